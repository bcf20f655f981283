"""Redaction of upstream error text before it reaches a client.

An upstream's error message is useful ("This model's maximum context length is 8192 tokens") but it
is written for the upstream's operator, not for our clients: it may echo the credential the gateway
sent ("Incorrect API key provided: sk-live-..."), name internal hosts and ports
(`gpu-node-7.corp.internal:8000`, `foo.svc.cluster.local`, `localhost:8000`), addresses, URLs and
source paths (`/opt/vllm/engine.py:812`, `C:\\srv\\engine.py`). A `Redactor` replaces each of those
with a placeholder and keeps the rest of the text.

The secrets are the policy's backends' resolved `api_key` values, collected once per runtime
(`redactor_for`), so the normaliser never needs an adapter's internals.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping

# Placeholders: none can be matched by a later pattern, so redaction is idempotent.
SECRET = "[redacted]"
URL = "[url]"
PATH = "[path]"
HOST = "[host]"
ADDRESS = "[address]"
# What the client gets when redaction cannot be trusted (a secret that keeps reappearing).
FALLBACK = "The upstream returned an error."
# Upstream tracebacks can be long; after redaction the message is cut to this many characters.
MAX_MESSAGE_CHARS = 2000

_TRAILING = ".,;:!?)]}'\"`>"
# scheme://anything-up-to-whitespace (the trailing punctuation of a sentence is given back).
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]{1,15}://[^\s\"'<>`]+")
# C:\dir\file or \\server\share\...
_WINDOWS_PATH = re.compile(r"(?<![\w])(?:[A-Za-z]:|\\\\[\w.$-]+)\\[^\s\"'<>|`]*")
# An absolute POSIX path: a slash that starts a token (not `and/or`, not `meta-llama/Llama-3`).
_POSIX_PATH = re.compile(r"(?<![\w.:/\\-])(?:~)?/[\w.@+%-]+(?:/[\w.@+%-]*)*(?::\d+)*")
# A source file named without a directory, or with a relative one: engine.py:812, vllm/worker.cu.
_SOURCE_FILE = re.compile(
    r"(?<![\w.-])[\w.-]+(?:/[\w.-]+)*\.(?:py|pyx|pyi|c|cc|cpp|cxx|cu|cuh|h|hpp|rs|go|java|kt|js|ts|rb|so)"
    r"(?::\d+)*(?![\w-]|\.\w)"
)
# Candidate IPv6 literals (validated by `ipaddress` before they are replaced): hex groups and colons,
# optionally bracketed, with a zone and a port.
_IPV6 = re.compile(
    r"(?<![\w:.])\[?(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|\d{1,3}(?:\.\d{1,3}){3})?(?:%[\w.-]+)?\]?"
    r"(?::\d{1,5})?(?![\w:]|\.\w)"
)
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?::\d{1,5})?(?!\w|\.\w)")
# A lower-case DNS name with at least two labels and an alphabetic last label: gpu-node-7.corp.internal,
# foo.svc.cluster.local, api.example.com. The whole dotted token must match, so `torch.cuda.OutOfMemory`
# and `json.exception.parse_error.101` (not host names) are left alone; so are versions (`3.5`) and model
# names (`gpt-3.5-turbo`, `qwen2.5-7b`), whose last label does not start with a letter.
_HOST = re.compile(
    r"(?<![\w.-])(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,61}[a-z0-9]"
    r"(?::\d{1,5})?(?![\w-]|\.\w)"
)
# The same in capitals (GPU-NODE-7.CORP.INTERNAL); mixed case is left alone, since `torch.cuda.OutOfMemoryError`
# is a dotted name of the same shape.
_HOST_UPPER = re.compile(
    r"(?<![\w.-])(?:[A-Z0-9](?:[A-Z0-9-]{0,61}[A-Z0-9])?\.)+[A-Z][A-Z0-9-]{0,61}[A-Z0-9]"
    r"(?::\d{1,5})?(?![\w-]|\.\w)"
)
# Anything shaped like a bearer credential, configured or not: `Bearer xyz`, OpenAI-style `sk-...` keys
# (including the masked echo `sk-proj-****abcd` some providers send back).
_KEYLIKE = re.compile(r"(?i)\bbearer\s+[^\s\"',]+|(?<![\w-])(?:sk|rk|pk)-[A-Za-z0-9_*.-]{6,}")
# A bare name with a port (gpu-node-7:8000, redis:6379) and localhost in any form.
_HOST_PORT = re.compile(r"(?<![\w.:/-])(?:[a-z][a-z0-9-]*:\d{2,5}|localhost)(?![\w:.-])", re.IGNORECASE)


def _url(match: re.Match[str]) -> str:
    text = match.group(0)
    stripped = text.rstrip(_TRAILING)
    return URL + text[len(stripped) :]


def _ipv6(match: re.Match[str]) -> str:
    text = match.group(0)
    literal = text
    if literal.startswith("["):
        literal = literal[1:].split("]", 1)[0]
    literal = literal.split("%", 1)[0]
    for candidate in (literal, literal.rsplit(":", 1)[0]):
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        return ADDRESS
    return text


def _ipv4(match: re.Match[str]) -> str:
    try:
        ipaddress.IPv4Address(match.group(0).split(":", 1)[0])
    except ValueError:
        return match.group(0)
    return ADDRESS


class Redactor:
    """Removes secrets, URLs, host names, IP addresses and file paths from upstream text."""

    __slots__ = ("_any", "_secrets")

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret that contains another one is removed whole.
        self._secrets = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))
        # Also in another case (an upstream that upper-cases what it echoes), and the first 8 characters
        # of a long secret on their own (the prefix a provider shows of a key it masks).
        forms = [re.escape(s) for s in self._secrets]
        forms += [re.escape(s[:8]) for s in self._secrets if len(s) >= 16]
        self._any = re.compile("|".join(forms), re.IGNORECASE) if forms else None

    def __call__(self, text: str) -> str:
        out = text
        # Secrets first, before any other pattern could cut one in two; and again at the end, since a
        # replacement could in principle join the text around it into a secret.
        out = self._drop_secrets(out)
        out = _KEYLIKE.sub(SECRET, out)
        out = _URL.sub(_url, out)
        out = _WINDOWS_PATH.sub(PATH, out)
        out = _POSIX_PATH.sub(PATH, out)
        out = _SOURCE_FILE.sub(PATH, out)
        out = _IPV6.sub(_ipv6, out)
        out = _IPV4.sub(_ipv4, out)
        out = _HOST.sub(HOST, out)
        out = _HOST_UPPER.sub(HOST, out)
        out = _HOST_PORT.sub(HOST, out)
        out = self._drop_secrets(out)
        if len(out) > MAX_MESSAGE_CHARS:
            out = out[: MAX_MESSAGE_CHARS - 1].rstrip() + "…"
            out = self._drop_secrets(out)
        return out

    def _drop_secrets(self, text: str) -> str:
        found = self._any
        if found is None:
            return text
        for _ in range(4):
            if found.search(text) is None:
                return text
            text = found.sub(SECRET, text)
        if found.search(text) is None:
            return text
        # A secret keeps reappearing (it overlaps its own placeholder): give nothing away.
        return "" if found.search(FALLBACK) else FALLBACK

    def optional(self, text: str | None) -> str | None:
        return None if text is None else self(text)


NO_SECRETS = Redactor()


def redactor_for(api_keys: Iterable[str | None], environ: Mapping[str, str]) -> Redactor:
    """The redactor for a policy's backends: each `api_key: env:NAME` resolved from `environ` (a
    variable that is not set is skipped: the adapter refuses to start without it anyway)."""
    secrets: list[str] = []
    for ref in api_keys:
        if ref:
            value = environ.get(ref.removeprefix("env:"))
            if value:
                secrets.append(value)
    return Redactor(secrets)
