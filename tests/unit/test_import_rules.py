"""ARCHITECTURE.md's import rule, enforced: imports run downhill (api -> pipeline -> stages -> policy,
upstream, state, accounting). Nothing below the edge imports `gateway.api`, the pipeline imports no
stage, so a stage can always be built and tested without the HTTP layer, and the policy engine imports
no stage and no I/O (state, upstream, accounting), so it stays pure and replayable offline."""

from __future__ import annotations

import ast
import subprocess
import sys
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
    "canonical.py",
    "passthrough.py",
    "tokens.py",
    "inflight.py",
)


# What the policy layer must never import: a stage, or anything doing I/O.
POLICY_FORBIDS = ("gateway.stages", "gateway.state", "gateway.upstream", "gateway.accounting", "gateway.api")


def imported(path: Path, package: str | None = None) -> set[str]:
    """Every module `path` imports, at the top or inside a function (a lazy import is still a dependency);
    `from gateway import stages` counts as importing `gateway.stages`, a relative import as its absolute
    (`package`: the file's package, by default from its place under gateway/)."""
    names: set[str] = set()
    if package is None:
        package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join([*base, module] if module else base)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def files_below_api() -> list[Path]:
    files = [p for d in BELOW_API for p in sorted((PACKAGE / d).rglob("*.py"))]
    return files + [PACKAGE / m for m in BELOW_API_MODULES]


@pytest.mark.parametrize("path", files_below_api(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_nothing_below_the_edge_imports_the_api(path: Path) -> None:
    uphill = sorted(m for m in imported(path) if _under(m, ("gateway.api",)))
    assert not uphill, f"{path.relative_to(PACKAGE)} imports {uphill} (imports must run downhill)"


def test_the_pipeline_imports_no_stage() -> None:
    uphill = sorted(m for m in imported(PACKAGE / "pipeline.py") if m.startswith(("gateway.stages", "gateway.api")))
    assert not uphill


@pytest.mark.parametrize("path", sorted((PACKAGE / "policy").rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_policy_imports_no_stage_and_no_io(path: Path) -> None:
    uphill = sorted(m for m in imported(path) if _under(m, POLICY_FORBIDS))
    assert not uphill, f"{path.relative_to(PACKAGE)} imports {uphill} (the policy engine imports no stage and no I/O)"


@pytest.mark.parametrize(
    "source",
    [
        "from gateway.stages.limits import LimitsStage\n",
        "def f():\n    from gateway.state.base import StoreConfigError\n",
        "def f():\n    import gateway.upstream.signals\n",
        "from gateway import accounting\n",
        "class C:\n    def m(self):\n        from ..stages import route\n",
    ],
)
def test_the_walk_sees_every_kind_of_import(tmp_path: Path, source: str) -> None:
    """The rule's own check: top-level, lazy (inside a function or method), `from gateway import x`
    and relative imports are all seen (a check that missed them would pass vacuously)."""
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    assert any(_under(m, POLICY_FORBIDS) for m in imported(probe, package="gateway.policy")), source


def test_importing_the_policy_loads_no_stage_and_no_io_module_transitively() -> None:
    """The ast rule sees direct imports; this sees what actually gets loaded (through contracts, errors,
    tokens, registry ...) when the whole policy package is imported in a fresh interpreter."""
    modules = sorted(p.stem for p in (PACKAGE / "policy").glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module('gateway.policy.' + m)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    loaded = [m for m in out.stdout.split() if _under(m, POLICY_FORBIDS)]
    assert "gateway.policy.engine" in out.stdout.split()
    assert not loaded, f"importing gateway.policy loads {loaded}"
