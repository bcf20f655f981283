"""JSON Schema (what OpenAI and Anthropic clients write for tool parameters and structured output) as
Gemini's `Schema`, the OpenAPI 3.0 subset `functionDeclarations[].parameters` and
`generationConfig.responseSchema` accept.

What Gemini's Schema has is kept; what maps exactly is converted (`["string", "null"]` and
`anyOf: [X, {"type": "null"}]` to `nullable`, `const` to a one-value `enum`, `oneOf` to `anyOf`,
local `$ref`s inlined, `examples` to `example`); annotations that do not change which values are valid
are dropped (`$schema`, `$id`, `$comment`, `deprecated`, `readOnly`, `writeOnly`, `additionalProperties`
as a boolean: Gemini never adds undeclared keys, a `format` Gemini does not know). Everything else
(`allOf`, `not`, conditionals, `patternProperties`, a map's `additionalProperties` schema, tuples,
non-string enums, `multipleOf`, exclusive bounds, recursion...) would be silently weakened, so it is
refused with `SchemaNotExpressible` naming the keyword and where it stands.
"""

from __future__ import annotations

from typing import Any, Final

# Gemini's Schema fields, taken as they are (values checked where they hold a schema).
_KEPT: Final = frozenset(
    {
        "description",
        "title",
        "default",
        "example",
        "minItems",
        "maxItems",
        "minProperties",
        "maxProperties",
        "minLength",
        "maxLength",
        "pattern",
        "minimum",
        "maximum",
        "required",
        "propertyOrdering",
        "nullable",
    }
)
# Annotations with no effect on which values are valid: dropped.
_DROPPED: Final = frozenset({"$schema", "$id", "$comment", "deprecated", "readOnly", "writeOnly", "strict"})
_TYPES: Final = {
    "string": "STRING",
    "number": "NUMBER",
    "integer": "INTEGER",
    "boolean": "BOOLEAN",
    "array": "ARRAY",
    "object": "OBJECT",
}
# The formats Gemini accepts per type; any other is a hint it would refuse, dropped.
_FORMATS: Final = {
    "STRING": frozenset({"enum", "date-time"}),
    "INTEGER": frozenset({"int32", "int64"}),
    "NUMBER": frozenset({"float", "double"}),
}
MAX_DEPTH: Final = 32  # nesting of schemas inside schemas ($ref expansion included)


class SchemaNotExpressible(ValueError):
    """The JSON Schema says something Gemini's Schema cannot: the message names the keyword and path."""


def to_gemini(schema: Any, where: str) -> dict[str, Any]:
    """Gemini's Schema for a JSON Schema object (`where` names it in errors: "tool 'get_weather'")."""
    if not isinstance(schema, dict):
        raise SchemaNotExpressible(f"{where}: the schema must be a JSON object")
    defs: dict[str, Any] = {}
    for key in ("$defs", "definitions"):
        found = schema.get(key)
        if isinstance(found, dict):
            defs.update({f"#/{key}/{name}": value for name, value in found.items()})
    return _Converter(defs, where).convert(schema, "", 0, ())


