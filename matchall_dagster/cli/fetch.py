"""`matchall fetch`: every member of a segment, in order, to stdout or a file written atomically."""

from __future__ import annotations

import os
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import click
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pa_parquet

from matchall_dagster.api.client import ContactIds
from matchall_dagster.api.errors import ActiveCampaignError
from matchall_dagster.api.models import MatchAllRun
from matchall_dagster.api.validation import DEFAULT_SORT
from matchall_dagster.cli.shared import CSV_OPTIONS, Progress, client_from_env, fail, silence_closed_stdout

FORMATS = ("csv", "parquet", "jsonl")
_JSONL_CHUNK = 100_000


@click.command()
@click.argument("segment_id")
@click.option("--sort", default=DEFAULT_SORT, show_default=True, help="Sort keys, e.g. 'last_name,-first_name'.")
@click.option("--run-id", help="Read this existing run instead of starting one.")
@click.option(
    "--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="File to write; CSV to stdout if absent."
)
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Output format; from --output's suffix, else csv.")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds to wait for the run to be ready.")
@click.option(
    "--budget",
    metavar="STORE",
    help="The account's request budget to share: 'memory', a SQLite file or postgresql://USER@HOST/DB. "
    "Default: MATCHALL_REQUEST_BUDGET, else DAGSTER_HOME's (beside a running instance), else this command's own.",
)
def fetch(
    segment_id: str,
    sort: str,
    run_id: str | None,
    output: Path | None,
    fmt: str | None,
    timeout: float,
    budget: str | None,
) -> None:
    """Write every member of SEGMENT_ID, in order: columns `position` (1-based) and `contact_id`.

    Exits 0 only when the complete list was written; never leaves a partial file at --output.
    """
    fmt = fmt or _format_of(output)
    if output is None and fmt != "csv":
        fail(f"--format {fmt} writes binary or line data; give --output PATH for it (stdout takes csv only).")
    progress = Progress(sys.stderr)
    started = time.monotonic()
    try:
        with client_from_env(budget) as client:
            if run_id is None:
                run_id = client.start_run(segment_id, sort=sort).run_id
                progress.show(f"Started run {run_id} of segment {segment_id}.")

            def waiting(run: MatchAllRun, elapsed: float) -> None:
                progress.show(f"Run {run_id} of segment {segment_id}: {run.state.value} after {elapsed:.0f} s")

            first = client.wait_until_ready(segment_id, run_id, sort=sort, timeout=timeout, on_poll=waiting)
            matches = client.fetch_matches(
                segment_id,
                run_id,
                sort=sort,
                first_page=first,
                ready_timeout=timeout,
                on_page=lambda done, last: progress.show(f"Reading pages: {done}/{last}"),
            )
        progress.done()
        _write(matches.contact_ids, fmt, output)
    except ActiveCampaignError as exc:
        progress.done()
        fail(str(exc))
    except OSError as exc:
        progress.done()
        if output is None:
            fail(f"Could not write to stdout: {exc.strerror or exc}. The list there is incomplete; use --output PATH.")
        fail(f"Could not write {output}: {exc.strerror or exc}. Nothing was written there; check the path.")
    click.echo(
        f"Wrote {matches.total:,} contacts of segment {segment_id} (run {run_id}, sort {sort}) "
        f"to {output or 'stdout'} in {time.monotonic() - started:.1f} s.",
        err=True,
    )


def _format_of(output: Path | None) -> str:
    suffix = output.suffix.lower().lstrip(".") if output else ""
    return suffix if suffix in FORMATS else "csv"


def _table(contact_ids: ContactIds) -> pa.Table:
    positions = np.arange(1, contact_ids.size + 1, dtype=np.int64)
    return pa.table({"position": positions, "contact_id": contact_ids})


def _write(contact_ids: ContactIds, fmt: str, output: Path | None) -> None:
    """Write the list; to a file only through a temporary sibling renamed into place at the end."""
    if output is None:
        try:
            pa_csv.write_csv(_table(contact_ids), sys.stdout.buffer, CSV_OPTIONS)
            sys.stdout.flush()
        except BrokenPipeError:
            silence_closed_stdout()
        return
    with _atomic_file(output) as stream:
        if fmt == "csv":
            pa_csv.write_csv(_table(contact_ids), stream, CSV_OPTIONS)
        elif fmt == "parquet":
            pa_parquet.write_table(_table(contact_ids), stream)
        else:
            for start in range(0, contact_ids.size, _JSONL_CHUNK):
                chunk = contact_ids[start : start + _JSONL_CHUNK].tolist()
                lines = "".join(
                    f'{{"position":{start + i + 1},"contact_id":{contact_id}}}\n' for i, contact_id in enumerate(chunk)
                )
                stream.write(lines.encode())


@contextmanager
def _atomic_file(path: Path) -> Iterator[IO[bytes]]:
    directory = path.resolve().parent
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=directory)
    try:
        try:  # mkstemp makes the file 0600: keep an existing file's mode, else what open() would give
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(handle, mode)
        with os.fdopen(handle, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
