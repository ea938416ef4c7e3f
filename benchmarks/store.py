"""The membership store, side by side: DuckDB against PostgreSQL at 10,000,000 members.

`python -m benchmarks.store` (options: `--size 10000000`, `--replacements 10`, `--engines
duckdb,postgresql`, `--parts replace,history,anatomy`, `--postgres URL`) prints a table and writes
`benchmarks/results/store-10m.json` and `.md`. Every part runs in a fresh process of its own per
engine, one engine after the other, in one run of this script:

- **replace**: what a run does, `--replacements` times: a real Dagster run (in-process, as the
  project's executor) of a partitioned asset that builds its frame with `members_frame` (the
  array of contact ids as the client returns it, 8 bytes an id) and returns it to
  `MatchallIOManager(store=URL)`, which replaces the partition. Each replacement changes 1 % of
  the members (as a day does). Per engine: seconds of `handle_output` (the write, through the
  store), rows/s, the run process's peak RSS (VmHWM: Dagster, the ids, the frame and the write),
  and the store's size after the first replacement and after the last (DuckDB: the file and its
  WAL, with its free blocks; PostgreSQL: every table of the schema, partitions and indexes
  included, with their dead rows).
- **history**: a partition of `--size` members, its summary (what `matches_complete` reads), a
  first history step (everyone joins), then the partition replaced with 1 % changed (1 % left,
  1 % joined) and its summary and the second step: seconds of each, through the store.
- **anatomy** (PostgreSQL): what bounds the write. The binary COPY stream built alone (numpy,
  in this process), then one COPY of it into a table created in the same transaction with
  `FREEZE` (the store's), without `FREEZE`, into an `UNLOGGED` table then `SET LOGGED`, and in
  chunks of 100,000 rows or in one chunk instead of 1,000,000 rows: wall seconds, rows/s, this
  process's CPU, the server backend's CPU (read from /proc when the server is local) and the WAL
  it wrote.

PostgreSQL runs in a database of its own, created on the server `--postgres` names
(`postgresql://postgres@127.0.0.1:5432/postgres` by default) and dropped at the end; DuckDB in a
temporary folder. The contact ids are a range of `size` ids in a random order, the next version's
range 1 % higher.
"""

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import dagster as dg
import numpy as np
import pandas as pd
from dagster import AssetExecutionContext

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "benchmarks" / "results" / "store-10m.json"
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
ENGINES = ("duckdb", "postgresql")
TITLES = {"duckdb": "DuckDB", "postgresql": "PostgreSQL"}
SEGMENT = "bench"
CHURN = 0.01  # the share of members that leave (and as many that join) between two versions
MIB = 2**20
_SERVER_SETTINGS = (
    "shared_buffers",
    "work_mem",
    "maintenance_work_mem",
    "max_wal_size",
    "wal_level",
    "synchronous_commit",
    "max_parallel_workers_per_gather",
)


# -- the data ---------------------------------------------------------------------------------------


def contact_ids(size: int, version: int) -> np.ndarray[Any, Any]:
    """Version `version` of a segment's members, in the API's order: `size` distinct ids, a range of them in a
    random order (as a sort by name gives them), each version with the lowest 1 % of the previous one's
    ids gone and as many new ones above (80 MB at 10,000,000, shuffled in place)."""
    churn = max(1, int(size * CHURN))
    ids = np.arange(1 + version * churn, 1 + version * churn + size, dtype=np.int64)
    np.random.default_rng(version).shuffle(ids)
    return ids


