"""Memory per member on the path of a materialization: the client's buffer, the frame, the write.

A segment of 10,000,000 members must fit a run in 750 MB (benchmarks/memory.py measures that
through Dagster). These tests guard the reasons it does, at small sizes: ids live in int64
buffers (8 bytes each), the frame adds only its position column and one byte of segment index a
row, and the IO manager writes it without per-row Python objects, to either store (DuckDB reads the
frame in place; PostgreSQL's COPY stream is built a chunk at a time, so its buffer does not grow
with the segment: these tests make the chunk smaller than the sizes measured). Each measure is the slope of
tracemalloc's peak between two sizes, so that what does not grow with the segment (threads,
pages in flight, Dagster's run) cancels out; per-id Python objects (about 36 bytes an id), a
copy of a column (8) or a sort of the ids (8 or more) would break the bounds.

(No `from __future__ import annotations`: this module defines Dagster assets.)
"""

import gc
import tracemalloc
from collections.abc import Callable
from typing import TypeVar

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from matchall_dagster import ActiveCampaignClient
from matchall_dagster.api.client import MatchList
from matchall_dagster.orchestration.account import DEFAULT_ACCOUNT
from matchall_dagster.orchestration.assets import members_frame
from matchall_dagster.simulator import SimAccount, SimSegment, SimulatorServer
from matchall_dagster.storage import postgres_store
from matchall_dagster.storage.io_manager import MatchallIOManager
from matchall_dagster.storage.store import open_store
from matchall_dagster_tests.conftest import ServeSimulator, materialize_segment

T = TypeVar("T")
# The slope is taken over the 200,000 ids between them; both are large enough (20 pages or more)
# for the client to keep its most pages in flight, so that those cancel out too.
SMALL, LARGE = 200_000, 400_000
SEGMENTS = {str(SMALL): SMALL, str(LARGE): LARGE}
WARM_UP = "7"  # a first run pays Dagster's one-time costs (imports, compiled records) outside the measures
# PostgreSQL's COPY buffer is one chunk (26 bytes a row), whatever the segment's size: at this chunk both
# sizes span several, so the buffer cancels out of the slope as it does at 10,000,000 with the real one.
TEST_CHUNK_ROWS = 50_000


def traced_peak(action: Callable[[], T]) -> tuple[T, int]:
    """What `action` returns, and the peak of the Python heap (numpy buffers included) above
    where it started."""
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        result = action()
        return result, tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


def bytes_per_id(measure: Callable[[int], int]) -> float:
    """The slope between two sizes, each the least peak of two tries: tracemalloc also counts the
    in-process simulator's transient answers, which only ever add to a peak."""
    least = {size: min(measure(size), measure(size)) for size in (SMALL, LARGE)}
    return (least[LARGE] - least[SMALL]) / (LARGE - SMALL)


@pytest.fixture
def big_server(serve_simulator: ServeSimulator) -> SimulatorServer:
    segments = [SimSegment(key, f"{size:,} members", size) for key, size in SEGMENTS.items()]
    account = SimAccount([*segments, SimSegment(WARM_UP, "warm-up", 7)], seed=5)
    server = serve_simulator(account)
    for segment_id in SEGMENTS:
        account.ordered(segment_id, "id")  # the simulator's own arrays, built before any measure
        account.ordered(segment_id, "-email")
    return server


def fetch(client: ActiveCampaignClient, segment_id: str, sort: str) -> MatchList:
    run = client.start_run(segment_id, sort=sort)
    first = client.wait_until_ready(segment_id, run.run_id, sort=sort)
    return client.fetch_matches(segment_id, run.run_id, sort=sort, first_page=first)


# -- the client's buffer ----------------------------------------------------------------------


@pytest.mark.parametrize("sort", ["id", "-email"], ids=["in id order", "shuffled"])
def test_fetch_matches_keeps_the_ids_in_one_int64_buffer(
    big_server: SimulatorServer, make_client: Callable[..., ActiveCampaignClient], sort: str
) -> None:
    # One page in flight: the in-process simulator's answers (Python ints, JSON) are traced too, and
    # eight of them at once would swamp the slope.
    client = make_client(big_server, max_concurrent_requests=1)

    def measure(size: int) -> int:
        matches, peak = traced_peak(lambda: fetch(client, str(size), sort))
        ids = matches.contact_ids
        assert type(ids) is np.ndarray
        assert ids.dtype == np.int64
        assert ids.flags.c_contiguous
        assert ids.size == size
        assert ids.tolist() == big_server.simulator.truth(str(size), sort)
        return peak

    per_id = bytes_per_id(measure)
    # 8 bytes an id for the buffer (measured 11 to 12 with 8 pages in flight, the duplicate
    # check's bitmap included); a sorted copy would add 8, Python ints 28 or more.
    assert 7.5 <= per_id <= 15.0, f"fetch_matches took {per_id:.1f} bytes an id"


