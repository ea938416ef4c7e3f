"""Fixtures of the sensor tests: the sensors' clock and their share of the rate."""

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


@pytest.fixture
def fast_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sensors' share of the rate, unbounded: these simulators have no limit, and each discovery
    tick would otherwise wait a second at the gate (the tick's request budget is unchanged)."""
    monkeypatch.setattr("matchall_dagster.orchestration.share.SENSOR_REQUESTS_PER_SECOND", 1000.0)
