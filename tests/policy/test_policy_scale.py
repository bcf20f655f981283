"""Policies at enterprise size: the loader and `policy check` do work per distinct compliance envelope,
not per tenant; the C-accelerated YAML parser keeps every file:line; the index is built once per load."""

from __future__ import annotations

import copy
import gc
import hashlib
import textwrap
import types
import weakref
from pathlib import Path

import msgspec
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.policy import compile as compile_module
from gateway.policy import load as load_module
from gateway.policy.index import PolicyIndex, policy_json, policy_version
from gateway.policy.load import check_policy
from gateway.policy.model import PolicySet
from gateway.registry import discover_adapters
from loadtest.policy_scale import BACKENDS, COMPLIANCES, MODELS, ROUTES, TENANTS, build_policy, write_policy

ADAPTERS = discover_adapters().keys()


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_generated_policy_loads_with_its_declared_size(tmp_path: Path) -> None:
    path = write_policy(2, tmp_path)
    policy, problems = check_policy(path, adapters=ADAPTERS)
    assert policy is not None, [str(p) for p in problems]
    assert (len(policy.backends), len(policy.models), len(policy.routes), len(policy.tenants)) == (
        2 * BACKENDS,
        2 * MODELS,
        2 * ROUTES,
        2 * TENANTS,
    )
    assert all(len(r.models) == 6 for r in policy.routes)


def test_compliance_is_judged_once_per_envelope_and_deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The S=50 load took 459 s when every tenant x route x candidate was judged; now it is envelopes x
    deployments, however many tenants and routes share them."""
    size = 3
    path = write_policy(size, tmp_path)
    calls = 0
    judge = compile_module.compliance_reason

    def counted(*args: object) -> str | None:
        nonlocal calls
        calls += 1
        return judge(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(compile_module, "compliance_reason", counted)
    policy, problems = check_policy(path, adapters=ADAPTERS)
    assert policy is not None, [str(p) for p in problems]
    deployments = sum(len(m.deployments) for m in policy.models)
    envelopes = len(COMPLIANCES) + 1  # the open tenant's empty compliance is judged apart
    assert calls <= envelopes * deployments
    index = PolicyIndex.of(policy)
    per_tenant = len(policy.tenants) * sum(len(index.candidates[(r.name, "chat")].targets) for r in policy.routes)
    assert per_tenant > 50 * calls  # what judging every tenant x route x candidate cost


def test_the_index_checked_is_the_index_served() -> None:
    built = build_policy(1)
    one = msgspec.convert(built, PolicySet)
    other = msgspec.convert(built, PolicySet)
    first = PolicyIndex.of(one)
    assert PolicyIndex.of(one) is first
    assert PolicyIndex.of(other) is not first  # equal but another load: built again


def test_collector_is_resumed_after_a_load_even_a_failed_one(tmp_path: Path) -> None:
    assert gc.isenabled()
    check_policy(_write(tmp_path, "version: 1\nbackends: [\n"), adapters=ADAPTERS)
    assert gc.isenabled()
    gc.disable()
    try:
        check_policy(write_policy(1, tmp_path), adapters=ADAPTERS)
        assert not gc.isenabled()  # a caller's own choice is left as it was
    finally:
        gc.enable()


def test_libyaml_parser_is_used_and_keeps_lines(tmp_path: Path) -> None:
    assert load_module._SafeLoader is yaml.CSafeLoader
    path = _write(
        tmp_path,
        """\
        version: 1
        backends:
          - name: a
            adapter: simulated
          - name: b
            adapter: simulated
            tier: orbit
        """,
    )
    _, problems = check_policy(path, adapters=ADAPTERS)
    assert [(p.line, p.col) for p in problems] == [(7, 11)]
    assert "orbit" in problems[0].reason or "tier" in problems[0].reason


def test_data_shortcut_gives_what_the_safe_constructor_gives() -> None:
    text = textwrap.dedent(
        """\
        base: &b {x: 1, y: [true, null, 2.5, "3"]}
        merged:
          <<: *b
          z: 2026-12-07
        1: one
        list: [a, {b: c}]
        """
    )
    loader = load_module._SafeLoader(text)
    try:
        root = loader.get_single_node()
        assert root is not None
        got = load_module._construct(loader, root)
    finally:
        loader.dispose()
    assert got == yaml.safe_load(text)


POLICY_WITH_FALLBACK = """\
version: 1
backends:
  - {name: us, adapter: simulated, hosting: {jurisdiction: US, retention_days: 0}}
  - {name: de, adapter: simulated, hosting: {jurisdiction: DE, retention_days: 0}}
