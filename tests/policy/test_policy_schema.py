"""`policies/schema.json` is generated reproducibly (byte for byte what `strait policy schema` prints) and
describes every key the shipped policies use, so editors complete and validate what the docs teach."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.__main__ import main
from gateway.policy.tools import schema

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "policies"


def test_committed_schema_is_byte_for_byte_what_the_command_prints(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "schema"]) == 0
    printed = capsys.readouterr().out
    assert printed == (POLICIES / "schema.json").read_text(encoding="utf-8"), (
        "policies/schema.json is stale: run `make schema` (strait policy schema > policies/schema.json)"
    )


def test_the_schema_does_not_depend_on_which_annotations_a_process_evaluated_first() -> None:
    """`typing` caches `Annotated[float, Meta(le=1.0)]` and hands it out for `Annotated[float, Meta(le=1)]`
    (equal Metas): a process that evaluated the embedder spec's bounds first once printed `1.0` where the
    committed schema says `1` (seen as an order-dependent CI failure)."""
    import subprocess
    import sys

    script = (
        "import typing\n"
        "from gateway.cache.embedders import spec\n"
        "typing.get_type_hints(spec.EmbedderSpec, include_extras=True)\n"
        "import msgspec\n"
        "msgspec.json.schema(spec.EmbedderSpec)\n"
        "from gateway.__main__ import main\n"
        "main(['policy', 'schema'])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == (POLICIES / "schema.json").read_text(encoding="utf-8")


def test_generating_twice_gives_the_same_text() -> None:
    assert json.dumps(schema(), indent=2, sort_keys=True) == json.dumps(schema(), indent=2, sort_keys=True)


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> list[dict[str, Any]]:
    """The object schemas a node may be (through $ref and anyOf)."""
    if "$ref" in node:
        return _resolve(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
    if "anyOf" in node:
        return [s for option in node["anyOf"] for s in _resolve(option, defs)]
    return [node]


def _unknown_keys(data: Any, node: dict[str, Any], defs: dict[str, Any], path: str) -> list[str]:
    options = _resolve(node, defs)
    if isinstance(data, dict):
        objects = [o for o in options if o.get("type") == "object"]
        if not objects:
            return [f"{path}: a mapping where the schema has none"]
        out = []
        for key, value in data.items():
            homes = [o["properties"][key] for o in objects if key in o.get("properties", {})]
            homes += [o["additionalProperties"] for o in objects if isinstance(o.get("additionalProperties"), dict)]
            if not homes:
                out.append(f"{path}.{key}")
            else:
                out += _unknown_keys(value, homes[0], defs, f"{path}.{key}")
        return out
    if isinstance(data, list):
        arrays = [o for o in options if o.get("type") == "array" and isinstance(o.get("items"), dict)]
        return (
            [k for i, item in enumerate(data) for k in _unknown_keys(item, arrays[0]["items"], defs, f"{path}[{i}]")]
            if arrays
            else []
        )
    return []


@pytest.mark.parametrize("name", sorted(p.name for p in POLICIES.glob("*.yaml")))
def test_every_key_of_a_shipped_policy_is_in_the_schema(name: str) -> None:
    doc = schema()
    data = yaml.safe_load((POLICIES / name).read_text())
    assert _unknown_keys(data, doc, doc["$defs"], "$") == []


def test_the_schema_walk_finds_a_misspelt_key() -> None:
    doc = schema()
    assert _unknown_keys({"backends": [{"name": "a", "adapter": "x", "teir": "edge"}]}, doc, doc["$defs"], "$") == [
        "$.backends[0].teir"
    ]
