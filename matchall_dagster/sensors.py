"""The sensors: segment discovery, and readiness polling of the pending match-all runs.

The readiness sensor's per-run work is `decide` (a pure function: a pending run and its polled
status in, the next step out); the sensor itself wires the cursor, the time and request
budgets of a tick, and the results.
"""

import enum
import hashlib
import logging
import os
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass

import dagster as dg
from pydantic import BaseModel, Field, ValidationError

from matchall_dagster.assets import segment_matches
from matchall_dagster.checks import ASSET_KEY, RUN_NOT_EXPIRED, RUN_NOT_FAILED
from matchall_dagster.client import ActiveCampaignClient
from matchall_dagster.errors import ActiveCampaignError, InvalidInputError
from matchall_dagster.kickoff import ATTEMPT, PENDING, STATUS, match_all_kickoff_job, pending_observation
from matchall_dagster.models import RunState, RunStatus
from matchall_dagster.partitions import segments_partitions, tracked
from matchall_dagster.resource import ActiveCampaignResource

# The sensors' share of the account's 5 requests/s; runs hold the rest (see dagster.yaml).
SENSOR_REQUESTS_PER_SECOND = 1.0
# Dagster ends a sensor evaluation after 60 s. A tick starts no poll after 25 s, and one poll
# takes at most 2 attempts of 10 s plus a 1 s backoff: every tick ends within about 46 s. What
# a tick could not poll is due first in the next one.
TICK_SECONDS = 25.0
SENSOR_MAX_RETRIES = 1
SENSOR_REQUEST_TIMEOUT = 10.0
MAX_POLLS_PER_TICK = 20  # at 1 request/s this fits the tick's time budget
FIRST_POLL_DELAY = 5.0
MAX_POLL_DELAY = 600.0
MAX_ATTEMPTS_VARIABLE = "MATCHALL_MAX_RUN_ATTEMPTS"
DEFAULT_MAX_ATTEMPTS = 3  # runs started per segment and kick-off when runs keep failing
OBSERVATION_PAGE = 1_000


class PendingRun(BaseModel):
    segment_id: str
    run_id: str
    sort: str
    next_poll_at: float
    polls: int = 0
    attempt: int = 1


class _PendingRecord(BaseModel):
    """The metadata of a pending-run observation (see `kickoff.pending_observation`)."""

    run_id: str
    sort: str
    attempt: int = Field(default=1, alias=ATTEMPT)


class ReadinessCursor(BaseModel):
    observations: str | None = None  # event-log cursor of the pending-run observations read so far
    pending: list[PendingRun] = []

    @classmethod
    def load(cls, raw: str | None, log: logging.Logger) -> "ReadinessCursor":
        if not raw:
            return cls()
        try:
            return cls.model_validate_json(raw)
        except ValidationError:
            log.error("The readiness sensor's cursor could not be read; starting from an empty one.")
            return cls()


def poll_delay(polls: int) -> float:
    """Soon after the start, then less often: 5 s, 10 s, 20 s, ... up to 10 minutes."""
    return float(min(FIRST_POLL_DELAY * 2**polls, MAX_POLL_DELAY))


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


def max_attempts() -> int:
    """MATCHALL_MAX_RUN_ATTEMPTS: how many runs a segment gets per kick-off when they keep failing."""
    raw = os.environ.get(MAX_ATTEMPTS_VARIABLE, "").strip()
    if not raw:
        return DEFAULT_MAX_ATTEMPTS
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise InvalidInputError(
            f"{MAX_ATTEMPTS_VARIABLE} must be a whole number from 1 to 100, not {raw[:20]!r}; "
            f"unset it for the default of {DEFAULT_MAX_ATTEMPTS}."
        )
    return int(raw)