def vm_hwm_mib() -> float:
    """This process's peak resident memory so far (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def vm_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# -- PostgreSQL: a database of our own ----------------------------------------------------------------


def with_database(server: str, database: str, schema: str | None = None) -> str:
    parts = urlsplit(server)
    query = f"schema={schema}" if schema else ""
    return urlunsplit(parts._replace(path=f"/{database}", query=query))


@contextlib.contextmanager
def scratch_database(server: str) -> Iterator[str]:
    """A fresh database `matchall_bench_<random>` on the server (its URL, no schema), dropped afterwards."""
    import psycopg

    name = f"matchall_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server, autocommit=True) as connection:
        connection.execute(f"create database {name}")
    try:
        yield with_database(server, name)
    finally:
        with psycopg.connect(server, autocommit=True) as connection:
            connection.execute(f"drop database if exists {name} with (force)")


def server_info(server: str) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(server, autocommit=True) as connection:
        row = connection.execute("select version()").fetchone()
        settings = {name: connection.execute(f"show {name}").fetchone() for name in _SERVER_SETTINGS}
    return {"version": row[0] if row else "?", **{name: value[0] for name, value in settings.items() if value}}


# -- sizes -----------------------------------------------------------------------------------------------


def store_size(url: str) -> dict[str, Any]:
    """The store's size on disk now (see the module's docstring)."""
    from matchall_dagster.storage.store import StoreUrl

    parsed = StoreUrl.parse(url)
    if parsed.kind == "duckdb":
        import duckdb

        path = Path(parsed.location)
        wal = path.with_name(path.name + ".wal")
        found: dict[str, Any] = {
            "bytes": path.stat().st_size + (wal.stat().st_size if wal.exists() else 0),
            "wal_bytes": wal.stat().st_size if wal.exists() else 0,
        }
        with duckdb.connect(str(path), read_only=True) as connection:
            query = "select block_size, total_blocks, free_blocks from pragma_database_size()"
            row = connection.execute(query).fetchone()
        if row:
            found["free_bytes"] = int(row[0]) * int(row[2])
        return found
    import psycopg

    with psycopg.connect(parsed.location, autocommit=True) as connection:
        row = connection.execute(
            "select coalesce(sum(pg_total_relation_size(c.oid)), 0), count(*) from pg_class c "
            "join pg_namespace n on n.oid = c.relnamespace where n.nspname = %s and c.relkind = 'r'",
            [parsed.schema],
        ).fetchone()
        dead = connection.execute(
            "select coalesce(sum(n_dead_tup), 0) from pg_stat_user_tables where schemaname = %s", [parsed.schema]
        ).fetchone()
        database = connection.execute("select pg_database_size(current_database())").fetchone()
    assert row is not None
    assert dead is not None
    assert database is not None
    return {"bytes": int(row[0]), "tables": int(row[1]), "dead_rows": int(dead[0]), "database_bytes": int(database[0])}


# -- the parts, each in a process of its own ----------------------------------------------------------


def replace_part(url: str, size: int, times: int) -> dict[str, Any]:
    """`times` real Dagster runs writing a partition of `size` members through MatchallIOManager."""
    from matchall_dagster.orchestration.assets import members_frame
    from matchall_dagster.storage.io_manager import MatchallIOManager

    writes: list[dict[str, float]] = []

    class TimedIOManager(MatchallIOManager):
        """The project's IO manager; the benchmark notes how long its write took."""

        def handle_output(self, context: dg.OutputContext, obj: pd.DataFrame) -> None:
            cpu, wall = time.process_time(), time.perf_counter()
            super().handle_output(context, obj)
            writes.append({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu})

    @dg.asset(name="segment_matches", partitions_def=dg.StaticPartitionsDefinition([SEGMENT]))
    def segment_matches(context: AssetExecutionContext) -> pd.DataFrame:
        return members_frame(context.partition_key, contact_ids(size, len(writes)))

    # Dagster's first run pays for imports and caches of its own: one of a single row, untimed, first.
    @dg.asset(name="warm_up", partitions_def=dg.StaticPartitionsDefinition([SEGMENT]))
    def warm_up(context: AssetExecutionContext) -> pd.DataFrame:
        return members_frame(context.partition_key, np.arange(1, 2, dtype=np.int64))

    with tempfile.TemporaryDirectory(prefix="store-bench-warm-") as folder:
        warm = MatchallIOManager(store=f"{folder}/warm.duckdb")
        dg.materialize([warm_up], partition_key=SEGMENT, resources={"io_manager": warm})
    rss_before = vm_rss_mib()
    sizes: list[dict[str, Any]] = []
    for _ in range(times):
        result = dg.materialize(
            [segment_matches], partition_key=SEGMENT, resources={"io_manager": TimedIOManager(store=url)}
        )
        assert result.success
        del result  # an in-process result keeps its outputs (the frame): a run process ends with its run
        gc.collect()
        sizes.append(store_size(url))
    from matchall_dagster.storage.store import open_store

    rows = open_store(url).summarize(SEGMENT).rows
    return {
        "writes": writes,
        "sizes": sizes,
        "rows_stored": rows,
        "rss_before_mib": round(rss_before, 1),
        "peak_rss_mib": round(vm_hwm_mib(), 1),
    }


