"""The `matchall` command: fetch a segment's members, list segments, serve the simulator."""

from __future__ import annotations

import os
import shlex
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, NoReturn

import click
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pa_parquet

from matchall_dagster.api.client import ActiveCampaignClient, ContactIds
from matchall_dagster.api.errors import ActiveCampaignError, InvalidInputError
from matchall_dagster.api.models import MatchAllRun, Segment
from matchall_dagster.api.validation import DEFAULT_SORT
from matchall_dagster.settings import ConfigurationError, settings
from matchall_dagster.simulator import DEFAULT_TOKEN, Faults, Simulator, SimulatorConfig, demo_account, serve

FORMATS = ("csv", "parquet", "jsonl")
_JSONL_CHUNK = 100_000
_CSV_OPTIONS = pa_csv.WriteOptions(quoting_style="none", quoting_header="none")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """ActiveCampaign segment memberships: fetch them, or serve the offline simulator."""
    settings.cache_clear()  # each command reads the settings of its own environment, checked first
    try:
        settings()
    except ConfigurationError as exc:
        _fail(str(exc))


def _client_from_env() -> ActiveCampaignClient:
    url = os.environ.get("ACTIVECAMPAIGN_API_URL", "")
    key = os.environ.get("ACTIVECAMPAIGN_API_KEY", "")
    missing = [name for name, value in (("ACTIVECAMPAIGN_API_URL", url), ("ACTIVECAMPAIGN_API_KEY", key)) if not value]
    if missing:
        raise InvalidInputError(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set. Set "
            f"ACTIVECAMPAIGN_API_URL and ACTIVECAMPAIGN_API_KEY to the account's API URL and key "
            f"(ActiveCampaign: Settings > Developer), or to a simulator's (`matchall simulator` prints both)."
        )
    return ActiveCampaignClient(url, key)


