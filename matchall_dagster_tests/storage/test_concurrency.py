"""Runs at once on one store, on each engine: four run processes each replacing a partition of
`segment_matches` (and recording its step), plus a fifth recording a step of another partition,
all started together (`concurrency_defs`). No lock error reaches a run; afterwards every partition
holds exactly its rows, and every step's joined and left are exactly who joined and left.

On DuckDB the runs take turns on the file: the test holds the file until each run has found it
locked at least once, then lets go (each run's connection waits and retries). On PostgreSQL the
four writers meet in the middle of their COPY: they write in parallel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import numpy as np
import pytest

from matchall_dagster.storage import history
from matchall_dagster.storage.postgres_store import partition_table
from matchall_dagster.storage.store import MATCHES_TABLE, StoreUrl, open_store
from matchall_dagster_tests.storage import concurrency_defs as runs
from matchall_dagster_tests.storage.engines import database, frame
from matchall_dagster_tests.storage.test_atomicity import wait_until

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2020, 1, 1, tzinfo=UTC)
WRITTEN = ("1", "2", "3", "4")  # one run each writes its partition, then records its step
RECORDED = "5"  # the fifth run records this partition's step only


def launch(partition: str, home: Path, store_url: str, barriers: Path) -> subprocess.Popen[str]:
    config: dict[str, Any]
    if partition == RECORDED:
        select, config = "segment_membership_changes", {"segment_membership_changes": {"config": {"barrier": True}}}
    else:
        select, config = (
            "segment_matches,segment_membership_changes",
            {"segment_matches": {"config": {"version": 1, "barrier": True}}},
        )
    command = [
        str(Path(sys.executable).parent / "dagster"), "asset", "materialize",
        "-m", runs.__name__, "-d", str(REPO),
        "--select", select, "--partition", partition, "--config-json", json.dumps({"ops": config}),
    ]  # fmt: skip
    environment = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        runs.STORE_ENV: store_url,
        runs.BARRIERS_ENV: str(barriers),
    }
    return subprocess.Popen(
        command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_four_writers_and_a_history_run_at_once(store_url: str, tmp_path: Path) -> None:
    home, barriers = tmp_path / "dagster_home", tmp_path / "barriers"
    home.mkdir()
    barriers.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    store = open_store(store_url)
    # Version 0 of every partition and its first step; partition 5 already at version 1, its step to come.
    for partition in (*WRITTEN, RECORDED):
        store.replace_partition(partition, frame(runs.contact_ids(partition, 0)))
        store.record_step(partition, source="setup", run_id="setup", observed_at=T0)
    store.replace_partition(RECORDED, frame(runs.contact_ids(RECORDED, 1)))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization(runs.segment_matches.key, partition=RECORDED))

    duck = StoreUrl.parse(store_url).kind == "duckdb"
    holder = duckdb.connect(StoreUrl.parse(store_url).location) if duck else None  # the file, locked
    processes = {partition: launch(partition, home, store_url, barriers) for partition in (*WRITTEN, RECORDED)}
    try:
        if holder is not None:
            wait_until(
                lambda: (
                    len(list(barriers.glob("locked-*"))) == len(processes)
                    or any(p.poll() is not None for p in processes.values())
                ),
                "every run to find the DuckDB file locked",
            )
            holder.close()
            holder = None
        outputs = {partition: process.communicate(timeout=600)[0] for partition, process in processes.items()}
    finally:
        if holder is not None:
            holder.close()
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.communicate()
    failed = {p: output[-3000:] for p, output in outputs.items() if processes[p].returncode != 0}
    assert not failed, f"runs failed: {failed}"
    assert len(list(barriers.glob("start-*"))) == len(processes)  # they all started together
    if duck:
        assert len(list(barriers.glob("locked-*"))) == len(processes)  # each waited for the file, none failed
    else:
        assert len(list(barriers.glob("copying-*"))) == len(WRITTEN)  # the four COPYs were under way at once

    with dg.DagsterInstance.from_config(str(home)) as instance:
        statuses = [record.dagster_run.status for record in instance.get_run_records()]
        assert statuses == [dg.DagsterRunStatus.SUCCESS] * len(processes)
        steps_recorded = {
            record.partition_key: record.asset_materialization.metadata
            for partition in (*WRITTEN, RECORDED)
            for record in instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=runs.segment_membership_changes.key, asset_partitions=[partition]),
                limit=1,
            ).records
            if record.asset_materialization is not None
        }
    assert set(steps_recorded) == {*WRITTEN, RECORDED}

    # No row lost or mixed: each partition is exactly its version 1, in its order.
    for partition in (*WRITTEN, RECORDED):
        rows = store.read_partition(partition)
        assert rows["position"].tolist() == list(range(1, len(rows) + 1)), partition
        assert np.array_equal(rows["contact_id"].to_numpy(), runs.contact_ids(partition, 1)), partition
    # And the history: each partition's second step is exactly who joined and who left.
    for partition in (*WRITTEN, RECORDED):
        before, after = (set(runs.contact_ids(partition, r).tolist()) for r in (0, 1))
        steps = store.steps_since(partition, None)
        assert steps is not None
        assert next((run, members) for _, run, members, _, _ in steps) == ("setup", len(before))
        assert [(members, joined, left) for _, _, members, joined, left in steps[1:]] == [
            (len(after), len(after - before), len(before - after))
        ], partition
        metadata = steps_recorded[partition]
        assert (metadata["joined"].value, metadata["left"].value) == (len(after - before), len(before - after))
        changes = list(store.changes_since(partition, steps[1][0], 1_000_000))
        joined = {int(c) for batch in changes for c in batch.loc[batch["change"] == history.JOINED, "contact_id"]}
        left = {int(c) for batch in changes for c in batch.loc[batch["change"] == history.LEFT, "contact_id"]}
        assert (joined, left) == (after - before, before - after), partition
    with database(store_url) as db:
        assert db.partition_sizes() == {p: len(runs.contact_ids(p, 1)) for p in (*WRITTEN, RECORDED)}
        if not duck:  # no writer left a table of its own behind
            partitions = {partition_table(p) for p in (*WRITTEN, RECORDED)}
            assert db.tables() == {MATCHES_TABLE, *history.TABLES, *partitions}


@pytest.fixture(autouse=True)
def _no_store_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runs' store comes from MATCHALL_TEST_STORE alone."""
    monkeypatch.delenv("MATCHALL_STORE", raising=False)
