"""The policy side of capture: consent off by default, redactor names checked at load, a licence in
either spelling."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.policy.load import PolicyError, load_policy
from gateway.policy.model import BUILTIN_REDACTIONS, CaptureSettings, Licence, PolicySet
from gateway.settings import Settings

BASE = """
version: 1
backends: [{name: b, adapter: simulated}]
models:
  - {name: plain, licence: mit, deployments: [{backend: b, upstream_model: x}]}
  - {name: terms, licence: {name: vendor-terms, outputs_train: false}, deployments: [{backend: b, upstream_model: y}]}
  - {name: unknown, deployments: [{backend: b, upstream_model: z}]}
routes: [{name: r, models: [plain]}]
tenants:
  - name: t
"""


def load(tmp_path: Path, text: str) -> PolicySet:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return load_policy(path)


def test_capture_is_off_unless_a_tenant_consents(tmp_path: Path) -> None:
    policy = load(tmp_path, BASE)
    tenant = policy.tenants[0]
    assert tenant.capture == CaptureSettings() and tenant.capture.enabled is False
    assert tenant.capture.training is False and tenant.capture.redact == BUILTIN_REDACTIONS


def test_a_licence_reads_the_same_in_either_spelling(tmp_path: Path) -> None:
    models = {m.name: m for m in load(tmp_path, BASE).models}
    assert models["plain"].licence_terms == Licence(name="mit", outputs_train=None)
    assert models["terms"].licence_terms == Licence(name="vendor-terms", outputs_train=False)
    assert models["unknown"].licence_terms is None


def test_an_unknown_redactor_is_a_load_error(tmp_path: Path) -> None:
    text = BASE + "    capture: {enabled: true, redact: [email, presidio]}\n"
    with pytest.raises(PolicyError) as raised:
        load(tmp_path, text)
    assert "unknown redactor 'presidio'" in str(raised.value)
    # A plugin redactor (entry point strait.redactors) is known.
    ok = load(tmp_path, BASE + "    capture: {enabled: true, sample_rate: 0.5, redact: [email, long_numbers]}\n")
    assert ok.tenants[0].capture.redact == ("email", "long_numbers")


@pytest.mark.parametrize(
    "capture",
    [
        "{enabled: true, sample_rate: 1.5}",
        "{enabled: true, retention_days: 0}",
        "{enabled: true, include: [images]}",
        "{enabled: yes, typo: 1}",
    ],
)
def test_bad_capture_settings_are_refused(tmp_path: Path, capture: str) -> None:
    with pytest.raises(PolicyError):
        load(tmp_path, BASE + f"    capture: {capture}\n")


def test_strait_capture_names_the_store_or_is_refused() -> None:
    assert Settings.from_env({}).capture_url == "sqlite:///.strait/capture.db"
    assert (
        Settings.from_env({"STRAIT_SPOOL_DIR": "/var/lib/strait/spool"}).capture_url
        == "sqlite:////var/lib/strait/capture.db"
    )
    for url in ("off", "postgresql://strait:pw@db:5432/strait", "sqlite:///data/capture.db"):
        assert Settings.from_env({"STRAIT_CAPTURE": url}).capture_url == url
    for bad in ("mysql://root:hunter2@db/x", "sqlite:", "capture.db"):
        with pytest.raises(ValueError) as raised:
            Settings.from_env({"STRAIT_CAPTURE": bad})
        assert "hunter2" not in str(raised.value)  # a password in a URL is never echoed
