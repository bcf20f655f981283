"""Upstream error text is redacted: no configured secret, URL, host name, address or file path survives,
and the useful part of the message does."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.upstream.redact import ADDRESS, HOST, PATH, SECRET, URL, Redactor, redactor_for
from tests.harness.fake_upstream import error_response

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PROVIDER_KEY = "sk-live-provider-0123456789abcdef"


def _fixture_messages() -> list[str]:
    """Every error message recorded from real upstreams (tests/fixtures) and the fake upstream's own."""
    found: list[str] = []

    def walk(doc: object) -> None:
        if isinstance(doc, dict):
            for k, v in doc.items():
                if k == "message" and isinstance(v, str):
                    found.append(v)
                else:
                    walk(v)
        elif isinstance(doc, list):
            for v in doc:
                walk(v)

    for path in sorted(FIXTURES.rglob("*.json")):
        walk(json.loads(path.read_text()))
    for status in (400, 401, 404, 429, 500, 502, 503, 504):
        for style in ("openai", "llamacpp", "vllm"):
            walk(error_response(status, {"error_style": style}, model="gpt-4o-mini", prompt_tokens=9000)[0])
    return sorted(set(found))


MESSAGES = _fixture_messages()
# Public documentation links are URLs too: the only part of a recorded message that is replaced.
_DOC_URLS = (
    "https://platform.openai.com/account/rate-limits",
    "https://platform.openai.com/account/api-keys",
    "https://platform.openai.com/docs/guides/error-codes/api-errors",
    "https://platform.openai.com/docs/guides/reasoning#advice-on-prompting",  # OpenAI's invalid_prompt refusal
    "https://go.microsoft.com/fwlink/?linkid=2198766",  # Azure's content_filter refusal
    "https://ai.google.dev/gemini-api/docs/thought-signatures",  # Gemini's missing-signature 400
)


def _expected(message: str) -> str:
    for url in _DOC_URLS:
        message = message.replace(url, URL)
    return message


def test_the_fixtures_hold_messages_worth_keeping() -> None:
    assert len(MESSAGES) >= 10
    assert any("maximum context length is" in m for m in MESSAGES)


def test_benign_messages_keep_their_text() -> None:
    redact = Redactor([PROVIDER_KEY])
    for message in MESSAGES:
        assert redact(message) == _expected(message), message


@given(
    message=st.sampled_from(MESSAGES) | st.text(max_size=200),
    secrets=st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=3),
    data=st.data(),
)
@example(message="Incorrect API key provided: X.", secrets=[PROVIDER_KEY], data=None)
@example(message="aaaa", secrets=["a[redacted]", "[redacted"], data=None)
@settings(max_examples=300, deadline=None)
def test_a_secret_inserted_anywhere_never_survives(message: str, secrets: list[str], data: st.DataObject) -> None:
    text = message
    for secret in secrets:
        at = data.draw(st.integers(0, len(text)), label="at") if data is not None else len(text) // 2
        text = text[:at] + secret + text[at:]
    out = Redactor(secrets)(text)
    for secret in secrets:
        assert secret not in out


_LABEL = st.from_regex(r"\A[a-z0-9](?:[a-z0-9-]{0,8}[a-z0-9])?\Z")
_TLD = st.from_regex(r"\A[a-z][a-z]{1,9}\Z")
_PORT = st.none() | st.integers(1, 65535)


@st.composite
def hostnames(draw: st.DrawFn) -> str:
    labels = draw(st.lists(_LABEL, min_size=1, max_size=4))
    port = draw(_PORT)
    name = ".".join([*labels, draw(_TLD)])
    return name if port is None else f"{name}:{port}"


@st.composite
def addresses(draw: st.DrawFn) -> str:
    ip = draw(st.ip_addresses())
    port = draw(_PORT)
    if isinstance(ip, ipaddress.IPv6Address):
        text = str(ip)
        return f"[{text}]:{port}" if port is not None else text
    return f"{ip}:{port}" if port is not None else str(ip)


@st.composite
def posix_paths(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.from_regex(r"\A[A-Za-z0-9_.-]{1,12}\Z"), min_size=1, max_size=5))
    line = draw(st.none() | st.integers(1, 9999))
    path = "/" + "/".join(parts)
    return path if line is None else f"{path}:{line}"


