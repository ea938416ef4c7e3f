"""Fixtures of the sensor tests: the sensors' clock."""

from __future__ import annotations

import pytest

from matchall_dagster_tests.orchestration.sensor_ticks import Clock


@pytest.fixture
def sensor_clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Both sensors' wall clock, moved by the test."""
    clock = Clock()
    monkeypatch.setattr("matchall_dagster.orchestration.readiness.clock", clock)
    monkeypatch.setattr("matchall_dagster.orchestration.discovery.clock", clock)
    return clock
