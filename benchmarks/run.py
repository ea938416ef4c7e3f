"""The benchmark suite: matchall-dagster against the account's floor and two peers, side by side.

`./scripts/bench.sh` (or `python -m benchmarks.run`) starts two simulators in processes of their
own (one enforcing the account's 5 requests/s, one without a limit), starts a ready run of each
segment, and has every tool read that same run into a DuckDB file, each in a fresh process:

- `ours (client)`: `ActiveCampaignClient.fetch_matches`, then the array into DuckDB;
- `ours (Dagster)`: the whole path, a Dagster run of `segment_matches` and its checks for the
  partition with the project's executor (in-process: every step in the run's process) into DuckDB;
- `ours (Dagster, multiprocess)`: the same run with Dagster's multiprocess executor, each step in a
  subprocess of its own (`multiproc`), to show what the project saves by not using it;
- `httpx loop`: a plain sequential paging loop with a sleep-based throttle;
- `dlt`: dlt's `rest_api` source (page-number paginator) into dlt's DuckDB destination.

`--budgets memory,sqlite,postgres` repeats our rows (client and Dagster) with the account's request
budget in each store, side by side (`--postgres URL` names the server; the SQLite file is a fresh one
in the row's folder); without it, each tool's own default (the client: its memory; the Dagster
path: the project's file in DAGSTER_HOME).

`--stores duckdb,postgresql` repeats the Dagster rows with the membership store (`MATCHALL_STORE`)
in each engine, side by side: a fresh DuckDB file in the row's folder, or a fresh schema in a
database of its own on the `--postgres` server (created for the run and dropped at its end).

Per row: wall seconds of the work (after the process started and imported its libraries; the
Dagster row includes launching the step subprocess), the floor (`pages / 5 requests/s`) and the
ratio, CPU seconds of the whole process tree per million ids (interpreter start and imports
included), peak resident memory (the largest VmHWM of any process of the tool's tree, and the
peak of the tree's summed RSS in the JSON), and how much faster ours is. The table is printed and
written with the machine and load to `--output` (JSON) and the same path with `.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.simserver import build_account, segment_id
from benchmarks.store import scratch_database
from matchall_dagster import ActiveCampaignClient
from matchall_dagster.simulator import DEFAULT_TOKEN

ROOT = Path(__file__).resolve().parent.parent
ACCOUNT_LIMIT = 5.0
PAGE_SIZE = 10_000
SIZES = (100_000, 1_000_000, 10_000_000)
LATENCIES = (0, 400)
TOOLS = ("ours", "whole", "multiproc", "loop", "dlt")
# Where our rows keep the account's request budget: "default" is each tool's own (see the docstring).
BUDGETS = ("default", "memory", "sqlite", "postgres")
BUDGETED = ("ours", "whole", "multiproc", "whole x2")  # the peers have throttles of their own
# The membership store of the Dagster rows (the client and the peers write a DuckDB table of their own).
STORES = ("duckdb", "postgresql")
STORED = ("whole", "multiproc", "whole x2")
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
LABELS = {
    "ours": "ours (client)",
    "whole": "ours (Dagster)",
    "multiproc": "ours (Dagster, multiprocess)",
    "loop": "httpx loop",
    "dlt": "dlt rest_api",
    "whole x2": "ours (Dagster) x2",
}
# dlt at 1,000,000 ids: about 100 s and 3.3 GB resident; at 10,000,000 it would need ~30 GB.
DLT_MAX_SIZE = 1_000_000
# Two parallel runs share no pool: both materialize at once (the project's dagster.yaml, which
# single runs use, would queue the second API step behind the first).
_PARALLEL_INSTANCE_YAML = """\
storage:
  sqlite:
    base_dir:
      env: DAGSTER_HOME
telemetry:
  enabled: false