# -- the frame --------------------------------------------------------------------------------


def test_members_frame_adds_its_position_column_and_a_byte_of_index_a_row() -> None:
    def measure(size: int) -> int:
        ids = np.arange(7, 7 + size, dtype=np.int64)[::-1].copy()
        frame, peak = traced_peak(lambda: members_frame("42", ids))
        assert list(frame.dtypes.astype(str)) == [
            "dictionary<values=string, indices=int8, ordered=0>[pyarrow]",
            "int64",
            "int64",
        ]
        assert not any(dtype == np.dtype(object) for dtype in frame.dtypes)
        segment_type = frame["segment_id"].dtype
        assert isinstance(segment_type, pd.ArrowDtype)
        assert segment_type.pyarrow_dtype == pa.dictionary(pa.int8(), pa.string())
        # The client's buffer is the column itself, not a copy of it.
        assert np.shares_memory(frame["contact_id"].to_numpy(), ids)
        return peak

    per_id = bytes_per_id(measure)
    # 8 for the positions, 1 for the segment's index (measured 9.8); a copy of the ids would add 8.
    assert 8.5 <= per_id <= 11.0, f"members_frame took {per_id:.1f} bytes an id"


# -- the IO manager's write -------------------------------------------------------------------


@pytest.fixture
def small_copy_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    assert postgres_store.COPY_CHUNK_ROWS > LARGE  # the real chunk is larger than these segments
    monkeypatch.setattr(postgres_store, "COPY_CHUNK_ROWS", TEST_CHUNK_ROWS)


def write(instance: dg.DagsterInstance, store_url: str, segment_id: str, frame: pd.DataFrame) -> None:
    @dg.asset(
        name="segment_matches",
        partitions_def=DEFAULT_ACCOUNT.segments_partitions,
        metadata={"partition_expr": "segment_id"},
    )
    def stand_in() -> pd.DataFrame:
        return frame

    if segment_id not in instance.get_dynamic_partitions("segments"):
        instance.add_dynamic_partitions("segments", [segment_id])
    result = dg.materialize(
        [stand_in],
        partition_key=segment_id,
        instance=instance,
        resources={"io_manager": MatchallIOManager(store=store_url)},
    )
    assert result.success


@pytest.mark.usefixtures("small_copy_chunks")
def test_the_io_manager_writes_a_frame_without_python_objects_per_row(
    instance: dg.DagsterInstance, store_url: str
) -> None:
    write(instance, store_url, WARM_UP, members_frame(WARM_UP, np.arange(1, 10, dtype=np.int64)))

    def measure(size: int) -> int:
        frame = members_frame(str(size), np.arange(1, size + 1, dtype=np.int64) * 3)
        _, peak = traced_peak(lambda: write(instance, store_url, str(size), frame))
        return peak

    per_id = bytes_per_id(measure)
    # measured 0.1 on DuckDB, 0.0 on PostgreSQL; a COPY buffer of the whole frame would add 26 an id or more
    assert per_id <= 1.0, f"the write took {per_id:.1f} bytes an id of Python memory"
    summary = open_store(store_url).summarize(str(LARGE))  # what was written is the frame, exactly
    assert (summary.rows, summary.positions_exact, summary.repeated_contacts) == (LARGE, True, 0)


# -- the whole materialization ----------------------------------------------------------------


@pytest.mark.usefixtures("small_copy_chunks")
def test_a_materialization_with_its_checks_stays_within_the_buffers(
    big_server: SimulatorServer, instance: dg.DagsterInstance, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real asset and its checks in one process, on either store: ids, positions, index; nothing
    per row besides (matches_complete's summary is computed by the database, it does not load the rows)."""
    from matchall_dagster.definitions import build_definitions
    from matchall_dagster.orchestration.resource import ActiveCampaignResource
    from matchall_dagster.simulator import DEFAULT_TOKEN

    monkeypatch.setenv("ACTIVECAMPAIGN_API_URL", big_server.url)
    monkeypatch.setenv("ACTIVECAMPAIGN_API_KEY", DEFAULT_TOKEN)
    defs = build_definitions(store=store_url)
    resources = {
        **(defs.resources or {}),
        "activecampaign": ActiveCampaignResource(
            api_url=big_server.url, api_key=DEFAULT_TOKEN, requests_per_second=1000
        ),
    }
    materialize_segment(defs, instance, WARM_UP, resources=resources)

    def measure(size: int) -> int:
        result, peak = traced_peak(lambda: materialize_segment(defs, instance, str(size), resources=resources))
        checks = result.get_asset_check_evaluations()
        assert [check.passed for check in checks] == [True] * 3, checks
        return peak

    per_id = bytes_per_id(measure)
    # ids 8 + positions 8 + index 1 at most (measured 13); loading the rows into pandas for the
    # check would add 17 and a string object a row.
    assert per_id <= 20.0, f"a materialization took {per_id:.1f} bytes an id"