def history_part(url: str, size: int) -> dict[str, Any]:
    """A first history step of `size` members, then a step with 1 % changed, through the store."""
    from matchall_dagster.orchestration.assets import members_frame
    from matchall_dagster.storage.store import open_store

    store = open_store(url)
    figures: dict[str, Any] = {}

    def timed(name: str, call: Any) -> Any:
        started = time.perf_counter()
        result = call()
        figures[f"{name}_s"] = round(time.perf_counter() - started, 3)
        return result

    steps = []
    for version in (0, 1):
        frame = members_frame(SEGMENT, contact_ids(size, version))
        timed(f"replace_{version + 1}", lambda frame=frame: store.replace_partition(SEGMENT, frame))
        del frame
        summary = timed(f"summarize_{version + 1}", lambda: store.summarize(SEGMENT))
        assert summary.rows == size, summary
        assert summary.positions_exact, summary
        assert not summary.repeated_contacts, summary
        step = timed(
            f"step_{version + 1}",
            lambda version=version: store.record_step(
                SEGMENT, source=f"bench-{version}", run_id=f"run-{version}", observed_at=datetime.now(UTC)
            ),
        )
        steps.append({"members": step.members, "joined": step.joined, "left": step.left})
    churn = max(1, int(size * CHURN))
    figures["steps"] = steps
    figures["exact"] = steps == [
        {"members": size, "joined": size, "left": 0},
        {"members": size, "joined": churn, "left": churn},
    ]
    figures["size_after"] = store_size(url)
    figures["peak_rss_mib"] = round(vm_hwm_mib(), 1)
    return figures


