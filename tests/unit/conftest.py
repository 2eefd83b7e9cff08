"""Fixtures shared by the unit tests."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import fileserver.processor as processor_module
from tests.unit.test_processor import Clock


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """A fake clock for the processor: time moves only when it sleeps."""
    fake = Clock()
    # replace the module's `time`, not time.monotonic itself (the event loop uses that)
    monkeypatch.setattr(processor_module, "time", SimpleNamespace(monotonic=fake.monotonic))
    return fake
