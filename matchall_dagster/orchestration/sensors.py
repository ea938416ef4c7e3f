"""The sensors: segment discovery, and readiness polling of the pending match-all runs.

Discovery lists the account (one request per 10,000 segments, through the sensors' share of the
limit) and leaves its decisions to `discovery` (new, missing, deleted, listed again; when the
catalog is refreshed); it wires the instance, the cursor and the results.

The readiness sensor's per-run work is `decide` (a pure function: a pending run and its polled
status in, the next step out), and its choice of what to poll is `plan` (pure too: the runs due,
oldest first, within the tick's request budget). The sensor itself wires the event log, the
cursor, the clock and the results.

Scale (10,000 pending runs at the sensors' 1 request/s): a tick sends at most
`REQUESTS_PER_TICK` requests and ends within `TICK_DEADLINE_SECONDS`; each run is polled soon
after it starts, then less often (the wait doubles the run's age, up to 10 minutes); the due runs
are polled oldest-due first, so a run waits at most ceil(runs due before it / REQUESTS_PER_TICK)
ticks. The cursor keeps only what the event log cannot tell: how far the pending-run records have
been taken, and, for the runs polled at least once and still pending, the record's id, the next
poll time and the poll count, packed in columns and compressed (about 3 bytes a run).
"""

import base64
import enum
import hashlib
import heapq
import json
import logging
import math
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace

import dagster as dg
import numpy as np
from dagster_duckdb import DuckDBResource
from pydantic import BaseModel, Field, ValidationError

from matchall_dagster.api.client import ActiveCampaignClient
from matchall_dagster.api.errors import ActiveCampaignError, APIUnavailableError, AuthenticationError
from matchall_dagster.api.models import RunState, RunStatus, Segment
from matchall_dagster.lifecycle.discovery import DiscoveryCursor, catalog_due, fingerprints, reconcile
from matchall_dagster.orchestration.assets import segment_matches
from matchall_dagster.orchestration.catalog import (
    CATALOG_JOB,
    LIST_PAGE_SIZE,
    activecampaign_segments_job,
    names_of,
    read_catalog,
)
from matchall_dagster.orchestration.checks import (
    ASSET_KEY,
    RUN_NOT_EXPIRED,
    RUN_NOT_FAILED,
    SEGMENT_NAME,
    STATUS,
    labelled,
)
from matchall_dagster.orchestration.deletions import (
    MISSING_TWICE,
    deleted_ids,
    deleted_observation,
    deleted_segments,
    is_deleted,
    listed_again_observation,
)
from matchall_dagster.orchestration.kickoff import ATTEMPT, KICKOFF, PENDING, match_all_kickoff_job, pending_observation
from matchall_dagster.orchestration.partitions import segments_partitions, tracked
from matchall_dagster.orchestration.resource import ActiveCampaignResource
from matchall_dagster.settings import settings

# The sensors' share of the account's 5 requests/s; runs hold the rest (see dagster.yaml).
SENSOR_REQUESTS_PER_SECOND = 1.0
# Dagster ends a sensor evaluation after 60 s; ours end within 40 s. No request starts after
# POLL_WINDOW_SECONDS; one takes at most SENSOR_REQUEST_TIMEOUT (no retry inside a tick: a failed
# poll is due again in a later one) after at most 1 s in the rate limiter; the event-log reads
# before and after are a few bounded queries. 24 + 1 + 8 = 33 s, leaving 7 s for the rest.
TICK_DEADLINE_SECONDS = 40.0
POLL_WINDOW_SECONDS = 24.0
SENSOR_REQUEST_TIMEOUT = 8.0
SENSOR_MAX_RETRIES = 0
# The request budget of a tick: what the share allows over the poll window. Fixed at import, so
# that a benchmark may speed the clock of the requests up without changing what a tick may send.
REQUESTS_PER_TICK = math.floor(SENSOR_REQUESTS_PER_SECOND * POLL_WINDOW_SECONDS)
MAX_POLLS_PER_TICK = REQUESTS_PER_TICK
FIRST_POLL_DELAY = 5.0
MAX_POLL_DELAY = 600.0
UNAVAILABLE_STOPS_TICK = 3  # consecutive 429/5xx/network failures: the API is struggling, stop for now
DEFAULT_MAX_ATTEMPTS = 3  # runs started per segment and kick-off when runs keep failing
OBSERVATION_PAGE = 2_000  # records read at most per query
NEW_RECORDS_SECONDS = 4.0  # at most this long reading new records a tick (a long history takes several)
CURSOR_VERSION = 2

