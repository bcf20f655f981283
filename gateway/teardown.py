"""Freeing a replaced policy runtime in small steps on the event loop, not in one cascade.

Dropping the last reference to an S=50 runtime frees millions of objects in one uninterruptible
deallocation (60-80 ms of CPU, a stall of every request; in a thread it would hold the GIL just the same).
`dismantle` takes the runtime over instead and frees it a few hundred objects per loop turn: an object only
it holds (`sys.getrefcount`: no request, stage or other runtime can see it) is opened up, its children
kept on a work list and the object itself dropped (cheap: its children are still held); anything else is
simply let go (a decref; whoever still holds it frees it later). Nothing is ever mutated, so a request
that still holds a part of the runtime sees it whole; the reloader starts only once no request started on
the runtime is running (`Runtime.held`), so the parts are ours.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

# Objects let go per loop turn: a few hundred small ones free in well under a millisecond.
CHUNK = 300
# Objects (a __dict__, slots or msgspec fields) and containers are opened up to this depth below the
# runtime; deeper ones are small (a tenant, a target) and freed whole, unless they are containers of more
# than OPEN_LEN items. Opening everything would cost a microsecond or so per object: seconds of CPU.
OPEN_DEPTH = 4
OPEN_LEN = 32
# sys.getrefcount of an object held only by one local variable (the variable and the call's argument).
_ONLY_OURS = 2


def _children(obj: object, depth: int) -> list[object] | None:
    """What `obj` references, when it is worth opening up; None: free it whole."""
    if isinstance(obj, dict):
        return list(obj.values()) if obj and (len(obj) > OPEN_LEN or depth < OPEN_DEPTH) else None
    if isinstance(obj, (list, tuple, set, frozenset)):
        return list(obj) if obj and (len(obj) > OPEN_LEN or depth < OPEN_DEPTH) else None
    if isinstance(obj, (str, bytes, int, float)) or depth >= OPEN_DEPTH:
        return None
    out: list[object] = []
    attrs = getattr(obj, "__dict__", None)
    if isinstance(attrs, dict):
        out.extend(attrs.values())
    names = getattr(type(obj), "__struct_fields__", None) or ()
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        names = (*names, *((slots,) if isinstance(slots, str) else slots))
    for name in names:
        if name in ("__dict__", "__weakref__"):
            continue
        try:
            value = getattr(obj, name)
        except AttributeError:  # an unset slot: nothing to free
            continue
        if value is not None:
            out.append(value)
    return out or None


async def dismantle(box: list[Any], chunk: int = CHUNK, on_step: Callable[[int], None] | None = None) -> int:
    """Free what `box` holds (the caller hands its only reference over in it and keeps none), `chunk`
    objects per loop turn. `on_step(n)` is told how many objects each turn let go. Returns the total."""
    work: list[tuple[list[object], int]] = [(box, 0)]
    total = 0
    while work:
        done = 0
        while work and done < chunk:
            items, depth = work[-1]
            if not items:
                work.pop()
                continue
            item = items.pop()
            done += 1
            if sys.getrefcount(item) == _ONLY_OURS:
                children = _children(item, depth)
                if children is not None:
                    work.append((children, depth + 1))
            del item
        total += done
        if on_step is not None:
            on_step(done)
        await asyncio.sleep(0)
    return total
