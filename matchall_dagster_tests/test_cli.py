"""The `matchall` command against the simulator over real HTTP: exact lists, clean failures."""

from __future__ import annotations

import csv
import errno
import functools
import io
import json
import os
import shlex
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from matchall_dagster import ActiveCampaignClient
from matchall_dagster.api.models import Segment
from matchall_dagster.cli import main, shared
from matchall_dagster.settings import settings
from matchall_dagster.simulator import DEFAULT_TOKEN, SimAccount, SimulatorServer
from matchall_dagster.storage.store import StoreUrl, open_store
from matchall_dagster_tests.conftest import UUID_SEGMENT, ServeSimulator, make_account
from matchall_dagster_tests.deployment import PG_HOST, PG_PORT, PG_USER, require_postgres

MakeClient = Callable[..., ActiveCampaignClient]

HEADER = ["position", "contact_id"]
OLD_BYTES = b"position,contact_id\n1,42\n"  # what a pre-existing --output file holds
EXISTING = {"fresh": None, "existing": OLD_BYTES}


# -- helpers ------------------------------------------------------------------------------------


def api_env(server: SimulatorServer, key: str | None = DEFAULT_TOKEN) -> dict[str, str | None]:
    return {"ACTIVECAMPAIGN_API_URL": server.url, "ACTIVECAMPAIGN_API_KEY": key}


def run_cli(args: list[str], env: Mapping[str, str | None]) -> Result:
    # click >= 8.2 always keeps stderr apart: result.stdout is stdout alone, result.stderr stderr alone.
    settings.cache_clear()  # the settings of this environment, as a new process reads them
    try:
        return CliRunner().invoke(main, args, env=dict(env))
    finally:
        settings.cache_clear()


def rows_of_csv(text: str) -> list[tuple[int, int]]:
    assert text.startswith("position,contact_id\n")  # the header, unquoted
    reader = csv.reader(io.StringIO(text, newline=""))
    assert next(reader) == HEADER
    rows = []
    for row in reader:
        assert len(row) == 2
        rows.append((int(row[0]), int(row[1])))
    return rows


def rows_of_parquet(path: Path) -> list[tuple[int, int]]:
    table = pq.read_table(path)
    assert table.column_names == HEADER
    assert table.schema.field("position").type == pa.int64()
    assert table.schema.field("contact_id").type == pa.int64()
    return list(zip(table.column("position").to_pylist(), table.column("contact_id").to_pylist(), strict=True))


def rows_of_jsonl(path: Path) -> list[tuple[int, int]]:
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    rows = []
    for line in text.splitlines():
        record = json.loads(line)
        assert list(record) == HEADER
        assert all(type(value) is int for value in record.values())
        rows.append((record["position"], record["contact_id"]))
    return rows


def rows_of_file(path: Path, fmt: str) -> list[tuple[int, int]]:
    if fmt == "csv":
        return rows_of_csv(path.read_text())
    if fmt == "parquet":
        return rows_of_parquet(path)
    return rows_of_jsonl(path)


def assert_exact(rows: list[tuple[int, int]], truth: list[int]) -> None:
    assert [position for position, _ in rows] == list(range(1, len(truth) + 1))
    assert [contact_id for _, contact_id in rows] == truth


def assert_succeeded(result: Result, total: int, segment_id: str, where: str) -> None:
    assert result.exit_code == 0, result.stderr
    assert result.exception is None
    assert f"Wrote {total:,} contacts of segment {segment_id} " in result.stderr
    assert f" to {where} in " in result.stderr
    assert DEFAULT_TOKEN not in result.stdout + result.stderr


def prepare(directory: Path, existing: bytes | None, name: str = "members.csv") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    if existing is not None:
        target.write_bytes(existing)
    return target