# The wall clock of the polling schedule. A benchmark replaces it to run hours of ticks in minutes.
clock: Callable[[], float] = time.time


class _ShareGate:
    """Spaces the sensors' requests across ticks and sensors of this process.

    Each tick builds a new client whose rate limiter starts empty; without this, the last request
    of one tick and the first of the next could fall within one second. The daemon evaluates the
    sensors one at a time (dagster.yaml: no `use_threads`), so one gate per process suffices.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_done = -math.inf

    def wait(self, requests_per_second: float) -> None:
        with self._lock:
            delay = self._last_done + 1.0 / requests_per_second + 0.015 - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def done(self) -> None:
        with self._lock:
            self._last_done = time.monotonic()


_share_gate = _ShareGate()


class _OutOfTimeError(Exception):
    """A wait inside the client would end after the tick's poll window."""


@dataclass
class _TickSleep:
    """The sensor client's `sleep`: waits (for a 429's Retry-After) only while the window lasts."""

    window_ends: float  # time.monotonic()

    def __call__(self, seconds: float) -> None:
        if time.monotonic() + seconds > self.window_ends:
            raise _OutOfTimeError
        time.sleep(seconds)


@dataclass(frozen=True)
class PendingRun:
    """A started run waiting to be ready, as its pending-run record and the sensor's polls say."""

    segment_id: str
    run_id: str
    sort: str
    started_at: float  # epoch seconds: the API's run_id_start (never later than the sensor's clock)
    storage_id: int = 0  # the event-log id of the run's pending-run record
    attempt: int = 1
    polls: int = 0
    next_poll_at: float = 0.0
    kickoff: str | None = None
    segment_name: str | None = None


class _PendingRecord(BaseModel):
    """The metadata of a pending-run observation (see `kickoff.pending_observation`)."""

    run_id: str
    sort: str
    run_started_at: float | None = None
    attempt: int = Field(default=1, alias=ATTEMPT)
    kickoff: str | None = Field(default=None, alias=KICKOFF)
    segment_name: str | None = Field(default=None, alias=SEGMENT_NAME)


@dataclass
class ReadinessCursor:
    """What the event log cannot tell the next tick.

    `after`: the pending-run records up to this event-log id have been taken (polled or passed
    over); later ones are new, due from their start. `waiting`: for each run
    polled at least once and still pending, by its record's id, (next poll time, polls so far).
    """

    after: int | None = None
    waiting: dict[int, tuple[float, int]] = field(default_factory=dict)

    def dump(self) -> str:
        ids = np.fromiter(sorted(self.waiting), dtype=np.int64, count=len(self.waiting))
        data: dict[str, object] = {"v": CURSOR_VERSION, "after": self.after}
        if ids.size:
            due = np.ceil([self.waiting[int(i)][0] for i in ids]).astype(np.int64)
            polls = np.minimum([self.waiting[int(i)][1] for i in ids], 255).astype(np.uint8)
            base = int(due.min())
            columns = b"".join(
                (np.diff(ids, prepend=0).astype("<i8").tobytes(), (due - base).astype("<u4").tobytes(), polls.tobytes())
            )
            data.update(n=int(ids.size), base=base, waiting=base64.b64encode(zlib.compress(columns, 6)).decode())
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def load(cls, raw: str | None, log: logging.Logger) -> "ReadinessCursor":
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("v") != CURSOR_VERSION:
                raise ValueError("another version")
            after = data.get("after")
            if after is not None and not isinstance(after, int):
                raise ValueError("bad `after`")
            count = int(data.get("n", 0))
            if not count:
                return cls(after=after)
            columns = zlib.decompress(base64.b64decode(data["waiting"], validate=True))
            if len(columns) != count * 13:
                raise ValueError("bad length")
            ids = np.cumsum(np.frombuffer(columns, "<i8", count))
            due = np.frombuffer(columns, "<u4", count, offset=count * 8).astype(np.int64) + int(data["base"])
            polls = np.frombuffer(columns, np.uint8, count, offset=count * 12)
            return cls(
                after=after,
                waiting={
                    int(i): (float(d), int(p))
                    for i, d, p in zip(ids.tolist(), due.tolist(), polls.tolist(), strict=True)
                },
            )
        except (ValueError, KeyError, TypeError, zlib.error) as exc:
            log.error(
                f"The readiness sensor's cursor could not be read ({exc}); taking the pending-run records "
                "from the start of the event log (the newest run of each segment is polled; none is "
                "materialized twice)."
            )
            return cls()


