"""Whether a captured record may become training data for a target model: the tenant's consent and the
producing model's licence, each fail-closed (gateway.capture.export applies it; README "The learning loop").

- Consent: the record was captured under `capture.training: true`, and the tenant's policy in force
  still says so (consent withdrawn since is consent missing); a tenant no longer in the policy: no.
- Licence (the producing model's, as recorded when it answered): `outputs_train: true` lets its outputs
  train any model; `false` forbids training *other* models, so only a target of the producing model's own
  family passes (`licence_forbids_target` otherwise); unknown (a licence named without `outputs_train`,
  or none) is treated as `false` (`licence_unknown` for a target of another family).
- Family: a model's family is the root of its `base_model` chain in the policy (a LoRA of
  llama-3.1-8b-edge is of family llama-3.1-8b-edge); `--target` names a policy model (its family is
  used) or a family by name. A model no longer in the policy is its own family.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.capture.records import CaptureRecord
from gateway.policy.model import PolicySet


@dataclass(frozen=True, slots=True)
class PolicyView:
    """What eligibility reads of the policy in force: each model's family, each tenant's training consent."""

    version: str
    families: Mapping[str, str]
    training: Mapping[str, bool]

    def family(self, model: str) -> str:
        return self.families.get(model, model)


def policy_view(policy: PolicySet, version: str) -> PolicyView:
    bases = {m.name: m.base_model for m in policy.models}
    families: dict[str, str] = {}
    for name in bases:
        root, seen = name, {name}
        while (base := bases.get(root)) is not None and base not in seen:
            seen.add(base)
            root = base
        families[name] = root
    training = {t.name: t.capture.enabled and t.capture.training for t in policy.tenants}
    return PolicyView(version, families, training)


def consent_problem(record: CaptureRecord, view: PolicyView) -> str | None:
    if not record.consent_training:
        return "no_training_consent"
    if not view.training.get(record.tenant, False):
        return "training_consent_withdrawn"
    return None


def licence_problem(record: CaptureRecord, target_family: str, view: PolicyView) -> str | None:
    allowed = record.licence_outputs_train
    if allowed is True:
        return None
    if record.model is not None and view.family(record.model) == target_family:
        return None
    return "licence_unknown" if allowed is None else "licence_forbids_target"
