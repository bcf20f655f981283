"""A worked example of a capture redactor plugin (gateway.contracts.TextRedactor): every run of 6 or more
digits (account numbers, order ids, national ids the pattern kinds do not know) becomes `[NUMBER]`.

Registered under the entry point group `strait.redactors` as `long_numbers` (pyproject.toml); a tenant
names it in `capture.redact`. A redactor is a pure function of the text; a plugin's runs in a worker thread."""

from __future__ import annotations

import re

_LONG = re.compile(r"[0-9]{6,}")


class LongNumbers:
    name = "long_numbers"

    def redact(self, text: str) -> str:
        return _LONG.sub("[NUMBER]", text)


def factory() -> LongNumbers:
    return LongNumbers()