class _Converter:
    def __init__(self, defs: dict[str, Any], where: str) -> None:
        self.defs = defs
        self.where = where

    def refuse(self, path: str, why: str) -> SchemaNotExpressible:
        at = path or "the top level"
        return SchemaNotExpressible(
            f"{self.where}: {why} at {at}, which Gemini's function/response schemas cannot express"
        )

    def convert(self, schema: Any, path: str, depth: int, refs: tuple[str, ...]) -> dict[str, Any]:
        if depth > MAX_DEPTH:
            raise self.refuse(path, f"nesting deeper than {MAX_DEPTH}")
        if schema is True or schema == {}:
            raise self.refuse(path, "a schema that allows any value")
        if not isinstance(schema, dict):
            raise self.refuse(path, "a schema that is not an object")
        ref = schema.get("$ref")
        if ref is not None:
            if not isinstance(ref, str) or ref not in self.defs:
                raise self.refuse(path, f"'$ref' {ref!r} (only local $defs/definitions are inlined)")
            if ref in refs:
                raise self.refuse(path, f"a recursive '$ref' {ref!r}")
            siblings = {k: v for k, v in schema.items() if k not in ("$ref", "$defs", "definitions")}
            target = self.defs[ref]
            if not isinstance(target, dict):
                raise self.refuse(path, f"'$ref' {ref!r} to a schema that is not an object")
            return self.convert({**target, **siblings}, path, depth + 1, (*refs, ref))
        out: dict[str, Any] = {}
        nullable = False
        for key, value in schema.items():
            here = f"{path}.{key}" if path else key
            if key in _KEPT:
                out[key] = value
            elif key in _DROPPED or key in ("$defs", "definitions"):
                continue
            elif key == "type":
                kind, nullable_type = self._type(value, here)
                if kind is not None:
                    out["type"] = kind
                nullable = nullable or nullable_type
            elif key == "format":
                continue  # decided once the type is known (below)
            elif key == "enum" or key == "const":
                values = value if key == "enum" else [value]
                if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                    raise self.refuse(here, f"'{key}' with values that are not strings")
                out["enum"] = values
            elif key == "examples":
                if isinstance(value, list) and value:
                    out.setdefault("example", value[0])
            elif key == "properties":
                if not isinstance(value, dict):
                    raise self.refuse(here, "'properties' that is not an object")
                out["properties"] = {
                    name: self.convert(sub, f"{here}.{name}", depth + 1, refs) for name, sub in value.items()
                }
            elif key == "items":
                if isinstance(value, list):
                    raise self.refuse(here, "a tuple ('items' as a list)")
                out["items"] = self.convert(value, here, depth + 1, refs)
            elif key in ("anyOf", "oneOf"):
                branches, null_branch = self._branches(value, here, depth, refs)
                nullable = nullable or null_branch
                if len(branches) == 1:
                    out.update({k: v for k, v in branches[0].items() if k not in out})
                else:
                    out["anyOf"] = branches
            elif key == "additionalProperties":
                if not isinstance(value, bool):
                    raise self.refuse(here, "'additionalProperties' as a schema (a map)")
            else:
                raise self.refuse(here, f"the keyword '{key}'")
        if "enum" in out and "type" not in out:
            out["type"] = "STRING"
        fmt = schema.get("format")
        if isinstance(fmt, str) and fmt in _FORMATS.get(out.get("type", ""), ()):
            out["format"] = fmt
        if "enum" in out and out.get("type") == "STRING":
            out["format"] = "enum"
        if nullable:
            out["nullable"] = True
        if "type" not in out and "anyOf" not in out:
            raise self.refuse(path, "a schema without a type")
        return out

    def _type(self, value: Any, here: str) -> tuple[str | None, bool]:
        names = value if isinstance(value, list) else [value]
        nullable = "null" in names
        rest = [n for n in names if n != "null"]
        if len(rest) > 1:
            raise self.refuse(here, f"a union of types {rest}")
        if not rest:
            raise self.refuse(here, "a value that can only be null")
        kind = _TYPES.get(rest[0]) if isinstance(rest[0], str) else None
        if kind is None:
            raise self.refuse(here, f"the type {rest[0]!r}")
        return kind, nullable

    def _branches(self, value: Any, here: str, depth: int, refs: tuple[str, ...]) -> tuple[list[dict[str, Any]], bool]:
        if not isinstance(value, list) or not value:
            raise self.refuse(here, "an empty or malformed union")
        null = False
        branches: list[dict[str, Any]] = []
        for i, branch in enumerate(value):
            if isinstance(branch, dict) and branch.get("type") == "null" and len(branch) == 1:
                null = True
                continue
            branches.append(self.convert(branch, f"{here}[{i}]", depth + 1, refs))
        if not branches:
            raise self.refuse(here, "a value that can only be null")
        return branches, null
