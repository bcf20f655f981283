"""Embedders are plugins (entry points `strait.embedders`): the shipped kinds are registered like any
third-party one, a policy naming a kind that is not installed is refused at its line, and a plugin's
factory gets the policy's spec."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway.cache.embedders import EmbedderSpec, open_embedder
from gateway.policy.load import check_policy
from gateway.registry import discover_embedders, embedder_kinds


class ToyEmbedder:
    id = "toy"
    version = "1"
    dims = 2

    def __init__(self, spec: EmbedderSpec) -> None:
        self.spec = spec

    async def embed(self, texts: Sequence[str]) -> Any:
        import numpy as np

        return np.ones((len(texts), 2), dtype=np.float32) / np.sqrt(2)

    async def warm(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def toy_factory(spec: EmbedderSpec, environ: Mapping[str, str]) -> ToyEmbedder:
    return ToyEmbedder(spec)


def test_the_shipped_kinds_are_entry_points() -> None:
    assert {"local", "remote"} <= embedder_kinds()
    factories = discover_embedders()
    assert callable(factories["local"]) and callable(factories["remote"])


def test_a_plugin_kind_is_built_from_the_policy_spec() -> None:
    spec = EmbedderSpec(name="mine", kind="toy", model="toy-v1", threshold=0.9)
    embedder = open_embedder(spec, factories={"toy": toy_factory})
    assert isinstance(embedder, ToyEmbedder) and embedder.spec is spec
    with pytest.raises(ValueError, match=r"unknown kind 'toy' \(installed: local, remote\)"):
        open_embedder(spec, factories={"local": toy_factory, "remote": toy_factory})


def test_a_policy_naming_a_kind_not_installed_is_refused_at_its_line(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\n"
        "cache:\n"
        "  embedders:\n"
        "    - name: mine\n"
        "      kind: toy\n"
        "backends: [{name: s, adapter: simulated}]\n"
        "models: [{name: m, deployments: [{backend: s, upstream_model: x}]}]\n"
        "routes: [{name: chat, models: [m]}]\n"
    )
    merged, problems = check_policy(policy)
    assert merged is None
    [problem] = [p for p in problems if "unknown kind" in str(p)]
    assert problem.line == 5
    assert "embedder 'mine': unknown kind 'toy' (installed: local, remote)" in str(problem)
