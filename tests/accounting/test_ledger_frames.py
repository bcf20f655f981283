"""The Redis ledger's EVALSHA for a batch is framed by hand (gateway.accounting.redis_ledger._command):
byte for byte what `pack` makes of the script's arguments (`_record_args`), whatever the record holds."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.accounting.records import UsageRecord
from gateway.accounting.redis_ledger import _command, _record_args
from gateway.state.scripts import pack

names = st.one_of(st.sampled_from(["chat", "m@fast", "k1", "", "é", "漢字", "a|b", "%"]), st.text(max_size=6))
counts = st.one_of(st.integers(0, 5000), st.integers(-(10**12), 10**15), st.sampled_from([0, 4095, 4096, -1]))
records = st.builds(
    UsageRecord,
    request_id=st.one_of(st.just("req_0123456789abcdef01234567"), st.text(max_size=8)),
    attempt=st.integers(1, 20),
    final=st.booleans(),
    ts_ms=st.integers(0, 2**45),
    tenant=names,
    key_id=names,
    route=names,
    model=names,
    deployment=names,
    backend=names,
    status=st.sampled_from([200, 429, 503]),
    prompt_tokens=counts,
    completion_tokens=counts,
    cached_tokens=counts,
    cache_write_tokens=counts,
    reasoning_tokens=counts,
    cost_micro_usd=counts,
    cache_hit=st.booleans(),
    tokens_saved=counts,
    client_request_id=st.one_of(st.none(), st.text(max_size=5)),
)


@given(st.lists(records, min_size=1, max_size=5), st.lists(names, min_size=1, max_size=3))
def test_a_batch_is_framed_as_pack_frames_its_arguments(batch: list[UsageRecord], keys: list[str]) -> None:
    fixed: list[int | str] = [8 * 24 * 3600, 400 * 24 * 3600, 1_000_000]
    args: list[int | str | bytes] = [*fixed]
    for r in batch:
        args += _record_args(r)
    sha = "0" * 40
    assert _command(sha, keys, fixed, batch) == pack(["EVALSHA", sha, len(keys), *keys, *args])
