"""`segment_matches`: a segment's complete, ordered member list from one ready match-all run.

The segment's name and expected size come from the catalog table (`activecampaign_segments`, a
local read: no request of the account's 5/s); without a catalog the materialization goes on
without them.
"""

from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import Field

from matchall_dagster.api.client import ActiveCampaignClient, ContactIds, MatchList
from matchall_dagster.api.errors import ActiveCampaignError, InvalidInputError, RunExpiredError, RunFailedError
from matchall_dagster.api.models import MatchAllRun
from matchall_dagster.api.validation import DEFAULT_SORT, validate_id, validate_sort
from matchall_dagster.orchestration.account import Account
from matchall_dagster.orchestration.catalog import CatalogEntry, read_catalog
from matchall_dagster.orchestration.checks import evaluation, latest_materialization
from matchall_dagster.orchestration.metadata import PAGE_TOTAL, SEGMENT_NAME, labelled, run_metadata
from matchall_dagster.orchestration.names import RUN_NOT_EXPIRED, RUN_NOT_FAILED

PREVIEW_ROWS = 10
# A read is noted when it differs from the catalog's count (the latest run's, taken at discovery)
# by more than this share of the larger of the two and by more than SIZE_NOTE_MIN_CONTACTS: a
# cached count lags behind a live one, so small differences are normal and never noted.
SIZE_NOTE_SHARE = 0.1
SIZE_NOTE_MIN_CONTACTS = 10


SORT_DESCRIPTION = (
    "Sort keys, comma-separated, '-' for descending: id, email, phone, first_name, last_name, full_name, cdate, "
    "udate, account_name, score, score<id>, field<id>. E.g. 'last_name,-first_name'. Empty: the account's sort."
)


class SegmentMatchesConfig(dg.Config):
    """What an analyst can choose in the launchpad; the sensor fills in the run it found ready."""

    sort: str = Field(default=DEFAULT_SORT, description=SORT_DESCRIPTION)
    run_id: str | None = Field(
        default=None, description="An existing match-all run to read; when empty, a new run is started."
    )
    wait_timeout_seconds: float = Field(default=3600.0, gt=0, description="How long to wait for the run to be ready.")
    max_restarts: int = Field(
        default=3, ge=0, description="Reads started again when the run changes mid-read (its sort changed elsewhere)."
    )


def members_frame(segment_id: str, contact_ids: ContactIds) -> pd.DataFrame:
    """The rows of one partition: columnar, with the segment id stored once (dictionary-encoded).

    `copy=False` keeps `contact_ids` as the frame's column: pandas would otherwise copy both int64
    columns into one block (16 bytes an id, 160 MB at 10,000,000 members).
    """
    size = contact_ids.size
    segment = pa.DictionaryArray.from_arrays(pa.array(np.zeros(size, dtype=np.int8)), pa.array([segment_id]))
    return pd.DataFrame(
        {
            "segment_id": pd.arrays.ArrowExtensionArray(segment),
            "position": np.arange(1, size + 1, dtype=np.int64),
            "contact_id": contact_ids,
        },
        copy=False,
    )


def size_note(total: int, expected: int) -> str | None:
    """A sentence when `total` differs a lot from `expected` (see SIZE_NOTE_SHARE), else None."""
    difference = total - expected
    if abs(difference) <= max(SIZE_NOTE_SHARE * max(total, expected), SIZE_NOTE_MIN_CONTACTS):
        return None
    return (
        f"Read {total:,} members where ActiveCampaign's latest count was {expected:,} "
        f"({difference:+,}; {difference / expected:+.0%} of it)."
        if expected
        else f"Read {total:,} members where ActiveCampaign's latest count was 0."
    ) + (
        " The count is cached from the segment's previous run; if the difference is not expected, check the "
        "segment's definition in ActiveCampaign."
    )