def decide(run: PendingRun, status: RunStatus, now: float, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> Decision:
    if status.state is RunState.READY:
        return Decision(Step.MATERIALIZE, run)
    if status.state is RunState.EXPIRED:
        return Decision(Step.EXPIRED, run)
    if status.state is RunState.FAILED:
        return Decision(Step.RESTART if run.attempt < max_attempts else Step.GIVE_UP, run)
    polls = run.polls + 1
    return Decision(Step.WAIT, run.model_copy(update={"polls": polls, "next_poll_at": now + poll_delay(polls)}))


def _sensor_client(activecampaign: ActiveCampaignResource) -> AbstractContextManager[ActiveCampaignClient]:
    return activecampaign.get_client(
        requests_per_second=SENSOR_REQUESTS_PER_SECOND,
        max_retries=SENSOR_MAX_RETRIES,
        request_timeout=SENSOR_REQUEST_TIMEOUT,
    )


def materialize_request(run: PendingRun) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=f"{run.segment_id}/{run.run_id}",  # one materialization per remote run
        partition_key=run.segment_id,
        run_config={"ops": {"segment_matches": {"config": {"run_id": run.run_id, "sort": run.sort}}}},
        tags={"matchall/run_id": run.run_id, "matchall/sort": run.sort},
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


def _read_new_pending(context: dg.SensorEvaluationContext, cursor: ReadinessCursor, now: float) -> None:
    """Fold the pending-run observations recorded since the last tick into the cursor."""
    by_segment = {run.segment_id: run for run in cursor.pending}
    for _ in range(100):  # bounded: at most 100,000 records a tick
        result = context.instance.fetch_observations(
            dg.AssetRecordsFilter(asset_key=ASSET_KEY),
            limit=OBSERVATION_PAGE,
            cursor=cursor.observations,
            ascending=True,
        )
        for record in result.records:
            observation = record.asset_observation
            if observation is None or record.partition_key is None:
                continue
            metadata = {key: value.value for key, value in observation.metadata.items()}
            if metadata.get(STATUS) != PENDING:
                continue
            try:
                recorded = _PendingRecord.model_validate(metadata)
            except ValidationError:
                context.log.warning(f"Ignored a malformed pending-run record of segment {record.partition_key}.")
                continue
            known = by_segment.get(record.partition_key)
            if known is not None and known.run_id == recorded.run_id:
                continue
            by_segment[record.partition_key] = PendingRun(
                segment_id=record.partition_key,
                run_id=recorded.run_id,
                sort=recorded.sort,
                next_poll_at=now,
                attempt=recorded.attempt,
            )
        cursor.observations = result.cursor
        if not result.has_more:
            break
    cursor.pending = list(by_segment.values())


@dg.sensor(
    name="match_all_readiness_sensor",
    target=dg.AssetSelection.assets(segment_matches),
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Polls each pending match-all run (backing off per run) and materializes its partition once ready.",
)
def match_all_readiness_sensor(
    context: dg.SensorEvaluationContext, activecampaign: ActiveCampaignResource
) -> dg.SensorResult:
    started = time.monotonic()
    now = time.time()
    attempts = max_attempts()
    cursor = ReadinessCursor.load(context.cursor, context.log)
    _read_new_pending(context, cursor, now)
    due = sorted((run for run in cursor.pending if run.next_poll_at <= now), key=lambda run: run.next_poll_at)
    requests: list[dg.RunRequest] = []
    events: list[dg.AssetObservation] = []
    updated = {run.segment_id: run for run in cursor.pending}
    polls = 0
    with _sensor_client(activecampaign) as client:
        for run in due:
            if polls >= MAX_POLLS_PER_TICK or time.monotonic() - started > TICK_SECONDS:
                break  # the rest are due first next tick
            polls += 1
            try:
                status = client.poll_run(run.segment_id, run.run_id, sort=run.sort)
                decision = decide(run, status, time.time(), max_attempts=attempts)
                if decision.step is Step.MATERIALIZE:
                    context.log.info(f"Run {run.run_id} of segment {run.segment_id} is ready; materializing it.")
                    requests.append(materialize_request(run))
                    del updated[run.segment_id]
                elif decision.step is Step.WAIT:
                    updated[run.segment_id] = decision.run
                elif decision.step is Step.EXPIRED:
                    context.log.warning(f"Run {run.run_id} of segment {run.segment_id} is gone (404); checking it.")
                    requests.append(check_request(run, RUN_NOT_EXPIRED))
                    del updated[run.segment_id]
                else:
                    retrying = decision.step is Step.RESTART
                    requests.append(check_request(run, RUN_NOT_FAILED))
                    del updated[run.segment_id]
                    if retrying:
                        fresh = client.start_run(run.segment_id, sort=run.sort)
                        polls += 1
                        events.append(pending_observation(run.segment_id, fresh, run.sort, attempt=run.attempt + 1))
                        updated[run.segment_id] = PendingRun(
                            segment_id=run.segment_id,
                            run_id=fresh.run_id,
                            sort=run.sort,
                            next_poll_at=time.time() + FIRST_POLL_DELAY,
                            attempt=run.attempt + 1,
                        )
                    context.log.warning(
                        f"Run {run.run_id} of segment {run.segment_id} failed (attempt {run.attempt}); "
                        + ("started a fresh run." if retrying else "giving up until the next kick-off.")
                    )
            except ActiveCampaignError as exc:
                # One bad segment never stops the others: note it, retry it later.
                context.log.warning(f"Polling run {run.run_id} of segment {run.segment_id} failed: {exc}")
                updated[run.segment_id] = run.model_copy(update={"next_poll_at": time.time() + poll_delay(run.polls)})
    cursor.pending = list(updated.values())
    return dg.SensorResult(
        run_requests=requests,
        asset_events=events,
        cursor=cursor.model_dump_json(exclude_defaults=True),
        skip_reason=None
        if requests or events
        else f"{len(cursor.pending)} run(s) pending, {polls} polled, none ready.",
    )


@dg.sensor(
    name="segment_discovery_sensor",
    job=match_all_kickoff_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds the account's saved segments (GET /api/3/audiences, limited by MATCHALL_SEGMENTS) as "
    "partitions, and starts runs for the new ones.",
)
def segment_discovery_sensor(
    context: dg.SensorEvaluationContext, activecampaign: ActiveCampaignResource
) -> dg.SensorResult:
    assert segments_partitions.name is not None
    try:
        with _sensor_client(activecampaign) as client:
            segments = client.list_segments()
    except ActiveCampaignError as exc:
        return dg.SensorResult(skip_reason=f"Could not list the account's segments: {exc}")
    known = set(context.instance.get_dynamic_partitions(segments_partitions.name))
    new = [segment_id for segment_id in tracked(s.id for s in segments) if segment_id not in known]
    if not new:
        return dg.SensorResult(skip_reason=f"No new segments among {len(segments)}.")
    context.log.info(f"Discovered {len(new)} new segment(s): {', '.join(new[:20])}{' ...' if len(new) > 20 else ''}")
    digest = hashlib.sha256(",".join(new).encode()).hexdigest()[:16]
    return dg.SensorResult(
        dynamic_partitions_requests=[segments_partitions.build_add_request(new)],
        run_requests=[
            dg.RunRequest(
                run_key=f"discovered/{digest}",
                run_config={"ops": {"start_match_all_runs": {"config": {"segment_ids": new}}}},
            )
        ],
    )