models:
  - {name: us-model, origin: {developer: Meta, country: US}, deployments: [{backend: us, upstream_model: x}]}
  - {name: de-model, origin: {developer: Meta, country: US}, deployments: [{backend: de, upstream_model: y}]}
routes:
  - {name: main, models: [us-model]FALLBACK}
  - {name: eu, models: [de-model]}
tenants:
  - {name: eu-only, allowed_routes: [main], compliance: {allowed_jurisdictions: [EU]}}
"""


def test_a_route_served_through_its_fallback_is_not_empty(tmp_path: Path) -> None:
    policy, problems = check_policy(
        _write(tmp_path, POLICY_WITH_FALLBACK.replace("FALLBACK", ", fallback: [eu]")), adapters=ADAPTERS
    )
    assert policy is not None
    assert problems == []


def test_a_route_without_a_compliant_candidate_anywhere_is_reported(tmp_path: Path) -> None:
    policy, problems = check_policy(_write(tmp_path, POLICY_WITH_FALLBACK.replace("FALLBACK", "")), adapters=ADAPTERS)
    assert policy is None
    assert [p.severity for p in problems] == ["error"]
    assert "compliance leaves route 'main' with no candidate" in problems[0].reason
    assert (
        "us-model@us: allowed_jurisdictions: hosting jurisdiction US is not in the allowed ['EU']" in problems[0].reason
    )


def test_the_same_files_checked_again_are_not_loaded_again(tmp_path: Path) -> None:
    """`strait serve` checks its policy, then the app loads it in the same process: one load."""
    path = write_policy(1, tmp_path)
    first, _ = check_policy(path, adapters=ADAPTERS)
    again, _ = check_policy(path, adapters=ADAPTERS)
    assert first is not None and again is first
    assert check_policy(path, adapters=ADAPTERS, fresh=True)[0] is not first
    # Same size, other content (a price digit): loaded again whatever the file's timestamps say.
    text = path.read_text()
    changed = text.replace("input_per_mtok: 1.", "input_per_mtok: 2.", 1)
    assert changed != text and len(changed) == len(text)
    path.write_text(changed)
    reloaded, _ = check_policy(path, adapters=ADAPTERS)
    assert reloaded is not None and reloaded is not first and reloaded != first
    assert check_policy(path, adapters=["simulated"])[0] is not reloaded  # other adapters: checked again


# ---- a reload's worker thread never holds the GIL for the whole document (gateway.policy.load) ----

EXAMPLES = sorted((Path(__file__).parents[2] / "policies").glob("*.yaml"))


def _examples() -> list[dict[str, object]]:
    docs = [yaml.safe_load(p.read_text()) for p in EXAMPLES]
    return [d for d in docs if isinstance(d, dict) and d.get("version") == 1]


@pytest.mark.parametrize("doc", [build_policy(1, 7), build_policy(2, 8), *_examples()])
def test_a_policy_converted_entry_by_entry_and_encoded_in_pieces_is_the_same(doc: dict[str, object]) -> None:
    whole = msgspec.convert(doc, PolicySet, strict=True)
    assert load_module._to_policy(doc) == whole
    assert b"".join(policy_json(whole)) == msgspec.json.encode(whole)
    assert policy_version(whole) == hashlib.sha256(msgspec.json.encode(whole)).hexdigest()[:12]


def test_an_entry_that_does_not_convert_is_reported_as_by_the_whole_conversion(tmp_path: Path) -> None:
    doc = build_policy(1, 7)
    doc["backends"][3]["tier"] = "orbit"  # type: ignore[index]
    with pytest.raises(msgspec.ValidationError) as whole:
        msgspec.convert(doc, PolicySet, strict=True)
    with pytest.raises(msgspec.ValidationError) as pieces:
        load_module._to_policy(doc)
    assert str(pieces.value) == str(whole.value)
    assert "$.backends[3].tier" in str(whole.value)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    _, problems = check_policy(path, adapters=ADAPTERS)
    assert [p.reason.split(":")[0] for p in problems] == ["backends[3].tier"]
    lines = path.read_text().splitlines()
    assert "orbit" in lines[problems[0].line - 1]


def test_parsed_yaml_is_freed_an_entry_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """One deallocation of a whole document is a long step with the GIL held; `_release` lets go of one
    entry of a large section per step (each step a call of `_parts`), so the GIL can pass between."""
    text = yaml.safe_dump({"version": 1, "backends": [{"name": f"b{i}", "adapter": "simulated"} for i in range(60)]})
    root, data = load_module._parse(text, load_module._SafeLoader)
    section = next(v for k, v in root.value if k.value == "backends")
    entries = [weakref.ref(node) for node in section.value]
    del section
    freed_per_step: list[int] = []
    real_parts = load_module._parts

    def parts(item: object, whole: int) -> object:
        freed_per_step.append(sum(ref() is None for ref in entries) - sum(freed_per_step))
        return real_parts(item, whole)

    monkeypatch.setattr(load_module, "_parts", parts)
    box: list[object] = [root, data]
    del root, data
    load_module._release(box)
    freed_per_step.append(sum(ref() is None for ref in entries) - sum(freed_per_step))
    assert all(ref() is None for ref in entries)  # everything was freed
    assert max(freed_per_step) == 1  # and never two entries in one step


def test_a_build_runs_young_collections_only_and_restores_the_thresholds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No full (or middle) collection over everything a load allocated, ever: the collector only takes
    bounded young batches while a policy is built; its thresholds come back afterwards."""
    before = gc.get_threshold()
    seen: list[tuple[int, ...]] = []
    real = load_module._merge

    def merge(*args: object) -> PolicySet:
        seen.append(gc.get_threshold())
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(load_module, "_merge", merge)
    policy, _ = check_policy(write_policy(1, tmp_path), adapters=ADAPTERS, fresh=True)
    assert policy is not None
    assert seen == [(load_module.BUILD_YOUNG_THRESHOLD, load_module._NEVER, load_module._NEVER)]
    assert gc.get_threshold() == before