def _backend_cpu(pid: int) -> float | None:
    """A local server backend's CPU seconds so far (None when it is not on this machine or not readable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def anatomy_part(url: str, size: int) -> dict[str, Any]:
    """The PostgreSQL write taken apart (see the module's docstring)."""
    import psycopg

    from matchall_dagster.storage import postgres_store
    from matchall_dagster.storage.store import StoreUrl

    parsed = StoreUrl.parse(url)
    ids = contact_ids(size, 0)
    positions = np.arange(1, size + 1, dtype=np.int64)
    rows: list[dict[str, Any]] = []

    cpu, wall = time.process_time(), time.perf_counter()
    stream_bytes = sum(len(chunk) for chunk in postgres_store.copy_chunks(positions, ids))
    rows.append(
        {
            "variant": "the COPY stream built alone (numpy)",
            "wall_s": time.perf_counter() - wall,
            "client_cpu_s": time.process_time() - cpu,
            "stream_mib": round(stream_bytes / MIB, 1),
        }
    )
    variants = [
        ("COPY FREEZE into a new table (the store's)", "freeze", None),
        ("COPY without FREEZE", "", None),
        ("COPY into an UNLOGGED table, then SET LOGGED", "unlogged", None),
        ("COPY FREEZE, chunks of 100,000 rows", "freeze", 100_000),
        ("COPY FREEZE, one chunk of all rows", "freeze", size),
    ]
    default_chunk = postgres_store.COPY_CHUNK_ROWS
    with psycopg.connect(parsed.location, autocommit=True) as connection:
        connection.execute(f"create schema if not exists {parsed.schema}")
        connection.execute(f"set search_path to {parsed.schema}")
        backend = connection.info.backend_pid
        for label, mode, chunk_rows in variants:
            postgres_store.COPY_CHUNK_ROWS = chunk_rows or default_chunk
            lsn = connection.execute("select pg_current_wal_lsn()").fetchone()
            server_cpu = _backend_cpu(backend)
            cpu, wall = time.process_time(), time.perf_counter()
            with connection.transaction():
                connection.execute("drop table if exists anatomy")
                kind = "unlogged " if mode == "unlogged" else ""
                connection.execute(
                    f"create {kind}table anatomy (segment_id varchar not null default 'bench', "
                    "position bigint not null, contact_id bigint not null)"
                )
                options = "format binary, freeze" if mode == "freeze" else "format binary"
                with connection.cursor().copy(f"copy anatomy (position, contact_id) from stdin ({options})") as copy:
                    for chunk in postgres_store.copy_chunks(positions, ids):
                        copy.write(chunk)
                copied = time.perf_counter() - wall
                if mode == "unlogged":
                    connection.execute("alter table anatomy set logged")
            seconds = time.perf_counter() - wall
            client_cpu = time.process_time() - cpu
            after_cpu = _backend_cpu(backend)
            wal = connection.execute("select pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", lsn).fetchone()
            rows.append(
                {
                    "variant": label,
                    "wall_s": seconds,
                    "copy_s": copied,
                    "rows_per_s": size / seconds,
                    "client_cpu_s": client_cpu,
                    "server_cpu_s": None if server_cpu is None or after_cpu is None else after_cpu - server_cpu,
                    "wal_mib": None if wal is None else round(float(wal[0]) / MIB, 1),
                }
            )
        connection.execute("drop table if exists anatomy")
    postgres_store.COPY_CHUNK_ROWS = default_chunk
    return {"rows": rows}


PARTS = ("replace", "history", "anatomy")


def run_part(part: str, url: str, size: int, times: int) -> dict[str, Any]:
    """A part in a fresh process of this interpreter; its JSON line."""
    command = [sys.executable, "-m", "benchmarks.store", "--part", part, "--url", url, "--size", str(size)]
    command += ["--replacements", str(times)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("MATCHALL_STORE", None)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)  # noqa: S603
    if done.returncode != 0 or not done.stdout.strip():
        print(done.stderr[-4000:], file=sys.stderr)
        return {"error": done.stderr[-800:], "process_wall_s": time.perf_counter() - started}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = round(time.perf_counter() - started, 3)
    return result


# -- the report -------------------------------------------------------------------------------------------


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:,.0f}"


def _ratio(pg: float | None, duck: float | None) -> str:
    return f"{pg / duck:.2f}x" if pg is not None and duck else "-"


def summary_rows(report: dict[str, Any]) -> list[tuple[str, dict[str, float | None], str]]:
    """(measure, value per engine, how to show it) for the side-by-side table."""
    size = report["size"]
    rows: list[tuple[str, dict[str, float | None], str]] = []
    replace = report["replace"]
    history = report["history"]

    def each(source: dict[str, Any], get: Any) -> dict[str, float | None]:
        values: dict[str, float | None] = {}
        for engine, figures in source.items():
            try:
                values[engine] = None if "error" in figures else get(figures)
            except (KeyError, IndexError, TypeError, ZeroDivisionError):
                values[engine] = None
        return values

    def median_write(figures: dict[str, Any]) -> float:
        return float(statistics.median(write["wall_s"] for write in figures["writes"]))

    def first_write(figures: dict[str, Any]) -> float:
        return float(figures["writes"][0]["wall_s"])

    def cpu(figures: dict[str, Any]) -> float:
        return float(statistics.median(write["cpu_s"] for write in figures["writes"]))

    def size_after(index: int) -> Any:
        return lambda figures: figures["sizes"][index]["bytes"] / MIB

    def growth(figures: dict[str, Any]) -> float:
        return float(figures["sizes"][-1]["bytes"] / figures["sizes"][0]["bytes"])

    times = max((len(figures.get("writes", [])) for figures in replace.values()), default=0) or report["replacements"]
    churn = max(1, int(size * CHURN))
    rows += [
        (f"replace the partition: s (median of {times})", each(replace, median_write), "s"),
        ("replace the partition: s (the first: tables created)", each(replace, first_write), "s"),
        ("write rate: rows/s (median replacement)", each(replace, lambda f: size / median_write(f)), "rate"),
        ("CPU s of the run process per replacement (median)", each(replace, cpu), "s"),
        ("peak RSS of the run process, MiB (bound: 750)", each(replace, lambda f: f["peak_rss_mib"]), "mib"),
        ("RSS of the run process before the first write, MiB", each(replace, lambda f: f["rss_before_mib"]), "mib"),
        ("store size after 1 replacement, MiB", each(replace, size_after(0)), "mib"),
        (f"store size after {times} replacements, MiB", each(replace, size_after(-1)), "mib"),
        (f"growth from 1 to {times} replacements", each(replace, growth), "x"),
        ("summarize (matches_complete's read): s", each(history, lambda f: f["summarize_2_s"]), "s"),
        ("history: first step (everyone joins): s", each(history, lambda f: f["step_1_s"]), "s"),
        (
            f"history: step with 1 % changed ({churn:,} joined, {churn:,} left): s",
            each(history, lambda f: f["step_2_s"]),
            "s",
        ),
    ]
    return rows