def poll_delay(age: float) -> float:
    """Soon after the start, then less often: wait as long as the run has run (5 s to 10 minutes).

    Keyed to the run's age, not to the poll count, so that a run first polled late (many runs
    ahead of it) is not polled again seconds later.
    """
    return float(min(max(age, FIRST_POLL_DELAY), MAX_POLL_DELAY))


class Step(enum.Enum):
    MATERIALIZE = "materialize"
    WAIT = "wait"
    RESTART = "restart"  # failed, attempts left: start a fresh run
    GIVE_UP = "give_up"  # failed, no attempts left
    EXPIRED = "expired"


@dataclass(frozen=True)
class Decision:
    step: Step
    run: PendingRun


def decide(run: PendingRun, status: RunStatus, now: float, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> Decision:
    if status.state is RunState.READY:
        return Decision(Step.MATERIALIZE, replace(run, polls=run.polls + 1))
    if status.state is RunState.EXPIRED:
        return Decision(Step.EXPIRED, run)
    if status.state is RunState.FAILED:
        return Decision(Step.RESTART if run.attempt < max_attempts else Step.GIVE_UP, run)
    return Decision(Step.WAIT, backed_off(run, now))


def backed_off(run: PendingRun, now: float) -> PendingRun:
    return replace(run, polls=run.polls + 1, next_poll_at=now + poll_delay(now - run.started_at))


@dataclass(frozen=True)
class Due:
    """A run that may be polled: `fresh` ones come from new records, the others from the cursor."""

    due_at: float
    storage_id: int
    fresh: bool


def plan(waiting: Iterable[Due], fresh: Sequence[Due], now: float, budget: int) -> list[Due]:
    """The runs to poll this tick: due ones, oldest due first (ties by record), at most `budget`.

    New records are taken in event-log order (their due times made non-decreasing), so that the
    ones taken are always a prefix and the cursor needs only the last record taken.
    """
    ordered: list[Due] = []
    latest = -math.inf
    for item in fresh:
        latest = max(latest, item.due_at)
        if latest > now:
            break
        ordered.append(replace(item, due_at=latest))
    due = (item for item in waiting if item.due_at <= now)
    return heapq.nsmallest(budget, [*ordered, *due], key=lambda item: (item.due_at, item.storage_id))


def _sensor_client(activecampaign: ActiveCampaignResource) -> AbstractContextManager[ActiveCampaignClient]:
    return activecampaign.get_client(
        requests_per_second=SENSOR_REQUESTS_PER_SECOND, max_retries=1, request_timeout=SENSOR_REQUEST_TIMEOUT
    )


def _polling_client(activecampaign: ActiveCampaignResource, sleep: _TickSleep) -> ActiveCampaignClient:
    """The readiness sensor's client: its share of the limit, no retries, waits bounded by the tick."""
    return ActiveCampaignClient(
        activecampaign.api_url,
        activecampaign.api_key,
        timeout=SENSOR_REQUEST_TIMEOUT,
        max_retries=SENSOR_MAX_RETRIES,
        requests_per_second=SENSOR_REQUESTS_PER_SECOND,
        page_size=activecampaign.page_size,
        max_concurrent_requests=1,
        sleep=sleep,
    )


def materialize_request(run: PendingRun) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=f"{run.segment_id}/{run.run_id}",  # one materialization per remote run
        partition_key=run.segment_id,
        run_config={"ops": {"segment_matches": {"config": {"run_id": run.run_id, "sort": run.sort}}}},
        tags={"matchall/run_id": run.run_id, "matchall/sort": run.sort, "matchall/polls": str(run.polls)},
    )


def check_request(run: PendingRun, check_name: str) -> dg.RunRequest:
    """A run of one check alone, judging this remote run, so that its verdict lands on the partition."""
    return dg.RunRequest(
        run_key=f"{run.segment_id}/{run.run_id}/{check_name}",
        partition_key=run.segment_id,
        asset_selection=[],
        asset_check_keys=[dg.AssetCheckKey(ASSET_KEY, check_name)],
        run_config={"ops": {f"segment_matches_{check_name}": {"config": {"run_id": run.run_id, "sort": run.sort}}}},
        tags={"matchall/run_id": run.run_id, "matchall/sort": run.sort},
    )


