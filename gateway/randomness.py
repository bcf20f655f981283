"""Unguessable random hex for identifiers, drawn from the OS's CSPRNG in blocks.

`secrets.token_hex(n)` is one `getrandom` system call per identifier; a request mints two (its id and its
decision id), about 1 % of a request's CPU. Here `os.urandom` fills a block of `_BLOCK` bytes at a time and
identifiers are sliced from it: the same source and the same unpredictability (every byte is handed out
once, never reused), one system call per few hundred identifiers. The block is per thread (a slice and an
index update are not atomic across threads), so a thread minting ids (the capture writer, a worker) never
shares bytes with the event loop.
"""

from __future__ import annotations

import os
import threading

_BLOCK = 4096


class _Pool(threading.local):
    def __init__(self) -> None:
        self.data = b""
        self.at = 0


_pool = _Pool()


def random_bytes(n: int) -> bytes:
    """`n` bytes from the OS's CSPRNG (as `os.urandom(n)`), each byte handed out once."""
    pool = _pool
    end = pool.at + n
    if end > len(pool.data):
        if n > _BLOCK:
            return os.urandom(n)
        pool.data = os.urandom(_BLOCK)
        pool.at, end = 0, n
    chunk = pool.data[pool.at : end]
    pool.at = end
    return chunk


def random_hex(n: int) -> str:
    """`2n` hex digits from `n` random bytes (as `secrets.token_hex(n)`)."""
    return random_bytes(n).hex()
