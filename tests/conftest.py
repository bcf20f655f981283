"""Suite-wide settings. In CI, hypothesis runs derandomized: the same examples every run, so a red
build is reproducible and never a coin toss; locally it keeps exploring new examples."""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