def _pending_run(record: dg.EventLogRecord, now: float, log: logging.Logger) -> PendingRun | None:
    """The pending run a record holds, or None for another kind of observation."""
    observation = record.asset_observation
    if observation is None or record.partition_key is None:
        return None
    metadata = {key: value.value for key, value in observation.metadata.items()}
    if metadata.get(STATUS) != PENDING:
        return None
    try:
        recorded = _PendingRecord.model_validate(metadata)
    except ValidationError:
        log.warning(f"Ignored a malformed pending-run record of segment {record.partition_key}.")
        return None
    started = recorded.run_started_at if recorded.run_started_at is not None else record.timestamp
    return PendingRun(
        segment_id=record.partition_key,
        run_id=recorded.run_id,
        sort=recorded.sort,
        started_at=min(started, now),  # an API clock ahead of ours must not delay the first poll
        storage_id=record.storage_id,
        attempt=recorded.attempt,
        kickoff=recorded.kickoff,
        segment_name=recorded.segment_name,
        next_poll_at=min(started, now),  # due once recorded: by the time a tick reads it, seconds have passed
    )


def _new_pending(
    instance: dg.DagsterInstance, after: int | None, budget: int, now: float, log: logging.Logger, *, until: float
) -> tuple[list[PendingRun], int | None, int]:
    """The first `budget` pending runs recorded after `after` that no newer record of their segment
    replaces; the id of the last record read; how many were passed over as replaced.

    Pages grow from twice the budget, so that a tick reads little when the sensor keeps up and
    gets through a long history (a cursor reset) quickly; reading stops at `until` (monotonic).
    """
    runs: list[PendingRun] = []
    last = after
    replaced = 0
    size = 2 * budget
    while True:
        page = instance.fetch_observations(
            dg.AssetRecordsFilter(asset_key=ASSET_KEY, after_storage_id=last), limit=size, ascending=True
        )
        parsed = [(record, _pending_run(record, now, log)) for record in page.records]
        oldest: dict[str, int] = {}
        for record, run in parsed:
            if run is not None:
                oldest.setdefault(run.segment_id, record.storage_id)
        newer = _newer_pending(instance, oldest, now)
        for record, run in parsed:
            last = record.storage_id
            if run is None:
                continue
            if newer.get(run.segment_id, run.storage_id) > run.storage_id:
                replaced += 1
                continue
            runs.append(run)
            if len(runs) == budget:
                return runs, last, replaced
        if not page.has_more or time.monotonic() >= until:
            return runs, last, replaced
        size = min(2 * size, OBSERVATION_PAGE)


@dataclass
class TickReport:
    """What one evaluation did, for its skip message and log."""

    waiting: int = 0
    new_taken: int = 0
    polled: int = 0
    requests: int = 0
    superseded: int = 0
    dropped: int = 0
    stopped: str = ""

    def describe(self) -> str:
        if not self.waiting and not self.polled:
            return "No runs pending; waiting for the next kick-off (or a new segment)."
        text = (
            f"{self.waiting} run(s) waiting after this tick; polled {self.polled} "
            f"({self.new_taken} new), {self.requests} request(s)"
        )
        if self.superseded:
            text += f", {self.superseded} superseded by a newer run"
        if self.dropped:
            text += f", {self.dropped} dropped (segment marked deleted or forgotten)"
        return text + (f"; stopped early: {self.stopped}" if self.stopped else "") + "."


