"""A model without a price is an alert, never silently $0: at start-up and on each policy reload, the
deployments that would be charged nothing without saying so (gateway.policy.rates.unpriced_in) get a
WARNING line naming each (model, backend) and `strait_deployment_unpriced{deployment}` = 1; every other
deployment of the policy in force reads 0 (a deployment a reload removed disappears)."""

from __future__ import annotations

import logging

from gateway.policy.model import PolicySet
from gateway.policy.rates import Unpriced, unpriced_in
from gateway.telemetry import Metrics

log = logging.getLogger("strait.accounting")


def report_unpriced(policy: PolicySet, metrics: Metrics) -> list[Unpriced]:
    """Log and gauge the unpriced deployments of `policy` (the one now in force); returns them."""
    unpriced = unpriced_in(policy)
    flagged = {u.deployment for u in unpriced}
    gauge = metrics.deployment_unpriced
    # Set, then the series of deployments the policy no longer has removed (never cleared first): the
    # reloader calls this in a worker thread, and a scrape in between must not find the gauge empty.
    shown = {s.labels["deployment"] for family in gauge.collect() for s in family.samples}
    wanted: set[str] = set()
    for m in policy.models:
        for d in m.deployments:
            label = f"{m.name}@{d.backend}"
            wanted.add(label)
            gauge.labels(label).set(1 if label in flagged else 0)
    for label in shown - wanted:
        gauge.remove(label)
    if unpriced:
        # One line for them all: the process's warnings are rate-limited per call site (gateway.logs).
        log.warning(
            "%d deployment(s) without a price, their usage charged $0: %s. Give each a price in the policy, "
            "or `price: {free: true}` when it is free on purpose",
            len(unpriced),
            "; ".join(f"model {u.model!r} on backend {u.backend!r}" for u in unpriced),
        )
    return unpriced
