"""Token counting with tiktoken, offline.

tiktoken's own `get_encoding` downloads its BPE files on first use; Strait never reaches the internet at
run time, so it never calls it. The BPE files of the encodings a policy may name ship in
`gateway/tokenizers/`, byte for byte the files tiktoken downloads: each is checked against the SHA-256
that tiktoken's `tiktoken_ext/openai_public.py` expects, and the `Encoding` is built here with the
pattern and special tokens that file defines. A name not in `ENCODINGS`, a missing file or a wrong hash
is a `TokenizerUnavailable` error (the policy loader turns it into a `file:line` refusal at start-up),
never a download and never a silent fallback. The loader only checks (`verify`); an encoding is built
on first use (cl100k_base about 25 MB resident, o200k_base about 45 MB, 0.2-0.5 s).

A request's prompt is counted lazily (`PromptTokens`): only when a stage needs the number, once, off the
event loop for long prompts; `PromptTokens.bound()` (UTF-8 bytes) settles a context-window check without it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tiktoken

DATA_DIR = Path(__file__).with_name("tokenizers")
FALLBACK_ENCODING = "cl100k_base"
# Per-message framing tokens in OpenAI's chat format (role and separators).
_PER_MESSAGE = 3
_PER_REPLY = 3

_ENDOFTEXT = "<|endoftext|>"
_ENDOFPROMPT = "<|endofprompt|>"
# Patterns as in tiktoken_ext/openai_public.py (tiktoken 0.14).
_CL100K_PAT = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
_O200K_PAT = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_O200K_SPECIAL = {_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018}


@dataclass(frozen=True)
class _Spec:
    file: str  # in DATA_DIR
    sha256: str  # tiktoken's expected_hash for the file
    pat_str: str
    special_tokens: dict[str, int] = field(default_factory=dict)


ENCODINGS: dict[str, _Spec] = {
    "cl100k_base": _Spec(
        "cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        _CL100K_PAT,
        {
            _ENDOFTEXT: 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            _ENDOFPROMPT: 100276,
        },
    ),
    "o200k_base": _Spec(
        "o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        _O200K_PAT,
        _O200K_SPECIAL,
    ),
    # gpt-oss: o200k_base's ranks and pattern with the harmony chat-format special tokens.
    "o200k_harmony": _Spec(
        "o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        _O200K_PAT,
        {
            **_O200K_SPECIAL,
            "<|startoftext|>": 199998,
            "<|reserved_200000|>": 200000,
            "<|reserved_200001|>": 200001,
            "<|return|>": 200002,
            "<|constrain|>": 200003,
            "<|reserved_200004|>": 200004,
            "<|channel|>": 200005,
            "<|start|>": 200006,
            "<|end|>": 200007,
            "<|message|>": 200008,
            "<|reserved_200009|>": 200009,
            "<|reserved_200010|>": 200010,
            "<|reserved_200011|>": 200011,
            "<|call|>": 200012,
        }
        | {f"<|reserved_{i}|>": i for i in range(200013, 201088)},
    ),
}


class TokenizerUnavailable(RuntimeError):
    """An encoding Strait cannot load offline (unknown name, missing file, wrong hash)."""


def _read(spec: _Spec) -> bytes:
    path = DATA_DIR / spec.file
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TokenizerUnavailable(f"tokenizer file {path} cannot be read: {exc.strerror or exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise TokenizerUnavailable(f"tokenizer file {path} has SHA-256 {digest}, expected {spec.sha256}")
    return data


def _spec(name: str) -> _Spec:
    spec = ENCODINGS.get(name)
    if spec is None:
        raise TokenizerUnavailable(
            f"tokenizer {name!r} is not available offline (available: {', '.join(sorted(ENCODINGS))})"
        )
    return spec


@functools.cache
def verify(name: str) -> None:
    """Raise TokenizerUnavailable unless `name` can be loaded offline (known name, file present, hash
    right). Cheap (a hash of a few MB, once per process): the policy loader calls it at start-up, while
    the encoding itself (tens of MB resident) is built on first use."""
    _read(_spec(name))


# Encodings built so far in this process: building one takes 0.2-1.5 s, never to be paid on the event loop.
_BUILT: set[str] = set()


def built(name: str) -> bool:
    """Whether `encoding(name)` is ready (calling it costs nothing more than a lookup)."""
    return name in _BUILT


_BUILDING = threading.Lock()


def encoding(name: str) -> tiktoken.Encoding:
    """The tiktoken encoding `name`, built once from its bundled, hash-checked BPE file.

    Built under a lock: the first requests after a start all ask for it at once (from worker threads,
    `PromptTokens.count`), and `functools.cache` alone would let each of them build its own copy
    (hundreds of MB of transient dicts, seconds of GIL) where one build serves them all."""
    if name in _BUILT:
        return _build(name)
    with _BUILDING:
        return _build(name)


def forget_encodings() -> None:
    """Drop every built encoding and remembered count (tests: a process that never counted)."""
    with _BUILDING:
        _build.cache_clear()
        _BUILT.clear()
        _memo.clear()


@functools.cache
def _build(name: str) -> tiktoken.Encoding:
    spec = _spec(name)
    data = _read(spec)
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    enc = tiktoken.Encoding(name, pat_str=spec.pat_str, mergeable_ranks=ranks, special_tokens=spec.special_tokens)
    # tiktoken keeps the Python dict only to pickle the Encoding (the ranks live in its Rust core):
    # about 20 MB for o200k_base that Strait never uses, so it is dropped (an Encoding is never pickled).
    enc._mergeable_ranks = {}
    _BUILT.add(name)
    return enc


# Token counts of recently counted texts. A chat resends its system prompt and its whole history every
# turn, an agent its instructions and earlier tool results: most texts of a prompt were counted moments
# ago. The key is (encoding, length, a 128-bit BLAKE2b of the text keyed with this process's own random
# key), never the text, so no prompt outlives its request here; nobody can choose two texts that collide
# (not even with PYTHONHASHSEED fixed, which would make str hashes predictable). First in, first out;
# safe from worker threads (each operation is one atomic call under the GIL).
MEMO_SIZE = 4096
_memo: OrderedDict[tuple[str, int, bytes], int] = OrderedDict()
_MEMO_KEY = os.urandom(32)


def _tokens(enc: tiktoken.Encoding, encoding_name: str, text: str) -> int:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16, key=_MEMO_KEY).digest()
    key = (encoding_name, len(text), digest)
    known = _memo.get(key)
    if known is not None:
        return known
    counted = len(enc.encode_ordinary(text))
    if len(_memo) >= MEMO_SIZE:
        with contextlib.suppress(KeyError):  # another thread emptied it meanwhile
            _memo.popitem(last=False)
    _memo[key] = counted
    return counted


def forget_counts() -> None:
    """Drop the remembered counts (tests)."""
    _memo.clear()


def count_text(text: str, encoding_name: str = FALLBACK_ENCODING) -> int:
    if not text:
        return 0
    return _tokens(encoding(encoding_name), encoding_name, text)


def count_chat(texts: list[str], encoding_name: str = FALLBACK_ENCODING) -> int:
    """Prompt tokens of a chat request: the content texts plus OpenAI's per-message framing."""
    enc = encoding(encoding_name)
    return sum(_tokens(enc, encoding_name, t) for t in texts if t) + _PER_MESSAGE * len(texts) + _PER_REPLY