@dg.sensor(
    name="match_all_readiness_sensor",
    target=dg.AssetSelection.assets(segment_matches),
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Polls each pending match-all run (backing off per run, oldest due first, a fixed request "
    "budget per tick) and materializes its partition once ready.",
)
def match_all_readiness_sensor(
    context: dg.SensorEvaluationContext, activecampaign: ActiveCampaignResource
) -> dg.SensorResult:
    started = time.monotonic()
    window_ends = started + POLL_WINDOW_SECONDS
    now = clock()
    attempts = settings().max_run_attempts
    instance = context.instance
    cursor = ReadinessCursor.load(context.cursor, context.log)
    report = TickReport()
    budget = REQUESTS_PER_TICK

    fresh, scanned_to, report.superseded = _new_pending(
        instance, cursor.after, budget, now, context.log, until=started + NEW_RECORDS_SECONDS
    )
    by_id = {run.storage_id: run for run in fresh}
    chosen = plan(
        (Due(due_at, storage_id, False) for storage_id, (due_at, _) in cursor.waiting.items()),
        [Due(run.next_poll_at, run.storage_id, True) for run in fresh],
        now,
        budget,
    )
    # The records of the waiting runs chosen, read back by id: the cursor does not repeat them.
    waiting_ids = [item.storage_id for item in chosen if not item.fresh]
    if waiting_ids:
        for record in instance.fetch_observations(
            dg.AssetRecordsFilter(asset_key=ASSET_KEY, storage_ids=waiting_ids), limit=len(waiting_ids)
        ).records:
            run = _pending_run(record, now, context.log)
            if run is not None:
                due_at, polls = cursor.waiting[record.storage_id]
                by_id[record.storage_id] = replace(run, polls=polls, next_poll_at=due_at)
    # A segment with a newer pending run drops the older one: never materialize stale members last.
    # (New records were sifted as they were read.)
    candidates: dict[str, int] = {}
    for item in chosen:
        if not item.fresh and item.storage_id in by_id:
            segment_id = by_id[item.storage_id].segment_id
            candidates[segment_id] = min(item.storage_id, candidates.get(segment_id, item.storage_id))
    newer = _newer_pending(instance, candidates, now)

    requests: list[dg.RunRequest] = []
    events: list[dg.AssetObservation] = []
    fresh_done = cursor.after
    unavailable = 0
    active: dict[str, bool] = {}
    client = _polling_client(activecampaign, _TickSleep(window_ends))
    try:
        for item in chosen:
            run = by_id.get(item.storage_id)
            if run is None:  # its record is gone (wiped event log): forget it
                cursor.waiting.pop(item.storage_id, None)
                fresh_done = max(fresh_done or 0, item.storage_id) if item.fresh else fresh_done
                continue
            if newer.get(run.segment_id, run.storage_id) > run.storage_id:
                report.superseded += 1
                cursor.waiting.pop(run.storage_id, None)
                fresh_done = max(fresh_done or 0, run.storage_id) if item.fresh else fresh_done
                continue
            if not active.setdefault(run.segment_id, _active(instance, run.segment_id)):
                # Polling it costs requests for nothing, and a request for a forgotten partition would
                # fail the tick; the next kick-off after it is listed again starts a fresh run.
                report.dropped += 1
                cursor.waiting.pop(run.storage_id, None)
                fresh_done = max(fresh_done or 0, run.storage_id) if item.fresh else fresh_done
                continue
            if client.requests_sent >= budget:
                report.stopped = "request budget spent"
                break
            if time.monotonic() >= window_ends:
                report.stopped = "time budget spent"
                break
            _share_gate.wait(SENSOR_REQUESTS_PER_SECOND)
            try:
                status = client.poll_run(run.segment_id, run.run_id, sort=run.sort)
            except _OutOfTimeError:
                report.stopped = "the API asked to wait past the tick's window"
                break
            except AuthenticationError as exc:
                context.log.error(f"Stopped polling: {exc}")
                report.stopped = "the API refused the token"
                break
            except ActiveCampaignError as exc:
                # One bad segment never stops the others: note it, poll it later (backing off).
                context.log.warning(f"Polling run {run.run_id} of segment {run.segment_id} failed: {exc}")
                report.polled += 1
                fresh_done = run.storage_id if item.fresh else fresh_done
                later = backed_off(run, clock())
                cursor.waiting[run.storage_id] = (later.next_poll_at, later.polls)
                unavailable = unavailable + 1 if isinstance(exc, APIUnavailableError) else 0
                if unavailable >= UNAVAILABLE_STOPS_TICK:
                    report.stopped = f"{unavailable} polls in a row found the API unavailable"
                    break
                continue
            finally:
                _share_gate.done()
            unavailable = 0
            report.polled += 1
            report.new_taken += item.fresh
            decision = decide(run, status, clock(), max_attempts=attempts)
            segment = labelled(run.segment_id, run.segment_name)
            if decision.step is Step.RESTART and client.requests_sent >= budget:
                report.stopped = "no request left to start a fresh run"
                break  # polled again next tick, first: it became due before the others
            fresh_done = run.storage_id if item.fresh else fresh_done
            cursor.waiting.pop(run.storage_id, None)
            if decision.step is Step.MATERIALIZE:
                context.log.info(
                    f"Run {run.run_id} of {segment} is ready; launching the materialization of "
                    f"partition {run.segment_id}."
                )
                requests.append(materialize_request(decision.run))
            elif decision.step is Step.WAIT:
                cursor.waiting[run.storage_id] = (decision.run.next_poll_at, decision.run.polls)
            elif decision.step is Step.EXPIRED:
                context.log.warning(
                    f"Run {run.run_id} of {segment} expired (404) before it could be read; "
                    f"recording it on the check run_not_expired. The next kick-off starts a new run; to read the "
                    f"segment sooner, materialize partition {run.segment_id} by hand."
                )
                requests.append(check_request(run, RUN_NOT_EXPIRED))
            else:
                requests.append(check_request(run, RUN_NOT_FAILED))
                retrying = decision.step is Step.RESTART
                restarted = retrying and _restart(client, run, events, context.log)
                if retrying and not restarted:  # the start failed: poll the failed run again later, and retry
                    later = backed_off(run, clock())
                    cursor.waiting[run.storage_id] = (later.next_poll_at, later.polls)
                context.log.warning(
                    f"Run {run.run_id} of {segment} failed (attempt {run.attempt}); "
                    + (
                        "started a fresh run."
                        if restarted
                        else "will try to start a fresh run later."
                        if retrying
                        else "giving up until the next kick-off."
                    )
                    + " Runs that keep failing point to the segment's definition: open it in ActiveCampaign."
                )
    finally:
        report.requests = client.requests_sent
        client.close()
    if not fresh or fresh_done == fresh[-1].storage_id:
        fresh_done = scanned_to  # every run read was taken: pass over the other records read too
    cursor.after = fresh_done
    report.waiting = len(cursor.waiting)
    if report.stopped:
        context.log.info(f"Tick {report.describe()}")
    return dg.SensorResult(
        run_requests=requests,
        asset_events=events,
        cursor=cursor.dump(),
        skip_reason=None if requests or events else report.describe(),
    )


def _restart(
    client: ActiveCampaignClient, run: PendingRun, events: list[dg.AssetObservation], log: logging.Logger
) -> bool:
    """Start a fresh run of a failed one's segment; its record (in `events`) brings it back to the sensor."""
    _share_gate.wait(SENSOR_REQUESTS_PER_SECOND)
    try:
        fresh = client.start_run(run.segment_id, sort=run.sort)
    except ActiveCampaignError as exc:
        log.warning(f"Could not start a fresh run of segment {run.segment_id}: {exc}")
        return False
    finally:
        _share_gate.done()
    events.append(
        pending_observation(
            run.segment_id, fresh, run.sort, attempt=run.attempt + 1, kickoff=run.kickoff, name=run.segment_name
        )
    )
    return True


def _active(instance: dg.DagsterInstance, segment_id: str) -> bool:
    """Still a partition, and not marked deleted: two indexed lookups."""
    assert segments_partitions.name is not None
    return instance.has_dynamic_partition(segments_partitions.name, segment_id) and not is_deleted(instance, segment_id)


def _newer_pending(instance: dg.DagsterInstance, candidates: dict[str, int], now: float) -> dict[str, int]:
    """Of these segments (with the record id of the run about to be polled), those with a newer
    pending-run record, and its id. One indexed query for the tick's few segments."""
    if not candidates:
        return {}
    latest = instance.event_log_storage.get_latest_storage_id_by_partition(
        ASSET_KEY, dg.DagsterEventType.ASSET_OBSERVATION, partitions=set(candidates)
    )
    later = [storage_id for segment_id, storage_id in latest.items() if storage_id > candidates[segment_id]]
    if not later:
        return {}
    records = instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=ASSET_KEY, storage_ids=later), limit=len(later)
    ).records
    log = logging.getLogger(__name__)
    return {
        record.partition_key: record.storage_id
        for record in records
        if record.partition_key is not None and _pending_run(record, now, log) is not None
    }


