"""A minimal instance of a JSON schema, for the simulated backend's structured output (`response_format`
json_schema): what a model constrained by the schema would at least have to produce.

Supported subset (what OpenAI's structured outputs and pydantic's `model_json_schema` emit): `type`
(one or a list; `null` chosen last), `enum`, `const`, `properties` (every one is filled: strict mode
requires them all) and `required`, `items` and `prefixItems` with `minItems`/`maxItems`, `minLength`/
`maxLength` and common string `format`s, `minimum`/`maximum` and their exclusive forms and `multipleOf`
for numbers, `anyOf`/`oneOf` (the first branch), `allOf` (merged), and local `$ref`s (`#/$defs/X`).
Anything outside it (`pattern`, `not`, conditionals) is ignored: the instance may then not validate.
"""

from __future__ import annotations

import math
from typing import Any

_TEXT = "simulated"
_FORMATS = {
    "date-time": "2026-01-01T00:00:00Z",
    "date": "2026-01-01",
    "time": "00:00:00Z",
    "email": "simulated@example.com",
    "uri": "https://example.com/simulated",
    "uuid": "00000000-0000-4000-8000-000000000000",
}
# A `$ref` cycle (a recursive model) is followed this deep, then the smallest value of the type is used.
_MAX_DEPTH = 32


def instance(schema: Any) -> Any:
    """A value that validates against `schema` (within the supported subset)."""
    return _Builder(schema).build(schema, 0)


class _Builder:
    def __init__(self, root: Any) -> None:
        self.root = root

    def build(self, schema: Any, depth: int) -> Any:
        if not isinstance(schema, dict):
            return _TEXT  # `true` or `{}`-like: anything goes
        if depth > _MAX_DEPTH:
            return _smallest(schema)
        ref = schema.get("$ref")
        if isinstance(ref, str):
            target = self._resolve(ref)
            if target is not None:
                return self.build({**target, **{k: v for k, v in schema.items() if k != "$ref"}}, depth + 1)
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return enum[0]
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches:
                rest = {k: v for k, v in schema.items() if k != key}
                return self.build(_merge(rest, branches[0]), depth + 1)
        every = schema.get("allOf")
        if isinstance(every, list) and every:
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for part in every:
                merged = _merge(merged, self._resolve(part["$ref"]) if _is_ref(part) else part)
            return self.build(merged, depth + 1)
        kind = _type_of(schema)
        if kind == "object":
            props = schema.get("properties")
            out = {k: self.build(v, depth + 1) for k, v in props.items()} if isinstance(props, dict) else {}
            for name in schema.get("required") or ():
                out.setdefault(name, _TEXT)
            return out
        if kind == "array":
            return self._array(schema, depth)
        if kind == "string":
            return _string(schema)
        if kind in ("integer", "number"):
            return _number(schema, integer=kind == "integer")
        if kind == "boolean":
            return True
        return None

    def _array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        prefix = schema.get("prefixItems")
        prefix = prefix if isinstance(prefix, list) else []
        items = schema.get("items")
        low = schema.get("minItems", 0)
        high = schema.get("maxItems")
        count = max(low, len(prefix), 0 if schema.get("uniqueItems") else 1)
        if isinstance(high, int):
            count = min(count, high)
        out = [self.build(s, depth + 1) for s in prefix[:count]]
        out += [self.build(items if items is not None else {}, depth + 1) for _ in range(count - len(out))]
        return out

    def _resolve(self, ref: str) -> dict[str, Any] | None:
        if not ref.startswith("#"):
            return None  # a remote schema: never fetched
        node: Any = self.root
        for part in ref[1:].split("/")[1:] if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node if isinstance(node, dict) else None


def _is_ref(schema: Any) -> bool:
    return isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and len(schema) == 1


def _merge(base: dict[str, Any], extra: Any) -> dict[str, Any]:
    if not isinstance(extra, dict):
        return base
    out = {**base, **extra}
    if isinstance(base.get("properties"), dict) and isinstance(extra.get("properties"), dict):
        out["properties"] = {**base["properties"], **extra["properties"]}
    if base.get("required") and extra.get("required"):
        out["required"] = [*base["required"], *extra["required"]]
    return out


def _type_of(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        chosen = [k for k in kind if k != "null"]
        return chosen[0] if chosen else "null"
    if isinstance(kind, str):
        return kind
    if "properties" in schema or "required" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return "string"


def _smallest(schema: dict[str, Any]) -> Any:
    kind = _type_of(schema)
    return {"object": {}, "array": [], "integer": 0, "number": 0, "boolean": False, "null": None}.get(kind, "")


def _string(schema: dict[str, Any]) -> str:
    text = _FORMATS.get(schema.get("format", ""), _TEXT)
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    if len(text) < low:
        text += "x" * (low - len(text))
    if isinstance(high, int) and len(text) > high:
        text = text[:high]
    return text


def _number(schema: dict[str, Any], *, integer: bool) -> int | float:
    low, high = schema.get("minimum"), schema.get("maximum")
    xlow, xhigh = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    step = schema.get("multipleOf")

    def fits(v: float) -> bool:
        return (
            (low is None or v >= low)
            and (high is None or v <= high)
            and (xlow is None or v > xlow)
            and (xhigh is None or v < xhigh)
            and (not step or math.isclose(v / step, round(v / step), abs_tol=1e-9))
        )

    floor = max((b for b in (low, xlow) if b is not None), default=None)
    ceiling = min((b for b in (high, xhigh) if b is not None), default=None)
    candidates: list[float] = [0]
    if floor is not None:
        candidates += [floor, math.ceil(floor), math.floor(floor) + 1]
        if step:
            candidates.append(math.ceil(floor / step) * step)
            candidates.append((math.floor(floor / step) + 1) * step)
    if ceiling is not None:
        candidates += [ceiling, math.floor(ceiling), math.ceil(ceiling) - 1]
        if step:
            candidates.append(math.floor(ceiling / step) * step)
    if floor is not None and ceiling is not None:
        candidates.append((floor + ceiling) / 2)
    for value in candidates:
        if integer and not float(value).is_integer():
            continue
        if fits(value):
            return int(value) if integer else value
    return int(floor or 0) if integer else (floor or 0)
