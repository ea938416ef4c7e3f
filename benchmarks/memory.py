"""Peak memory of materializing multi-million-member segments through Dagster into the membership store.

Each run is the real thing: `dagster asset materialize --select segment_matches --partition ...`
(the project's definitions and executor: in-process, every step in the run's process) with a
temporary DAGSTER_HOME and the store `--store` names (`duckdb`: a file in it, the default;
`postgresql`: a schema in a database of the run's own on the `--postgres` server, dropped at the
end), against the simulator serving the segments from a process of
its own without a rate limit (the client runs at 1,000 requests/s, 8 pages in flight). A sampler
reads the resident memory (RSS) of the run process and of every process below it every 20 ms;
each process's own peak is its kernel high-water mark (VmHWM), the tree's is the largest sum seen
at one instant. Steps are named from the run's event log (the pid of each STEP_START).

    .venv/bin/python benchmarks/memory.py                  # 10,000,000 members: alone, then 2 in parallel
    .venv/bin/python benchmarks/memory.py --size 2000000   # smaller, quicker
    .venv/bin/python benchmarks/memory.py --store postgresql

`measure(size, parallel, store)` returns the figures for other scripts (the benchmark table).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
SIMULATOR_TOKEN = "simulator-token"  # noqa: S105  # the simulator's public demo token
MIB = 2**20
SAMPLE_SECONDS = 0.02
EXECUTOR = "in_process"  # the project's (definitions.py); the runs take no executor config
INSTANCE_YAML = """\
storage:
  sqlite:
    base_dir: {home}
telemetry:
  enabled: false
"""


@dataclass
class ProcessPeak:
    pid: int
    role: str  # "run", "step <key>", or what else runs below the run process
    peak_mib: float


@dataclass
class RunMemory:
    segment_id: str
    succeeded: bool
    seconds: float
    tree_peak_mib: float  # the largest sum of the run's processes' RSS at one instant
    processes: list[ProcessPeak] = field(default_factory=list)

    def peak_of(self, role: str) -> float:
        return max((p.peak_mib for p in self.processes if p.role == role), default=0.0)


@dataclass
class Scenario:
    name: str
    size: int
    runs: list[RunMemory]
    total_peak_mib: float  # every run's tree together, at one instant
    rows_stored: dict[str, int]
    executor: str
    simulator_peak_mib: float = 0.0  # the simulator's process so far (it serves every scenario)
    store: str = "duckdb"

    @property
    def exact(self) -> bool:
        return all(run.succeeded and self.rows_stored.get(run.segment_id) == self.size for run in self.runs)


def _vm_hwm_bytes(pid: int) -> int:
    """The kernel's record of a process's peak RSS (Linux); 0 where it cannot be read."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeSampler:
    """Samples the RSS of process trees in a thread, until stopped."""

    def __init__(self, roots: Sequence[psutil.Process]) -> None:
        self.roots = list(roots)
        self.peak_bytes: dict[int, int] = {}  # pid -> own peak
        self.members: dict[int, set[int]] = {root.pid: {root.pid} for root in self.roots}
        self.tree_peak: dict[int, int] = {root.pid: 0 for root in self.roots}
        self.total_peak = 0
        self.cmdlines: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            total = 0
            for root in self.roots:
                try:
                    processes = [root, *root.children(recursive=True)]
                except psutil.NoSuchProcess:
                    continue
                tree = 0
                for process in processes:
                    try:
                        rss = process.memory_info().rss
                        if process.pid not in self.cmdlines:
                            self.cmdlines[process.pid] = " ".join(process.cmdline())
                    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                        continue
                    own = max(rss, _vm_hwm_bytes(process.pid))
                    self.peak_bytes[process.pid] = max(self.peak_bytes.get(process.pid, 0), own)
                    self.members[root.pid].add(process.pid)
                    tree += rss
                self.tree_peak[root.pid] = max(self.tree_peak[root.pid], tree)
                total += tree
            self.total_peak = max(self.total_peak, total)
            self._stop.wait(SAMPLE_SECONDS)


