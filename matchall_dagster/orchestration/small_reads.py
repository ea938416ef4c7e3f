"""Small segments read together: one run reads a batch of ready segments of one page or less.

Most segments of an account are small, and a Dagster run costs a process: about 3 CPU seconds of
imports and start-up before any data, then another run for `segment_membership_changes`. Their
API work is one or two requests. So the readiness sensor sends every ready run whose first page
holds the whole segment (`is_small`) to `read_small_segments`, up to `BATCH_MAX_SEGMENTS` a run,
and keeps one run of `segment_matches` per large segment.

For each segment the batch does what the asset, its checks and `segment_membership_changes` do,
and logs the same events on the segment's partition: the materialization of `segment_matches`
(same metadata), the verdicts of `run_not_failed`, `run_not_expired` and `matches_complete`,
the materialization of `segment_membership_changes` and `membership_change_plausible`. The rows
are written by `storage.partitions` (one transaction a partition) and the history by
`storage.history`, as the assets do. The runs carry `BATCH_TAG`, on which the automation of
`segment_membership_changes` stands aside (`changes.CHANGES_AUTOMATION`).

A segment fails alone. A failed or expired remote run is recorded on its check, as the asset
does. Any other failure (the API after retries, the database) hands the segment back to the
readiness sensor with a pending record marked `alone`: it is read again in a run of its own, whose
failure, if it fails again, shows on its partition like any other run's. The batch goes on.
"""

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import dagster as dg
from dagster_duckdb import DuckDBResource
from pydantic import Field

from matchall_dagster.api.client import ActiveCampaignClient, MatchList
from matchall_dagster.api.errors import ActiveCampaignError, RunExpiredError, RunFailedError
from matchall_dagster.api.models import RunStatus
from matchall_dagster.api.validation import MAX_PAGE_SIZE
from matchall_dagster.lifecycle.policy import PendingRun
from matchall_dagster.lifecycle.record import PendingRecord
from matchall_dagster.orchestration.assets import (
    SegmentMatchesConfig,
    matches_metadata,
    members_frame,
    read_when_ready,
    run_verdict,
)
from matchall_dagster.orchestration.catalog import read_catalog
from matchall_dagster.orchestration.changes import changes_metadata, describe, plausibility
from matchall_dagster.orchestration.checks import evaluation, latest_materialization, materialized_verdicts
from matchall_dagster.orchestration.metadata import labelled
from matchall_dagster.orchestration.names import API_POOL, BATCH_TAG, CHANGES_KEY, MATCHES_KEY, SMALL_READS_JOB
from matchall_dagster.orchestration.resource import ActiveCampaignResource
from matchall_dagster.settings import Settings, settings
from matchall_dagster.storage.history import record_step
from matchall_dagster.storage.partitions import replace_partition, stored_metadata, summarize

__all__ = [
    "BATCH_MAX_SEGMENTS",
    "SMALL_MAX_MEMBERS",
    "SmallRead",
    "SmallReadsConfig",
    "batch_requests",
    "is_small",
    "read_small_segments",
]

SMALL_MAX_MEMBERS = MAX_PAGE_SIZE  # one page: the sensor's poll of a ready run already shows its total
# A run's start-up (about 3 CPU s) shared by up to this many segments (MATCHALL_SMALL_BATCH_SEGMENTS);
# the batch's API work at 5/s is then 20-40 s, and a failure of the whole run (a killed process)
# leaves this many for the next kick-off.
BATCH_MAX_SEGMENTS = Settings.model_fields["small_batch_segments"].default
_OP = "read_segment_batch"  # the job's one op


def is_small(status: RunStatus) -> bool:
    """A ready run whose segment fits on its first page."""
    page = status.run.page if status.run is not None else None
    return page is not None and page.total <= SMALL_MAX_MEMBERS


class SmallRead(dg.Config):
    """One ready run of the batch: what its pending record said."""

    segment_id: str
    run_id: str
    sort: str
    run_started_at: float | None = None
    attempt: int = 1
    kickoff: str | None = None
    segment_name: str | None = None
    polls: int = 0


class SmallReadsConfig(dg.Config):
    reads: list[SmallRead] = Field(description="The ready runs to read, one per segment.")
    wait_timeout_seconds: float = Field(
        default=600.0, gt=0, description="How long to wait for a run that turned not-ready again (its sort changed)."
    )
    max_restarts: int = Field(default=3, ge=0, description="Reads started again when a run changes mid-read.")


def batch_requests(runs: Sequence[PendingRun], size: int) -> list[dg.RunRequest]:
    """Runs of `read_small_segments` for ready small runs, `size` at most each."""
    requests = []
    for start in range(0, len(runs), max(size, 1)):
        chunk = runs[start : start + max(size, 1)]
        reads = [
            SmallRead(
                segment_id=run.segment_id,
                run_id=run.run_id,
                sort=run.sort,
                run_started_at=run.started_at,
                attempt=run.attempt,
                kickoff=run.kickoff,
                segment_name=run.segment_name,
                polls=run.polls,
            ).model_dump()
            for run in chunk
        ]
        # One key per set of remote runs: a tick evaluated twice launches the batch once.
        digest = hashlib.sha256("\n".join(f"{r.segment_id}/{r.run_id}" for r in chunk).encode()).hexdigest()[:20]
        requests.append(
            dg.RunRequest(
                run_key=f"small/{digest}",
                job_name=SMALL_READS_JOB,
                run_config={"ops": {_OP: {"config": {"reads": reads}}}},
                tags={BATCH_TAG: str(len(chunk))},
            )
        )
    return requests


