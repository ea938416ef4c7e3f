"""Fixtures of the orchestration tests: the sensors' clock, and the project's definitions on each engine."""

from __future__ import annotations

import dagster as dg
import pytest

from matchall_dagster.definitions import build_definitions
from matchall_dagster.simulator import SimulatorServer
from matchall_dagster_tests.orchestration.sensor_ticks import Clock


@pytest.fixture
def sensor_clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Both sensors' wall clock, moved by the test."""
    clock = Clock()
    monkeypatch.setattr("matchall_dagster.orchestration.readiness.clock", clock)
    monkeypatch.setattr("matchall_dagster.orchestration.discovery.clock", clock)
    return clock


@pytest.fixture
def store_defs(simulator_env: SimulatorServer, store_url: str) -> dg.Definitions:
    """The project's real definitions against the test's simulator, storing in `store_url`: a DuckDB file,
    then a PostgreSQL schema (for the tests where the engine matters)."""
    return build_definitions(store=store_url)