def _cell(value: float | None, kind: str) -> str:
    if value is None:
        return "failed"
    if kind == "rate":
        return f"{value:,.0f}"
    if kind == "mib":
        return f"{value:,.0f}"
    if kind == "x":
        return f"{value:.2f}x"
    return f"{value:.2f}"


def table(report: dict[str, Any]) -> list[tuple[str, ...]]:
    engines = report["engines"]
    header = ("measure", *(TITLES[engine] for engine in engines))
    if len(engines) == 2:
        header += (f"{TITLES[engines[1]]} / {TITLES[engines[0]]}",)
    lines: list[tuple[str, ...]] = [header]
    for measure, values, kind in summary_rows(report):
        if not values:  # a part not run
            continue
        cells = tuple(_cell(values[engine], kind) if engine in values else "-" for engine in engines)
        if len(engines) == 2:
            cells += (_ratio(values.get(engines[1]), values.get(engines[0])) if kind != "x" else "",)
        lines.append((measure, *cells))
    return lines


def anatomy_table(report: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = report.get("anatomy", {}).get("rows", [])
    lines: list[tuple[str, ...]] = [("PostgreSQL write", "s", "rows/s", "client CPU s", "server CPU s", "WAL MiB")]
    for row in rows:
        server = row.get("server_cpu_s")
        lines.append(
            (
                row["variant"],
                f"{row['wall_s']:.2f}",
                f"{row['rows_per_s']:,.0f}" if "rows_per_s" in row else "-",
                f"{row['client_cpu_s']:.2f}",
                "-" if server is None else f"{server:.2f}",
                f"{row['wal_mib']:,.0f}" if row.get("wal_mib") is not None else "-",
            )
        )
    return lines


def _md(lines: list[tuple[str, ...]]) -> list[str]:
    header = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    return header + ["| " + " | ".join(line) + " |" for line in lines[1:]]


def _plain(lines: list[tuple[str, ...]]) -> str:
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines)


def notes(report: dict[str, Any]) -> list[str]:
    info, before, after = report["machine"], report["load_before"], report["load_after"]
    lines = []
    for engine, figures in report["replace"].items():
        sizes = figures.get("sizes") or []
        if engine == "postgresql" and sizes:
            last = sizes[-1]
            lines.append(
                f"PostgreSQL after {len(sizes)} replacements: {last['tables']} tables in the schema, "
                f"{last['dead_rows']:,} dead rows; the database {last['database_bytes'] / MIB:,.0f} MiB."
            )
        if engine == "duckdb" and sizes:
            last = sizes[-1]
            file_mib, wal_mib = (last["bytes"] - last["wal_bytes"]) / MIB, last["wal_bytes"] / MIB
            lines.append(
                f"DuckDB after {len(sizes)} replacements: the file {file_mib:,.0f} MiB (WAL {wal_mib:,.0f} MiB), "
                f"of which {last.get('free_bytes', 0) / MIB:,.0f} MiB free blocks."
            )
    server = report.get("postgresql_server") or {}
    if server:
        settings = ", ".join(f"{name} {server[name]}" for name in _SERVER_SETTINGS if name in server)
        lines.append(f"{server.get('version', 'PostgreSQL').split(' on ')[0]} on this machine: {settings}.")
    versions = ", ".join(f"{name} {value}" for name, value in info["versions"].items() if value)
    loads = [", ".join(f"{x:.1f}" for x in load["loadavg"]) for load in (before, after)]
    lines.append(
        f"{report['size']:,} members a partition, each part in a fresh process per engine. {info['cpu']}, "
        f"{info['cores']} cores, {info['memory_gb']} GB, Python {info['python']}; {versions}. Load average "
        f"{loads[0]} before, {loads[1]} after."
    )
    return lines


