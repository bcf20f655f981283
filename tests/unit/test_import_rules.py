"""ARCHITECTURE.md's import rule, enforced: imports run downhill (api -> pipeline -> stages -> policy,
upstream, state, accounting). Nothing below the edge imports `gateway.api`, and the pipeline imports no
stage, so a stage can always be built and tested without the HTTP layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "gateway"
BELOW_API = ("stages", "upstream", "policy", "state", "accounting")
# Top-level modules below the edge (app.py and __main__.py wire everything and may import anything).
BELOW_API_MODULES = (
    "pipeline.py",
    "relay.py",
    "spans.py",
    "context.py",
    "contracts.py",
    "reply.py",
    "runtime.py",
    "errors.py",
)


def imported(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function (a lazy import is still a dependency)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def files_below_api() -> list[Path]:
    files = [p for d in BELOW_API for p in sorted((PACKAGE / d).rglob("*.py"))]
    return files + [PACKAGE / m for m in BELOW_API_MODULES]


@pytest.mark.parametrize("path", files_below_api(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_nothing_below_the_edge_imports_the_api(path: Path) -> None:
    uphill = sorted(m for m in imported(path) if m == "gateway.api" or m.startswith("gateway.api."))
    assert not uphill, f"{path.relative_to(PACKAGE)} imports {uphill} (imports must run downhill)"


def test_the_pipeline_imports_no_stage() -> None:
    uphill = sorted(m for m in imported(PACKAGE / "pipeline.py") if m.startswith(("gateway.stages", "gateway.api")))
    assert not uphill