def assert_failed_cleanly(
    result: Result, expect: str | tuple[str, ...], directory: Path | None, existing: bytes | None, *secrets: str
) -> None:
    """Non-zero exit, one `Error: ...` paragraph on stderr, nothing on stdout, the directory as it was
    (holding `members.csv` with `existing` bytes, or nothing, and no temporary `.partial` file)."""
    assert result.exit_code not in (0, None)
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.stdout == ""
    assert result.stderr.startswith("Error: "), result.stderr
    assert result.stderr.endswith("\n"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # one paragraph
    assert "Traceback" not in result.stderr
    for fragment in (expect,) if isinstance(expect, str) else expect:  # what happened, and what to do
        assert fragment in result.stderr, result.stderr
    for secret in (DEFAULT_TOKEN, *secrets):
        assert secret not in result.stdout
        assert secret not in result.stderr
    if directory is not None and directory.is_dir():
        names = sorted(path.name for path in directory.iterdir())
        assert not [name for name in names if name.endswith(".partial")], names
        if existing is None:
            assert names == []
        else:
            assert names == ["members.csv"]
            assert (directory / "members.csv").read_bytes() == existing


# -- complete lists -------------------------------------------------------------------------------

SEGMENTS = ["100", "1", "10001", "25001", UUID_SEGMENT]  # 0, 1, 10,001, 25,001 and 12,345 members
OUTPUTS = ["stdout", "csv", "parquet", "jsonl"]


def fetch_to(
    server: SimulatorServer, tmp_path: Path, segment_id: str, sort: str, output: str, extra: list[str] | None = None
) -> list[tuple[int, int]]:
    """Run `matchall fetch` to stdout or a file of the given format; return its rows."""
    args = ["fetch", segment_id, "--sort", sort, *(extra or [])]
    if output == "stdout":
        result = run_cli(args, api_env(server))
        total = len(server.simulator.truth(segment_id, sort))
        assert_succeeded(result, total, segment_id, "stdout")
        return rows_of_csv(result.stdout)
    target = tmp_path / "out" / f"members.{output}"
    target.parent.mkdir(exist_ok=True)
    result = run_cli([*args, "--output", str(target), "--format", output], api_env(server))
    total = len(server.simulator.truth(segment_id, sort))
    assert_succeeded(result, total, segment_id, str(target))
    assert result.stdout == ""
    assert sorted(path.name for path in target.parent.iterdir()) == [target.name]  # no temporary left behind
    return rows_of_file(target, output)


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("segment_id", SEGMENTS)
def test_fetch_writes_the_exact_list_in_every_format(
    server: SimulatorServer, tmp_path: Path, segment_id: str, output: str
) -> None:
    rows = fetch_to(server, tmp_path, segment_id, "id", output)
    assert_exact(rows, server.simulator.truth(segment_id, "id"))


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("sort", ["-id", "email", "last_name,-first_name", "score2", "-field9,cdate"])
def test_fetch_keeps_the_order_of_every_sort(server: SimulatorServer, tmp_path: Path, sort: str, output: str) -> None:
    rows = fetch_to(server, tmp_path, "25001", sort, output)
    truth = server.simulator.truth("25001", sort)
    assert truth != server.simulator.truth("25001", "id")  # the sort really reorders
    assert_exact(rows, truth)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("members.parquet", "parquet"), ("members.JSONL", "jsonl"), ("members.csv", "csv"), ("members.txt", "csv")],
)
def test_format_follows_the_output_suffix(server: SimulatorServer, tmp_path: Path, name: str, expected: str) -> None:
    target = tmp_path / name
    result = run_cli(["fetch", "10001", "--output", str(target)], api_env(server))
    assert_succeeded(result, 10_001, "10001", str(target))
    assert_exact(rows_of_file(target, expected), server.simulator.truth("10001"))


def test_explicit_format_wins_over_the_suffix(server: SimulatorServer, tmp_path: Path) -> None:
    target = tmp_path / "members.csv"
    result = run_cli(["fetch", "1", "--output", str(target), "--format", "jsonl"], api_env(server))
    assert_succeeded(result, 1, "1", str(target))
    assert_exact(rows_of_jsonl(target), server.simulator.truth("1"))


def test_fetch_replaces_an_existing_output_file(server: SimulatorServer, tmp_path: Path) -> None:
    target = prepare(tmp_path / "out", OLD_BYTES)
    result = run_cli(["fetch", "10001", "--output", str(target)], api_env(server))
    assert_succeeded(result, 10_001, "10001", str(target))
    assert_exact(rows_of_csv(target.read_text()), server.simulator.truth("10001"))
    assert [path.name for path in target.parent.iterdir()] == ["members.csv"]


@pytest.mark.parametrize("output", ["stdout", "parquet"])
def test_run_id_reads_an_existing_ready_run_without_starting_another(
    server: SimulatorServer, client: ActiveCampaignClient, tmp_path: Path, output: str
) -> None:
    run = client.start_run(UUID_SEGMENT, sort="last_name,-first_name")
    runs_before = set(server.simulator.runs)
    rows = fetch_to(server, tmp_path, UUID_SEGMENT, "last_name,-first_name", output, ["--run-id", run.run_id])
    assert_exact(rows, server.simulator.truth(UUID_SEGMENT, "last_name,-first_name"))
    assert set(server.simulator.runs) == runs_before  # no new run was started