class _Batch:
    """One run's reads: the client, the database and the event log it shares between segments."""

    def __init__(
        self,
        context: dg.OpExecutionContext,
        config: SmallReadsConfig,
        client: ActiveCampaignClient,
        duckdb: DuckDBResource,
    ) -> None:
        self.context = context
        self.client = client
        self.duckdb = duckdb
        self.read_config = SegmentMatchesConfig(
            wait_timeout_seconds=config.wait_timeout_seconds, max_restarts=config.max_restarts
        )
        self.max_share = settings().max_change_share
        self.catalog = read_catalog(duckdb.database, [read.segment_id for read in config.reads])

    def read(self, read: SmallRead) -> str:
        """Read, store and judge one segment; its outcome: "stored", "run ended" or "handed back"."""
        segment_id, log = read.segment_id, self.context.log
        requests, waited = self.client.requests_sent, self.client.budget.waited_seconds
        try:
            matches = read_when_ready(log, self.client, segment_id, read.run_id, read.sort, self.read_config)
        except (RunFailedError, RunExpiredError) as exc:
            log.warning(f"{labelled(segment_id, read.segment_name)}: {exc}")
            self._log(run_verdict(exc, self.context.instance, segment_id, read.run_id, read.sort))
            return "run ended"
        except ActiveCampaignError as exc:
            return self._hand_back(read, exc)
        metadata = matches_metadata(
            matches,
            self.catalog.get(segment_id),
            requests=self.client.requests_sent - requests,
            waited=self.client.budget.waited_seconds - waited,
            budget=str(self.client.budget.store),
            log=log,
        )
        try:
            self._store(matches, metadata)
        except Exception as exc:  # the database's errors have no common base: hand back any
            return self._hand_back(read, exc)
        return "stored"

    def _store(self, matches: MatchList, metadata: dict[str, Any]) -> None:
        """Write the rows, log the materialization and the checks' verdicts, then record the history step.

        One connection for it all: the file is locked for milliseconds, never while the API is waited for.
        """
        segment_id = matches.segment_id
        with self.duckdb.get_connection() as connection:
            replace_partition(connection, segment_id, members_frame(segment_id, matches.contact_ids))
            summary = summarize(connection, segment_id)
            metadata = {**metadata, **stored_metadata(self.duckdb.database, matches.total)}
            self._log(dg.AssetMaterialization(MATCHES_KEY, partition=segment_id, metadata=metadata))
            record = self._latest(MATCHES_KEY, segment_id)
            stored = {key: value.value for key, value in record.asset_materialization.metadata.items()}  # type: ignore[union-attr]
            for result in materialized_verdicts(stored, summary, datetime.now(UTC)):
                self._log(evaluation(result, MATCHES_KEY, segment_id, record))
            step = record_step(
                connection,
                segment_id,
                source=str(record.storage_id),
                run_id=matches.run.run_id,
                observed_at=datetime.fromtimestamp(record.timestamp, UTC),
            )
        self.context.log.info(describe(step))
        self._log(dg.AssetMaterialization(CHANGES_KEY, partition=segment_id, metadata=changes_metadata(step)))
        changes = self._latest(CHANGES_KEY, segment_id)
        self._log(evaluation(plausibility(step, self.max_share), CHANGES_KEY, segment_id, changes))

    def _log(self, event: dg.AssetMaterialization | dg.AssetObservation | dg.AssetCheckEvaluation) -> None:
        # An op's `log_event` handles check evaluations (as an asset's does); its annotation omits them.
        self.context.log_event(event)  # type: ignore[arg-type]

    def _latest(self, key: dg.AssetKey, segment_id: str) -> dg.EventLogRecord:
        """The materialization just logged: the target of its checks; its storage id keys the history step."""
        record = latest_materialization(self.context.instance, key, segment_id)
        if record is None or record.run_id != self.context.run_id:
            raise RuntimeError(f"The latest materialization of {key.to_user_string()}[{segment_id}] is not this run's.")
        return record

    def _hand_back(self, read: SmallRead, exc: Exception) -> str:
        """A pending record marked `alone`: the readiness sensor reads the segment again in a run of its own."""
        self.context.log.warning(
            f"Could not read {labelled(read.segment_id, read.segment_name)} in this batch: {exc} It goes back to "
            f"the readiness sensor, to be read in a run of its own."
        )
        record = PendingRecord(
            run_id=read.run_id,
            sort=read.sort,
            run_started_at=read.run_started_at,
            attempt=read.attempt,
            kickoff=read.kickoff,
            segment_name=read.segment_name,
            alone=True,
        )
        self._log(
            dg.AssetObservation(
                MATCHES_KEY,
                partition=read.segment_id,
                description=f"Match-all run {read.run_id} handed back by a batch, to be read alone.",
                metadata=record.to_metadata(),
            )
        )
        return "handed back"


@dg.op(name=_OP, pool=API_POOL, description="Reads a batch of small ready segments (see small_reads).")
def read_small_segments_op(
    context: dg.OpExecutionContext,
    config: SmallReadsConfig,
    activecampaign: ActiveCampaignResource,
    duckdb: DuckDBResource,
) -> None:
    with activecampaign.get_client() as client:
        batch = _Batch(context, config, client, duckdb)
        outcomes = [batch.read(read) for read in config.reads]
    counts = ", ".join(f"{outcomes.count(outcome)} {outcome}" for outcome in ("stored", "run ended", "handed back"))
    context.log.info(
        f"Read {len(outcomes)} small segment(s) in {client.requests_sent} request(s) "
        f"({client.budget.waited_seconds:.1f} s waiting for the request budget): {counts}."
    )


@dg.job(
    name=SMALL_READS_JOB,
    description="Reads a batch of small ready segments in one run: for each, the partition of segment_matches, "
    "its checks and segment_membership_changes, as their own runs would. Launched by the readiness sensor.",
)
def read_small_segments() -> None:
    read_small_segments_op()
