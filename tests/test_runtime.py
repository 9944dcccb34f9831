import sys

import pytest

from cellseg.runtime import tune_malloc


def test_malloc_tuning_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("CELLSEG_MALLOC_TUNING", "0")
    assert tune_malloc() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_malloc_tuning_applies_on_glibc(monkeypatch):
    monkeypatch.delenv("CELLSEG_MALLOC_TUNING", raising=False)
    assert tune_malloc() is True