def _expected_metadata(entry: CatalogEntry | None, total: int, log: Any) -> dict[str, Any]:
    if entry is None or entry.last_total is None:
        return {}
    metadata: dict[str, Any] = {"expected_total": entry.last_total}
    if entry.last_run_id:
        metadata["expected_total_run_id"] = entry.last_run_id
    note = size_note(total, entry.last_total)
    if note is not None:
        metadata["size_note"] = note
        log.warning(note)
    return metadata


def _preview(matches: MatchList) -> dg.MetadataValue:
    head = matches.contact_ids[:PREVIEW_ROWS].tolist()
    lines = ["| position | contact_id |", "|---|---|", *(f"| {i} | {cid} |" for i, cid in enumerate(head, 1))]
    if matches.total > PREVIEW_ROWS:
        lines.append(f"| ... | ({matches.total - PREVIEW_ROWS:,} more) |")
    return dg.MetadataValue.md("\n".join(lines))


def _validated(segment_id: str, config: SegmentMatchesConfig, default_sort: str) -> str:
    """The run configuration's sort, once the ids are known to be safe to send; else a Failure."""
    try:
        validate_id(segment_id)
        sort = validate_sort(config.sort or default_sort)
        if config.run_id is not None:
            validate_id(config.run_id, "run id")
    except InvalidInputError as exc:
        raise dg.Failure(description=f"{exc} Fix the run configuration and launch again.") from None
    return sort


def read_when_ready(
    log: Any, client: ActiveCampaignClient, segment_id: str, run_id: str, sort: str, config: SegmentMatchesConfig
) -> MatchList:
    """Wait for the run to be ready, then read every page of it."""

    def waiting(run: MatchAllRun, elapsed: float) -> None:
        if not run.is_ready:
            log.info(f"Run {run_id} is {run.state.value} after {elapsed:.0f} s; waiting.")

    first = client.wait_until_ready(segment_id, run_id, sort=sort, timeout=config.wait_timeout_seconds, on_poll=waiting)
    assert first.page is not None
    log.info(f"Run {run_id} is ready: {first.page.total:,} members on {first.page.last_page} page(s).")
    return client.fetch_matches(
        segment_id,
        run_id,
        sort=sort,
        first_page=first,
        ready_timeout=config.wait_timeout_seconds,
        max_restarts=config.max_restarts,
    )


def run_verdict(
    exc: RunFailedError | RunExpiredError,
    instance: dg.DagsterInstance,
    key: dg.AssetKey,
    segment_id: str,
    run_id: str,
    sort: str,
) -> dg.AssetCheckEvaluation:
    """The failed verdict of run_not_failed or run_not_expired on a run that could not be read,
    judged against the partition's latest materialization (so that the UI shows it there)."""
    result = dg.AssetCheckResult(
        check_name=RUN_NOT_FAILED if isinstance(exc, RunFailedError) else RUN_NOT_EXPIRED,
        passed=False,
        description=str(exc),
        metadata=run_metadata(None, run_id, sort),
    )
    return evaluation(result, key, segment_id, latest_materialization(instance, key, segment_id))


# The table's columns, as the UI's Columns tab shows them (`dagster/column_schema`).
MATCHES_COLUMNS = dg.TableSchema(
    columns=[
        dg.TableColumn("segment_id", "VARCHAR", description="The segment (the partition key), as the API gives it."),
        dg.TableColumn("position", "BIGINT", description="1-based place of the contact in the run's sort order."),
        dg.TableColumn("contact_id", "BIGINT", description="The member contact's id."),
    ]
)
MATCHES_DESCRIPTION = "Every member contact id of the segment, in the run's sort order (1-based position)."


