"""`matchall changes`: who joined and who left a segment, read from the DuckDB file's history."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import pyarrow.csv as pa_csv

from matchall_dagster.cli.shared import CSV_OPTIONS, fail, silence_closed_stdout


@click.command()
@click.argument("segment_id")
@click.option("--since", help="Only what was observed on or after this date (YYYY-MM-DD) or time (ISO 8601; UTC).")
@click.option(
    "--database",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The DuckDB file; default MATCHALL_DUCKDB_PATH, else $DAGSTER_HOME/matchall.duckdb.",
)
@click.option("--contacts", is_flag=True, help="List each change (observed_at, change, contact_id, run_id) as CSV.")
def changes(segment_id: str, since: str | None, database: Path | None, contacts: bool) -> None:
    """Who joined and who left SEGMENT_ID at each materialization: one line per step, or every contact."""
    import duckdb

    from matchall_dagster.settings import duckdb_path
    from matchall_dagster.storage import history

    start = _parse_since(since) if since else None
    path = database or Path(duckdb_path())
    if not path.is_file():
        fail(f"No DuckDB file at {path}. Give --database, or set MATCHALL_DUCKDB_PATH or DAGSTER_HOME as Dagster's.")
    try:
        connection = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as exc:
        fail(
            f"Could not open {path} for reading ({str(exc).splitlines()[0][:200]}). A running materialization may "
            f"hold it: try again in a moment, or read a copy of the file."
        )
    with connection:
        tables = {row[0] for row in connection.execute("select table_name from information_schema.tables").fetchall()}
        if history.STEPS_TABLE not in tables:
            fail(f"{path} holds no membership history yet: materialize segment_membership_changes first.")
        steps = history.steps_since(connection, segment_id, start)
        if not steps:
            if not history.has_history(connection, segment_id):
                fail(f"Segment {segment_id!r} has no membership history in {path}; check the segment id.")
            click.echo(f"No changes of segment {segment_id} since {start:%Y-%m-%d %H:%M:%S} UTC.", err=True)
            return
        if contacts:
            _write_contacts(history.changes_since(connection, segment_id, start))
            return
        click.echo("observed_at\trun_id\tmembers\tjoined\tleft")
        for observed_at, run_id, members, joined, left in steps:
            click.echo(f"{observed_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}\t{run_id}\t{members}\t{joined}\t{left}")


def _write_contacts(relation: Any) -> None:
    """Every change as CSV on stdout, streamed in batches: a segment's history can be millions of rows."""
    reader = relation.to_arrow_reader(100_000)
    try:
        with pa_csv.CSVWriter(sys.stdout.buffer, reader.schema, write_options=CSV_OPTIONS) as writer:
            for batch in reader:
                writer.write_batch(batch)
        sys.stdout.flush()
    except BrokenPipeError:
        silence_closed_stdout()


def _parse_since(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        fail(f"--since {value[:40]!r} is not a date: write it as YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS][+HH:MM].")
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