# ---- counting on demand ----

# Prompts whose texts are longer than this (characters) are counted in a worker thread, off the event loop.
OFFLOAD_CHARS = 20_000


def utf8_bound(texts: list[str]) -> int:
    """An upper bound of the tokens of `texts` in any byte-level BPE: a token covers at least one byte of
    the UTF-8 text, so tokens <= bytes. Cheap: ASCII texts are measured without encoding them."""
    return sum(len(t) if t.isascii() else len(t.encode("utf-8", "surrogatepass")) for t in texts)


class PromptTokens:
    """A request's prompt tokens, counted only when something needs them (a token limit or reservation,
    a rule on prompt size, a context window the cheap bound does not clear, an accounting estimate).

    `bound()` costs one pass over the texts' lengths; `count()` runs the tokenizer once (in a worker thread
    above OFFLOAD_CHARS, or when the encoding is still to be built) and remembers the result; `count_now()` counts on the calling thread, for the
    rare synchronous readers (an upstream that reported no usage), who first `await count()` when the
    prompt is `long()` (a few MB of text can take seconds). `known` is None until counted.
    """

    __slots__ = ("_chat", "_encoding", "_read_texts", "_texts", "known")

    def __init__(
        self,
        texts: Callable[[], list[str]] | None = None,
        *,
        chat: bool = False,
        encoding_name: str = FALLBACK_ENCODING,
    ) -> None:
        self._texts = texts
        # The texts once read (bound, long and count all need them; reading joins multi-part messages).
        self._read_texts: list[str] | None = None
        self._chat = chat
        self._encoding = encoding_name
        self.known: int | None = None if texts is not None else 0

    @classmethod
    def of(cls, value: int) -> PromptTokens:
        """Already known (tests, requests built in-process)."""
        counted = cls()
        counted.known = value
        return counted

    def _read(self) -> list[str]:
        texts = self._read_texts
        if texts is None:
            texts = self._read_texts = self._texts() if self._texts is not None else []
        return texts

    def bound(self) -> int:
        if self.known is not None:
            return self.known
        texts = self._read()
        framing = _PER_MESSAGE * len(texts) + _PER_REPLY if self._chat else 0
        return utf8_bound(texts) + framing

    def _count(self, texts: list[str]) -> int:
        if self._chat:
            return count_chat(texts, self._encoding)
        return sum(count_text(t, self._encoding) for t in texts)

    def long(self) -> bool:
        """Not counted yet, and to be counted off the event loop (`count`, not `count_now`): long enough,
        or its encoding not built yet in this process (the first count builds it: up to a second or so)."""
        return self.known is None and (not built(self._encoding) or sum(len(t) for t in self._read()) > OFFLOAD_CHARS)

    async def count(self) -> int:
        if self.known is None:
            texts = self._read()
            if not built(self._encoding) or sum(len(t) for t in texts) > OFFLOAD_CHARS:
                self.known = await asyncio.to_thread(self._count, texts)
            else:
                self.known = self._count(texts)
        return self.known

    def count_now(self) -> int:
        if self.known is None:
            self.known = self._count(self._read())
        return self.known
