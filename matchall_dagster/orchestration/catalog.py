"""`activecampaign_segments`: the account's saved segments as a table analysts can search.

One row per segment that ActiveCampaign lists, plus the tracked segments it no longer lists (kept
from the previous table, so their names stay known): name, latest known size and run, dates, and
`status` (`active`, or `deleted` once discovery or a kick-off marked it, see `deletions`). The
discovery sensor requests a refresh when the listing changes. The same table is where the rest of
the project finds a segment's name and expected size (`read_catalog`): a local read, no request.
"""

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import dagster as dg
import pandas as pd

from matchall_dagster.api.errors import ActiveCampaignError
from matchall_dagster.api.models import Segment
from matchall_dagster.orchestration.account import Account
from matchall_dagster.orchestration.deletions import deleted_ids
from matchall_dagster.storage.store import CATALOG_TABLE, MembershipStore

__all__ = [
    "CATALOG_TABLE",
    "LIST_PAGE_SIZE",
    "CatalogEntry",
    "build_catalog",
    "catalog_frame",
    "names_of",
    "read_catalog",
]

ACTIVE = "active"
DELETED = "deleted"
PREVIEW_ROWS = 20
LIST_PAGE_SIZE = 10_000  # the API's largest page: one request per 10,000 segments

# (name, DuckDB type, pandas dtype, description): the table's columns, in order.
_TIMESTAMP = "datetime64[us, UTC]"
COLUMNS: tuple[tuple[str, str, Any, str], ...] = (
    ("segment_id", "VARCHAR", "string", "The id the match-all endpoints take (attributes.segment_id)."),
    ("name", "VARCHAR", "string", "The segment's name in ActiveCampaign."),
    ("status", "VARCHAR", "string", "active: listed by ActiveCampaign; deleted: no longer there (rows kept)."),
    ("tracked", "BOOLEAN", "boolean", "Has a partition of segment_matches (found by discovery, admitted)."),
    ("last_total", "BIGINT", "Int64", "Members counted by the latest run (counts.last_total.count; cached)."),
    ("last_total_updated", "TIMESTAMP WITH TIME ZONE", _TIMESTAMP, "When ActiveCampaign updated last_total."),
    ("last_run_id", "VARCHAR", "string", "The run that counted last_total."),
    ("last_run_start", "TIMESTAMP WITH TIME ZONE", _TIMESTAMP, "That run's start."),
    ("last_run_end", "TIMESTAMP WITH TIME ZONE", _TIMESTAMP, "That run's end (empty while it runs)."),
    ("created_date", "TIMESTAMP WITH TIME ZONE", _TIMESTAMP, "When the segment was created."),
    ("updated_date", "TIMESTAMP WITH TIME ZONE", _TIMESTAMP, "When its definition last changed."),
    ("last_used_date", "TIMESTAMP WITH TIME ZONE", _TIMESTAMP, "When it was last used in ActiveCampaign."),
)
_NAMES = tuple(name for name, *_ in COLUMNS)
COLUMN_SCHEMA = dg.TableSchema(
    columns=[dg.TableColumn(name=name, type=kind, description=text) for name, kind, _, text in COLUMNS]
)


@dataclass(frozen=True)
class CatalogEntry:
    """What the rest of the project reads of a segment's row."""

    segment_id: str
    name: str | None
    status: str
    last_total: int | None
    last_run_id: str | None


def _row(segment: Segment, *, tracked: bool) -> dict[str, Any]:
    run = segment.last_run
    return {
        "segment_id": segment.id,
        "name": segment.name,
        "status": ACTIVE,
        "tracked": tracked,
        "last_total": segment.last_total,
        "last_total_updated": run.last_total_updated if run else None,
        "last_run_id": run.run_id if run else None,
        "last_run_start": run.run_id_start if run else None,
        "last_run_end": run.run_id_end if run else None,
        "created_date": segment.created_date,
        "updated_date": segment.updated_date,
        "last_used_date": segment.last_used_date,
    }


def catalog_frame(
    listed: Iterable[Segment],
    previous: pd.DataFrame | None,
    partitions: Collection[str],
    deleted: Collection[str],
) -> pd.DataFrame:
    """The table's rows: every listed segment, then each tracked one no longer listed.

    A listed segment is active (the discovery sensor unmarks it on its next tick). An unlisted
    partition keeps its previous row, `deleted` once marked; a segment neither listed nor a
    partition (forgotten, or never tracked) leaves the table.
    """
    rows = [_row(segment, tracked=segment.id in partitions) for segment in listed]
    seen = {row["segment_id"] for row in rows}
    kept: dict[str, dict[Any, Any]] = {}
    if previous is not None:
        for record in previous.to_dict("records"):
            kept[str(record["segment_id"])] = record
    for segment_id in sorted(set(partitions) - seen):
        row = dict.fromkeys(_NAMES)
        row.update({key: value for key, value in kept.get(segment_id, {}).items() if key in row})
        row.update(segment_id=segment_id, tracked=True, status=DELETED if segment_id in deleted else ACTIVE)
        rows.append(row)
    frame = pd.DataFrame(rows, columns=list(_NAMES), dtype=object)
    for name, _, dtype, _ in COLUMNS:
        column = frame[name].where(frame[name].notna(), None)
        frame[name] = pd.to_datetime(column, utc=True).astype(dtype) if dtype == _TIMESTAMP else column.astype(dtype)
    return frame


