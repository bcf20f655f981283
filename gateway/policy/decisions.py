"""Recent decision tables kept for `GET /admin/decisions/{id}` (explain), bounded in memory per process."""

from __future__ import annotations

from collections import OrderedDict

from gateway.policy.engine import Decision


class DecisionLog:
    def __init__(self, capacity: int = 2048) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Decision] = OrderedDict()

    def put(self, decision: Decision) -> None:
        self._items[decision.id] = decision
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, decision_id: str) -> Decision | None:
        return self._items.get(decision_id)