@st.composite
def windows_paths(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.from_regex(r"\A[A-Za-z0-9_.-]{1,12}\Z"), min_size=1, max_size=4))
    return draw(st.sampled_from("CDE")) + ":\\" + "\\".join(parts)


@st.composite
def urls(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["http", "https", "grpc", "redis", "s3"]))
    # Ending like a URL, not like a sentence (trailing punctuation is given back to the sentence).
    rest = draw(st.from_regex(r"\A[A-Za-z0-9._~:/?#@!$&*+,;=%-]{0,39}[A-Za-z0-9/]\Z"))
    return f"{scheme}://{rest}"


@given(
    prefix=st.sampled_from(MESSAGES),
    suffix=st.sampled_from(MESSAGES),
    leak=hostnames() | addresses() | posix_paths() | windows_paths() | urls(),
)
@example(prefix="CUDA OOM on", suffix="", leak="gpu-node-7.corp.internal:8000")
@example(prefix="upstream", suffix="refused", leak="localhost:8000")
@example(prefix="svc", suffix="down", leak="foo.svc.cluster.local")
@example(prefix="at", suffix="", leak="/opt/vllm/engine.py:812")
@example(prefix="at", suffix="", leak="C:\\srv\\vllm\\engine.py")
@example(prefix="peer", suffix="", leak="[fe80::1%eth0]:8080")
@settings(max_examples=300, deadline=None)
def test_internal_names_never_survive_and_the_rest_is_kept(prefix: str, suffix: str, leak: str) -> None:
    """A host, address, path or URL placed between two recorded messages is replaced by one placeholder;
    the messages around it are unchanged."""
    out = Redactor()(f"{_expected(prefix)} {leak} {_expected(suffix)}")
    kept = {f"{_expected(prefix)} {p} {_expected(suffix)}" for p in (HOST, ADDRESS, PATH, URL)}
    assert out in kept, (leak, out)


def test_measured_attacks() -> None:
    redact = Redactor([PROVIDER_KEY])
    oom = redact("CUDA OOM on gpu-node-7.corp.internal:8000 (/opt/vllm/engine.py:812)")
    assert oom == f"CUDA OOM on {HOST} ({PATH})"
    echoed = redact(f"Incorrect API key provided: {PROVIDER_KEY}. You can find your API key at https://x.example/k.")
    assert echoed == f"Incorrect API key provided: {SECRET}. You can find your API key at {URL}."
    mixed = redact("upstream 10.0.3.7 and 2001:db8::7 and localhost:8000 and redis:6379 (engine.py:812)")
    assert mixed == f"upstream {ADDRESS} and {ADDRESS} and {HOST} and {HOST} ({PATH})"


def test_model_names_versions_and_code_names_are_not_hosts() -> None:
    text = (
        "The model `meta-llama/Llama-3.1-8B-Instruct` (gpt-3.5-turbo, qwen2.5-7b, v0.6.3) raised "
        "torch.cuda.OutOfMemoryError at 12:30:45, e.g. std::bad_alloc"
    )
    assert Redactor()(text) == text


def test_redactor_for_resolves_env_references() -> None:
    redact = redactor_for(["env:A_KEY", None, "env:UNSET"], {"A_KEY": "sk-aaaaaaaaaaaa"})
    assert redact("key sk-aaaaaaaaaaaa echoed") == f"key {SECRET} echoed"


def test_long_messages_are_cut_after_redaction() -> None:
    out = Redactor([PROVIDER_KEY])("x" * 5000 + PROVIDER_KEY)
    assert len(out) <= 2000 and PROVIDER_KEY[:10] not in out


def test_upper_case_hosts_case_changed_and_masked_secrets_never_survive() -> None:
    """Found in review: these passed through the first redactor."""
    secret = "sk-live-0123456789abcdefXYZ"
    redact = Redactor([secret])
    out = redact(f"GPU-NODE-7.CORP.INTERNAL:8000 refused {secret.upper()}; key shown as sk-live-****cXYZ")
    assert "GPU-NODE-7" not in out and "CORP.INTERNAL" not in out
    assert secret.upper() not in out and secret not in out and "sk-live-" not in out
    assert redact("Authorization: Bearer abc.def-123 was refused") == "Authorization: [redacted] was refused"
    # Mixed-case dotted names are code, not hosts.
    assert (
        redact("torch.cuda.OutOfMemoryError: CUDA out of memory") == "torch.cuda.OutOfMemoryError: CUDA out of memory"
    )
