"""Definitions for `test_concurrency`: a partitioned `segment_matches` written through
`MatchallIOManager`, and a `segment_membership_changes` that records each partition's step with
`MembershipStore.record_step`, both on the store named by MATCHALL_TEST_STORE. Each run is a
`dagster asset materialize` process of its own, on a shared DAGSTER_HOME.

The rows of a partition are `contact_ids(partition, version)`: each version, a percent of version 0's
members leave and more join, so that a step's joined and left sets are known in advance.

With MATCHALL_TEST_BARRIERS set (a folder), the run processes also:
- wait at the `start` barrier (`barrier` config) until all five runs are there, so that they
  write at once;
- on PostgreSQL, wait in the middle of their COPY until all four writers are in theirs (the
  `copying` barrier): proof that writers of different partitions write in parallel;
- on DuckDB, leave a `locked-<pid>` file each time the store's connection finds the file locked
  by another process (and retries): proof that they took turns rather than failing.
"""

# (No `from __future__ import annotations`: Dagster reads the config classes from the functions'
# annotations, and a string annotation would not resolve.)
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import numpy as np
import pandas as pd

from matchall_dagster.orchestration.assets import members_frame
from matchall_dagster.storage import postgres_store
from matchall_dagster.storage.io_manager import MatchallIOManager, MembershipStoreResource
from matchall_dagster.storage.store import StoreUrl

STORE_ENV = "MATCHALL_TEST_STORE"
BARRIERS_ENV = "MATCHALL_TEST_BARRIERS"
PARTITIONS = dg.StaticPartitionsDefinition(["1", "2", "3", "4", "5"])
WRITERS = 4  # runs writing a partition at once; a fifth records a step only
BASE_ROWS = 100_000
BARRIER_PATIENCE = 180.0


def contact_ids(partition: str, version: int) -> np.ndarray[Any, np.dtype[np.int64]]:
    """The partition's members at a version, shuffled: version 0's less `version` percent, plus as many and 1,000
    more a version."""
    k = int(partition)
    size = BASE_ROWS + 10_000 * k
    pool = np.random.default_rng(k).permutation(3 * size).astype(np.int64) + k * 100_000_000
    churn = version * size // 100
    members = np.concatenate([pool[churn:size], pool[size : size + churn + 1_000 * version]])
    return np.random.default_rng(100 + version).permutation(members)


def barrier(name: str, parties: int) -> None:
    """Wait until `parties` processes reached the barrier `name` (files in the barriers folder)."""
    folder = Path(os.environ[BARRIERS_ENV])
    (folder / f"{name}-{os.getpid()}").touch()
    deadline = time.monotonic() + BARRIER_PATIENCE
    while (arrived := len(list(folder.glob(f"{name}-*")))) < parties:
        if time.monotonic() > deadline:
            raise RuntimeError(f"Only {arrived} of {parties} runs reached {name!r} in {BARRIER_PATIENCE:.0f} s.")
        time.sleep(0.02)


def _probe_duckdb_locks() -> None:
    connect = duckdb.connect

    def probed(*args: Any, **kwargs: Any) -> duckdb.DuckDBPyConnection:
        try:
            return connect(*args, **kwargs)
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                (Path(os.environ[BARRIERS_ENV]) / f"locked-{os.getpid()}").touch()
            raise

    duckdb.connect = probed  # this run process only


def _meet_mid_copy() -> None:
    chunks = postgres_store.copy_chunks

    def meeting(positions: Any, contact_ids: Any) -> Iterator[bytes]:
        stream = chunks(positions, contact_ids)
        yield next(stream)  # the header
        yield next(stream)  # the first chunk of rows: this COPY is under way
        barrier("copying", WRITERS)
        yield from stream

    postgres_store.copy_chunks = meeting


if os.environ.get(BARRIERS_ENV):
    if StoreUrl.parse(os.environ[STORE_ENV]).kind == "duckdb":
        _probe_duckdb_locks()
    else:
        _meet_mid_copy()


class MatchesConfig(dg.Config):
    version: int = 0
    barrier: bool = False


class ChangesConfig(dg.Config):
    barrier: bool = False


@dg.asset(partitions_def=PARTITIONS)
def segment_matches(context: dg.AssetExecutionContext, config: MatchesConfig) -> pd.DataFrame:
    if config.barrier:
        barrier("start", WRITERS + 1)
    return members_frame(context.partition_key, contact_ids(context.partition_key, config.version))


@dg.asset(partitions_def=PARTITIONS, deps=[segment_matches])
def segment_membership_changes(
    context: dg.AssetExecutionContext, config: ChangesConfig, store: MembershipStoreResource
) -> dg.MaterializeResult:  # type: ignore[type-arg]
    if config.barrier:
        barrier("start", WRITERS + 1)
    (source,) = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=segment_matches.key, asset_partitions=[context.partition_key]), limit=1
    ).records
    step = store.open().record_step(
        context.partition_key,
        source=str(source.storage_id),
        run_id=source.run_id,
        observed_at=datetime.fromtimestamp(source.timestamp, UTC),
    )
    return dg.MaterializeResult(
        metadata={"members": step.members, "joined": step.joined, "left": step.left, "recorded": step.recorded}
    )


defs = dg.Definitions(
    assets=[segment_matches, segment_membership_changes],
    resources={
        "io_manager": MatchallIOManager(store=dg.EnvVar(STORE_ENV)),
        "store": MembershipStoreResource(url=dg.EnvVar(STORE_ENV)),
    },
    executor=dg.in_process_executor,
)
