"""STRAIT_REGION: the replica's region, read once from the environment (a short name or nothing)."""

from __future__ import annotations

import pytest

from gateway.settings import Settings


def test_the_region_is_read_from_the_environment() -> None:
    assert Settings.from_env({"STRAIT_REGION": "eu-west"}).region == "eu-west"
    assert Settings.from_env({}).region is None
    assert Settings.from_env({"STRAIT_REGION": ""}).region is None  # empty: unset


@pytest.mark.parametrize("bad", ["eu west", "x" * 65, "eu/west"])
def test_a_region_that_is_not_a_short_name_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid setting"):
        Settings.from_env({"STRAIT_REGION": bad})
