"""A worker process's GIL switch interval (`TANDEM_WORKER_SWITCH_INTERVAL_MS`, applied by
`tandem worker` before it serves)."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from tandem import env
from tandem.cli.worker import apply_switch_interval


@pytest.fixture(autouse=True)
def restore_interval() -> Iterator[None]:
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


def test_default_is_pythons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TANDEM_WORKER_SWITCH_INTERVAL_MS", raising=False)
    sys.setswitchinterval(0.005)
    apply_switch_interval()
    assert sys.getswitchinterval() == pytest.approx(0.005)


def test_set_or_left_at_pythons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_WORKER_SWITCH_INTERVAL_MS", "2")
    apply_switch_interval()
    assert sys.getswitchinterval() == pytest.approx(0.002)
    sys.setswitchinterval(0.005)
    monkeypatch.setenv("TANDEM_WORKER_SWITCH_INTERVAL_MS", "0")  # 0: Python's own, untouched
    apply_switch_interval()
    assert sys.getswitchinterval() == pytest.approx(0.005)


@pytest.mark.parametrize("value", ["-1", "101", "fast"])
def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("TANDEM_WORKER_SWITCH_INTERVAL_MS", value)
    with pytest.raises(ValueError):
        env.worker_switch_interval_s()
