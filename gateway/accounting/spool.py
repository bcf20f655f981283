"""A bounded on-disk spool per replica: usage records wait here while the ledger is unreachable.

Records are appended as JSON lines to a file named for this process; replay reads whole files,
writes them to the ledger (idempotent, so a replay after a partial write counts each record once)
and deletes a file only after the ledger accepted all of it. When the spool is full, new records
are dropped and counted, never blocking requests.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path

import msgspec

from gateway.accounting.records import UsageRecord

_encode = msgspec.json.Encoder()
_decode_line = msgspec.json.Decoder(UsageRecord)


class Spool:
    def __init__(self, directory: Path, *, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.dropped = 0
        self._name = f"spool-{os.getpid()}-{secrets.token_hex(4)}"
        self._seq = 0

    def size(self) -> int:
        return sum(p.stat().st_size for p in self._files())

    def pending(self) -> bool:
        return bool(self._files())

    def _files(self) -> list[Path]:
        if not self.directory.exists():
            return []
        return sorted(self.directory.glob("spool-*.jsonl"))

    def append(self, records: Sequence[UsageRecord]) -> int:
        """Spool `records` in a new file (fsynced); returns how many were kept."""
        if not records:
            return 0
        data = b"".join(_encode.encode(r) + b"\n" for r in records)
        if self.size() + len(data) > self.max_bytes:
            self.dropped += len(records)
            return 0
        self.directory.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        path = self.directory / f"{self._name}-{self._seq:08d}.jsonl"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(path)  # a crash mid-write leaves only a .tmp, never half a batch to replay
        return len(records)

    def batches(self) -> list[tuple[Path, list[UsageRecord]]]:
        out = []
        for path in self._files():
            records = []
            for line in path.read_bytes().splitlines():
                if line.strip():
                    try:
                        records.append(_decode_line.decode(line))
                    except msgspec.DecodeError:
                        continue
            out.append((path, records))
        return out

    @staticmethod
    def done(path: Path) -> None:
        path.unlink(missing_ok=True)