# -- failures: non-zero, one clear paragraph, never a file ----------------------------------------


def failure_case(
    case: str, server: SimulatorServer, client: ActiveCampaignClient
) -> tuple[list[str], dict[str, str | None], tuple[str, ...], tuple[str, ...]]:
    """(fetch arguments, environment, what stderr must say, secrets that must not show) of a case."""
    env = api_env(server)
    if case == "failed run":
        return ["77"], env, ("failed: it ended at", "Start a new run"), ()
    if case == "expired run":
        run = client.start_run("10001")
        server.simulator.advance_clock(91 * 86_400)
        return ["10001", "--run-id", run.run_id], env, ("90 days after they start", "Start a new run."), ()
    if case == "unknown run":
        return (
            ["10001", "--run-id", "744390a5-208e-4c3d-b709-b3c3ea6e5948"],
            env,
            ("is gone (404", "Start a new run."),
            (),
        )
    if case == "unknown segment":
        return ["404404"], env, ("no saved segment '404404'", "Check the id under Contacts > Segments"), ()
    if case == "bad token":
        secret = "sekrit-token-0123456789-ZQX"
        return (
            ["1"],
            api_env(server, secret),
            ("refused the API token (403)", "Check ACTIVECAMPAIGN_API_KEY"),
            (secret,),
        )
    if case == "bad sort":
        return (
            ["1", "--sort", "email desc"],
            env,
            ("The sort 'email desc'", "Use comma-separated keys without spaces"),
            (),
        )
    if case == "hostile segment id":
        return ["../x"], env, ("The segment id '../x' is not a valid", "Copy the id again"), ()
    if case == "hostile run id":
        return (
            ["1", "--run-id", "../../audiences"],
            env,
            ("The run id '../../audiences' is not a valid", "Copy the id again"),
            (),
        )
    if case == "no env":
        unset: dict[str, str | None] = {"ACTIVECAMPAIGN_API_URL": None, "ACTIVECAMPAIGN_API_KEY": None}
        return (
            ["1"],
            unset,
            ("ACTIVECAMPAIGN_API_URL and ACTIVECAMPAIGN_API_KEY are not set", "to the account's API URL and key"),
            (),
        )
    if case == "no url":
        return (
            ["1"],
            api_env(server) | {"ACTIVECAMPAIGN_API_URL": None},
            ("ACTIVECAMPAIGN_API_URL is not set", "to the account's API URL and key"),
            (),
        )
    if case == "empty key":
        return ["1"], api_env(server, ""), ("ACTIVECAMPAIGN_API_KEY is not set", "to the account's API URL and key"), ()
    if case == "url with a path":
        url = f"{server.url}/api/3"
        return ["1"], env | {"ACTIVECAMPAIGN_API_URL": url}, ("has a path", "give the account's base URL only"), ()
    raise AssertionError(case)


FAILURES = [
    "failed run",
    "expired run",
    "unknown run",
    "unknown segment",
    "bad token",
    "bad sort",
    "hostile segment id",
    "hostile run id",
    "no env",
    "no url",
    "empty key",
    "url with a path",
]


@pytest.mark.parametrize("existing", EXISTING.values(), ids=EXISTING.keys())
@pytest.mark.parametrize("case", FAILURES)
def test_failures_exit_non_zero_with_one_clear_error_and_no_file(
    server: SimulatorServer, client: ActiveCampaignClient, tmp_path: Path, case: str, existing: bytes | None
) -> None:
    args, env, expect, secrets = failure_case(case, server, client)
    target = prepare(tmp_path / "out", existing)
    result = run_cli(["fetch", *args, "--output", str(target)], env)
    assert_failed_cleanly(result, expect, target.parent, existing, *secrets)


@pytest.mark.parametrize("case", FAILURES)
def test_failures_write_nothing_to_stdout(server: SimulatorServer, client: ActiveCampaignClient, case: str) -> None:
    args, env, expect, secrets = failure_case(case, server, client)
    result = run_cli(["fetch", *args], env)
    assert_failed_cleanly(result, expect, None, None, *secrets)


