"""The auth stage's memo of known keys and the pooled CSPRNG behind request ids."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import randomness
from gateway.errors import AuthenticationFailed
from gateway.policy.index import PolicyIndex, key_digest
from gateway.policy.load import load_policy
from gateway.stages.auth import AuthStage

GOOD = "sk-auth-memo-good-0001"
OTHER = "sk-auth-memo-other-0002"


def _index(tmp_path: Path, *keys: str) -> PolicyIndex:
    lines = "\n".join(f'      - {{id: k{i}, digest: "{key_digest(k)}"}}' for i, k in enumerate(keys))
    path = tmp_path / f"p{len(keys)}.yaml"
    path.write_text(
        "version: 1\n"
        "backends:\n  - {name: sim, adapter: simulated}\n"
        "models:\n  - {name: m, deployments: [{backend: sim, upstream_model: s}]}\n"
        "routes:\n  - {name: chat, models: [m]}\n"
        f"tenants:\n  - name: acme\n    keys:\n{lines}\n"
    )
    return PolicyIndex(load_policy(path))


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_a_known_key_is_remembered_and_a_wrong_one_never(tmp_path: Path) -> None:
    stage = AuthStage(_index(tmp_path, GOOD))
    first = stage.authenticate(_bearer(GOOD))
    assert first.tenant == "acme" and stage.authenticate(_bearer(GOOD)) is first
    for i in range(50):
        with pytest.raises(AuthenticationFailed):
            stage.authenticate(_bearer(f"sk-wrong-{i}"))
    assert list(stage._known) == [GOOD]  # a flood of wrong keys adds nothing


def test_a_new_index_forgets_keys_it_no_longer_holds(tmp_path: Path) -> None:
    stage = AuthStage(_index(tmp_path, GOOD, OTHER))
    assert stage.authenticate(_bearer(GOOD)).key_id == "k0"
    stage.index = _index(tmp_path, OTHER)  # a reload revoked GOOD
    with pytest.raises(AuthenticationFailed):
        stage.authenticate(_bearer(GOOD))
    assert stage.authenticate(_bearer(OTHER)).key_id == "k0"


@given(st.lists(st.integers(min_value=0, max_value=5000), max_size=40))
def test_random_bytes_hand_out_the_os_stream_in_order_each_byte_once(sizes: list[int]) -> None:
    blocks: list[bytes] = []

    def fake_urandom(n: int) -> bytes:
        # Distinct, traceable bytes: block k holds k's number in every byte's high bits.
        out = bytes(((len(blocks) % 16) << 4) | (i % 16) for i in range(n))
        blocks.append(out)
        return out

    real = os.urandom
    os.urandom = fake_urandom
    randomness._pool.data, randomness._pool.at = b"", 0
    try:
        drawn = [randomness.random_bytes(n) for n in sizes]
    finally:
        os.urandom = real
        randomness._pool.data, randomness._pool.at = b"", 0
    # The model: each draw is the next unused slice of the current block, or of a fresh block when the
    # current one has too little left (its rest is never handed out), or a call of its own when larger
    # than a block. No byte of what the OS gave is handed out twice.
    expected: list[bytes] = []
    block, at, k = b"", 0, 0
    for n in sizes:
        if at + n > len(block):
            if n > randomness._BLOCK:
                expected.append(blocks[k])
                k += 1
                continue
            block, at = blocks[k], 0
            k += 1
        expected.append(block[at : at + n])
        at += n
    assert drawn == expected
    assert k == len(blocks)  # one OS call per block (or per oversized draw), no more


def test_threads_never_share_a_pool() -> None:
    seen: list[str] = []
    lock = threading.Lock()

    def mint() -> None:
        ids = [randomness.random_hex(12) for _ in range(2000)]
        with lock:
            seen.extend(ids)

    threads = [threading.Thread(target=mint) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 8000 and len(set(seen)) == 8000
    assert all(len(i) == 24 and int(i, 16) >= 0 for i in seen)