"""


@dataclass(frozen=True)
class Scenario:
    size: int
    latency_ms: int
    limit: bool
    tools: tuple[str, ...]


def plan(sizes: Sequence[int], latencies: Sequence[int], tools: Sequence[str], parallel: bool) -> list[Scenario]:
    """The matrix, trimmed where a row would cost minutes and say nothing new (README says which)."""
    scenarios = []
    for limit in (True, False):
        for latency in latencies:
            for size in sizes:
                chosen = [tool for tool in tools if tool not in ("dlt", "multiproc") or size <= DLT_MAX_SIZE]
                if limit and size > 1_000_000:
                    # Rate-bound: 200 s a tool. Ours at 400 ms only; the peers' ratio is that of 1M.
                    if latency != max(latencies):
                        continue
                    chosen = [tool for tool in chosen if tool in ("ours", "whole")]
                if not limit and latency:
                    # Latency costs a client no CPU; without the limit, 0 ms shows the client's cost
                    # and 400 ms what its concurrent pages make of latency.
                    chosen = [tool for tool in chosen if tool == "ours"] if size <= 1_000_000 else []
                if chosen:
                    scenarios.append(Scenario(size, latency, limit, tuple(chosen)))
    if parallel and "whole" in tools:
        scenarios.append(Scenario(max(sizes), 0, False, ("whole x2",)))
    return scenarios


# -- the simulators -------------------------------------------------------------------------------


class Sim:
    """A simulator process; `limit` is the account's 5 requests/s, or none."""

    def __init__(self, sizes: Sequence[int], limit: bool, copies: int) -> None:
        command = [sys.executable, "-m", "benchmarks.simserver", "--sizes", ",".join(map(str, sizes))]
        command += ["--copies", str(copies), "--requests-per-second", str(ACCOUNT_LIMIT if limit else 0)]
        self.process = subprocess.Popen(  # noqa: S603  # this interpreter, our module
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the simulator did not start; see its output above")
        self.url: str = json.loads(line)["url"]
        self.limit = limit
        self.psutil = psutil.Process(self.process.pid)
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def set_latency(self, latency_ms: int) -> None:
        self.http.post("/_simulator/faults", json={"latency_ms": latency_ms}).raise_for_status()

    def ready_run(self, segment: str) -> str:
        with ActiveCampaignClient(self.url, DEFAULT_TOKEN, requests_per_second=1) as client:
            run = client.start_run(segment, sort="id")
            client.wait_until_ready(segment, run.run_id, sort="id", poll_interval=0.05)
        time.sleep(1.1)  # let these requests leave the simulator's one-second window
        self.http.post("/_simulator/stats/reset").raise_for_status()
        return run.run_id

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.http.get("/_simulator/stats").json()
        return stats

    def cpu(self) -> float:
        times = self.psutil.cpu_times()
        return times.user + times.system

    def close(self) -> None:
        self.http.close()
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -- measuring a tool's process tree --------------------------------------------------------------


def vm_hwm_mb(pid: int) -> float:
    """A process's peak resident memory so far (VmHWM), in MB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class TreeSampler:
    """Peak memory of process trees: each process's own peak (VmHWM, exact whenever sampled before
    the process ends) and the trees' summed RSS (sampled every 0.1 s: a sample costs ~5 ms of CPU)."""

    def __init__(self, pids: Sequence[int], interval: float = 0.1) -> None:
        self.roots = [psutil.Process(pid) for pid in pids]
        self.interval = interval
        self.peak_process_mb = 0.0
        self.peak_tree_mb = 0.0
        self.processes: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0.0
            for root in self.roots:
                with contextlib.suppress(psutil.Error):
                    for process in [root, *root.children(recursive=True)]:
                        with contextlib.suppress(psutil.Error):
                            total += process.memory_info().rss / 2**20
                            self.peak_process_mb = max(self.peak_process_mb, vm_hwm_mb(process.pid))
                            if process.pid not in self.processes:
                                self.processes[process.pid] = " ".join(process.cmdline()[1:4])
            self.peak_tree_mb = max(self.peak_tree_mb, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Row:
    size: int
    latency_ms: int
    limit: bool
    tool: str
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    peak_tree_mb: float
    ids: int
    ok: bool
    detail: dict[str, Any] = field(default_factory=dict)
    budget: str = "default"
    store: str = "duckdb"  # the Dagster rows' membership store
    store_shown: bool = False  # several stores in the run: the label says which

    @property
    def label(self) -> str:
        return label(self.tool, self.budget, self.store if self.store_shown else None)

    @property
    def pages(self) -> int:
        return math.ceil(self.size / PAGE_SIZE)

    @property
    def floor_s(self) -> float | None:
        return self.pages / ACCOUNT_LIMIT if self.limit else None

    def as_dict(self) -> dict[str, Any]:
        floor = self.floor_s
        return {
            "size": self.size,
            "latency_ms": self.latency_ms,
            "limit": self.limit,
            "tool": self.tool,
            "budget": self.budget,
            **({"store": self.store} if self.tool in STORED else {}),
            "wall_s": round(self.wall_s, 3),
            "floor_s": floor,
            "wall_over_floor": round(self.wall_s / floor, 3) if floor else None,
            "cpu_s": round(self.cpu_s, 3),
            "cpu_s_per_million_ids": round(self.cpu_s / self.size * 1e6, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "peak_tree_rss_mb": round(self.peak_tree_mb, 1),
            "ids": self.ids,
            "ok": self.ok,
            **self.detail,
        }


def label(tool: str, budget: str, store: str | None = None) -> str:
    """A row's name: the tool, then its request budget and membership store when they are not the default."""
    extras = ([] if budget == "default" else [budget]) + ([f"{store} store"] if store else [])
    return LABELS[tool] + (f" [{', '.join(extras)}]" if extras else "")


class Bench:
    def __init__(
        self,
        sims: dict[bool, Sim],
        workdir: Path,
        truth: dict[str, list[int]],
        postgres: str = LOCAL_POSTGRES,
        store_database: str | None = None,
    ) -> None:
        self.sims = sims
        self.workdir = workdir
        self.truth = truth
        self.postgres = postgres
        self.store_database = store_database  # a database of the run's own on the server, for postgresql rows
        self.rows: list[Row] = []

    def membership_store(self, store: str, folder: Path) -> str:
        """The membership store of a Dagster row: a fresh DuckDB file, or a fresh schema."""
        if store == "duckdb":
            return f"duckdb://{folder / 'bench.duckdb'}"
        assert self.store_database, "a postgresql store needs the run's database"
        return f"{self.store_database}?schema=row{len(self.rows) + 1}"

    def store(self, budget: str, folder: Path) -> str | None:
        """The request budget's store of a row (None: the tool's own default)."""
        return {
            "default": None,
            "memory": "memory",
            "sqlite": str(folder / "budget.sqlite"),
            "postgres": self.postgres,
        }[budget]

    def _env(self, sim: Sim, home: Path, db: Path | str, tool: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            ACTIVECAMPAIGN_API_URL=sim.url,
            ACTIVECAMPAIGN_API_KEY=DEFAULT_TOKEN,
            DAGSTER_HOME=str(home),
            MATCHALL_BENCH_DB=str(db),
            MATCHALL_BENCH_RPS=str(ACCOUNT_LIMIT if sim.limit else 1000),
            MATCHALL_BENCH_EXECUTOR="multiprocess" if tool == "multiproc" else "project",
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        )
        return env

    def measure(
        self, scenario: Scenario, tool: str, budget: str = "default", store: str = "duckdb", store_shown: bool = False
    ) -> Row:
        sim = self.sims[scenario.limit]
        copies = 2 if tool == "whole x2" else 1
        segments = [segment_id(scenario.size, copy) for copy in range(copies)]
        run_ids = [sim.ready_run(segment) for segment in segments]
        folder = Path(
            tempfile.mkdtemp(prefix=f"{tool.replace(' ', '')}-{budget}-{store}-{scenario.size}-", dir=self.workdir)
        )
        home = folder / "dagster_home"
        home.mkdir()
        instance_yaml = _PARALLEL_INSTANCE_YAML if copies > 1 else (ROOT / "dagster.yaml").read_text()
        (home / "dagster.yaml").write_text(instance_yaml)
        db = folder / "bench.duckdb"
        env = self._env(sim, home, self.membership_store(store, folder) if tool in STORED else db, tool)
        budget_store = self.store(budget, folder)
        commands = []
        for segment, run_id in zip(segments, run_ids, strict=True):
            arguments = ["--segment", segment, "--run-id", run_id]
            arguments += ["--budget", budget_store] if budget_store else []
            if tool.startswith("whole") or tool == "multiproc":
                commands.append([sys.executable, "-m", "benchmarks.whole_path", *arguments])
            else:
                rps = str(ACCOUNT_LIMIT if scenario.limit else 0)
                options = ["--url", sim.url, "--rps", rps, "--db", str(db)]
                commands.append([sys.executable, "-m", "benchmarks.tools", tool, *arguments, *options])
        if copies > 1:
            # The instance's SQLite files and partitions first: two runs creating them at once can
            # fail with "database is locked" before any step starts.
            setup = "import sys, dagster as d; d.DagsterInstance.get().add_dynamic_partitions('segments', sys.argv[1:])"
            subprocess.run([sys.executable, "-c", setup, *segments], cwd=ROOT, env=env, check=True)  # noqa: S603
        cpu_before, sim_cpu_before, started = _children_cpu(), sim.cpu(), time.monotonic()
        processes = [
            subprocess.Popen(  # noqa: S603  # this interpreter, our modules
                command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for command in commands
        ]
        with TreeSampler([process.pid for process in processes]) as sampler:
            outputs = [process.communicate() for process in processes]
        process_wall = time.monotonic() - started
        cpu = _children_cpu() - cpu_before
        stats = sim.stats()
        results: list[dict[str, Any]] = []
        for process, (stdout, stderr) in zip(processes, outputs, strict=True):
            lines = stdout.strip().splitlines()
            if process.returncode != 0 or not lines:
                print(f"  {tool} failed ({process.returncode}): {stderr[-3000:]}", file=sys.stderr)
                results.append({"ids": 0, "error": stderr[-500:]})
            else:
                results.append(json.loads(lines[-1]))
        ids = sum(int(result.get("ids", 0)) for result in results)
        ok = all(
            int(result.get("ids", 0)) == scenario.size
            and result.get("success", True)
            and all(result.get("checks", {}).values())
            and result.get("first_ids", self.truth[segment][:3]) == self.truth[segment][:3]
            for result, segment in zip(results, segments, strict=True)
        )
        wall = max(float(result.get("work_wall_s", process_wall)) for result in results)
        detail: dict[str, Any] = {
            "budget_store": sorted({str(r.get("budget", r.get("request_budget", ""))) for r in results}),
            "process_wall_s": round(process_wall, 3),
            "server_requests": stats["requests"],
            "server_429": stats["by_status"].get("429", stats["by_status"].get(429, 0)),
            "server_max_in_any_second": stats["max_requests_in_any_second"],
            "simulator_cpu_s": round(sim.cpu() - sim_cpu_before, 3),
            "processes": sorted(set(sampler.processes.values())),
            "results": results,
        }
        fetch_cpu = sum(float(result.get("fetch_cpu_s", 0)) for result in results)
        if fetch_cpu:
            detail["client_million_ids_per_cpu_s"] = round(ids / fetch_cpu / 1e6, 2)
        read = [float(result.get("elapsed_seconds", result.get("fetch_wall_s", 0))) for result in results]
        if any(read):
            detail["read_s"] = round(max(read), 3)
            if scenario.limit:
                detail["read_over_floor"] = round(max(read) / (math.ceil(scenario.size / PAGE_SIZE) / ACCOUNT_LIMIT), 3)
        row = Row(
            size=scenario.size * copies,
            latency_ms=scenario.latency_ms,
            limit=scenario.limit,
            tool=tool,
            wall_s=wall,
            cpu_s=cpu,
            peak_rss_mb=sampler.peak_process_mb,
            peak_tree_mb=sampler.peak_tree_mb,
            ids=ids,
            ok=ok,
            detail=detail,
            budget=budget,
            store=store,
            store_shown=store_shown,
        )
        self.rows.append(row)
        return row


# -- the report -----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str | None] = {}
    for package in ("matchall-dagster", "dagster", "duckdb", "psycopg", "dlt", "httpx", "numpy", "pydantic", "uvicorn"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
        "versions": versions,
    }


def load() -> dict[str, Any]:
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()  # noqa: S607
    return {"at": datetime.now(UTC).isoformat(timespec="seconds"), "uptime": uptime, "loadavg": os.getloadavg()}


HEADER = (
    "size",
    "latency",
    "limit",
    "tool",
    "wall s",
    "floor s",
    "wall/floor",
    "CPU s per M ids",
    "peak RSS MB",
    "ours vs this",
)


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value else "-"


def table_rows(rows: Sequence[Row]) -> list[tuple[str, ...]]:
    """One line per row; a peer's last column is its wall over ours (client / Dagster)."""
    lines: list[tuple[str, ...]] = []
    by_key: dict[tuple[int, int, bool, str], Row] = {}
    for row in rows:  # a peer is compared with our first row of the scenario (the first budget)
        by_key.setdefault((row.size, row.latency_ms, row.limit, row.tool), row)
    for row in rows:
        floor = row.floor_s
        versus = ""
        if row.tool in ("loop", "dlt"):
            ours = [by_key.get((row.size, row.latency_ms, row.limit, tool)) for tool in ("ours", "whole")]
            versus = " / ".join(f"{row.wall_s / other.wall_s:.2f}x" if other else "-" for other in ours)
        elif row.tool == "ours" and "client_million_ids_per_cpu_s" in row.detail:
            versus = f"read {row.detail['read_s']:.1f} s, {row.detail['client_million_ids_per_cpu_s']:.1f} M ids/CPU s"
        elif row.tool in ("whole", "whole x2", "multiproc") and "read_s" in row.detail:
            versus = f"read {row.detail['read_s']:.1f} s"
        if not row.ok:
            versus = f"WRONG/FAILED {versus}"
        lines.append(
            (
                f"{row.size:,}",
                f"{row.latency_ms} ms",
                "5/s" if row.limit else "none",
                row.label,
                f"{row.wall_s:.2f}",
                f"{floor:.1f}" if floor else "-",
                _ratio(row.wall_s / floor if floor else None),
                f"{row.cpu_s / row.size * 1e6:.2f}",
                f"{row.peak_rss_mb:.0f}",
                versus,
            )
        )
    return lines


def markdown(rows: Sequence[Row], info: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    versions = ", ".join(f"{name} {value}" for name, value in info["versions"].items() if value)
    lines.append("")
    lines.append(
        f"{info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB, Python {info['python']}, {info['system']}; "
        f"{versions}."
    )
    return "\n".join(lines)


def plain(rows: Sequence[Row]) -> str:
    cells = [HEADER, *table_rows(rows)]
    widths = [max(len(line[column]) for line in cells) for column in range(len(HEADER))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in cells)


# -- main -----------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(part.replace("_", "")) for part in text.split(",") if part]


@contextlib.contextmanager
def simulators(sizes: Sequence[int], parallel: bool) -> Iterator[dict[bool, Sim]]:
    sims: dict[bool, Sim] = {}
    try:
        sims[True] = Sim(sizes, limit=True, copies=1)
        sims[False] = Sim(sizes, limit=False, copies=2 if parallel else 1)
        yield sims
    finally:
        for sim in sims.values():
            sim.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=_ints, default=list(SIZES), help="segment sizes (default: %(default)s)")
    parser.add_argument("--latencies", type=_ints, default=list(LATENCIES), help="ms (default: %(default)s)")
    parser.add_argument("--tools", default=",".join(TOOLS), help="of ours,whole,multiproc,loop,dlt (default: all)")
    parser.add_argument("--no-parallel", action="store_true", help="skip the two parallel Dagster runs")
    parser.add_argument(
        "--budgets", default="default", help="our rows' request budget stores, of default,memory,sqlite,postgres"
    )
    parser.add_argument(
        "--stores", default="duckdb", help="the Dagster rows' membership stores, of duckdb,postgresql (default: duckdb)"
    )
    parser.add_argument(
        "--postgres", default=LOCAL_POSTGRES, help="the postgres budget's and store's server (%(default)s)"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "latest.json")
    args = parser.parse_args(argv)
    tools = [tool for tool in args.tools.split(",") if tool]
    unknown = set(tools) - set(TOOLS)
    if unknown:
        parser.error(f"unknown tools {sorted(unknown)}; choose from {','.join(TOOLS)}")
    budgets = [budget for budget in args.budgets.split(",") if budget]
    if not budgets or set(budgets) - set(BUDGETS):
        parser.error(f"--budgets takes {','.join(BUDGETS)}, not {args.budgets!r}")
    stores = [store for store in args.stores.split(",") if store]
    if not stores or set(stores) - set(STORES):
        parser.error(f"--stores takes {','.join(STORES)}, not {args.stores!r}")
    parallel = not args.no_parallel
    scenarios = plan(args.sizes, args.latencies, tools, parallel)
    info = machine()
    before = load()
    print(f"{info['cpu']}, {info['cores']} cores; {before['uptime']}", flush=True)
    print(f"Building {len(args.sizes)} segment(s) in the simulators...", flush=True)
    account = build_account(args.sizes, 2 if parallel else 1)
    truth = {segment.id: account.ordered(segment.id, "id")[:3].tolist() for segment in account.segments}
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="matchall-bench-"))
        sims = stack.enter_context(simulators(args.sizes, parallel))
        database = stack.enter_context(scratch_database(args.postgres)) if "postgresql" in stores else None
        bench = Bench(sims, Path(workdir), truth, args.postgres, database)
        for scenario in scenarios:
            for sim in sims.values():
                sim.set_latency(scenario.latency_ms)
            for tool in scenario.tools:
                for budget in budgets if tool in BUDGETED else ["default"]:
                    for store in stores if tool in STORED else ["duckdb"]:
                        shown = len(stores) > 1 and tool in STORED
                        limit = "5/s" if scenario.limit else "no limit"
                        where = f"{scenario.size:,} ids, {scenario.latency_ms} ms, {limit}"
                        print(f"- {label(tool, budget, store if shown else None)}: {where} ...", end=" ", flush=True)
                        row = bench.measure(scenario, tool, budget, store, shown)
                        print(f"{row.wall_s:.2f} s, {row.cpu_s:.2f} CPU s, {row.peak_rss_mb:.0f} MB", flush=True)
    after = load()
    rows = [row.as_dict() for row in bench.rows]
    report = {"machine": info, "load_before": before, "load_after": after, "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(bench.rows, info) + "\n")
    print()
    print(plain(bench.rows))
    print(f"\n{after['uptime']}\nWritten: {args.output} and {args.output.with_suffix('.md')}")


if __name__ == "__main__":
    main()