@pytest.mark.parametrize(
    ("case", "args"),
    [
        ("bad sort", ["1", "--sort", "name"]),
        ("bad sort", ["1", "--sort", "id,id"]),
        ("bad sort", ["1", "--sort", "ID"]),
        ("hostile segment id", ["../x"]),
        ("hostile segment id", ["1/../2"]),
        ("hostile segment id", ["%2F"]),
        ("hostile segment id", ["a b"]),
        ("hostile run id", ["1", "--run-id", "a/../b"]),
    ],
)
def test_bad_input_is_refused_before_any_request(server: SimulatorServer, case: str, args: list[str]) -> None:
    result = run_cli(["fetch", *args], api_env(server))
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ")
    assert result.stdout == ""
    assert ("sort" if case == "bad sort" else "id") in result.stderr
    assert server.simulator.stats()["requests"] == 0


def test_bad_token_is_not_retried_and_never_shown(server: SimulatorServer, tmp_path: Path) -> None:
    secret = "sekrit-token-0123456789-ZQX"
    result = run_cli(["fetch", "1"], api_env(server, secret))
    assert_failed_cleanly(result, "Check ACTIVECAMPAIGN_API_KEY", tmp_path, None, secret)
    assert server.simulator.stats()["requests"] == 1


@pytest.mark.parametrize("existing", EXISTING.values(), ids=EXISTING.keys())
def test_run_of_a_segment_that_expires_early_fails_cleanly(
    server: SimulatorServer, client: ActiveCampaignClient, tmp_path: Path, existing: bytes | None
) -> None:
    # Segment "88" forgets its runs 60 s after they start: a read by --run-id a minute later fails
    # although the run had been ready.
    run = client.start_run("88")
    server.simulator.advance_clock(61)
    target = prepare(tmp_path / "out", existing)
    result = run_cli(["fetch", "88", "--run-id", run.run_id, "--output", str(target)], api_env(server))
    assert_failed_cleanly(result, "Start a new run", target.parent, existing)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_non_csv_format_without_output_is_refused(server: SimulatorServer, fmt: str) -> None:
    result = run_cli(["fetch", "1", "--format", fmt], api_env(server))
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"Error: --format {fmt} writes binary or line data; give --output PATH for it (stdout takes csv only).\n"
    )
    assert server.simulator.stats()["requests"] == 0  # refused before anything was fetched


# -- unwritable outputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["missing directory", "parent is a file", "read-only directory"])
def test_unwritable_output_directory_fails_cleanly(server: SimulatorServer, tmp_path: Path, where: str) -> None:
    existing: bytes | None = None
    if where == "missing directory":
        directory = tmp_path / "missing"
    elif where == "parent is a file":
        (tmp_path / "a-file").write_text("not a directory\n")
        directory = tmp_path / "a-file"
    else:
        if os.geteuid() == 0:
            pytest.skip("root may write into a read-only directory")
        directory = tmp_path / "read-only"
        existing = OLD_BYTES
        prepare(directory, existing)
        directory.chmod(0o555)
    target = directory / "members.csv"
    try:
        result = run_cli(["fetch", "10001", "--output", str(target)], api_env(server))
    finally:
        if directory.is_dir():
            directory.chmod(0o755)
    assert_failed_cleanly(result, f"Could not write {target}: ", directory, existing)
    assert "check the path" in result.stderr
    assert not (tmp_path / "missing").exists()
    if where == "parent is a file":
        assert (tmp_path / "a-file").read_text() == "not a directory\n"


def test_output_that_is_a_directory_is_refused(server: SimulatorServer, tmp_path: Path) -> None:
    (tmp_path / "members.csv").mkdir()
    result = run_cli(["fetch", "1", "--output", str(tmp_path / "members.csv")], api_env(server))
    assert result.exit_code == 2  # click's usage error
    assert "Error: Invalid value for '--output'" in result.stderr
    assert "is a directory" in result.stderr
    assert result.stdout == ""
    assert list((tmp_path / "members.csv").iterdir()) == []
    assert server.simulator.stats()["requests"] == 0


@pytest.mark.parametrize("existing", EXISTING.values(), ids=EXISTING.keys())
def test_a_write_failing_half_way_leaves_no_partial_file(
    server: SimulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bytes | None
) -> None:
    def disk_full(table: pa.Table, sink: Any, options: Any = None) -> None:
        sink.write(b"position,contact_id\n1,")  # half a file on disk, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pa_csv, "write_csv", disk_full)  # the module the CLI writes through
    target = prepare(tmp_path / "out", existing)
    result = run_cli(["fetch", "10001", "--output", str(target)], api_env(server))
    assert_failed_cleanly(result, f"Could not write {target}: No space left on device", target.parent, existing)