def _listing(activecampaign: ActiveCampaignResource) -> list[Segment]:
    with _sensor_client(activecampaign) as client:
        _share_gate.wait(SENSOR_REQUESTS_PER_SECOND)
        try:
            return client.list_segments(page_size=LIST_PAGE_SIZE)  # 10,000 segments a request
        finally:
            _share_gate.done()


@dg.sensor(
    name="segment_discovery_sensor",
    jobs=[match_all_kickoff_job, activecampaign_segments_job],
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Lists the account's saved segments (GET /api/3/audiences, one request per 10,000): adds the new "
    "ones admitted by MATCHALL_SEGMENTS as partitions and starts their runs, marks tracked ones missing from two "
    "listings in a row as deleted (unmarked when listed again), and refreshes the catalog activecampaign_segments "
    "when the listing changed (sizes alone: at most hourly).",
)
def segment_discovery_sensor(
    context: dg.SensorEvaluationContext,
    activecampaign: ActiveCampaignResource,
    duckdb: DuckDBResource,
) -> dg.SensorResult:
    assert segments_partitions.name is not None
    now = clock()
    try:
        listed = _listing(activecampaign)
    except ActiveCampaignError as exc:  # not a listing: nothing counts as missing
        return dg.SensorResult(skip_reason=f"Could not list the account's segments: {exc}", cursor=context.cursor)
    cursor = DiscoveryCursor.load(context.cursor, context.log)
    instance = context.instance
    partitions = set(instance.get_dynamic_partitions(segments_partitions.name))
    deleted = deleted_ids(instance)
    listed_ids = [segment.id for segment in listed]
    names = {segment.id: segment.name for segment in listed}
    admitted = set(tracked([*listed_ids, *partitions]))
    change = reconcile(listed_ids, admitted, partitions, deleted, cursor.missing)

    requests: list[dg.RunRequest] = []
    partition_requests: list[dg.AddDynamicPartitionsRequest | dg.DeleteDynamicPartitionsRequest] = []
    events: list[dg.AssetObservation] = []
    done: list[str] = []
    if change.new:
        context.log.info(
            f"Discovered {len(change.new)} new segment(s): {', '.join(change.new[:20])}"
            f"{' ...' if len(change.new) > 20 else ''}"
        )
        digest = hashlib.sha256(",".join(change.new).encode()).hexdigest()[:16]
        partition_requests.append(segments_partitions.build_add_request(change.new))
        requests.append(
            dg.RunRequest(
                job_name=match_all_kickoff_job.name,
                run_key=f"discovered/{digest}/{now:.0f}",  # a segment forgotten, then listed again, is started again
                run_config={"ops": {"start_match_all_runs": {"config": {"segment_ids": change.new}}}},
            )
        )
        done.append(f"added {len(change.new)}")
    if change.to_mark:
        known_names = names_of(read_catalog(duckdb.database, change.to_mark, patience=0.5))
        context.log.warning(
            f"{len(change.to_mark)} tracked segment(s) missing from two listings in a row, marked deleted (their "
            f"rows are kept): {', '.join(change.to_mark[:20])}{' ...' if len(change.to_mark) > 20 else ''}"
        )
        partition_requests.append(deleted_segments.build_add_request(change.to_mark))
        events.extend(deleted_observation(s, MISSING_TWICE, known_names.get(s)) for s in change.to_mark)
        done.append(f"marked {len(change.to_mark)} deleted")
    if change.listed_again:
        context.log.info(f"{len(change.listed_again)} segment(s) marked deleted are listed again: unmarked.")
        partition_requests.append(deleted_segments.build_delete_request(change.listed_again))
        events.extend(listed_again_observation(s, names.get(s)) for s in change.listed_again)
        done.append(f"unmarked {len(change.listed_again)}")
    if change.missing_once:
        done.append(f"{len(change.missing_once)} missing once")

    after_deleted = (deleted | set(change.to_mark)) - set(change.listed_again)
    structure, counts = fingerprints(listed, partitions | set(change.new), after_deleted)
    why = catalog_due(cursor, structure, counts, now)
    if why is not None:
        requests.append(dg.RunRequest(job_name=CATALOG_JOB, run_key=f"catalog/{now:.0f}", tags={"matchall/why": why}))
        cursor = DiscoveryCursor(cursor.missing, structure, counts, now)
        done.append(f"catalog refresh requested ({why})")
    cursor.missing = change.missing_once
    summary = f"{len(listed)} segment(s) listed: " + ("; ".join(done) or "no changes") + "."
    if done:
        context.log.info(summary)
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=partition_requests,
        asset_events=events,
        cursor=cursor.dump(),
        skip_reason=None if requests else summary,
    )
