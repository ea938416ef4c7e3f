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
are written through the account's membership store (one transaction a partition), the history
too, as the assets do. The runs carry `BATCH_TAG`, on which the automation of
`segment_membership_changes` stands aside (`changes.CHANGES_AUTOMATION`). The batch reads every
segment first (the API: at most 100 pages of 10,000 ids, 8 MB), then stores and judges them in
passes (`_Batch.store`), so that the store is connected to twice a run and never held while the
API is waited for.

A segment fails alone. A failed or expired remote run is recorded on its check, as the asset
does. Any other failure (the API after retries, the database) hands the segment back to the
readiness sensor with a pending record marked `alone`: it is read again in a run of its own, whose
failure, if it fails again, shows on its partition like any other run's. The batch goes on.
"""

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dagster as dg
from pydantic import Field

from matchall_dagster.api.client import ActiveCampaignClient, MatchList
from matchall_dagster.api.errors import ActiveCampaignError, RunExpiredError, RunFailedError
from matchall_dagster.api.models import RunStatus
from matchall_dagster.api.validation import MAX_PAGE_SIZE
from matchall_dagster.lifecycle.policy import PendingRun
from matchall_dagster.lifecycle.record import PendingRecord
from matchall_dagster.orchestration.account import Account
from matchall_dagster.orchestration.assets import (
    SegmentMatchesConfig,
    matches_metadata,
    members_frame,
    read_when_ready,
    run_verdict,
)
from matchall_dagster.orchestration.catalog import read_catalog
from matchall_dagster.orchestration.changes import changes_metadata, plausibility, step_source
from matchall_dagster.orchestration.checks import evaluation, materialized_verdicts
from matchall_dagster.orchestration.metadata import labelled
from matchall_dagster.orchestration.names import BATCH_TAG
from matchall_dagster.settings import Settings, settings
from matchall_dagster.storage.history import Step
from matchall_dagster.storage.io_manager import store_metadata
from matchall_dagster.storage.store import MATCHES_TABLE, MembershipStore, PartitionSummary

__all__ = [
    "BATCH_MAX_SEGMENTS",
    "SMALL_MAX_MEMBERS",
    "SmallRead",
    "SmallReadsConfig",
    "batch_requests",
    "build_small_reads",
    "is_small",
]

SMALL_MAX_MEMBERS = MAX_PAGE_SIZE  # one page: the sensor's poll of a ready run already shows its total
# A run's start-up (about 3 CPU s) shared by up to this many segments (MATCHALL_SMALL_BATCH_SEGMENTS);
# the batch's API work at 5/s is then 20-40 s, and a failure of the whole run (a killed process)
# leaves this many for the next kick-off.
BATCH_MAX_SEGMENTS = Settings.model_fields["small_batch_segments"].default


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


def batch_requests(account: Account, runs: Sequence[PendingRun], size: int) -> list[dg.RunRequest]:
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
                job_name=account.name("read_small_segments"),
                run_config={"ops": {account.name("read_segment_batch"): {"config": {"reads": reads}}}},
                tags={BATCH_TAG: str(len(chunk))},
            )
        )
    return requests


@dataclass
class _Read:
    """A segment read by the batch, on its way to being stored and judged."""

    read: SmallRead
    matches: MatchList
    metadata: dict[str, Any]
    summary: PartitionSummary | None = None
    step: Step | None = None

    @property
    def segment_id(self) -> str:
        return self.read.segment_id


class _WarningsOnly:
    """The log of a segment's read and metadata in a batch: warnings reach the run's log, the
    progress lines do not. Every line is an event in the run's event log (a few milliseconds of a
    database write each); a segment's events say what was read and stored, and the run's last line
    sums the batch up."""

    def __init__(self, log: Any) -> None:
        self.warning = log.warning

    def info(self, message: str) -> None:
        pass


class _Batch:
    """One run's reads: the client, the database and the event log it shares between segments."""

    def __init__(
        self,
        context: dg.OpExecutionContext,
        account: Account,
        config: SmallReadsConfig,
        client: ActiveCampaignClient,
        store: MembershipStore,
    ) -> None:
        self.context = context
        self.matches_key = account.matches_key
        self.changes_key = account.changes_key
        self.client = client
        self.membership_store = store
        self.read_config = SegmentMatchesConfig(
            wait_timeout_seconds=config.wait_timeout_seconds, max_restarts=config.max_restarts
        )
        self.max_share = settings().max_change_share
        self.quiet = _WarningsOnly(context.log)
        self.catalog = read_catalog(store, [read.segment_id for read in config.reads])
        self.stored = 0
        self.handed_back = 0

    def read(self, read: SmallRead) -> _Read | str:
        """One segment's pages (the API only), or its outcome when it cannot be stored: "run ended" or "handed back"."""
        segment_id, log = read.segment_id, self.quiet
        requests, waited = self.client.requests_sent, self.client.budget.waited_seconds
        try:
            matches = read_when_ready(log, self.client, segment_id, read.run_id, read.sort, self.read_config)
        except (RunFailedError, RunExpiredError) as exc:
            log.warning(f"{labelled(segment_id, read.segment_name)}: {exc}")
            self._log(run_verdict(exc, self.context.instance, self.matches_key, segment_id, read.run_id, read.sort))
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
        stored = store_metadata(self.membership_store, MATCHES_TABLE, matches.total, partitioned=True)
        return _Read(read, matches, {**metadata, **stored})

    def store(self, items: list[_Read]) -> None:
        """Store and judge the segments read: their rows on one connection, then on another each
        segment's events and history step, its two materializations milliseconds apart (see
        `changes.CHANGES_AUTOMATION`). The store is connected to twice a batch rather than three times a
        segment (a DuckDB opening costs tens of milliseconds) and is never held while the API is waited for."""
        written = self._each(items, self._write)
        recorded = self._each(written, self._record)
        for item, record in self._latest(self.changes_key, recorded):
            assert item.step is not None
            verdict = plausibility(item.step, self.max_share)
            self._log(evaluation(verdict, self.changes_key, item.segment_id, record))
            self.stored += 1

    def _each(self, items: list[_Read], write: Callable[[_Read], None]) -> list[_Read]:
        """The items `write` succeeded for, on one connection; the others are handed back."""
        done = []
        try:
            with self.membership_store.held():
                for item in items:
                    try:
                        write(item)
                    except Exception as exc:  # the database's errors have no common base: hand back any
                        self._hand_back(item.read, exc)
                    else:
                        done.append(item)
        except Exception as exc:  # the store could not be opened (a file locked beyond the retries, a server down)
            for item in items[len(done) :]:
                self._hand_back(item.read, exc)
        return done

    def _write(self, item: _Read) -> None:
        self.membership_store.replace_partition(
            item.segment_id, members_frame(item.segment_id, item.matches.contact_ids)
        )
        item.summary = self.membership_store.summarize(item.segment_id)

    def _record(self, item: _Read) -> None:
        """The materialization of `segment_matches`, its verdicts, the history step, the materialization of
        `segment_membership_changes`: as the asset, its checks and the history asset would record them."""
        self._log(dg.AssetMaterialization(self.matches_key, partition=item.segment_id, metadata=item.metadata))
        ((_, record),) = self._latest(self.matches_key, [item])
        stored = {key: value.value for key, value in record.asset_materialization.metadata.items()}  # type: ignore[union-attr]
        assert item.summary is not None
        for result in materialized_verdicts(stored, item.summary, datetime.now(UTC)):
            self._log(evaluation(result, self.matches_key, item.segment_id, record))
        item.step = self.membership_store.record_step(
            item.segment_id,
            source=step_source(record),  # as the asset's: a later run of it appends nothing twice
            run_id=item.matches.run.run_id,
            observed_at=datetime.fromtimestamp(record.timestamp, UTC),
        )
        changes = changes_metadata(item.step)
        self._log(dg.AssetMaterialization(self.changes_key, partition=item.segment_id, metadata=changes))

    def _log(self, event: dg.AssetMaterialization | dg.AssetObservation | dg.AssetCheckEvaluation) -> None:
        # An op's `log_event` handles check evaluations (as an asset's does); its annotation omits them.
        self.context.log_event(event)  # type: ignore[arg-type]

    def _latest(self, key: dg.AssetKey, items: list[_Read]) -> Iterator[tuple[_Read, dg.EventLogRecord]]:
        """Each item with the materialization of `key` this run just logged for it (one query for all): the
        target of its checks, whose storage id keys the history step. A partition materialized since by
        another run is left to that run's checks and changes."""
        if not items:
            return
        records = self.context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, asset_partitions=[item.segment_id for item in items]),
            limit=len(items),
        ).records
        latest: dict[str, dg.EventLogRecord] = {}
        for record in records:  # newest first
            if record.partition_key is not None:
                latest.setdefault(record.partition_key, record)
        for item in items:
            found = latest.get(item.segment_id)
            if found is None or found.run_id != self.context.run_id:  # a run of its own, just now: rare
                raise RuntimeError(
                    f"Partition {item.segment_id} of {key.to_user_string()} was materialized by another run meanwhile."
                )
            yield item, found

    def _hand_back(self, read: SmallRead, exc: Exception) -> str:
        """A pending record marked `alone`: the readiness sensor reads the segment again in a run of its own."""
        self.context.log.warning(
            f"Could not read {labelled(read.segment_id, read.segment_name)} in this batch: {exc} It goes back to "
            f"the readiness sensor, to be read in a run of its own."
        )
        # The read holds the pending record's fields (batch_requests copied them from it), the polls aside.
        record = PendingRecord(**read.model_dump(exclude={"segment_id", "polls"}), alone=True)
        self._log(
            dg.AssetObservation(
                self.matches_key,
                partition=read.segment_id,
                description=f"Match-all run {read.run_id} handed back by a batch, to be read alone.",
                metadata=record.to_metadata(),
            )
        )
        self.handed_back += 1
        return "handed back"