# -- segments -------------------------------------------------------------------------------------


SEGMENTS_HEADER = "segment_id\tlast_total\tlast_run_id\tdiscovery\tname"


def no_instance(server: SimulatorServer) -> dict[str, str | None]:
    return {**api_env(server), "DAGSTER_HOME": None, "MATCHALL_SEGMENTS": None}


def listed(server: SimulatorServer) -> list[Segment]:
    """The listing as the client parses the published shape."""
    with ActiveCampaignClient(server.url, DEFAULT_TOKEN, requests_per_second=1000) as client:
        return client.list_segments()


def segment_line(segment: Segment, discovery: str) -> str:
    size = "" if segment.last_total is None else str(segment.last_total)
    run_id = segment.last_run.run_id if segment.last_run and segment.last_run.run_id else ""
    return f"{segment.id}\t{size}\t{run_id}\t{discovery}\t{segment.name}"


def test_segments_prints_one_tab_separated_line_per_segment(server: SimulatorServer) -> None:
    with ActiveCampaignClient(server.url, DEFAULT_TOKEN, requests_per_second=1000) as client:
        client.start_run("1")  # ready at once: the listing counts segment 1 with this run
    result = run_cli(["segments"], no_instance(server))
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == SEGMENTS_HEADER
    assert lines[1:] == [segment_line(segment, "new") for segment in listed(server)]
    assert {segment.id for segment in listed(server)} == {segment.id for segment in make_account().segments}
    assert any(line.startswith("1\t") and line.split("\t")[2] for line in lines)  # the last run's id
    assert all(line.count("\t") == 4 for line in lines)
    assert result.stdout.endswith("\n")
    assert "DAGSTER_HOME is not set" in result.stderr
    assert "every admitted segment would be added" in result.stderr
    assert DEFAULT_TOKEN not in result.stdout + result.stderr


def test_segments_of_an_account_without_any_prints_the_header_only(serve_simulator: ServeSimulator) -> None:
    result = run_cli(["segments"], no_instance(serve_simulator(SimAccount([]))))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == SEGMENTS_HEADER + "\n"