class _Progress:
    """One self-rewriting status line on a terminal's stderr; silent when stderr is not a tty."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._live = stream.isatty()
        self._width = 0

    def show(self, text: str) -> None:
        if self._live:
            self._stream.write("\r" + text.ljust(self._width))
            self._stream.flush()
            self._width = len(text)

    def done(self) -> None:
        if self._live and self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()


@main.command()
@click.argument("segment_id")
@click.option("--sort", default=DEFAULT_SORT, show_default=True, help="Sort keys, e.g. 'last_name,-first_name'.")
@click.option("--run-id", help="Read this existing run instead of starting one.")
@click.option(
    "--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="File to write; CSV to stdout if absent."
)
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Output format; from --output's suffix, else csv.")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds to wait for the run to be ready.")
def fetch(segment_id: str, sort: str, run_id: str | None, output: Path | None, fmt: str | None, timeout: float) -> None:
    """Write every member of SEGMENT_ID, in order: columns `position` (1-based) and `contact_id`.

    Exits 0 only when the complete list was written; never leaves a partial file at --output.
    """
    fmt = fmt or _format_of(output)
    if output is None and fmt != "csv":
        _fail(f"--format {fmt} writes binary or line data; give --output PATH for it (stdout takes csv only).")
    progress = _Progress(sys.stderr)
    started = time.monotonic()
    try:
        with _client_from_env() as client:
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
        _fail(str(exc))
    except OSError as exc:
        progress.done()
        if output is None:
            _fail(f"Could not write to stdout: {exc.strerror or exc}. The list there is incomplete; use --output PATH.")
        _fail(f"Could not write {output}: {exc.strerror or exc}. Nothing was written there; check the path.")
    click.echo(
        f"Wrote {matches.total:,} contacts of segment {segment_id} (run {run_id}, sort {sort}) "
        f"to {output or 'stdout'} in {time.monotonic() - started:.1f} s.",
        err=True,
    )


# What `matchall segments` says discovery would do with each segment (its `discovery` column).
_TRACKED, _NEW, _IGNORED, _RESTORE, _UNLISTED, _DELETED = "tracked", "new", "ignored", "restore", "unlisted", "deleted"


def _instance_or_none() -> Any:
    """The Dagster instance of DAGSTER_HOME, or None when DAGSTER_HOME is unset."""
    if not os.environ.get("DAGSTER_HOME"):
        return None
    import dagster as dg

    try:
        return dg.DagsterInstance.get()
    except Exception as exc:  # Dagster raises several kinds for a bad home; all mean the same to the user
        _fail(
            f"Could not open the Dagster instance at DAGSTER_HOME={os.environ['DAGSTER_HOME']} "
            f"({str(exc).splitlines()[0][:200]}). Point DAGSTER_HOME at the folder holding the instance's "
            f"dagster.yaml, as `dagster dev` and the daemon use it."
        )


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() and c != "\t" else " " for c in text)


@main.command()
def segments() -> None:
    """List the account's saved segments and what discovery would do with each, as tab-separated lines.

    Columns: segment_id, last_total (ActiveCampaign's latest count), last_run_id (the run that counted
    it), discovery, name. `discovery` is: tracked (a partition), new (discovery adds it), ignored (left
    out by MATCHALL_SEGMENTS), restore (marked deleted, listed again: discovery unmarks it), and for
    partitions ActiveCampaign does not list: unlisted (marked deleted once two listings in a row miss
    it) or deleted (marked). Without DAGSTER_HOME every admitted segment shows as new. Read-only.
    """
    from matchall_dagster.orchestration.partitions import tracked

    try:
        listed = _listing()
        tracked([])  # MATCHALL_SEGMENTS read (and refused if bad) before anything is printed
    except ActiveCampaignError as exc:
        _fail(str(exc))
    instance = _instance_or_none()
    partitions: set[str] = set()
    deleted: set[str] = set()
    if instance is None:
        click.echo(
            "DAGSTER_HOME is not set: no instance to compare with; every admitted segment would be added.", err=True
        )
    else:
        from matchall_dagster.orchestration.deletions import deleted_ids

        with instance:
            partitions = set(instance.get_dynamic_partitions("segments"))
            deleted = deleted_ids(instance)
    admitted = set(tracked([*(segment.id for segment in listed), *partitions]))
    click.echo("segment_id\tlast_total\tlast_run_id\tdiscovery\tname")
    for segment in listed:
        if segment.id not in admitted and segment.id not in partitions:
            action = _IGNORED
        elif segment.id in deleted:
            action = _RESTORE
        else:
            action = _TRACKED if segment.id in partitions else _NEW
        size = "" if segment.last_total is None else str(segment.last_total)
        run_id = segment.last_run.run_id if segment.last_run and segment.last_run.run_id else ""
        click.echo(f"{segment.id}\t{size}\t{_one_line(run_id)}\t{action}\t{_one_line(segment.name)}")
    unlisted = sorted(partitions - {segment.id for segment in listed})
    if unlisted:
        from matchall_dagster.orchestration.catalog import read_catalog
        from matchall_dagster.settings import duckdb_path

        known = read_catalog(duckdb_path(), unlisted, patience=0.5)
        for segment_id in unlisted:
            entry = known.get(segment_id)
            size = "" if entry is None or entry.last_total is None else str(entry.last_total)
            run_id = entry.last_run_id or "" if entry else ""
            action = _DELETED if segment_id in deleted else _UNLISTED if segment_id in admitted else _IGNORED
            click.echo(
                f"{segment_id}\t{size}\t{_one_line(run_id)}\t{action}\t{_one_line(entry.name or '' if entry else '')}"
            )
    waiting = sum(1 for segment_id in unlisted if segment_id not in deleted and segment_id in admitted)
    if waiting:
        click.echo(
            f"{waiting} tracked partition(s) are not listed by ActiveCampaign: discovery marks each deleted once two "
            f"listings in a row miss it (rows kept).",
            err=True,
        )


def _listing() -> list[Segment]:
    with _client_from_env() as client:
        return client.list_segments(page_size=10_000)


@main.command()
@click.argument("segment_id")
@click.option(
    "--force", is_flag=True, help="Also forget a segment not marked deleted (discovery adds it again while listed)."
)
def forget(segment_id: str, force: bool) -> None:
    """Remove SEGMENT_ID's partition of segment_matches, typically after it was marked deleted.

    Its stored rows (tables segment_matches and segment_membership_changes in the DuckDB file) and its
    event history are kept; the command prints how to delete the rows. Needs DAGSTER_HOME.
    """
    from matchall_dagster.api.validation import validate_id
    from matchall_dagster.orchestration.deletions import NotForgettableError
    from matchall_dagster.orchestration.deletions import forget as forget_segment
    from matchall_dagster.settings import duckdb_path
    from matchall_dagster.storage import history

    try:
        validate_id(segment_id)
    except InvalidInputError as exc:
        _fail(str(exc))
    instance = _instance_or_none()
    if instance is None:
        _fail(
            "DAGSTER_HOME is not set: forget removes a partition from the Dagster instance. Set DAGSTER_HOME to the "
            "instance's folder (the one `dagster dev` and the daemon use) and run again."
        )
    with instance:
        try:
            forgotten = forget_segment(instance, segment_id, force=force)
        except NotForgettableError as exc:
            _fail(str(exc))
    database = duckdb_path()
    tables = (history.MATCHES_TABLE, history.CHANGES_TABLE, history.STEPS_TABLE, history.STATE_TABLE)
    statements = " ".join(f"delete from main.{table} where segment_id = '{segment_id}';" for table in tables)  # noqa: S608  # printed, never run; ids hold no quotes (validate_id)
    click.echo(
        f"Removed the partition of segment {segment_id} from segment_matches"
        + (" and its deleted mark." if forgotten.was_deleted else ".")
        + f" Its stored rows are kept in {database}, its history in Dagster's event log. To delete the rows "
        + f"(tables missing from the file can be left out):\n  duckdb {shlex.quote(database)} {shlex.quote(statements)}"
    )


@main.command()
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
        _fail(f"No DuckDB file at {path}. Give --database, or set MATCHALL_DUCKDB_PATH or DAGSTER_HOME as Dagster's.")
    try:
        connection = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as exc:
        _fail(
            f"Could not open {path} for reading ({str(exc).splitlines()[0][:200]}). A running materialization may "
            f"hold it: try again in a moment, or read a copy of the file."
        )
    with connection:
        tables = {row[0] for row in connection.execute("select table_name from information_schema.tables").fetchall()}
        if history.STEPS_TABLE not in tables:
            _fail(f"{path} holds no membership history yet: materialize segment_membership_changes first.")
        steps = history.steps_since(connection, segment_id, start)
        if not steps:
            if not history.has_history(connection, segment_id):
                _fail(f"Segment {segment_id!r} has no membership history in {path}; check the segment id.")
            click.echo(f"No changes of segment {segment_id} since {start:%Y-%m-%d %H:%M:%S} UTC.", err=True)
            return
        if contacts:
            reader = history.changes_since(connection, segment_id, start).to_arrow_reader(100_000)
            try:
                with pa_csv.CSVWriter(sys.stdout.buffer, reader.schema, write_options=_CSV_OPTIONS) as writer:
                    for batch in reader:
                        writer.write_batch(batch)
                sys.stdout.flush()
            except BrokenPipeError:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                sys.exit(1)
            return
        click.echo("observed_at\trun_id\tmembers\tjoined\tleft")
        for observed_at, run_id, members, joined, left in steps:
            click.echo(f"{observed_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}\t{run_id}\t{members}\t{joined}\t{left}")


def _parse_since(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        _fail(f"--since {value[:40]!r} is not a date: write it as YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS][+HH:MM].")
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _fault_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for name, help_text in reversed(
        [
            ("latency_ms", "Milliseconds added to every answer."),
            ("latency_jitter_ms", "Plus up to this many random milliseconds."),
            ("error_rate", "Share of requests answered 500/502/503/504."),
            ("reset_rate", "Share of answers whose connection drops mid-body."),
            ("truncate_rate", "Share of answers cut short (invalid JSON)."),
            ("burst_429_rate", "Chance that a request starts a burst of 429s."),
            ("burst_429_length", "429s in a burst."),
            ("burst_429_retry_after_seconds", "Retry-After of burst 429s (0: retry at once)."),
            ("slow_rate", "Share of answers delayed by --slow-ms (time-outs)."),
            ("slow_ms", "Delay of slow answers."),
            ("non_json_rate", "Share of answers that are 200 with an HTML page instead of JSON."),
            ("total_drift_rate", "Share of ready pages whose page.total differs from the run's."),
            ("duplicate_rate", "Share of ready pages with one id of another page in place of one of theirs."),
            ("short_page_rate", "Share of ready pages before the last that hold fewer than per_page ids."),
            ("rekick_rate", "Share of reads of page 2+ that find the run searching again (as after a sort change)."),
            ("rekick_ms", "How long such a run searches again."),
        ]
    ):
        default = getattr(Faults(), name)
        option = click.option(
            f"--{name.replace('_', '-')}",
            name,
            type=type(default),
            default=default,
            show_default=True,
            envvar=f"MATCHALL_SIM_{name.upper()}",
            help=help_text,
        )
        func = option(func)
    return func


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, envvar="MATCHALL_SIM_HOST")
@click.option("--port", default=8765, show_default=True, envvar="MATCHALL_SIM_PORT")
@click.option(
    "--token", default=DEFAULT_TOKEN, show_default=True, envvar="MATCHALL_SIM_TOKEN", help="The accepted Api-Token."
)
@click.option(
    "--seed", default=0, show_default=True, envvar="MATCHALL_SIM_SEED", help="Seed of the account and the faults."
)
@click.option(
    "--ready-after",
    default=2.0,
    show_default=True,
    envvar="MATCHALL_SIM_READY_AFTER",
    help="Seconds until a run is ready.",
)
@click.option(
    "--requests-per-second",
    default=5.0,
    show_default=True,
    envvar="MATCHALL_SIM_REQUESTS_PER_SECOND",
    help="The account limit; 0 turns it off.",
)
@click.option(
    "--retry-after", default=1, show_default=True, envvar="MATCHALL_SIM_RETRY_AFTER", help="Retry-After of 429s."
)
@click.option(
    "--burst-429-retry-after/--no-burst-429-retry-after", default=True, envvar="MATCHALL_SIM_BURST_429_RETRY_AFTER"
)
@_fault_options
def simulator(
    host: str,
    port: int,
    token: str,
    seed: int,
    ready_after: float,
    requests_per_second: float,
    retry_after: int,
    **faults: Any,
) -> None:
    """Serve a simulated account of the Match-All API (every option also reads MATCHALL_SIM_<NAME>)."""
    try:
        config = SimulatorConfig(
            api_token=token,
            requests_per_second=requests_per_second,
            retry_after=retry_after,
            ready_after=ready_after,
            seed=seed,
            faults=Faults(**faults),
        )
    except ValueError as exc:
        _fail(str(exc))
    account = demo_account(seed)
    url_host = f"[{host}]" if ":" in host else host
    click.echo(
        f"Simulated ActiveCampaign account with {len(account.segments)} segments.\n"
        f"  export ACTIVECAMPAIGN_API_URL=http://{url_host}:{port}\n"
        f"  export ACTIVECAMPAIGN_API_KEY={token if token == DEFAULT_TOKEN else '<your --token>'}",
        err=True,
    )
    serve(Simulator(account, config), host=host, port=port, log_level="warning")


def _format_of(output: Path | None) -> str:
    suffix = output.suffix.lower().lstrip(".") if output else ""
    return suffix if suffix in FORMATS else "csv"


def _fail(message: str) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(1)


def _table(contact_ids: ContactIds) -> pa.Table:
    positions = np.arange(1, contact_ids.size + 1, dtype=np.int64)
    return pa.table({"position": positions, "contact_id": contact_ids})


def _write(contact_ids: ContactIds, fmt: str, output: Path | None) -> None:
    """Write the list; to a file only through a temporary sibling renamed into place at the end."""
    if output is None:
        try:
            pa_csv.write_csv(_table(contact_ids), sys.stdout.buffer, _CSV_OPTIONS)
            sys.stdout.flush()
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, as other command-line tools do.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        return
    with _atomic_file(output) as stream:
        if fmt == "csv":
            pa_csv.write_csv(_table(contact_ids), stream, _CSV_OPTIONS)
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