class SimulatorProcess:
    """The simulator in a process of its own, serving the given segments without a rate limit."""

    def __init__(self, segments: dict[str, int]) -> None:
        spec = [f"{segment_id}:{size}" for segment_id, size in segments.items()]
        self.process = subprocess.Popen(  # noqa: S603  # this interpreter and this file, no shell
            [sys.executable, __file__, "--serve-simulator", *spec],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().strip()
        if not self.url.startswith("http://127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"the simulator did not start (it said {self.url!r})")

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()  # the server's signal to stop
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    @property
    def peak_mib(self) -> float:
        return _vm_hwm_bytes(self.process.pid) / MIB


def _serve_simulator(spec: Sequence[str]) -> None:
    from matchall_dagster.simulator import SimAccount, SimSegment, Simulator, SimulatorConfig, SimulatorServer

    segments = [SimSegment(part.split(":")[0], f"Benchmark {part}", int(part.split(":")[1])) for part in spec]
    account = SimAccount(segments=segments, seed=11)
    for segment in segments:
        account.ordered(segment.id, "id")  # built before the runs start, not during them
    config = SimulatorConfig(requests_per_second=0, ready_after=0.0)
    with SimulatorServer(Simulator(account, config)) as server:
        print(server.url, flush=True)
        sys.stdin.read()  # until the parent closes our stdin


def _run_config() -> str:
    env = {"api_url": {"env": "ACTIVECAMPAIGN_API_URL"}, "api_key": {"env": "ACTIVECAMPAIGN_API_KEY"}}
    return json.dumps({"resources": {"activecampaign": {"config": {**env, "requests_per_second": 1000}}}})


def _add_partitions(home: Path, segment_ids: Sequence[str]) -> None:
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("segments", list(segment_ids))


def _step_pids(home: Path) -> dict[int, str]:
    """pid -> step key, from the STEP_START events of every run of the instance."""
    import dagster as dg

    roles: dict[int, str] = {}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        for run in instance.get_runs():
            for entry in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START):
                event = entry.dagster_event
                if event is not None and event.pid is not None:
                    roles[event.pid] = f"step {event.step_key}"
    return roles


def _rows(url: str) -> dict[str, int]:
    """Rows stored per segment in `segment_matches` of the store at `url`."""
    from matchall_dagster.storage.store import StoreUrl

    parsed = StoreUrl.parse(url)
    query = "select segment_id, count(*) from segment_matches group by 1"
    if parsed.kind == "duckdb":
        import duckdb

        if not Path(parsed.location).exists():
            return {}
        with duckdb.connect(parsed.location, read_only=True) as connection:
            rows = connection.execute(query).fetchall()
    else:
        import psycopg
        from psycopg import sql

        with psycopg.connect(parsed.location) as connection:
            found = connection.execute("select to_regclass(%s)", [f"{parsed.schema}.segment_matches"]).fetchone()
            if not found or found[0] is None:
                return {}
            connection.execute(sql.SQL("set search_path to {}").format(sql.Identifier(parsed.schema)))
            rows = connection.execute(query).fetchall()
    return {str(segment_id): int(count) for segment_id, count in rows}


def run_scenario(
    name: str, simulator: SimulatorProcess, segment_ids: Sequence[str], size: int, store: str | None = None
) -> Scenario:
    """Materialize the segments, each in a run of its own, all at once, in a fresh instance, into `store`
    (a store URL; None: a DuckDB file in the instance's folder)."""
    with tempfile.TemporaryDirectory(prefix="matchall-memory-") as folder:
        home = Path(folder)
        (home / "dagster.yaml").write_text(INSTANCE_YAML.format(home=home))
        url = store or f"duckdb://{home / 'matchall.duckdb'}"
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "MATCHALL_STORE": url,
            "ACTIVECAMPAIGN_API_URL": simulator.url,
            "ACTIVECAMPAIGN_API_KEY": SIMULATOR_TOKEN,
        }
        env.pop("MATCHALL_SEGMENTS", None)
        _add_partitions(home, segment_ids)
        started = time.perf_counter()
        children: list[tuple[str, subprocess.Popen[bytes]]] = []
        logs = []
        for segment_id in segment_ids:
            command = [
                sys.executable,
                "-m",
                "dagster",
                "asset",
                "materialize",
                "--select",
                "segment_matches",
                "--partition",
                segment_id,
                "-m",
                "matchall_dagster.definitions",
                "--config-json",
                _run_config(),
            ]
            logs.append((home / f"run-{segment_id}.log").open("wb"))
            child = subprocess.Popen(command, env=env, cwd=home, stdout=logs[-1], stderr=subprocess.STDOUT)  # noqa: S603
            children.append((segment_id, child))
        roots = [psutil.Process(child.pid) for _, child in children]
        seconds: dict[str, float] = {}
        with TreeSampler(roots) as sampler:
            for segment_id, child in children:
                child.wait()
                seconds[segment_id] = time.perf_counter() - started
        for log in logs:
            log.close()
        roles = _step_pids(home)
        runs = []
        for (segment_id, child), root in zip(children, roots, strict=True):
            processes = []
            for pid in sorted(sampler.members[root.pid]):
                role = "run" if pid == root.pid else roles.get(pid) or _other_role(sampler.cmdlines.get(pid, ""))
                processes.append(ProcessPeak(pid, role, sampler.peak_bytes.get(pid, 0) / MIB))
            if child.returncode != 0:
                tail = (home / f"run-{segment_id}.log").read_text(errors="replace")[-3000:]
                print(f"run of segment {segment_id} failed ({child.returncode}):\n{tail}", file=sys.stderr)
            runs.append(
                RunMemory(
                    segment_id=segment_id,
                    succeeded=child.returncode == 0,
                    seconds=seconds[segment_id],
                    tree_peak_mib=sampler.tree_peak[root.pid] / MIB,
                    processes=processes,
                )
            )
        kind = url.split("://", 1)[0] if "://" in url else "duckdb"
        return Scenario(name, size, runs, sampler.total_peak / MIB, _rows(url), EXECUTOR, simulator.peak_mib, kind)