@pytest.fixture
def dagster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, dg.DagsterInstance]]:
    """An instance in a DAGSTER_HOME of its own (SQLite), as `dagster dev` and the daemon keep one."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        yield home, instance


def test_segments_shows_what_discovery_would_do_with_the_instance_s_partitions(
    server: SimulatorServer, dagster_home: tuple[Path, dg.DagsterInstance]
) -> None:
    home, instance = dagster_home
    account = server.simulator.account
    account.segments = [s for s in account.segments if s.id not in ("10001", "25001")]
    instance.add_dynamic_partitions("segments", ["1", "10001", "25001", "9999"])
    instance.add_dynamic_partitions("deleted_segments", ["25001", "9999"])
    env = {**api_env(server), "DAGSTER_HOME": str(home), "MATCHALL_SEGMENTS": "1,10000,10001,25001,9999"}
    result = run_cli(["segments"], env)
    assert result.exit_code == 0, result.stderr
    by_id = {line.split("\t")[0]: line.split("\t")[3] for line in result.stdout.splitlines()[1:]}
    assert {key: by_id[key] for key in ("1", "10000", "9999", "10001", "25001", "100")} == {
        "1": "tracked",
        "10000": "new",
        "9999": "restore",  # marked deleted, listed again
        "10001": "unlisted",  # marked deleted once two listings in a row miss it
        "25001": "deleted",
        "100": "ignored",  # left out by MATCHALL_SEGMENTS
    }
    assert "1 tracked partition(s) are not listed" in result.stderr
    assert result.stdout.splitlines()[-2:] == ["10001\t\t\tunlisted\t", "25001\t\t\tdeleted\t"]


def test_segments_refuses_a_bad_allow_list_clearly(server: SimulatorServer) -> None:
    result = run_cli(["segments"], {**no_instance(server), "MATCHALL_SEGMENTS": "1,a/b"})
    assert_failed_cleanly(result, ("MATCHALL_SEGMENTS: ",), None, None)


# -- matchall forget ------------------------------------------------------------------------------


def test_forget_removes_a_deleted_segment_s_partition_and_keeps_its_rows(
    dagster_home: tuple[Path, dg.DagsterInstance], tmp_path: Path
) -> None:
    home, instance = dagster_home
    database = tmp_path / "matchall.duckdb"
    with duckdb.connect(str(database)) as connection:
        connection.execute("create table segment_matches (segment_id varchar, position bigint, contact_id bigint)")
        connection.execute("insert into segment_matches values ('7', 1, 42), ('8', 1, 43)")
    instance.add_dynamic_partitions("segments", ["7", "8"])
    instance.add_dynamic_partitions("deleted_segments", ["7"])
    env = {"DAGSTER_HOME": str(home), "MATCHALL_STORE": f"duckdb://{database}"}
    result = run_cli(["forget", "7"], env)
    assert result.exit_code == 0, result.stderr
    assert instance.get_dynamic_partitions("segments") == ["8"]
    assert instance.get_dynamic_partitions("deleted_segments") == []
    assert "Its stored rows are kept in" in result.stdout
    with duckdb.connect(str(database)) as connection:
        assert connection.execute("select segment_id from segment_matches order by 1").fetchall() == [("7",), ("8",)]
        # The printed command deletes them (the tables this file holds).
        command = shlex.split(result.stdout.splitlines()[-1])
        assert command[:2] == ["duckdb", str(database)]
        for statement in command[2].split(";"):
            if "main.segment_matches " in statement:
                connection.execute(statement)
        assert connection.execute("select segment_id from segment_matches").fetchall() == [("8",)]


def members(*ids: int) -> pd.DataFrame:
    return pd.DataFrame({"position": range(1, len(ids) + 1), "contact_id": list(ids)}, dtype="int64")


def test_forget_prints_psql_statements_for_a_postgresql_store(
    dagster_home: tuple[Path, dg.DagsterInstance], postgres_store: str
) -> None:
    home, instance = dagster_home
    store = open_store(postgres_store)
    store.replace_partition("7", members(42, 43))
    store.replace_partition("8", members(44))
    for segment_id in ("7", "8"):
        store.record_step(segment_id, source=segment_id, run_id="run-1", observed_at=datetime(2026, 11, 1, tzinfo=UTC))
    instance.add_dynamic_partitions("segments", ["7", "8"])
    instance.add_dynamic_partitions("deleted_segments", ["7"])
    result = run_cli(["forget", "7"], {"DAGSTER_HOME": str(home), "MATCHALL_STORE": postgres_store})
    assert result.exit_code == 0, result.stderr
    assert instance.get_dynamic_partitions("segments") == ["8"]
    assert f"Its stored rows are kept in {StoreUrl.parse(postgres_store)}" in result.stdout
    assert len(store.read_partition("7")) == 2  # kept until the printed command runs
    command = shlex.split(result.stdout.splitlines()[-1])
    assert command[:3] == ["psql", StoreUrl.parse(postgres_store).location, "-c"]
    assert len(command) == 4
    # The printed command runs as printed (every table exists in a PostgreSQL store) and deletes segment 7 only.
    done = subprocess.run(
        [*command[:3], command[3], "-v", "ON_ERROR_STOP=1"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert store.read_partition("7").empty
    assert store.read_partition("8")["contact_id"].tolist() == [44]
    assert store.steps_since("7", None) == []
    assert [(run_id, members) for _, run_id, members, *_ in store.steps_since("8", None) or []] == [("run-1", 1)]


def test_forget_refuses_what_it_should_not_remove(dagster_home: tuple[Path, dg.DagsterInstance]) -> None:
    home, instance = dagster_home
    instance.add_dynamic_partitions("segments", ["8"])
    env = {"DAGSTER_HOME": str(home)}
    assert_failed_cleanly(run_cli(["forget", "9"], env), "is not a partition of segment_matches", None, None)
    assert_failed_cleanly(run_cli(["forget", "8"], env), ("is not marked deleted", "--force"), None, None)
    assert instance.get_dynamic_partitions("segments") == ["8"]
    assert_failed_cleanly(run_cli(["forget", "a/b"], env), "not a valid ActiveCampaign id", None, None)
    assert_failed_cleanly(run_cli(["forget", "8"], {"DAGSTER_HOME": None}), "DAGSTER_HOME is not set", None, None)
    forced = run_cli(["forget", "8", "--force"], env)
    assert forced.exit_code == 0, forced.stderr
    assert instance.get_dynamic_partitions("segments") == []


@pytest.mark.parametrize("case", ["bad token", "no env"])
def test_segments_failures_are_clean(server: SimulatorServer, tmp_path: Path, case: str) -> None:
    secret = "sekrit-token-0123456789-ZQX"
    env = api_env(server, secret if case == "bad token" else None)
    expect = "refused the API token (403)" if case == "bad token" else "ACTIVECAMPAIGN_API_KEY is not set"
    result = run_cli(["segments"], env)
    assert_failed_cleanly(result, expect, tmp_path, None, secret)


# -- the installed entry point --------------------------------------------------------------------


def test_installed_console_script_fetches_over_real_http(server: SimulatorServer) -> None:
    script = Path(sys.executable).with_name("matchall")
    assert script.is_file(), f"the `matchall` console script is not installed next to {sys.executable}"
    env = {**os.environ, "ACTIVECAMPAIGN_API_URL": server.url, "ACTIVECAMPAIGN_API_KEY": DEFAULT_TOKEN}
    completed = subprocess.run(
        [str(script), "fetch", "25001", "--sort", "-email"], env=env, capture_output=True, timeout=120, check=False
    )
    stderr = completed.stderr.decode()
    assert completed.returncode == 0, stderr
    assert_exact(rows_of_csv(completed.stdout.decode()), server.simulator.truth("25001", "-email"))
    assert "Wrote 25,001 contacts of segment 25001 " in stderr
    assert "sort -email) to stdout" in stderr
    assert DEFAULT_TOKEN.encode() not in completed.stdout + completed.stderr


# -- file modes, unsendable keys, and a failing stdout ----


@pytest.mark.parametrize("existing", [None, 0o640], ids=["new file", "existing file"])
def test_written_file_gets_ordinary_permissions(server: SimulatorServer, tmp_path: Path, existing: int | None) -> None:
    target = tmp_path / "members.csv"
    reference = tmp_path / "reference"
    reference.touch()  # what any program's new file gets under this umask
    if existing is not None:
        target.write_bytes(OLD_BYTES)
        target.chmod(existing)
    expected = existing if existing is not None else stat.S_IMODE(reference.stat().st_mode)
    result = run_cli(["fetch", "1", "--output", str(target)], api_env(server))
    assert result.exit_code == 0, result.stderr
    assert oct(stat.S_IMODE(target.stat().st_mode)) == oct(expected)


@pytest.mark.parametrize(
    "key",
    ["s\u00e9krit-t\u00f6ken-0123", "sekrit-token-0123\n", " sekrit-token-0123", "sekrit-token-0123\r"],
    ids=["non-ascii", "trailing newline", "leading space", "trailing CR"],
)
def test_api_key_that_cannot_be_sent_is_refused_clearly(
    server: SimulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    # Without retries the current behaviour shows at once instead of after ~33 s of backoff.
    monkeypatch.setattr(shared, "ActiveCampaignClient", functools.partial(ActiveCampaignClient, max_retries=0))
    target = prepare(tmp_path / "out", OLD_BYTES)
    result = run_cli(["fetch", "1", "--output", str(target)], api_env(server, key))
    assert_failed_cleanly(result, "ACTIVECAMPAIGN_API_KEY", target.parent, OLD_BYTES, key, key.strip())
    assert "overloaded" not in result.stderr
    assert server.simulator.stats()["requests"] == 0


def test_failed_write_to_stdout_names_stdout(
    server: SimulatorServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def disk_full(table: pa.Table, sink: Any, options: Any = None) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pa_csv, "write_csv", disk_full)  # the module the CLI writes through
    result = run_cli(["fetch", "1"], api_env(server))
    assert_failed_cleanly(result, "No space left on device", tmp_path, None)
    assert "None" not in result.stderr
    assert "stdout" in result.stderr


# -- matchall changes -----------------------------------------------------------------------------


@pytest.fixture
def history_store(store_url: str) -> str:
    """A store of each engine with two steps of segment "s": 1, 2, 3 joined; then 1 left and 4 joined
    (and a step of another segment, which no answer about "s" shows)."""
    store = open_store(store_url)
    for n, ids in enumerate(([1, 2, 3], [2, 3, 4]), start=1):
        store.replace_partition("s", members(*ids))
        store.record_step("s", source=str(n), run_id=f"run-{n}", observed_at=datetime(2026, 11, n, 6, tzinfo=UTC))
    store.replace_partition("other", members(9))
    store.record_step("other", source="3", run_id="run-3", observed_at=datetime(2026, 11, 2, 7, tzinfo=UTC))
    return store_url


def test_changes_prints_one_line_per_step(history_store: str) -> None:
    result = run_cli(["changes", "s", "--store", history_store], {"MATCHALL_STORE": None})
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        "observed_at\trun_id\tmembers\tjoined\tleft",
        "2026-11-01 06:00:00\trun-1\t3\t3\t0",
        "2026-11-02 06:00:00\trun-2\t3\t1\t1",
    ]


def test_changes_lists_contacts_since_a_date(history_store: str) -> None:
    result = run_cli(["changes", "s", "--since", "2026-11-02", "--contacts"], {"MATCHALL_STORE": history_store})
    assert result.exit_code == 0, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["observed_at", "change", "contact_id", "run_id"]
    assert [(change, contact, run) for _, change, contact, run in rows[1:]] == [
        ("joined", "4", "run-2"),
        ("left", "1", "run-2"),
    ]
    assert {datetime.fromisoformat(observed) for observed, *_ in rows[1:]} == {datetime(2026, 11, 2, 6, tzinfo=UTC)}


def test_changes_lists_every_contact_without_a_date(history_store: str) -> None:
    result = run_cli(["changes", "s", "--contacts", "--store", history_store], {"MATCHALL_STORE": None})
    assert result.exit_code == 0, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout)))[1:]
    assert sorted((run, change, contact) for _, change, contact, run in rows) == [
        ("run-1", "joined", "1"),
        ("run-1", "joined", "2"),
        ("run-1", "joined", "3"),
        ("run-2", "joined", "4"),
        ("run-2", "left", "1"),
    ]
    assert [run for *_, run in rows] == sorted(run for *_, run in rows)  # oldest first


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["changes", "nope"], "has no membership history"),
        (["changes", "s", "--since", "last week"], "is not a date"),
        (["changes", "s", "--since", "2030-01-01"], "No changes of segment s since 2030-01-01"),
    ],
)
def test_changes_explains_what_it_cannot_show(history_store: str, args: list[str], message: str) -> None:
    result = run_cli([*args, "--store", history_store], {"MATCHALL_STORE": None})
    assert message in result.stderr
    assert result.exit_code == (0 if "No changes" in message else 1)
    assert result.stdout == ""


def test_changes_without_a_database_or_history_says_what_to_do(tmp_path: Path) -> None:
    missing = run_cli(["changes", "s"], {"DAGSTER_HOME": str(tmp_path), "MATCHALL_STORE": None})
    assert_failed_cleanly(missing, (f"No DuckDB file at {tmp_path / 'matchall.duckdb'}", "--store"), None, None)

    with duckdb.connect(str(tmp_path / "matchall.duckdb")) as connection:
        connection.execute("create table segment_matches (segment_id varchar)")
    empty = run_cli(["changes", "s"], {"DAGSTER_HOME": str(tmp_path), "MATCHALL_STORE": None})
    assert_failed_cleanly(empty, "holds no membership history yet", None, None)


PG_SECRET = "pg-sekrit-0123456789-ZQX"


@pytest.mark.parametrize(
    ("store", "expect"),
    [
        ("mysql://matchall@127.0.0.1/warehouse", ("--store: ", "is not one this project keeps", "postgresql://")),
        ("postgresql://postgres@127.0.0.1", ("--store: ", "names no host or database")),
        (f"postgresql://postgres:{PG_SECRET}@127.0.0.1/warehouse", ("--store: ", "carries a password", "PGPASSWORD")),
        # Nothing listens on port 1: the server is named, and what to check.
        (
            "postgresql://postgres@127.0.0.1:1/warehouse",
            ("Could not connect to the store", "127.0.0.1:1", "PGPASSWORD"),
        ),
    ],
    ids=["unknown scheme", "no database", "password", "no server"],
)
def test_changes_refuses_a_bad_store_clearly(store: str, expect: tuple[str, ...]) -> None:
    result = run_cli(["changes", "s", "--store", store], {"MATCHALL_STORE": None})
    assert_failed_cleanly(result, expect, None, None, PG_SECRET)


def test_changes_on_a_missing_postgresql_database_names_it() -> None:
    require_postgres()
    missing = f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/matchall_no_such_database"
    result = run_cli(["changes", "s", "--store", missing], {"MATCHALL_STORE": None})
    assert_failed_cleanly(result, ("Could not connect to the store", "matchall_no_such_database"), None, None)


def test_changes_names_a_bad_store_setting(tmp_path: Path) -> None:
    result = run_cli(["changes", "s"], {"MATCHALL_STORE": "mysql://matchall@127.0.0.1/warehouse"})
    assert_failed_cleanly(result, ("MATCHALL_STORE: ", "is not one this project keeps"), None, None)
