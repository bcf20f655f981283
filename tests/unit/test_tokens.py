"""Tokenizers load offline: every encoding a policy may name is built from a bundled, hash-checked BPE
file, with networking blocked; a policy naming any other is refused with file:line:col."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tiktoken
import tiktoken_ext.openai_public as openai_public
from tiktoken.load import load_tiktoken_bpe

from gateway import tokens
from gateway.policy.load import check_policy
from gateway.registry import discover_adapters

ROOT = Path(__file__).resolve().parents[2]
ADAPTERS = discover_adapters().keys()

# Facts about the tokenizers (the token ids tiktoken's reference encodings give).
HELLO_WORLD = {
    "cl100k_base": [15339, 1917],
    "o200k_base": [24912, 2375],
    "o200k_harmony": [24912, 2375],
}

# Run in a fresh interpreter: no socket can be opened or name resolved, proxies point at a closed
# port, and tiktoken's cache is an empty directory, so any download attempt fails loudly.
_OFFLINE_PROBE = """
import json, socket, sys

def _no_network(*args, **kwargs):
    raise OSError("network access attempted")

socket.socket.connect = _no_network
socket.socket.connect_ex = _no_network
socket.create_connection = _no_network
socket.getaddrinfo = _no_network

from gateway import tokens

out = {}
for name in tokens.ENCODINGS:
    enc = tokens.encoding(name)
    out[name] = {"hello": enc.encode_ordinary("hello world"), "n_vocab": enc.n_vocab}
