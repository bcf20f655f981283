"""The simulated backend's structured output: a minimal instance of any schema in the supported subset
validates against it (checked by a small validator of that subset, and by pydantic for its own schemas)."""

from __future__ import annotations

import enum
import math
from typing import Any, Literal

import pydantic
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.schema_instance import instance

# ---- a validator of the supported subset (no jsonschema in the lock) ----


def _resolve(root: dict[str, Any], ref: str) -> Any:
    node: Any = root
    for part in ref.lstrip("#").strip("/").split("/"):
        node = node[part]
    return node


def errors(value: Any, schema: Any, root: Any, where: str = "$") -> list[str]:
    if not isinstance(schema, dict):
        return []
    out: list[str] = []
    if "$ref" in schema:
        out += errors(value, _resolve(root, schema["$ref"]), root, where)
    if "const" in schema and value != schema["const"]:
        out.append(f"{where}: not the const")
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{where}: not in the enum")
    if "anyOf" in schema and all(errors(value, s, root, where) for s in schema["anyOf"]):
        out.append(f"{where}: no anyOf branch")
    for part in schema.get("allOf", ()):
        out += errors(value, part, root, where)
    kinds = schema.get("type")
    if kinds is not None:
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if not any(_is(value, k) for k in kinds):
            return [*out, f"{where}: {value!r} is not {kinds}"]
    if isinstance(value, dict):
        props = schema.get("properties", {})
        out += [f"{where}: missing {k}" for k in schema.get("required", ()) if k not in value]
        for k, v in value.items():
            if k in props:
                out += errors(v, props[k], root, f"{where}.{k}")
            elif schema.get("additionalProperties") is False:
                out.append(f"{where}: extra {k}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", math.inf):
            out.append(f"{where}: {len(value)} items")
        for i, item in enumerate(value):
            out += errors(item, schema.get("items", {}), root, f"{where}[{i}]")
    if isinstance(value, str) and not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", math.inf):
        out.append(f"{where}: length {len(value)}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < schema.get("minimum", -math.inf) or value > schema.get("maximum", math.inf):
            out.append(f"{where}: {value} out of range")
        if value <= schema.get("exclusiveMinimum", -math.inf) or value >= schema.get("exclusiveMaximum", math.inf):
            out.append(f"{where}: {value} out of the exclusive range")
    return out


def _is(value: Any, kind: str) -> bool:
    return {
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "null": value is None,
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
    }[kind]


# ---- schemas in the supported subset ----

names = st.text("abcdefghij_", min_size=1, max_size=6)
scalars = st.none() | st.booleans() | st.integers(-50, 50) | names


@st.composite
def bounded_numbers(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["integer", "number"]))
    low = draw(st.integers(-1000, 1000))
    high = low + draw(st.integers(2, 1000))
    schema: dict[str, Any] = {"type": kind}
    if draw(st.booleans()):
        schema["exclusiveMinimum" if draw(st.booleans()) else "minimum"] = low
    if draw(st.booleans()):
        schema["exclusiveMaximum" if draw(st.booleans()) else "maximum"] = high
    return schema


@st.composite
def strings(draw: st.DrawFn) -> dict[str, Any]:
    low = draw(st.integers(0, 20))
    schema: dict[str, Any] = {"type": "string", "minLength": low}
    if draw(st.booleans()):
        schema["maxLength"] = low + draw(st.integers(0, 5))
    return schema


leaves = (
    strings()
    | bounded_numbers()
    | st.sampled_from([{"type": "boolean"}, {"type": "null"}, {"type": ["string", "null"]}, {}])
    | st.lists(scalars, min_size=1, max_size=4).map(lambda e: {"enum": e})
    | scalars.map(lambda c: {"const": c})
)


@st.composite
def objects(draw: st.DrawFn, inner: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    props = draw(st.dictionaries(names, inner, max_size=4))
    required = draw(st.lists(st.sampled_from(sorted(props)), unique=True)) if props else []
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


@st.composite
def arrays(draw: st.DrawFn, inner: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    low = draw(st.integers(0, 3))
    schema: dict[str, Any] = {"type": "array", "items": draw(inner), "minItems": low}
    if draw(st.booleans()):
        schema["maxItems"] = low + draw(st.integers(0, 2))
    return schema


schemas = st.recursive(
    leaves,
    lambda inner: objects(inner) | arrays(inner) | st.lists(inner, min_size=1, max_size=3).map(lambda b: {"anyOf": b}),
    max_leaves=12,
)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """A schema, sometimes behind a `$ref` to `$defs` (as pydantic writes nested models)."""
    schema = draw(schemas)
    if draw(st.booleans()):
        return {"$defs": {"Inner": schema}, "type": "object", "properties": {"x": {"$ref": "#/$defs/Inner"}}}
    return schema


@settings(max_examples=400, deadline=None)
@given(schema=documents())
def test_the_instance_validates_against_any_schema_of_the_subset(schema: dict[str, Any]) -> None:
    value = instance(schema)
    assert errors(value, schema, schema) == []


# ---- pydantic's own schemas, as `client.chat.completions.parse` sends them ----


class Colour(enum.Enum):
    RED = "red"
    GREEN = "green"


class Step(pydantic.BaseModel):
    explanation: str = pydantic.Field(min_length=20)
    output: int = pydantic.Field(gt=3, le=9)


class Reasoning(pydantic.BaseModel):
    steps: list[Step] = pydantic.Field(min_length=2)
    colour: Colour
    mode: Literal["fast", "slow"]
    note: str | None
    ratio: float = pydantic.Field(ge=0.5, lt=0.75)
    tags: dict[str, int]
    nested: Step | None = None


def test_the_instance_of_a_pydantic_schema_parses_as_the_model() -> None:
    parsed = Reasoning.model_validate(instance(Reasoning.model_json_schema()))
    assert len(parsed.steps) == 2 and parsed.steps[0].output > 3 and len(parsed.steps[0].explanation) >= 20
    assert parsed.colour is Colour.RED and parsed.mode == "fast" and 0.5 <= parsed.ratio < 0.75


def test_the_validator_refuses_what_breaks_each_keyword() -> None:
    """The property above is only as strong as this validator: each keyword it checks can fail."""
    obj = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 2}}, "required": ["a"]}
    cases: list[tuple[Any, dict[str, Any]]] = [
        (5, {"type": "string"}),
        ("x", {"enum": ["y"]}),
        ("x", {"const": "y"}),
        ({}, obj),
        ({"a": 1}, obj),
        ({"a": 2, "b": 1}, {**obj, "additionalProperties": False}),
        ([], {"type": "array", "minItems": 1}),
        ([1, 2], {"type": "array", "maxItems": 1}),
        (["x"], {"type": "array", "items": {"type": "integer"}}),
        ("ab", {"type": "string", "minLength": 3}),
        (3, {"type": "integer", "exclusiveMaximum": 3}),
        (True, {"type": "integer"}),
        (1, {"anyOf": [{"type": "string"}, {"type": "null"}]}),
        (1, {"$defs": {"S": {"type": "string"}}, "$ref": "#/$defs/S"}),
    ]
    for value, schema in cases:
        assert errors(value, schema, schema), (value, schema)