def test_a_check_leaves_no_reference_cycles_of_its_own(tmp_path: Path) -> None:
    """The reloader freezes what a check built without a full collection first: a reference cycle the
    check left (a recursive closure, say) would stay frozen, a leak per reload. None of the gateway's."""
    path = write_policy(1, tmp_path)
    check_policy(path, adapters=ADAPTERS, fresh=True)  # imports and caches of a first load
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        policy, _ = check_policy(path, adapters=ADAPTERS, fresh=True)
        assert policy is not None
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        ours = [
            o.__qualname__
            for o in gc.garbage
            if isinstance(o, types.FunctionType) and "/gateway/" in o.__code__.co_filename
        ]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()
    assert ours == []


_SMALL = build_policy(1, 7)
_ENTRIES = [(section, i) for section in load_module._ENTRY_TYPES for i in range(len(_SMALL.get(section, ())))]  # type: ignore[arg-type]
_ODD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=False),
    st.text(max_size=4),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=150, deadline=None)
@given(
    place=st.sampled_from(_ENTRIES),
    data=st.data(),
    value=_ODD,
    top=st.sampled_from(["server", "cache", "version", "backends", "extra", None]),
    top_value=_ODD,
)
def test_entry_by_entry_conversion_agrees_with_the_whole_one(
    place: tuple[str, int], data: st.DataObject, value: object, top: str | None, top_value: object
) -> None:
    """Whatever a document holds (a field of any entry set to an odd value, a section replaced), the
    conversion an entry at a time gives the same policy, or the same error, as one whole conversion."""
    doc = copy.deepcopy(_SMALL)
    section, i = place
    entry = doc[section][i]  # type: ignore[index]
    field = data.draw(st.sampled_from([*entry, "unknown_field"]))
    entry[field] = value
    if top is not None:
        doc[top] = top_value

    def outcome(convert: object) -> object:
        try:
            return convert(doc)  # type: ignore[operator]
        except msgspec.ValidationError as exc:
            return str(exc)

    assert outcome(load_module._to_policy) == outcome(lambda d: msgspec.convert(d, PolicySet, strict=True))