print(json.dumps(out))
"""


def test_every_encoding_loads_with_networking_blocked(tmp_path: Path) -> None:
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    env = {
        **os.environ,
        "TIKTOKEN_CACHE_DIR": str(cache),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9",
    }
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    out = subprocess.run(
        [sys.executable, "-c", _OFFLINE_PROBE], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert set(got) == set(tokens.ENCODINGS) == set(HELLO_WORLD)
    assert {name: v["hello"] for name, v in got.items()} == HELLO_WORLD
    assert got["cl100k_base"]["n_vocab"] == 100277
    assert got["o200k_base"]["n_vocab"] == 200019
    assert got["o200k_harmony"]["n_vocab"] == 201088
    assert list(cache.iterdir()) == []  # nothing went through tiktoken's downloader or its cache


@pytest.mark.parametrize("name", sorted(tokens.ENCODINGS))
def test_each_encoding_is_tiktokens_own(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same BPE file hash, pattern and special tokens as tiktoken's constructor of that name (whose
    download is intercepted here): an upgrade of tiktoken that changes an encoding fails this test."""
    spec = tokens.ENCODINGS[name]
    asked: list[tuple[str, str | None]] = []

    def fake_load(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        asked.append((url, expected_hash))
        return load_tiktoken_bpe(str(tokens.DATA_DIR / spec.file), spec.sha256)

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", fake_load)
    reference: dict[str, Any] = openai_public.ENCODING_CONSTRUCTORS[name]()
    assert {(url.rsplit("/", 1)[1], h) for url, h in asked} == {(spec.file, spec.sha256)}
    enc = tokens.encoding(name)
    assert enc._pat_str == reference["pat_str"]
    assert enc._special_tokens == reference["special_tokens"]
    assert enc.max_token_value == max(max(reference["mergeable_ranks"].values()), *reference["special_tokens"].values())
    text = "Hello, world! 123456 naïve café 東京 🤖\n\n  x <|endoftext|>"
    ids = enc.encode_ordinary(text)
    assert ids == tiktoken.Encoding(name, **{k: v for k, v in reference.items() if k != "name"}).encode_ordinary(text)
    assert enc.decode(ids) == text


def test_counts_with_the_named_encoding() -> None:
    text = "Hello, world! naïve café 東京"
    assert tokens.count_text(text, "o200k_base") == len(tokens.encoding("o200k_base").encode_ordinary(text))
    assert tokens.count_text("hello world", "o200k_base") == 2
    assert tokens.count_text("", "o200k_base") == 0
    # Special-token text is counted as ordinary text, never as a control token.
    assert tokens.count_text("<|endoftext|>", "o200k_base") == 7
    assert tokens.count_chat(["hello world"], "cl100k_base") == 2 + 3 + 3


def test_unknown_encoding_is_an_error_not_a_fallback() -> None:
    with pytest.raises(tokens.TokenizerUnavailable, match=r"'p50k_base' is not available offline \(available: "):
        tokens.encoding("p50k_base")


def _policy(tmp_path: Path, tokenizer_line: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(
        "backends:\n"
        "  - {name: edge, adapter: simulated}\n"
        "models:\n"
        "  - name: m\n"
        "    deployments: [{backend: edge, upstream_model: x}]\n"
        f"{tokenizer_line}"
        "routes:\n"
        "  - {name: r, models: [m]}\n"
    )
    return path


@pytest.mark.parametrize("name", sorted(tokens.ENCODINGS))
def test_policy_naming_an_offline_encoding_loads(tmp_path: Path, name: str) -> None:
    policy, problems = check_policy(_policy(tmp_path, f"    tokenizer: {name}\n"), adapters=ADAPTERS)
    assert policy is not None and problems == []
    assert policy.models[0].tokenizer == name


@pytest.mark.parametrize("name", ["p50k_base", "gpt2", "O200K_BASE", "o200k_base_offline", ""])
def test_policy_naming_another_tokenizer_is_refused_with_file_line(tmp_path: Path, name: str) -> None:
    path = _policy(tmp_path, f"    tokenizer: '{name}'\n")
    policy, problems = check_policy(path, adapters=ADAPTERS)
    assert policy is None
    assert [str(p) for p in problems] == [
        f"{path}:6:16: model 'm': tokenizer {name!r} is not available offline "
        f"(available: {', '.join(sorted(tokens.ENCODINGS))})"
    ]


@pytest.fixture
def fresh_tokenizers() -> Iterator[None]:
    tokens.forget_encodings()
    tokens.verify.cache_clear()
    yield
    tokens.forget_encodings()
    tokens.verify.cache_clear()


def test_missing_or_altered_bpe_file_refuses_the_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_tokenizers: None
) -> None:
    data = tmp_path / "tokenizers"
    data.mkdir()
    (data / "cl100k_base.tiktoken").write_bytes((tokens.DATA_DIR / "cl100k_base.tiktoken").read_bytes())
    altered = bytearray((tokens.DATA_DIR / "o200k_base.tiktoken").read_bytes())
    altered[-2] ^= 1  # one rank changed
    (data / "o200k_base.tiktoken").write_bytes(bytes(altered))
    monkeypatch.setattr(tokens, "DATA_DIR", data)
    path = _policy(tmp_path, "")  # the default tokenizer, o200k_base
    policy, problems = check_policy(path, adapters=ADAPTERS)
    assert policy is None
    assert len(problems) == 1
    assert re.fullmatch(
        rf"{re.escape(str(path))}:4:5: model 'm': tokenizer file {re.escape(str(data))}/o200k_base.tiktoken "
        r"has SHA-256 [0-9a-f]{64}, expected 446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        str(problems[0]),
    )
    (data / "cl100k_base.tiktoken").unlink()
    tokens.forget_encodings()
    tokens.verify.cache_clear()
    policy, problems = check_policy(_policy(tmp_path, "    tokenizer: cl100k_base\n"), adapters=ADAPTERS)
    assert policy is None
    assert [str(p).split(": ", 1)[1].split(" cannot be read")[0] for p in problems] == [
        f"model 'm': tokenizer file {data}/cl100k_base.tiktoken",
        f"prompt tokenizer: tokenizer file {data}/cl100k_base.tiktoken",
    ]


def test_loading_a_policy_checks_tokenizers_without_building_them(tmp_path: Path, fresh_tokenizers: None) -> None:
    """The encodings cost tens of MB resident: the loader only checks their files (built on first use)."""
    policy, problems = check_policy(_policy(tmp_path, "    tokenizer: o200k_harmony\n"), adapters=ADAPTERS)
    assert policy is not None and problems == []
    assert not any(tokens.built(name) for name in tokens.ENCODINGS)
    assert tokens.verify.cache_info().currsize == 2  # o200k_harmony and the prompt encoding


def test_bundled_files_are_the_ones_tiktoken_expects() -> None:
    import hashlib

    for spec in tokens.ENCODINGS.values():
        assert hashlib.sha256((tokens.DATA_DIR / spec.file).read_bytes()).hexdigest() == spec.sha256


def test_nothing_asks_tiktoken_to_fetch_an_encoding() -> None:
    """gateway/ and plugins/ build encodings only through gateway.tokens (tiktoken's registry downloads)."""
    pattern = re.compile(
        r"\b(get_encoding|encoding_for_model|encoding_name_for_model|load_tiktoken_bpe)\s*\(|from tiktoken\S* import"
    )
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for top in ("gateway", "plugins")
        for path in sorted((ROOT / top).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_an_encoding_asked_for_by_many_threads_at_once_is_built_once(
    monkeypatch: pytest.MonkeyPatch, fresh_tokenizers: None
) -> None:
    """The first requests after a start all count at once, each from a worker thread: one build serves them."""
    import threading

    import tiktoken

    built: list[str] = []
    real = tiktoken.Encoding

    def counting(name: str, **kwargs: Any) -> object:
        built.append(name)
        return real(name, **kwargs)

    monkeypatch.setattr(tiktoken, "Encoding", counting)
    tokens.forget_encodings()
    start = threading.Barrier(6)
    got: list[object] = []

    def ask() -> None:
        start.wait()
        got.append(tokens.encoding("cl100k_base"))

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert built == ["cl100k_base"]
    assert len(got) == 6 and all(g is got[0] for g in got)