def _md(text: object) -> str:
    return "" if text is None or text is pd.NA else str(text).replace("|", "\\|").replace("\n", " ")


def _preview(frame: pd.DataFrame) -> dg.MetadataValue:
    head = frame.sort_values(["name", "segment_id"], na_position="last").head(PREVIEW_ROWS)
    lines = ["| name | segment_id | last_total | status |", "|---|---|---|---|"]
    for row in head.itertuples(index=False):
        total: Any = row.last_total
        size = "" if pd.isna(total) else f"{int(total):,}"
        lines.append(f"| {_md(row.name)} | {_md(row.segment_id)} | {size} | {row.status} |")
    if len(frame) > PREVIEW_ROWS:
        lines.append(f"| ... | ({len(frame) - PREVIEW_ROWS:,} more) | | |")
    return dg.MetadataValue.md("\n".join(lines))


def read_catalog(
    store: MembershipStore, segment_ids: Collection[str] | None = None, *, patience: float = 2.0
) -> dict[str, CatalogEntry]:
    """The catalog's entries (of `segment_ids`, or all), by id; empty when there is no catalog yet
    or the store stays unavailable: a name or an expected size is never worth failing a step for."""
    frame = store.read_table(CATALOG_TABLE, patience=patience)
    if frame is None:
        return {}
    wanted = None if segment_ids is None else set(segment_ids)
    entries = {}
    for segment_id, name, status, total, run_id in frame[
        ["segment_id", "name", "status", "last_total", "last_run_id"]
    ].itertuples(index=False):
        if wanted is not None and segment_id not in wanted:
            continue
        entries[str(segment_id)] = CatalogEntry(
            segment_id=str(segment_id),
            name=None if _missing(name) else str(name),
            status=str(status),
            last_total=None if _missing(total) else int(total),
            last_run_id=None if _missing(run_id) else str(run_id),
        )
    return entries


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and value != value)


def names_of(entries: Mapping[str, CatalogEntry]) -> dict[str, str]:
    return {segment_id: entry.name for segment_id, entry in entries.items() if entry.name}


def _previous(store: MembershipStore, log: Any) -> pd.DataFrame | None:
    try:
        return store.read_table(CATALOG_TABLE, patience=10.0)
    except Exception as exc:  # the engines' errors have no common base; the catalog is rebuilt anyway
        log.warning(f"Could not read the previous catalog ({exc}); segments no longer listed keep no name.")
        return None


CATALOG_DESCRIPTION = (
    "The account's saved segments (GET /api/3/audiences): id, name, latest known size and run, dates, and whether "
    "ActiveCampaign still has them (status). Refreshed by the discovery sensor when the listing changes; table "
    "activecampaign_segments in the account's store."
)


def build_catalog(account: Account) -> "tuple[dg.AssetsDefinition, dg.UnresolvedAssetJobDefinition]":
    """The account's `activecampaign_segments` and the job that refreshes it."""

    @dg.asset(
        key=account.catalog_key,
        pool=account.pool,
        kinds={account.store_url().kind, "pandas"},
        io_manager_key=account.io_manager_key,
        required_resource_keys={account.api_resource, account.store_resource},
        metadata={"dagster/column_schema": COLUMN_SCHEMA, "dagster/table_name": account.table_name(CATALOG_TABLE)},
        description=account.description("activecampaign_segments", CATALOG_DESCRIPTION),
        group_name=account.group_name,
        owners=list(account.owners) or None,
        tags=dict(account.tags) or None,
    )
    def activecampaign_segments(context: dg.AssetExecutionContext) -> dg.Output[pd.DataFrame]:
        try:
            with account.api(context).get_client() as client:
                listed = client.list_segments(page_size=LIST_PAGE_SIZE)
                requests = client.requests_sent
        except ActiveCampaignError as exc:
            raise dg.Failure(description=f"{exc} The previous catalog is kept.") from None
        partitions = set(context.instance.get_dynamic_partitions(account.partitions_name))
        deleted = deleted_ids(context.instance, account)
        frame = catalog_frame(listed, _previous(account.membership_store(context), context.log), partitions, deleted)
        counts = frame["status"].value_counts()
        context.log.info(
            f"{len(listed):,} segment(s) listed in {requests} request(s); the catalog holds {len(frame):,} "
            f"({int(counts.get(DELETED, 0)):,} deleted)."
        )
        return dg.Output(
            frame,
            metadata={
                "dagster/row_count": len(frame),
                "dagster/column_schema": COLUMN_SCHEMA,
                "listed": len(listed),
                "active": int(counts.get(ACTIVE, 0)),
                "deleted": int(counts.get(DELETED, 0)),
                "tracked": int(frame["tracked"].sum()),
                "requests": requests,
                "preview": _preview(frame),
            },
        )

    job = dg.define_asset_job(
        account.name("activecampaign_segments_job"),
        selection=[account.catalog_key],
        tags=dict(account.tags) or None,
        description="Refreshes the segment catalog (one or two API requests); requested by the discovery sensor.",
    )
    return activecampaign_segments, job
