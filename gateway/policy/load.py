"""Read policy YAML (a file or a directory of files), decode it into Structs, cross-check references.

Every problem is reported as `file:line:col: reason`. YAML is parsed once with PyYAML's safe loader
(never a full loader: policy files are data, not code), the libyaml one (`CSafeLoader`) when PyYAML was
built with it: its composer is C and gives every node the same marks; the node tree is kept so that a
msgspec validation path such as `$.backends[2].tier` can be turned back into the line where it was
written.

Loading allocates a node and a few objects per YAML scalar and keeps them all: the cyclic garbage
collector's full passes would scan the growing heap again and again for nothing (a 1 MB policy took 2 s
to parse with them, 0.5 s without), so while a policy is read and checked only young objects are
collected, a bounded batch at a time (`collector_paused`). The server then freezes what it loaded
(`freeze_loaded`), before the collector resumes.

A reload runs all this in a worker thread beside the event loop, which waits for the GIL whenever the
thread holds it; the thread passes it on every few ms, but only between bytecodes. So nothing here is
one long C call over the whole document: the YAML's node tree and plain data are freed a piece at a
time (`_release`), the Structs are converted an entry at a time (`_to_policy`), and no collection ever
scans all that a load allocated (one pass over an S=50 load holds the GIL for 50-60 ms).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import re
import sys
import threading
import typing
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import yaml

from gateway import tokens
from gateway.policy import checks, compliance_checks
from gateway.policy.index import PolicyIndex
from gateway.policy.model import BUILTIN_REDACTIONS, PolicySet
from gateway.policy.places import policy_places

_PATH_TOKEN = re.compile(r"\.([^.\[\]]+)|\[(\d+)\]")
_AT_PATH = re.compile(r" - at `(\$[^`]*)`$")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]+)`")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_ENV_REF = checks.ENV_REF
# The C-accelerated safe loader when PyYAML has libyaml (nodes carry the same line/column marks).
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# While a policy is built, the collector runs young passes only, each over at most this many objects (a
# few ms), never a pass over all the build allocated; the older generations wait until the build ends.
BUILD_YOUNG_THRESHOLD = 5_000
_NEVER = 1 << 30

_pauses = 0
_thresholds = gc.get_threshold()
_pauses_lock = threading.Lock()


@contextmanager
def collector_paused() -> Iterator[None]:
    """No full (or middle-generation) garbage collection while a policy is built, and young ones over a
    bounded batch of objects; reference counting still frees. The collector is process-wide: concurrent
    loads (a reload thread, a CLI) count, the last one restores its thresholds; whether it runs at all
    (`gc.isenabled`) stays the caller's choice. (The collector was once disabled instead: its first pass
    after the build then scanned every object the build allocated in one go, a stall of 50-60 ms.)"""
    global _pauses, _thresholds
    with _pauses_lock:
        if _pauses == 0:
            _thresholds = gc.get_threshold()
            # (A threshold of 0 turns automatic collection off: left so.)
            gc.set_threshold(BUILD_YOUNG_THRESHOLD if _thresholds[0] else 0, _NEVER, _NEVER)
        _pauses += 1
    try:
        yield
    finally:
        with _pauses_lock:
            _pauses -= 1
            if _pauses == 0:
                gc.set_threshold(*_thresholds)


def _url_problem(url: str) -> str | None:
    """Why an upstream base URL cannot be used as given, or None. Credentials in a URL would be logged
    and echoed wherever the URL is (the key belongs in `api_key: env:NAME`); a fragment is never sent.
    A query (e.g. Azure's `?api-version=`) is kept and sent with every request."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return "is not a valid URL"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials (user:password@): give the key as api_key: env:NAME"
    if parts.fragment:
        return "must not have a #fragment"
    if not parts.hostname:
        return "has no host"
    return None


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int
    col: int
    reason: str
    # "error" refuses the policy; "warning" is printed and the policy still loads; "silenced": a warning
    # the policy's `silenced_warnings` accepts (printed only on request).
    severity: str = "error"
    # For a warning that can be silenced: (kind, tenant, route), matched against `silenced_warnings`.
    subject: tuple[str, str | None, str | None] | None = None
    # Why it is silenced (the silence's reason).
    silenced_because: str | None = None

    def __str__(self) -> str:
        prefix = {"warning": "warning: ", "silenced": "silenced warning: "}.get(self.severity, "")
        suffix = f" [silenced: {self.silenced_because}]" if self.silenced_because else ""
        return f"{self.file}:{self.line}:{self.col}: {prefix}{self.reason}{suffix}"


class PolicyError(Exception):
    """A policy could not be loaded; `problems` lists every reason with its place."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True, slots=True)
class _Source:
    """One decoded file and its YAML node tree, for turning paths into lines."""

    file: str
    root: yaml.Node | None

    def locate(self, path: str, *, key: str | None = None) -> tuple[int, int]:
        """1-based (line, col) of the node at a `$.a[0].b` path (or of mapping key `key` inside it)."""
        node = self.root
        if node is None:
            return (1, 1)
        for name, index in _PATH_TOKEN.findall(path):
            nxt = _child(node, name, index)
            if nxt is None:
                break
            node = nxt
        if key is not None and isinstance(node, yaml.MappingNode):
            for k, _v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == key:
                    node = k
                    break
        return (node.start_mark.line + 1, node.start_mark.column + 1)


def _child(node: yaml.Node, name: str, index: str) -> yaml.Node | None:
    if name and isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == name:
                return v  # type: ignore[no-any-return]
    if index and isinstance(node, yaml.SequenceNode):
        i = int(index)
        if i < len(node.value):
            return node.value[i]  # type: ignore[no-any-return]
    return None


_STR, _MAP, _SEQ = "tag:yaml.org,2002:str", "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"


# The young generation's threshold while serving (CPython's default is 700): a JSON request allocates a
# few hundred tracked containers that reference counting frees anyway, so at 700 the collector ran a young
# pass every few requests, about 5 % of a request's CPU in loadtest.bench_app; a pass over 10k young
# objects stays well under a millisecond. The older generations keep their thresholds.
SERVING_YOUNG_THRESHOLD: typing.Final = 10_000


def serving_collector() -> None:
    """Set the serving process's young-generation threshold (`strait serve`, once at start). A threshold
    of 0 (automatic collection off) is left so."""
    young, middle, old = gc.get_threshold()
    if young:
        gc.set_threshold(max(young, SERVING_YOUNG_THRESHOLD), middle, old)


def freeze_loaded() -> None:
    """Move everything alive now out of the cyclic collector's reach (`gc.freeze`): called by the server
    once a policy is loaded (start, reload), so no later full collection on the event loop rescans a large
    policy's objects (0.1-0.4 s for an S=50 policy: a request stall after every reload). A policy replaced
    later is still freed: it holds no reference cycles, reference counting frees it. Not done by
    `check_policy` itself: the CLI and tests have no event loop to protect.

    Called inside `collector_paused`, as the reloader does, it costs a young pass over a bounded batch:
    what the build allocated is out of the collector's reach before any pass could scan it all."""
    gc.collect(0)  # the last young batch's garbage, not frozen with it
    gc.freeze()


def _plain_data(loader: yaml.SafeLoader, node: yaml.Node) -> object:
    """The data of a node tree, as `construct_document` builds it, with a shortcut for what policies are
    made of (strings, mappings, sequences): the generic constructor costs 4x as much. Any other scalar
    (numbers, booleans, null) goes through the safe constructor; merge keys and anchors too."""
    if type(node) is yaml.ScalarNode and node.tag == _STR:
        return node.value
    if type(node) is yaml.MappingNode and node.tag == _MAP:
        out = {}
        for k, v in node.value:
            if k.tag == "tag:yaml.org,2002:merge":
                return loader.construct_object(node, deep=True)
            out[_plain_data(loader, k)] = _plain_data(loader, v)
        return out
    if type(node) is yaml.SequenceNode and node.tag == _SEQ:
        return [_plain_data(loader, v) for v in node.value]
    return loader.construct_object(node, deep=True)


def _construct(loader: yaml.SafeLoader, root: yaml.Node) -> object:
    try:
        return _plain_data(loader, root)
    except (TypeError, RecursionError):
        # An unhashable key, a document nested too deeply: the safe constructor says it as YAML errors do.
        return loader.construct_document(root)


def _parse(text: str, loader_class: type[yaml.SafeLoader]) -> tuple[yaml.Node | None, object]:
    loader = loader_class(text)
    try:
        root = loader.get_single_node()
        return root, (_construct(loader, root) if root is not None else {})
    finally:
        loader.dispose()


def _policy_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        if not files:
            raise PolicyError([Problem(str(path), 1, 1, "directory holds no .yaml policy files")])
        return files
    return [path]


def _decode_file(path: Path) -> tuple[PolicySet | None, _Source, list[Problem]]:
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, _Source(name, None), [Problem(name, 1, 1, f"cannot read policy file: {exc}")]
    try:
        root, data = _parse(text, _SafeLoader)
    except yaml.YAMLError:
        # libyaml words errors its own way; the pure-Python parser (same positions) says them as the
        # docs and tests show, with or without libyaml. Only a broken file pays the second parse.
        try:
            root, data = _parse(text, yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
            return None, _Source(name, None), [Problem(name, line, col, f"invalid YAML: {exc.problem or exc}")]
        except yaml.YAMLError as exc:
            return None, _Source(name, None), [Problem(name, 1, 1, f"invalid YAML: {exc}")]
    source = _Source(name, root)
    del root
    if not isinstance(data, dict):
        return None, source, [Problem(name, 1, 1, "a policy file must be a mapping of sections")]
    # The plain data is handed over to be freed a piece at a time once converted (`_release`).
    box: list[object] = [data]
    del data
    try:
        return _to_policy(box[0]), source, []  # type: ignore[arg-type]
    except msgspec.ValidationError as exc:
        message = str(exc)
        m = _AT_PATH.search(message)
        path_expr = m.group(1) if m else "$"
        reason = message[: m.start()] if m else message
        unknown = _UNKNOWN_FIELD.search(reason)
        line, col = source.locate(path_expr, key=unknown.group(1) if unknown else None)
        where = path_expr[2:] if path_expr.startswith("$.") else path_expr
        return None, source, [Problem(name, line, col, f"{where}: {reason}" if where != "$" else reason)]
    finally:
        _release(box)


# The policy's sections that are lists of entries (backends, models, tenants...), by field: what each
# entry converts to.
_ENTRY_TYPES: dict[str, object] = {
    name: typing.get_args(hint)[0]
    for name, hint in typing.get_type_hints(PolicySet).items()
    if typing.get_origin(hint) is tuple
}


def _to_policy(data: dict[str, object]) -> PolicySet:
    """`msgspec.convert(data, PolicySet, strict=True)`, a section entry at a time: one conversion of a
    whole enterprise-size document is one C call that holds the GIL for 10-15 ms (a reload's worker
    thread then stalls the event loop as long). The same Structs result; a document that does not convert
    is converted again whole, so its error names the place (`$.backends[2].tier`) as it always has."""
    try:
        rest = dict(data)
        entries: dict[str, tuple[object, ...]] = {}
        for name, entry_type in _ENTRY_TYPES.items():
            value = data.get(name)
            if type(value) is list:
                entries[name] = tuple(msgspec.convert(v, entry_type, strict=True) for v in value)
                rest[name] = []
        return msgspec.structs.replace(msgspec.convert(rest, PolicySet, strict=True), **entries)
    except msgspec.ValidationError:
        return msgspec.convert(data, PolicySet, strict=True)


# A mapping or sequence of more entries than this is freed an entry at a time by `_release`; a smaller one
# at once, with all it holds (one policy entry's nodes: a few hundred objects at most, microseconds).
_RELEASE_WHOLE = 16


def _release(box: list[object]) -> None:
    """Free parsed YAML handed over in `box` (node trees, plain data: `box` holds their only reference) a
    piece at a time: an entry of a large mapping or sequence (a backend, a tenant) per step. Dropping a
    whole S=50 document at once is one deallocation cascade, 30-40 ms in which no bytecode runs, so a
    reload's worker thread cannot pass the GIL to the event loop; between these steps it can. What
    someone else still holds (`sys.getrefcount`: a string a Struct kept) is only let go."""
    work: list[object] = []
    while box:  # a document is always opened: a few sections, each may be large
        item = box.pop()
        if sys.getrefcount(item) == 2:  # only ours: `item` and the call's argument
            work.extend(_parts(item, 0))
        del item
    while work:
        item = work.pop()
        if sys.getrefcount(item) == 2:
            work.extend(_parts(item, _RELEASE_WHOLE))
        del item


def _parts(item: object, whole: int) -> list[object] | tuple[object, ...]:
    """What `_release` frees apart from `item`: its entries when it has more than `whole` (or is a mapping
    node's (key, value) pair: the value may be a large section), else nothing (it is freed whole)."""
    parts = item.value if isinstance(item, yaml.CollectionNode) else item
    if isinstance(parts, dict):
        parts = list(parts.values())  # keys are strings
    if isinstance(parts, (list, tuple)) and (len(parts) > whole or type(parts) is tuple):
        return parts
    return ()


def _redactor_names() -> frozenset[str]:
    """What a tenant's `capture.redact` may name: the built-in kinds and the installed redactor plugins."""
    return frozenset(BUILTIN_REDACTIONS) | frozenset(ep.name for ep in entry_points(group="strait.redactors"))


def load_policy(path: Path | str, *, adapters: Iterable[str] | None = None) -> PolicySet:
    """Load and check a policy file or directory; raise PolicyError listing every problem."""
    merged, problems = check_policy(Path(path), adapters=adapters)
    if merged is None:
        raise PolicyError([p for p in problems if p.severity == "error"])
    return merged


# The last policy that loaded, by what it was loaded from: `strait serve` checks the policy before it
# binds its port and the app loads it again in the same process; at enterprise size that is seconds.
_last_loaded: tuple[tuple[object, ...], PolicySet, list[Problem]] | None = None


def _load_key(path: Path, adapters: Iterable[str] | None) -> tuple[object, ...] | None:
    """What a check's result depends on: each file's name and content digest, and the adapters."""
    try:
        files = _policy_files(path) if path.exists() else []
        digests = tuple((str(f), hashlib.sha256(f.read_bytes()).hexdigest()) for f in files)
    except (OSError, PolicyError):
        return None
    return (str(path), digests, None if adapters is None else frozenset(adapters))


def check_policy(
    path: Path, *, adapters: Iterable[str] | None = None, fresh: bool = False
) -> tuple[PolicySet | None, list[Problem]]:
    """The merged policy (None when any problem is an error) and every problem found. The same files
    checked again (same content, same adapters) give the same policy object without a second load,
    unless `fresh` (a benchmark, a test that changes the environment)."""
    global _last_loaded
    adapters = None if adapters is None else list(adapters)
    key = None if fresh else _load_key(path, adapters)
    last = _last_loaded
    if key is not None and last is not None and last[0] == key:
        return last[1], list(last[2])
    with collector_paused():
        policy, problems = _check_policy(path, adapters)
    if key is not None and policy is not None:
        _last_loaded = (key, policy, list(problems))
    return policy, problems


def _check_policy(path: Path, adapters: Iterable[str] | None) -> tuple[PolicySet | None, list[Problem]]:
    if not path.exists():
        return None, [Problem(str(path), 1, 1, "policy path does not exist")]
    try:
        files = _policy_files(path)
    except PolicyError as exc:
        return None, exc.problems
    sources: list[_Source] = []
    try:
        return _check_files(files, adapters, sources)
    finally:
        # Only problems (strings) come out of the check: the YAML node trees are freed now, a piece at a time.
        roots: list[object] = [s.root for s in sources]
        sources.clear()
        _release(roots)


def _check_files(
    files: list[Path], adapters: Iterable[str] | None, sources: list[_Source]
) -> tuple[PolicySet | None, list[Problem]]:
    decoded: list[tuple[PolicySet, _Source]] = []
    problems: list[Problem] = []
    for f in files:
        policy, source, file_problems = _decode_file(f)
        sources.append(source)
        problems.extend(file_problems)
        if policy is not None:
            decoded.append((policy, source))
    if problems:
        return None, problems
    merged = _merge(decoded, problems)
    problems.extend(_cross_check(merged, decoded, set(adapters) if adapters is not None else None))
    failed = any(p.severity == "error" for p in problems)
    return (None if failed else merged), problems


def _merge(decoded: list[tuple[PolicySet, _Source]], problems: list[Problem]) -> PolicySet:
    default_server = PolicySet().server
    server = default_server
    for policy, source in decoded:
        if policy.server != default_server:
            if server != default_server:
                line, col = source.locate("$.server")
                problems.append(Problem(source.file, line, col, "server: set in more than one policy file"))
            server = policy.server
    default_cache = PolicySet().cache
    cache = default_cache
    for policy, source in decoded:
        if policy.cache != default_cache:
            if cache != default_cache:
                line, col = source.locate("$.cache")
                problems.append(Problem(source.file, line, col, "cache: set in more than one policy file"))
            cache = policy.cache
    return PolicySet(
        server=server,
        cache=cache,
        operators=tuple(o for p, _ in decoded for o in p.operators),
        blocs=tuple(b for p, _ in decoded for b in p.blocs),
        backends=tuple(b for p, _ in decoded for b in p.backends),
        models=tuple(m for p, _ in decoded for m in p.models),
        routes=tuple(r for p, _ in decoded for r in p.routes),
        tenants=tuple(t for p, _ in decoded for t in p.tenants),
        rules=tuple(r for p, _ in decoded for r in p.rules),
        silenced_warnings=tuple(w for p, _ in decoded for w in p.silenced_warnings),
    )


def _cross_check(
    merged: PolicySet, decoded: list[tuple[PolicySet, _Source]], adapters: set[str] | None
) -> list[Problem]:
    problems: list[Problem] = []

    def at(
        source: _Source,
        path: str,
        reason: str,
        severity: str = "error",
        subject: tuple[str, str | None, str | None] | None = None,
    ) -> None:
        line, col = source.locate(path)
        problems.append(Problem(source.file, line, col, reason, severity, subject))

    seen: dict[tuple[str, str], str] = {}
    for policy, source in decoded:
        named: tuple[tuple[str, tuple[str, ...]], ...] = (
            ("backends", tuple(b.name for b in policy.backends)),
            ("models", tuple(m.name for m in policy.models)),
            ("routes", tuple(r.name for r in policy.routes)),
            ("tenants", tuple(t.name for t in policy.tenants)),
            ("rules", tuple(r.name for r in policy.rules)),
        )
        for section, names in named:
            for i, entry_name in enumerate(names):
                key = (section, entry_name)
                if key in seen:
                    at(
                        source,
                        f"$.{section}[{i}].name",
                        f"duplicate {section[:-1]} name {entry_name!r} (first in {seen[key]})",
                    )
                else:
                    seen[key] = source.file
    backend_names = {b.name for b in merged.backends}
    model_names = {m.name for m in merged.models}
    route_names = {r.name for r in merged.routes}
    for policy, source in decoded:
        for i, b in enumerate(policy.backends):
            if adapters is not None and b.adapter not in adapters:
                at(
                    source,
                    f"$.backends[{i}].adapter",
                    f"backend {b.name!r}: unknown adapter {b.adapter!r} (installed: {', '.join(sorted(adapters))})",
                )
            if b.adapter != "simulated" and not b.base_url:
                at(source, f"$.backends[{i}]", f"backend {b.name!r}: base_url is required for adapter {b.adapter!r}")
            if b.base_url and not b.base_url.startswith(("http://", "https://")):
                at(
                    source,
                    f"$.backends[{i}].base_url",
                    f"backend {b.name!r}: base_url must start with http:// or https://",
                )
            if b.base_url and (problem := _url_problem(b.base_url)) is not None:
                at(source, f"$.backends[{i}].base_url", f"backend {b.name!r}: base_url {problem}")
            if b.api_key is not None and not _ENV_REF.match(b.api_key):
                at(
                    source,
                    f"$.backends[{i}].api_key",
                    f"backend {b.name!r}: api_key must be an env:NAME reference, never the secret itself",
                )
        for i, m in enumerate(policy.models):
            if not m.deployments:
                at(source, f"$.models[{i}].deployments", f"model {m.name!r}: needs at least one deployment")
            try:
                # Checked now, so a missing or altered BPE file is a start-up error, never a download.
                tokens.verify(m.tokenizer)
            except tokens.TokenizerUnavailable as exc:
                at(source, f"$.models[{i}].tokenizer", f"model {m.name!r}: {exc}")
            for j, d in enumerate(m.deployments):
                if d.backend not in backend_names:
                    at(
                        source,
                        f"$.models[{i}].deployments[{j}].backend",
                        f"model {m.name!r}: unknown backend {d.backend!r}",
                    )
        for i, r in enumerate(policy.routes):
            if not r.models:
                at(source, f"$.routes[{i}].models", f"route {r.name!r}: needs at least one model")
            if r.max_attempts < 1:
                at(source, f"$.routes[{i}].max_attempts", f"route {r.name!r}: max_attempts must be at least 1")
            for j, name in enumerate(r.models):
                if name not in model_names:
                    at(source, f"$.routes[{i}].models[{j}]", f"route {r.name!r}: unknown model {name!r}")
            for part, trial in (("shadow", r.shadow), ("canary", r.canary)):
                if trial is not None and trial.model not in model_names:
                    at(source, f"$.routes[{i}].{part}.model", f"route {r.name!r}: unknown {part} model {trial.model!r}")
        for i, t in enumerate(policy.tenants):
            for j, k in enumerate(t.keys):
                if not _DIGEST.match(k.digest):
                    at(
                        source,
                        f"$.tenants[{i}].keys[{j}].digest",
                        f"tenant {t.name!r}: key {k.id!r} digest must be sha256:<64 hex> (see `strait keys hash`)",
                    )
            for j, name in enumerate(t.allowed_routes):
                if name != "*" and name not in route_names:
                    at(source, f"$.tenants[{i}].allowed_routes[{j}]", f"tenant {t.name!r}: unknown route {name!r}")
    known = {"routes": route_names, "tenants": {t.name for t in merged.tenants}}
    places = policy_places((b.name, b.members) for b in merged.blocs)
    for policy, source in decoded:
        checks.check_cors(policy, source, at)
        checks.check_routes(policy, source, route_names, at)
        checks.check_backends(policy, source, at)
        checks.check_responses(policy, source, at)
        checks.check_prices(policy, merged, source, at)
        checks.check_spillover(policy, source, at)
        checks.check_tenants(policy, source, route_names, at, places)
        checks.check_rules(policy, source, known, at)
        checks.check_cache(policy, merged, source, at)
        checks.check_capture(policy, source, _redactor_names(), at)
        compliance_checks.check_entities(policy, merged, source, at)
    if not problems:
        cycle = checks.rewrite_cycle(merged)
        if cycle:
            # Point at the first rule that closes the cycle.
            place = next(
                (
                    (source, i)
                    for policy, source in decoded
                    for i, rule in enumerate(policy.rules)
                    if rule.then.route in cycle and (rule.when.routes is None or set(rule.when.routes) & set(cycle))
                ),
                (decoded[0][1], -1),
            )
            where = f"$.rules[{place[1]}].then.route" if place[1] >= 0 else "$"
            at(place[0], where, f"rules rewrite routes in a cycle: {' -> '.join(cycle)}")
        empty = checks.EmptyRoutes(PolicyIndex.of(merged))
        for policy, source in decoded:
            for i, t in enumerate(policy.tenants):
                explicit = "*" not in t.allowed_routes
                for route, reasons in empty.of(t):
                    at(
                        source,
                        f"$.tenants[{i}].compliance",
                        f"tenant {t.name!r}: compliance leaves route {route!r} with no candidate ({'; '.join(reasons)})",
                        "error" if explicit else "warning",
                        ("empty_route", t.name, route),
                    )
    for policy, source in decoded:
        for i, t in enumerate(policy.tenants):
            if t.priority.default is not None and t.priority.default not in t.priority.allowed:
                at(
                    source,
                    f"$.tenants[{i}].priority.default",
                    f"tenant {t.name!r}: priority.default {t.priority.default!r} is not among priority.allowed "
                    f"({', '.join(t.priority.allowed)})",
                )
    for j, digest in enumerate(merged.server.admin_keys):
        if not _DIGEST.match(digest):
            problems.append(Problem(decoded[0][1].file, 1, 1, f"server.admin_keys[{j}] must be sha256:<64 hex>"))
    try:
        tokens.verify(tokens.FALLBACK_ENCODING)  # prompts are counted with it, whatever the models say
    except tokens.TokenizerUnavailable as exc:
        problems.append(Problem(decoded[0][1].file, 1, 1, f"prompt tokenizer: {exc}"))
    if merged.server.max_body_bytes < 1024:
        problems.append(Problem(decoded[0][1].file, 1, 1, "server.max_body_bytes must be at least 1024"))
    return _silence(problems, decoded, {"tenants": known["tenants"], "routes": route_names}, at)


def _silence(
    problems: list[Problem],
    decoded: list[tuple[PolicySet, _Source]],
    names: dict[str, set[str]],
    at: checks.Report,
) -> list[Problem]:
    """Warnings the policy's `silenced_warnings` accept become "silenced" (in place); a silence that names
    an unknown tenant or route is an error, one that matches no warning a warning (both appended by `at`)."""
    found = len(problems)  # what `at` appends below is about the silences themselves
    for policy, source in decoded:
        for i, silence in enumerate(policy.silenced_warnings):
            base = f"$.silenced_warnings[{i}]"
            if silence.tenant is None and silence.route is None:
                at(source, base, f"silenced warning {silence.warning}: name the tenant or the route it covers")
                continue
            for field, known in (("tenant", names["tenants"]), ("route", names["routes"])):
                value = getattr(silence, field)
                if value is not None and value not in known:
                    at(source, f"{base}.{field}", f"silenced warning {silence.warning}: unknown {field} {value!r}")
            matched = False
            for j, p in enumerate(problems[:found]):
                if p.severity not in ("warning", "silenced") or p.subject is None:
                    continue
                kind, tenant, route = p.subject
                if (
                    kind == silence.warning
                    and (silence.tenant is None or silence.tenant == tenant)
                    and (silence.route is None or silence.route == route)
                ):
                    matched = True
                    problems[j] = dataclasses.replace(p, severity="silenced", silenced_because=silence.reason)
            if not matched:
                at(
                    source,
                    base,
                    f"silenced warning {silence.warning} matches no warning (remove it, or fix its tenant/route)",
                    "warning",
                )
    return problems
