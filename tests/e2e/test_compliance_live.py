"""Compliance v2 through a running gateway and the official openai SDK: a replica in region eu-west
(STRAIT_REGION) serves a tenant that requires EU ingress and refuses one that requires US ingress; the
refusal codes a client sees (ingress_region_not_allowed, policy_widening_refused, no_compliant_candidate,
capability_missing) come in OpenAI's envelope; an EEA tenant may narrow to the EU."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from gateway.policy.index import key_digest
from tests.e2e.conftest import Ledger
from tests.harness.gateway import gateway_process
from tests.harness.procs import ServerProcess

EEA_KEY = "sk-eea-tenant-0001"
US_KEY = "sk-us-ingress-0002"

POLICY = """
version: 1
operators:
  - {{name: Platform, headquarters: DE}}
  - {{name: BigCloud, headquarters: US}}
backends:
  - name: eu-gpu
    adapter: openai
    base_url: "{fake}/v1"
    tier: self-hosted
    hosting: {{operator: Platform, jurisdiction: EU, region: eu-west, retention_days: 0, trains_on_data: false}}
    hardware: {{chip: H100, count: 8, memory_gb: 80}}
  - name: us-api
    adapter: openai
    base_url: "{fake}/v1"
    hosting: {{operator: BigCloud, jurisdiction: US, region: us-east}}
models:
  - name: open-eu
    origin: {{developer: Mistral AI, country: FR}}
    deployments: [{{backend: eu-gpu, upstream_model: eu-model}}]
  - name: frontier
    origin: {{developer: BigLab, country: US}}
    capabilities: [chat, vision]
    deployments: [{{backend: us-api, upstream_model: us-model}}]
routes:
  - {{name: chat, models: [frontier, open-eu], objective: ordered, prefer: {{ingress_region: true}}}}
tenants:
  - name: eea
    keys: [{{id: eea-1, digest: "{eea}"}}]
    compliance:
      required_ingress_regions: [eu-west, eu-central]
      allowed_jurisdictions: [EEA]
      allowed_operator_countries: [EEA]
      no_training: true
  - name: us-only
    keys: [{{id: us-1, digest: "{us}"}}]
    compliance: {{required_ingress_regions: [us-east]}}
"""


@pytest.fixture(scope="module")
def eu_replica(fake_upstream: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("compliance-gw")
    policy = folder / "policy.yaml"
    policy.write_text(POLICY.format(fake=fake_upstream.base_url, eea=key_digest(EEA_KEY), us=key_digest(US_KEY)))
    env = {"STRAIT_REGION": "eu-west", "STRAIT_SPOOL_DIR": str(folder / "spool")}
    with gateway_process(policy, log_path=folder / "gateway.log", env=env) as gw:
        yield gw


def _client(gw: ServerProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url + "/v1", api_key=key, max_retries=0)


def _ask(client: openai.OpenAI, **extra: object) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=2,
        **extra,  # type: ignore[call-overload]
    )


def test_ingress_region_is_required_per_tenant(eu_replica: ServerProcess, ledger: Ledger) -> None:
    before = ledger.count()
    raw = _client(eu_replica, EEA_KEY).chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "x"}], max_tokens=2
    )
    assert raw.headers["x-strait-deployment"] == "open-eu@eu-gpu"
    with pytest.raises(openai.PermissionDeniedError) as info:
        _ask(_client(eu_replica, US_KEY))
    assert info.value.code == "ingress_region_not_allowed"
    assert "'eu-west'" in info.value.message and "['us-east']" in info.value.message
    assert ledger.count() == before + 1  # the refused request reached no upstream


def test_refusal_codes_say_which_stage_left_nothing(eu_replica: ServerProcess, ledger: Ledger) -> None:
    eea = _client(eu_replica, EEA_KEY)
    before = ledger.count()
    with pytest.raises(openai.PermissionDeniedError) as widening:
        _ask(eea, extra_body={"strait": {"jurisdictions": ["US"]}})
    assert widening.value.code == "policy_widening_refused"
    with pytest.raises(openai.PermissionDeniedError) as none_left:
        _ask(eea, extra_body={"strait": {"jurisdictions": ["NO"]}})
    assert none_left.value.code == "no_compliant_candidate"
    assert "frontier@us-api: hosting jurisdiction US" in none_left.value.message
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with pytest.raises(openai.BadRequestError) as missing:
        eea.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": [{"type": "text", "text": "x"}, image]}], max_tokens=2
        )
    assert missing.value.code == "capability_missing"
    assert ledger.count() == before
    # Narrowing an EEA tenant to the EU bloc (contained) is served.
    assert _ask(eea, extra_body={"strait": {"jurisdictions": ["EU"]}}).choices