def build_segment_matches(account: Account, *, freshness: dg.FreshnessPolicy | None = None) -> dg.AssetsDefinition:
    """The account's `segment_matches` (its checks are in `checks.build_matches_checks`)."""

    class AccountMatchesConfig(SegmentMatchesConfig):
        # The launchpad shows the account's sort (the component's `sort`) as the default.
        sort: str = Field(default=account.sort, description=SORT_DESCRIPTION)

    @dg.asset(
        key=account.matches_key,
        partitions_def=account.segments_partitions,
        metadata={
            "partition_expr": "segment_id",
            "dagster/column_schema": MATCHES_COLUMNS,
            "dagster/table_name": account.table_name("segment_matches"),
        },
        pool=account.pool,
        io_manager_key=account.io_manager_key,
        required_resource_keys={account.api_resource, account.store_resource},
        kinds={account.store_url().kind, "pandas"},
        freshness_policy=freshness,
        description=account.description("segment_matches", MATCHES_DESCRIPTION),
        group_name=account.group_name,
        owners=list(account.owners) or None,
        tags=dict(account.tags) or None,
    )
    def segment_matches(context: dg.AssetExecutionContext, config: AccountMatchesConfig) -> dg.Output[pd.DataFrame]:
        segment_id = context.partition_key
        sort = _validated(segment_id, config, account.sort)
        entry = read_catalog(account.membership_store(context), [segment_id]).get(segment_id)
        name = entry.name if entry is not None else None
        segment = labelled(segment_id, name)

        with account.api(context).get_client() as client:
            run_id = config.run_id
            try:
                if run_id is None:
                    run_id = client.start_run(segment_id, sort=sort).run_id
                    context.log.info(f"Started match-all run {run_id} of {segment} (sort {sort}).")
                else:
                    context.log.info(f"Reading the existing match-all run {run_id} of {segment} (sort {sort}).")
                matches = read_when_ready(context.log, client, segment_id, run_id, sort, config)
            except (RunFailedError, RunExpiredError) as exc:
                # The checks after this step are skipped; record the verdict on the partition here.
                verdict = run_verdict(exc, context.instance, account.matches_key, segment_id, run_id or "", sort)
                context.log_event(verdict)
                raise dg.Failure(description=str(exc)) from None
            except ActiveCampaignError as exc:
                raise dg.Failure(description=str(exc)) from None

        metadata = matches_metadata(
            matches,
            entry,
            requests=client.requests_sent,
            waited=client.budget.waited_seconds,
            budget=str(client.budget.store),
            log=context.log,
        )
        return dg.Output(members_frame(segment_id, matches.contact_ids), metadata=metadata)

    return segment_matches


def matches_metadata(
    matches: MatchList, entry: CatalogEntry | None, *, requests: int, waited: float, budget: str, log: Any
) -> dict[str, Any]:
    """A materialization's metadata (and its log line), read back by the checks and the history.

    `requests` and `waited` are this read's own (its start, polls and pages; its waits for places
    in the account's request budget `budget`).
    """
    run = matches.run
    assert run.page is not None
    name = entry.name if entry is not None else None
    log.info(
        f"Read {matches.total:,} members of {labelled(matches.segment_id, name)} in {matches.pages_read} page(s), "
        f"{requests} request(s), {matches.elapsed_seconds:.1f} s ({waited:.1f} s of it waiting for places in the "
        f"account's request budget, {budget})."
    )
    return {
        "dagster/row_count": matches.total,
        **({SEGMENT_NAME: name} if name else {}),
        **run_metadata(run, run.run_id, matches.sort),
        **_expected_metadata(entry, matches.total, log),
        PAGE_TOTAL: run.page.total,
        "pages_read": matches.pages_read,
        "requests": requests,
        "budget_wait_seconds": round(waited, 3),
        "request_budget": budget,
        "restarts": matches.restarts,
        "elapsed_seconds": round(matches.elapsed_seconds, 3),
        "preview": _preview(matches),
    }


__all__ = [
    "MATCHES_COLUMNS",
    "SegmentMatchesConfig",
    "build_segment_matches",
    "matches_metadata",
    "members_frame",
    "read_when_ready",
    "run_verdict",
]