def _other_role(cmdline: str) -> str:
    if "resource_tracker" in cmdline:
        return "multiprocessing resource tracker"
    if "watch_orphans" in cmdline:
        return "compute log orphan watcher"
    if "poll_compute_logs" in cmdline:
        return "compute log watcher"
    if cmdline.startswith("tail "):
        return "compute log tail"
    if "multiprocessing.spawn" in cmdline:
        return "step process (its STEP_START not found)"
    return f"other ({cmdline[:60]})"


def measure(
    size: int = 10_000_000, parallel: int = 2, store: str = "duckdb", postgres: str = LOCAL_POSTGRES
) -> list[Scenario]:
    """One segment of `size` members alone, then `parallel` different ones at once, each run with
    the project's executor, into `store` (`duckdb` or `postgresql`: a database of its own on `postgres`)."""
    if str(ROOT) not in sys.path:  # run as a file (`python benchmarks/memory.py`)
        sys.path.insert(0, str(ROOT))
    from benchmarks.store import scratch_database

    segment_ids = [f"bench{index + 1}" for index in range(max(parallel, 1))]
    with contextlib.ExitStack() as stack:
        database = stack.enter_context(scratch_database(postgres)) if store == "postgresql" else None

        def url(scenario: int) -> str | None:
            return f"{database}?schema=scenario{scenario}" if database else None

        simulator = SimulatorProcess(dict.fromkeys(segment_ids, size))
        try:
            scenarios = [run_scenario("alone", simulator, segment_ids[:1], size, url(1))]
            if parallel > 1:
                scenarios.append(run_scenario(f"{parallel} in parallel", simulator, segment_ids, size, url(2)))
        finally:
            simulator.stop()
    return scenarios


def report(scenarios: Sequence[Scenario]) -> None:
    for scenario in scenarios:
        print(
            f"\n{scenario.name}: {scenario.size:,} members a segment into {scenario.store}; peak of all runs together "
            f"{scenario.total_peak_mib:,.0f} MiB ({scenario.executor} executor; simulator process "
            f"{scenario.simulator_peak_mib:,.0f} MiB)"
        )
        for run in scenario.runs:
            stored = scenario.rows_stored.get(run.segment_id, 0)
            verdict = "ok" if run.succeeded and stored == scenario.size else "FAILED"
            print(
                f"  segment {run.segment_id}: {verdict}, {stored:,} rows stored, {run.seconds:.1f} s, "
                f"tree peak {run.tree_peak_mib:,.0f} MiB"
            )
            helpers = [p for p in run.processes if p.role == "run" or p.role.startswith("step ")]
            for process in helpers:
                print(f"    {process.role:45} pid {process.pid:>7}  peak RSS {process.peak_mib:8,.0f} MiB")
            others = [p for p in run.processes if p not in helpers]
            if others:
                kinds = ", ".join(sorted({p.role for p in others}))
                largest = max(p.peak_mib for p in others)
                print(f"    + {len(others)} helper process(es), each at most {largest:,.0f} MiB: {kinds}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=10_000_000, help="members a segment (default 10,000,000)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once in the second scenario (default 2)")
    parser.add_argument("--store", choices=("duckdb", "postgresql"), default="duckdb", help="the membership store")
    parser.add_argument("--postgres", default=LOCAL_POSTGRES, help="the postgresql store's server (%(default)s)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead")
    parser.add_argument("--serve-simulator", nargs="+", metavar="ID:SIZE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_simulator:
        _serve_simulator(args.serve_simulator)
        return
    scenarios = measure(args.size, args.parallel, args.store, args.postgres)
    if args.json:
        print(json.dumps([asdict(scenario) for scenario in scenarios], indent=2))
    else:
        report(scenarios)


if __name__ == "__main__":
    main()