def markdown(report: dict[str, Any]) -> str:
    lines = _md(table(report))
    if report.get("anatomy", {}).get("rows"):
        lines += ["", *_md(anatomy_table(report))]
    lines += ["", *notes(report)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=10_000_000, help="members a partition (default: %(default)s)")
    parser.add_argument("--replacements", type=int, default=10, help="replacements a store (default: %(default)s)")
    parser.add_argument("--engines", default=",".join(ENGINES), help="of duckdb,postgresql (default: both)")
    parser.add_argument("--postgres", default=LOCAL_POSTGRES, help="the PostgreSQL server (default: %(default)s)")
    parser.add_argument("--parts", default="replace,history,anatomy", help="of replace,history,anatomy (default: all)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        if args.part == "replace":
            result = replace_part(args.url, args.size, args.replacements)
        elif args.part == "history":
            result = history_part(args.url, args.size)
        else:
            result = anatomy_part(args.url, args.size)
        print(json.dumps(result), flush=True)
        return
    engines = [engine for engine in args.engines.split(",") if engine]
    if not engines or set(engines) - set(ENGINES):
        parser.error(f"--engines takes {','.join(ENGINES)}, not {args.engines!r}")
    parts = [part for part in args.parts.split(",") if part]
    if set(parts) - set(PARTS):
        parser.error(f"--parts takes {','.join(PARTS)}, not {args.parts!r}")
    from benchmarks.run import load, machine

    info, before = machine(), load()
    print(f"{info['cpu']}, {info['cores']} cores; {before['uptime']}", flush=True)
    report: dict[str, Any] = {
        "size": args.size,
        "replacements": args.replacements,
        "engines": engines,
        "machine": info,
        "load_before": before,
        "replace": {},
        "history": {},
    }
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="store-bench-")))
        database = stack.enter_context(scratch_database(args.postgres)) if "postgresql" in engines else ""
        if database:
            report["postgresql_server"] = server_info(args.postgres)

        def url(engine: str, part: str) -> str:
            return f"duckdb://{folder / part}.duckdb" if engine == "duckdb" else f"{database}?schema={part}"

        for part in [part for part in ("replace", "history") if part in parts]:
            for engine in engines:
                print(f"- {part}, {TITLES[engine]}, {args.size:,} members ...", end=" ", flush=True)
                result = run_part(part, url(engine, part), args.size, args.replacements)
                report[part][engine] = result
                print("failed" if "error" in result else f"{result['process_wall_s']:.1f} s", flush=True)
        if database and "anatomy" in parts:
            print("- anatomy of the PostgreSQL write ...", end=" ", flush=True)
            report["anatomy"] = run_part("anatomy", url("postgresql", "anatomy"), args.size, 1)
            print(f"{report['anatomy'].get('process_wall_s', 0):.1f} s", flush=True)
    report["load_after"] = after = load()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(report) + "\n")
    print()
    print(_plain(table(report)))
    if report.get("anatomy", {}).get("rows"):
        print()
        print(_plain(anatomy_table(report)))
    print(f"\n{after['uptime']}\nWritten: {args.output} and {args.output.with_suffix('.md')}")


if __name__ == "__main__":
    main()
