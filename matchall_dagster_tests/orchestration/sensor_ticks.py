"""What the sensor tests share: one tick through `evaluate_tick`, the sensors' clock, pending runs
recorded as the kick-off records them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from matchall_dagster import ActiveCampaignClient
from matchall_dagster.lifecycle.cursor import ReadinessCursor
from matchall_dagster.lifecycle.policy import FIRST_POLL_DELAY
from matchall_dagster.orchestration.account import DEFAULT_ACCOUNT
from matchall_dagster.orchestration.pending_runs import pending_observation
from matchall_dagster.simulator import DEFAULT_TOKEN, SimulatorServer
from matchall_dagster.storage.store import open_store
from matchall_dagster_tests.conftest import sensor_context

READINESS = "match_all_readiness_sensor"
DISCOVERY = "segment_discovery_sensor"
LOG = logging.getLogger("test")


@dataclass(frozen=True)
class Read:
    """A read the readiness sensor requested: alone (a run of segment_matches) or in a batch."""

    segment_id: str
    run_id: str
    sort: str
    polls: int
    batch: bool


def reads_of(data: dg.SensorExecutionData) -> list[Read]:
    """Every segment read the tick requested, batches expanded, in request order."""
    found: list[Read] = []
    for request in data.run_requests:
        if request.job_name == "read_small_segments":
            (config,) = (op["config"] for op in request.run_config["ops"].values())
            found.extend(Read(r["segment_id"], r["run_id"], r["sort"], r["polls"], True) for r in config["reads"])
        elif not request.asset_check_keys:
            assert request.job_name == "segment_matches_job"
            assert request.run_key == f"{request.partition_key}/{request.tags['matchall/run_id']}"
            config = request.run_config["ops"]["segment_matches"]["config"]
            assert request.partition_key is not None
            polls = int(request.tags["matchall/polls"])
            found.append(Read(request.partition_key, config["run_id"], config["sort"], polls, False))
    return found


def tick(
    instance: dg.DagsterInstance, defs: dg.Definitions, name: str, cursor: str | None = None
) -> dg.SensorExecutionData:
    with sensor_context(instance, defs, cursor) as context:
        return defs.resolve_sensor_def(name).evaluate_tick(context)


class Clock:
    """The sensors' wall clock, moved forward by the test instead of waiting. It starts
    FIRST_POLL_DELAY ahead, so that runs recorded by a test are due at once."""

    def __init__(self) -> None:
        self.offset = FIRST_POLL_DELAY

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def record_pending(
    instance: dg.DagsterInstance,
    server: SimulatorServer,
    *segment_ids: str,
    sort: str = "id",
    names: dict[str, str] | None = None,
) -> dict[str, str]:
    """Start runs as the kick-off does and record them as pending; returns run ids by segment."""
    instance.add_dynamic_partitions(
        "segments", sorted(set(segment_ids) - set(instance.get_dynamic_partitions("segments")))
    )
    runs = {}
    with ActiveCampaignClient(server.url, DEFAULT_TOKEN, requests_per_second=1000) as client:
        for segment_id in segment_ids:
            run = client.start_run(segment_id, sort=sort)
            name = (names or {}).get(segment_id)
            instance.report_runless_asset_event(pending_observation(DEFAULT_ACCOUNT, segment_id, run, sort, name=name))
            runs[segment_id] = run.run_id
    return runs


def stored_rows(store: str | Path, segment_id: str) -> int:
    """The partition's rows in the store (a URL, or a DuckDB file's path)."""
    return len(open_store(str(store)).read_partition(segment_id))


def cursor_of(data: dg.SensorExecutionData) -> ReadinessCursor:
    return ReadinessCursor.load(data.cursor, LOG)