def build_small_reads(account: Account) -> dg.JobDefinition:
    """The account's `read_small_segments` job (its one op reads a batch; see the module)."""

    @dg.op(
        name=account.name("read_segment_batch"),
        pool=account.pool,
        required_resource_keys={account.api_resource, account.store_resource},
        description="Reads a batch of small ready segments (see small_reads).",
    )
    def read_segment_batch(context: dg.OpExecutionContext, config: SmallReadsConfig) -> None:
        read_batch(context, account, config)

    @dg.job(
        name=account.name("read_small_segments"),
        description="Reads a batch of small ready segments in one run: for each, the partition of segment_matches, "
        "its checks and segment_membership_changes, as their own runs would. Launched by the readiness sensor.",
        tags=dict(account.tags) or None,
    )
    def read_small_segments() -> None:
        read_segment_batch()

    return read_small_segments


def read_batch(context: dg.OpExecutionContext, account: Account, config: SmallReadsConfig) -> None:
    with account.api(context).get_client() as client:
        batch = _Batch(context, account, config, client, account.membership_store(context))
        read = [batch.read(one) for one in config.reads]
    batch.store([item for item in read if isinstance(item, _Read)])
    counts = {"stored": batch.stored, "run ended": read.count("run ended"), "handed back": batch.handed_back}
    context.log.info(
        f"Read {len(read)} small segment(s) in {client.requests_sent} request(s) "
        f"({client.budget.waited_seconds:.1f} s waiting for the request budget): "
        + ", ".join(f"{count} {outcome}" for outcome, count in counts.items())
        + "."
    )
