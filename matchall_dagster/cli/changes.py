"""`matchall changes`: who joined and who left a segment, read from the membership store's history."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click
import pyarrow as pa
import pyarrow.csv as pa_csv

if TYPE_CHECKING:
    import pandas as pd

from matchall_dagster.cli.shared import CSV_OPTIONS, fail, silence_closed_stdout


@click.command()
@click.argument("segment_id")
@click.option("--since", help="Only what was observed on or after this date (YYYY-MM-DD) or time (ISO 8601; UTC).")
@click.option(
    "--store",
    help="The membership store (duckdb:///path/file.duckdb, a DuckDB file's path, or postgresql://USER@HOST/DB); "
    "default MATCHALL_STORE, else $DAGSTER_HOME/matchall.duckdb.",
)
@click.option("--contacts", is_flag=True, help="List each change (observed_at, change, contact_id, run_id) as CSV.")
def changes(segment_id: str, since: str | None, store: str | None, contacts: bool) -> None:
    """Who joined and who left SEGMENT_ID at each materialization: one line per step, or every contact."""
    from matchall_dagster.settings import store_url
    from matchall_dagster.storage.store import StoreUnavailableError, StoreUrl, open_store

    start = _parse_since(since) if since else None
    try:
        url = StoreUrl.parse(store) if store else store_url()
    except ValueError as exc:
        fail(f"--store: {exc}")
    membership = open_store(url)
    try:
        steps = membership.steps_since(segment_id, start)
    except StoreUnavailableError as exc:
        busy = (
            " A running materialization may hold the DuckDB file: try again in a moment."
            if url.kind == "duckdb"
            else ""
        )
        fail(f"{exc} Give --store, or set MATCHALL_STORE or DAGSTER_HOME as Dagster's.{busy}")
    if steps is None:
        fail(f"{url} holds no membership history yet: materialize segment_membership_changes first.")
    if not steps:
        if not membership.steps_since(segment_id, None):
            fail(f"Segment {segment_id!r} has no membership history in {url}; check the segment id.")
        click.echo(f"No changes of segment {segment_id} since {start:%Y-%m-%d %H:%M:%S} UTC.", err=True)
        return
    if contacts:
        _write_contacts(membership.changes_since(segment_id, start, batch_rows=100_000))
        return
    click.echo("observed_at\trun_id\tmembers\tjoined\tleft")
    for observed_at, run_id, members, joined, left in steps:
        click.echo(f"{observed_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}\t{run_id}\t{members}\t{joined}\t{left}")


_CONTACT_SCHEMA = pa.schema(
    [
        ("observed_at", pa.timestamp("us", tz="UTC")),
        ("change", pa.string()),
        ("contact_id", pa.int64()),
        ("run_id", pa.string()),
    ]
)


def _write_contacts(batches: Iterator[pd.DataFrame]) -> None:
    """Every change as CSV on stdout, streamed in batches: a segment's history can be millions of rows."""
    try:
        with pa_csv.CSVWriter(sys.stdout.buffer, _CONTACT_SCHEMA, write_options=CSV_OPTIONS) as writer:
            for frame in batches:
                writer.write_table(pa.Table.from_pandas(frame, schema=_CONTACT_SCHEMA, preserve_index=False))
        sys.stdout.flush()
    except BrokenPipeError:
        silence_closed_stdout()


def _parse_since(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        fail(f"--since {value[:40]!r} is not a date: write it as YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS][+HH:MM].")
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
