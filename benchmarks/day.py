"""The whole simulated day, end to end, with the real Dagster daemon: today's runs against the batches.

`python -m benchmarks.day [--segments N] [--baseline-segments M]` prints a report (`--json` for one
JSON line, `--out NAME` to save `benchmarks/results/NAME.json` and `.md`; progress lines go to
stderr). Its floor at the account's real 5 requests/s is about N / 1,000 x 16 minutes; on 2 cores
the day measured 1.9 times that (1,000 segments: 31 minutes), the baseline of 40 small segments 6
minutes more. The full 10,000 would take hours.

Each day is a deployment of its own, started as the project's end-to-end tests start theirs:

- A temporary DAGSTER_HOME holding the project's `dagster.yaml` (SQLite storage, the queued run
  coordinator with `max_concurrent_runs` 4, the pool `activecampaign` at 2), a DuckDB file as the
  membership store (`MATCHALL_STORE=duckdb:///...`) and the request budget in its default place (a SQLite file in
  DAGSTER_HOME). `dagster-daemon run -w workspace.yaml` runs everything: its code server evaluates
  the sensors (discovery, readiness) and starts a process per run (the default run launcher; a
  `multiprocessing` spawn child of the code server, not an `api execute_run` command line); the
  daemon itself evaluates the automation sensor of `segment_membership_changes` and dequeues runs.
  The daemon reloads its workspace every 60 s, starting a fresh code server each time (the old one
  ends 20 s after its last heartbeat): their CPU is reported with the code server's.
  `MATCHALL_KICKOFF_CRON` is set 12 hours away so that the schedule never fires during the day.
  The deployment imports a copy of `matchall_dagster` made when the day starts (first on its
  PYTHONPATH; `--live-code` for the working tree), so that edits made meanwhile do not reach the
  day's runs halfway; the report names the copy's digest.
- The simulator in a process of its own on 127.0.0.1 (an ephemeral port), enforcing the account's
  5 requests/s, with N segments of realistic sizes (`SIZE_MIX`: 85 % of one page or less, many
  under 1,000 members, a tail of a few up to 1,000,000; 0.5 % whose runs fail). A run turns ready
  after `READY_BASE_S + READY_PER_MILLION_S * sqrt(members / 1,000,000)` seconds (times a uniform
  0.5 to 1.5): 2 s to a minute instead of minutes to hours, so that the day is bound by the 5/s of
  requests (the kick-off alone takes N / 5 s), not by waiting. `--ready-scale` stretches them.
- The day starts with nothing but the account: the discovery sensor's first tick lists the
  segments, adds them as partitions of `segments` and launches the kick-off (`match_all_kickoff_job`
  with their ids) and the catalog's refresh; the readiness sensor polls the runs and launches the
  reads (small segments in batches of `read_small_segments`, large ones in runs of
  `segment_matches_job`), the automation sensor the runs of `segment_membership_changes` (for the
  large ones only when batches are on). The day is over when every segment whose runs do not fail
  has a materialization of `segment_membership_changes` newer than its latest one of
  `segment_matches`, and no run is queued or in progress. Then the daemon is stopped with SIGINT
  and waited for.

The baseline day (`--baseline-segments M`, first) has M small segments of 50 to 950 members and
`MATCHALL_SMALL_BATCH_SEGMENTS=0`: today's behaviour, a run of `segment_matches_job` and a run of
`segment_membership_changes` for every segment. The batched day (N mixed segments) follows with
the project's default batch size (`--batch`).

Measured, and printed for each day side by side:

- **Wall time against the request floor**: from the kick-off's start to the last membership
  change stored, against the requests the simulator served in that span (429s excluded) ÷ 5/s;
  the requests by kind (starts, polls, reads, listings: reads are the `requests` the
  materializations record, polls the other result-set requests), 429s, the most in any second.
- **CPU of the run processes**: every descendant of this process is sampled with psutil every
  `--sample-interval` s (0.2): its last user + system time, resident memory and command line. A run
  is matched to its process by the pid in its "Started process for run (pid: N)" event, and gets
  the CPU of that process and of its own descendants. CPU per segment by size class: small (one
  page or less: the batches, or today the reads and the changes of small partitions) and large
  (their reads and changes), over the segments stored; the kick-off and the catalog apart, and the
  check runs of failed remote runs apart. The cross-check: `getrusage(RUSAGE_CHILDREN)` of this
  process over the day less the last sampled times of every process that is not a run's (daemon,
  code servers, multiprocessing's resource trackers); the difference with the sampled sum is the
  CPU the sampler could not see (a process's last 0.2 s, shutdowns). For RUSAGE_CHILDREN to hold
  everything, this process makes itself a child subreaper (prctl): the code server the daemon
  leaves behind when it stops, and a run's helpers (`tail -F` of its compute logs, Dagster's
  `watch_orphans.py`) when the run's process ends first, become its children and are reaped here.
- **Runs launched**: total, per job, per 1,000 small segments; runs of `segment_membership_changes`
  launched for small partitions (none expected with batches on); failed runs.
- **Memory**: the peak of the summed RSS of the deployment's processes (with and without the
  simulator), and the largest single run process (its VmHWM when sampled).
- **The long-lived processes' own CPU**: the daemon, the code server (where sensors run), the
  simulator; the daemon log's errors, warnings and tracebacks, counted.

Notes: the simulator caches every segment's members, about 8 bytes a member (10,000 segments of
this mix: about 1.2 GB in its process). The day is measured on whatever else the machine runs;
`--keep-logs DIR` copies each day's daemon log there.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import psutil

from benchmarks.run import vm_hwm_mb
from matchall_dagster.lifecycle import policy
from matchall_dagster.orchestration.account import DEFAULT_ACCOUNT
from matchall_dagster.settings import Settings
from matchall_dagster.simulator import (
    DEFAULT_TOKEN,
    Answer,
    Behavior,
    SimAccount,
    SimSegment,
    Simulator,
    SimulatorConfig,
    SimulatorServer,
)
from matchall_dagster.simulator.rules import AUDIENCE, AUDIENCES, MATCH_SOME, RESULT_SET, START

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
INSTANCE_YAML = REPO / "dagster.yaml"
WORKSPACE = REPO / "workspace.yaml"
ACCOUNT_RATE = policy.ACCOUNT_REQUESTS_PER_SECOND  # the account's 5/s, the simulator's limit too
SMALL_MAX = 10_000  # one page: the readiness sensor's `is_small` (small_reads.SMALL_MAX_MEMBERS)
DEFAULT_BATCH = Settings.model_fields["small_batch_segments"].default
MATCHES_KEY = DEFAULT_ACCOUNT.matches_key
CHANGES_KEY = DEFAULT_ACCOUNT.changes_key
KICKOFF_JOB = DEFAULT_ACCOUNT.name("match_all_kickoff_job")
CATALOG_JOB = DEFAULT_ACCOUNT.name("activecampaign_segments_job")
MATCHES_JOB = DEFAULT_ACCOUNT.name("segment_matches_job")
SMALL_READS_JOB = DEFAULT_ACCOUNT.name("read_small_segments")
# Segment sizes: (share of segments, smallest, largest members), log-uniform within a band.
SIZE_MIX = (
    (0.01, 0, 0),
    (0.39, 10, 1_000),
    (0.45, 1_000, SMALL_MAX),
    (0.12, SMALL_MAX, 100_000),
    (0.025, 100_000, 500_000),
    (0.005, 500_000, 1_000_000),
)
BASELINE_SIZES = (50, 950)  # members of the baseline's small segments, uniform
FAIL_SHARE = 0.005
READY_BASE_S = 2.0
READY_PER_MILLION_S = 60.0
TODAY_CPU_PER_SMALL = 6.0  # s, reported in the issue
CPU_TARGET_PER_SMALL = 0.3  # s
FLOOR_TARGET = 1.2
IN_PROGRESS = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]
PATH_KINDS = {START: "start", RESULT_SET: "result", MATCH_SOME: "result", AUDIENCES: "listing", AUDIENCE: "listing"}
_PID = re.compile(r"Started process for run \(pid: (\d+)\)")
_LEVEL = re.compile(r" - (ERROR|WARNING|CRITICAL) - ")


# -- the account -----------------------------------------------------------------------------------


def _draw_size(rng: random.Random) -> int:
    share = rng.random()
    band = SIZE_MIX[-1]
    for candidate in SIZE_MIX:
        if share < candidate[0]:
            band = candidate
            break
        share -= candidate[0]
    _, low, high = band
    if high == 0:
        return 0
    return min(high, round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def ready_after(size: int, rng: random.Random, scale: float) -> float:
    """Seconds until a run of a segment of `size` members turns ready (compressed; grows with size)."""
    return scale * (READY_BASE_S + READY_PER_MILLION_S * math.sqrt(size / 1_000_000)) * rng.uniform(0.5, 1.5)


def build_account(count: int, seed: int, kind: str, ready_scale: float) -> SimAccount:
    """`kind` "mixed": `SIZE_MIX` with failing runs; "small": the baseline's (50-950 members, none failing)."""
    rng = random.Random(seed)  # noqa: S311  # reproducible sizes, not secrets
    segments = []
    for i in range(1, count + 1):
        if kind == "small":
            size, behavior = rng.randint(*BASELINE_SIZES), Behavior.OK
        else:
            size = _draw_size(rng)
            behavior = Behavior.FAIL if rng.random() < FAIL_SHARE else Behavior.OK
        segments.append(
            SimSegment(str(i), f"Segment {i}", size, behavior=behavior, ready_after=ready_after(size, rng, ready_scale))
        )
    return SimAccount(segments=segments, seed=seed)


# -- the simulator's process -----------------------------------------------------------------------


class _Recorder:
    """Every API answer: wall time, kind of path, status (the `on_answer` hook)."""

    def __init__(self) -> None:
        self.answers: list[tuple[float, str, int]] = []
        self._lock = threading.Lock()

    def __call__(self, answer: Answer) -> None:
        with self._lock:
            self.answers.append((time.time(), PATH_KINDS.get(answer.path, answer.path), answer.status))


def serve(count: int, seed: int, kind: str, ready_scale: float) -> None:
    """The simulator's process: prints {"url"} once serving, serves until stdin closes, then prints
    its statistics, every answer and its own CPU as one JSON line."""
    account = build_account(count, seed, kind, ready_scale)
    recorder = _Recorder()
    config = SimulatorConfig(requests_per_second=ACCOUNT_RATE)
    with SimulatorServer(Simulator(account, config, on_answer=recorder)) as server:
        print(json.dumps({"url": server.url}), flush=True)
        sys.stdin.read()
        stats = server.simulator.stats()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    del stats["arrivals"]
    stats["answers"] = recorder.answers
    stats["cpu_s"] = usage.ru_utime + usage.ru_stime
    stats["peak_rss_mb"] = usage.ru_maxrss / 1024
    print(json.dumps(stats), flush=True)


class SimulatorProcess:
    def __init__(self, count: int, seed: int, kind: str, ready_scale: float) -> None:
        command = [sys.executable, "-m", "benchmarks.day", "--serve", kind, "--segments", str(count)]
        command += ["--seed", str(seed), "--ready-scale", str(ready_scale)]
        self.process = subprocess.Popen(  # noqa: S603  # this interpreter, our module
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.kill()
            raise RuntimeError("the simulator did not start; see its output above")
        self.url: str = json.loads(line)["url"]

    def finish(self) -> dict[str, Any]:
        """Its statistics; the process ends."""
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.close()
        line = self.process.stdout.readline()
        self.process.wait(timeout=30)
        stats: dict[str, Any] = json.loads(line)
        return stats

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


# -- sampling the processes ------------------------------------------------------------------------


@dataclass
class Proc:
    """One process seen by the sampler: its last CPU times and its memory peaks."""

    pid: int
    ppid: int
    created: float
    cmdline: str
    cpu_s: float = 0.0
    rss_peak_mb: float = 0.0
    hwm_mb: float = 0.0
    first_seen: float = 0.0
    last_seen: float = 0.0
    role: str = "other"


class Sampler:
    """Samples every descendant of this process (the daemon's tree, what it orphaned, the simulator)
    every `interval` seconds."""

    def __init__(self, simulator_pid: int, interval: float) -> None:
        self.simulator_pid = simulator_pid
        self.interval = interval
        self.procs: dict[tuple[int, float], Proc] = {}
        self.peak_stack_mb = 0.0
        self.peak_with_simulator_mb = 0.0
        self.samples = 0
        self.sample_cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="day-sampler", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.thread_time()
            self.sample()
            self.sample_cpu_s += time.thread_time() - began
            self._stop.wait(self.interval)

    def sample(self) -> None:
        now = time.time()
        stack = 0.0
        simulator = 0.0
        processes: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            processes = psutil.Process().children(recursive=True)
        with self._lock:
            for process in processes:
                try:
                    with process.oneshot():
                        if process.status() == psutil.STATUS_ZOMBIE:
                            continue
                        times = process.cpu_times()
                        rss = process.memory_info().rss / 2**20
                        key = (process.pid, process.create_time())
                        proc = self.procs.get(key)
                        if proc is None:
                            proc = Proc(process.pid, process.ppid(), key[1], " ".join(process.cmdline()))
                            proc.first_seen = now
                            self.procs[key] = proc
                        elif now - proc.first_seen < 2.0:  # a fresh fork shows its parent's until it execs
                            proc.cmdline = " ".join(process.cmdline())
                except psutil.Error:
                    continue
                proc.cpu_s = times.user + times.system
                proc.rss_peak_mb = max(proc.rss_peak_mb, rss)
                proc.hwm_mb = max(proc.hwm_mb, vm_hwm_mb(process.pid))
                proc.last_seen = now
                if process.pid == self.simulator_pid:
                    simulator += rss
                else:
                    stack += rss
            self.samples += 1
        self.peak_stack_mb = max(self.peak_stack_mb, stack)
        self.peak_with_simulator_mb = max(self.peak_with_simulator_mb, stack + simulator)


def become_subreaper() -> bool:
    """Orphans of our descendants (the code server once the daemon is gone, a run's helpers once
    its process is gone) become our children: reaped by us, their CPU counts in RUSAGE_CHILDREN."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(36, 1, 0, 0, 0) == 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def reap(keep: set[int]) -> int:
    """Waits for our children that ended (except `keep`: the Popen objects' own); how many are left."""
    left = 0
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children():
            if child.pid in keep:
                continue
            try:
                pid, _ = os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:
                continue
            left += pid == 0
    return left


def assign_roles(procs: list[Proc], daemon_pid: int, simulator_pid: int) -> None:
    """daemon, code server (the daemon's child serving the code: `api grpc`/`code-server`), run
    worker (a spawn child of the code server), run helper (below a run worker), other."""
    by_pid: dict[int, list[Proc]] = defaultdict(list)
    for proc in procs:
        by_pid[proc.pid].append(proc)
    for proc in sorted(procs, key=lambda p: p.created):
        parent = _parent(proc, by_pid)
        if proc.pid == daemon_pid:
            proc.role = "daemon"
        elif proc.pid == simulator_pid:
            proc.role = "simulator"
        elif "api grpc" in proc.cmdline or "code-server" in proc.cmdline or "code_server" in proc.cmdline:
            proc.role = "code server"
        elif "resource_tracker" in proc.cmdline:
            proc.role = "other"
        elif parent is not None and parent.role == "code server" and "multiprocessing" in proc.cmdline:
            proc.role = "run worker"
        elif parent is not None and parent.role in ("run worker", "run helper"):
            proc.role = "run helper"


def _parent(proc: Proc, by_pid: Mapping[int, list[Proc]]) -> Proc | None:
    candidates = [p for p in by_pid.get(proc.ppid, []) if p.created <= proc.created]
    return max(candidates, key=lambda p: p.created, default=None)


# -- the day ---------------------------------------------------------------------------------------


@dataclass
class Progress:
    """What the instance says so far: each partition's latest materialization of both assets."""

    matches: dict[str, tuple[int, float]] = field(default_factory=dict)  # partition -> (storage id, time)
    changes: dict[str, tuple[int, float]] = field(default_factory=dict)
    read_requests: int = 0
    cursors: dict[str, str | None] = field(default_factory=dict)
    last_event: float = field(default_factory=time.time)

    def update(self, instance: dg.DagsterInstance) -> None:
        for key, latest in ((MATCHES_KEY, self.matches), (CHANGES_KEY, self.changes)):
            name = key.to_user_string()
            while True:
                page = instance.fetch_materializations(
                    dg.AssetRecordsFilter(asset_key=key), limit=1_000, cursor=self.cursors.get(name), ascending=True
                )
                for record in page.records:
                    if record.partition_key is None:
                        continue
                    latest[record.partition_key] = (record.storage_id, record.timestamp)
                    self.last_event = time.time()
                    materialization = record.asset_materialization
                    if key == MATCHES_KEY and materialization is not None and "requests" in materialization.metadata:
                        value = materialization.metadata["requests"].value
                        self.read_requests += int(value) if isinstance(value, int | float) else 0
                self.cursors[name] = page.cursor
                if not page.has_more:
                    break

    def missing(self, segments: list[str]) -> list[str]:
        """Segments without a membership change newer than their latest read."""
        return [s for s in segments if s not in self.changes or self.changes[s][0] < self.matches.get(s, (0, 0))[0]]


def snapshot_code(folder: Path) -> str:
    """A copy of the package in `folder`, first on the deployment's PYTHONPATH: the day runs one
    version of the code even when the working tree is edited meanwhile (the daemon starts a fresh
    code server every minute, and each run imports the code again). Its digest."""
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "matchall_dagster", folder / "matchall_dagster", ignore=ignore)
    digest = hashlib.sha256()
    for path in sorted((folder / "matchall_dagster").rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _children_env(home: Path, url: str, batch: int, code: Path | None) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith(("MATCHALL_", "DAGSTER_"))}
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH")]))
    away = (datetime.now(UTC).hour + 12) % 24
    env.update(
        DAGSTER_HOME=str(home),
        ACTIVECAMPAIGN_API_URL=url,
        ACTIVECAMPAIGN_API_KEY=DEFAULT_TOKEN,
        MATCHALL_STORE=f"duckdb://{home / 'matchall.duckdb'}",
        MATCHALL_SMALL_BATCH_SEGMENTS=str(batch),
        MATCHALL_KICKOFF_CRON=f"0 {away} * * *",  # never during the day
        PYTHONUNBUFFERED="1",
    )
    return env


@contextlib.contextmanager
def _instance(env: Mapping[str, str], home: Path) -> Iterator[dg.DagsterInstance]:
    saved = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            yield instance
    finally:
        if saved is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = saved


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _stop_daemon(daemon: subprocess.Popen[bytes], simulator_pid: int, grace: float = 60.0) -> bool:
    """SIGINT to the daemon alone, waited for; then its code server, orphaned to us, is given the
    time to end by itself (it stops 20 s after the daemon's last heartbeat), and reaped; then
    SIGKILL to the group and to any descendant left. True when everything ended by itself."""
    clean = True
    if daemon.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon.pid, signal.SIGINT)
        try:
            daemon.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            clean = False
    keep = {daemon.pid, simulator_pid}
    deadline = time.monotonic() + (grace if clean else 0.0)
    while reap(keep) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(daemon.pid, signal.SIGKILL)
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children(recursive=True):
            if child.pid != simulator_pid:
                clean = False
                with contextlib.suppress(psutil.Error):
                    child.kill()
    if daemon.poll() is None:
        daemon.wait(timeout=10)
    while reap(keep):
        time.sleep(0.1)
    return clean


def run_day(
    label: str,
    kind: str,
    count: int,
    batch: int,
    *,
    seed: int,
    ready_scale: float,
    interval: float,
    timeout: float | None,
    stall: float,
    keep_logs: Path | None,
    verbose: bool,
    snapshot: bool,
) -> dict[str, Any]:
    """One day in a deployment of its own; its figures (see the module's docstring)."""
    account = build_account(count, seed, kind, ready_scale)
    sizes = {segment.id: segment.size for segment in account.segments}
    ok = [segment.id for segment in account.segments if segment.behavior is Behavior.OK]
    pages = sum(max(1, math.ceil(size / SMALL_MAX)) for size in sizes.values())
    if timeout is None:  # three times a rough floor (start, poll, pages a segment), plus start-up
        timeout = 900.0 + 3 * (2 * count + pages) / ACCOUNT_RATE
    bin_dir = Path(sys.executable).parent
    started = time.time()
    log_line = _logger(verbose, label)
    with contextlib.ExitStack() as stack:
        home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"day-{label}-")))
        shutil.copy(INSTANCE_YAML, home / "dagster.yaml")
        simulator = SimulatorProcess(count, seed, kind, ready_scale)
        stack.callback(simulator.kill)
        code = home / "code" if snapshot else None
        digest = snapshot_code(code) if code is not None else "live working tree"
        env = _children_env(home, simulator.url, batch, code)
        instance = stack.enter_context(_instance(env, home))  # creates the SQLite schema before the daemon
        daemon_log = home / "daemon.log"
        children_before = _children_cpu()
        with daemon_log.open("wb") as output:
            daemon = subprocess.Popen(  # noqa: S603  # the virtualenv's dagster-daemon
                [str(bin_dir / "dagster-daemon"), "run", "-w", str(WORKSPACE)],
                env=env,
                cwd=home,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        daemon_started = time.time()
        sampler = Sampler(simulator.process.pid, interval)
        stopped = {"clean": False}

        def stop() -> None:
            stopped["clean"] = _stop_daemon(daemon, simulator.process.pid)
            sampler.stop()

        stack.callback(stop)
        sampler.start()
        progress = Progress()
        outcome = "complete"
        kickoff_seen = False
        while True:
            time.sleep(5.0)
            reap({daemon.pid, simulator.process.pid})
            if daemon.poll() is not None:
                outcome = f"the daemon exited with code {daemon.returncode}"
                break
            progress.update(instance)
            in_progress = instance.get_run_records(dg.RunsFilter(statuses=IN_PROGRESS))
            kickoffs = instance.get_run_records(dg.RunsFilter(job_name=KICKOFF_JOB))
            kickoff_seen = kickoff_seen or any(r.dagster_run.is_finished for r in kickoffs)
            missing = progress.missing(ok)
            log_line(
                f"{time.time() - started:6.0f} s: {len(ok) - len(missing)}/{len(ok)} stored, "
                f"{len(progress.matches)} read, {len(in_progress)} run(s) in progress"
            )
            if kickoff_seen and not missing and not in_progress:
                break
            if time.time() - started > timeout:
                outcome = f"timed out after {timeout:.0f} s with {len(missing)} segment(s) not stored"
                break
            if kickoff_seen and not in_progress and time.time() - progress.last_event > stall:
                outcome = f"stalled: nothing in progress for {stall:.0f} s with {len(missing)} segment(s) not stored"
                break
        stopped["clean"] = _stop_daemon(daemon, simulator.process.pid)  # sampled until every process is gone
        sampler.stop()
        children_cpu = _children_cpu() - children_before
        sim_stats = simulator.finish()
        if keep_logs is not None:
            keep_logs.mkdir(parents=True, exist_ok=True)
            shutil.copy(daemon_log, keep_logs / f"daemon-{label}.log")
        procs = list(sampler.procs.values())
        assign_roles(procs, daemon.pid, simulator.process.pid)
        long_lived_cpu = sum(p.cpu_s for p in procs if p.role in ("daemon", "code server", "other"))
        runs = [record.dagster_run for record in instance.get_run_records()]
        run_rows = _runs(instance, runs, procs, sizes)
        log_text = daemon_log.read_text(errors="replace")
    figures = _figures(
        label=label,
        kind=kind,
        count=count,
        batch=batch,
        sizes=sizes,
        ok=ok,
        outcome=outcome,
        progress=progress,
        run_rows=run_rows,
        procs=procs,
        sampler=sampler,
        sim_stats=sim_stats,
        children_cpu=children_cpu,
        long_lived_cpu=long_lived_cpu,
        clean_stop=stopped["clean"],
        daemon_started=daemon_started,
        log_text=log_text,
        benchmark_wall=time.time() - started,
    )
    figures["code"] = digest
    return figures


def _logger(verbose: bool, label: str) -> Any:
    def log_line(text: str) -> None:
        if verbose:
            print(f"[{label}] {text}", file=sys.stderr, flush=True)

    return log_line


@dataclass
class RunRow:
    run_id: str
    job: str
    kind: str  # kickoff, catalog, batch, matches, check, changes, other
    status: str
    partitions: list[str]
    start: float | None
    end: float | None
    cpu_s: float | None  # None: its process was not seen
    peak_mb: float


def _run_kind(run: dg.DagsterRun) -> str:
    if run.job_name == KICKOFF_JOB:
        return "kickoff"
    if run.job_name == CATALOG_JOB:
        return "catalog"
    if run.job_name == SMALL_READS_JOB:
        return "batch"
    if run.job_name == MATCHES_JOB:  # a check alone: an empty asset selection (readiness.check_request)
        return "check" if run.asset_selection is not None and not run.asset_selection else "matches"
    if run.asset_selection and CHANGES_KEY in run.asset_selection:
        return "changes"
    return "other"


def _run_partitions(run: dg.DagsterRun) -> list[str]:
    if run.job_name == SMALL_READS_JOB:
        config: dict[str, Any] = dict(run.run_config)
        reads = config.get("ops", {}).get("read_segment_batch", {}).get("config", {}).get("reads", [])
        return [str(read["segment_id"]) for read in reads]
    partition = run.tags.get("dagster/partition")
    return [partition] if partition else []


def _runs(
    instance: dg.DagsterInstance, runs: list[dg.DagsterRun], procs: list[Proc], sizes: Mapping[str, int]
) -> list[RunRow]:
    by_pid: dict[int, list[Proc]] = defaultdict(list)
    children: dict[int, list[Proc]] = defaultdict(list)
    for proc in procs:
        by_pid[proc.pid].append(proc)
    for proc in procs:
        parent = _parent(proc, by_pid)
        if parent is not None:
            children[id(parent)].append(proc)
    rows = []
    for run in runs:
        record = instance.get_run_record_by_id(run.run_id)
        start = record.start_time if record is not None else None
        end = record.end_time if record is not None else None
        pid = None
        for entry in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
            found = _PID.search(entry.message or "")
            if found:
                pid = int(found.group(1))
                break
        worker = None
        if pid is not None:
            moment = start or time.time()
            candidates = [p for p in by_pid.get(pid, []) if p.created <= moment + 1]
            worker = max(candidates, key=lambda p: p.created, default=None)
        cpu = None
        peak = 0.0
        if worker is not None:
            tree, queue = [], [worker]
            while queue:
                proc = queue.pop()
                tree.append(proc)
                queue.extend(children.get(id(proc), []))
            cpu = sum(p.cpu_s for p in tree)
            peak = max(max(p.hwm_mb, p.rss_peak_mb) for p in tree)
        rows.append(
            RunRow(
                run.run_id, run.job_name, _run_kind(run), run.status.value, _run_partitions(run), start, end, cpu, peak
            )
        )
    return rows


def _size_class(partitions: list[str], sizes: Mapping[str, int]) -> str:
    if not partitions:
        return "none"
    return "small" if all(sizes.get(p, 0) <= SMALL_MAX for p in partitions) else "large"


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _figures(
    *,
    label: str,
    kind: str,
    count: int,
    batch: int,
    sizes: Mapping[str, int],
    ok: list[str],
    outcome: str,
    progress: Progress,
    run_rows: list[RunRow],
    procs: list[Proc],
    sampler: Sampler,
    sim_stats: dict[str, Any],
    children_cpu: float,
    long_lived_cpu: float,
    clean_stop: bool,
    daemon_started: float,
    log_text: str,
    benchmark_wall: float,
) -> dict[str, Any]:
    stored = [s for s in ok if s in progress.changes and progress.changes[s][0] > progress.matches.get(s, (0, 0))[0]]
    small_stored = [s for s in stored if sizes[s] <= SMALL_MAX]
    large_stored = [s for s in stored if sizes[s] > SMALL_MAX]
    kickoffs = [row for row in run_rows if row.kind == "kickoff" and row.start is not None]
    day_start = min((row.start for row in kickoffs if row.start is not None), default=daemon_started)
    kickoff_end = max((row.end for row in kickoffs if row.end is not None), default=None)
    day_end = max((progress.changes[s][1] for s in stored), default=day_start)
    last_read = max((progress.matches[s][1] for s in stored), default=day_start)
    first_read = min((t for _, t in progress.matches.values()), default=None)
    answers = sim_stats["answers"]
    in_day = [(t, k, status) for t, k, status in answers if day_start <= t <= day_end]
    served = [a for a in in_day if a[2] != 429]
    by_kind = Counter(k for _, k, _ in served)
    floor = len(served) / ACCOUNT_RATE
    wall = day_end - day_start
    reads = progress.read_requests
    # CPU of the runs by what they serve
    cpu: defaultdict[str, float] = defaultdict(float)
    runs_by: Counter[str] = Counter()
    unmeasured = 0
    small_changes_runs = 0
    for row in run_rows:
        size_class = _size_class(row.partitions, sizes)
        group = row.kind if row.kind in ("kickoff", "catalog", "check", "other") else size_class
        runs_by[group] += 1
        if row.kind == "changes" and size_class == "small":
            small_changes_runs += 1
        if row.cpu_s is None:
            unmeasured += 1
            continue
        cpu[group] += row.cpu_s
    runs_total = len(run_rows)
    per_job = Counter(row.job if row.kind != "changes" else "segment_membership_changes" for row in run_rows)
    run_cpu = sum(row.cpu_s or 0.0 for row in run_rows)
    role_cpu: defaultdict[str, float] = defaultdict(float)
    for proc in procs:
        role_cpu[proc.role] += proc.cpu_s
    sampled_runs = role_cpu["run worker"] + role_cpu["run helper"]
    runs_by_rusage = children_cpu - long_lived_cpu  # the daemon's tree: the simulator is reaped later
    workers = [p for p in procs if p.role == "run worker"]
    levels = Counter(match.group(1) for match in _LEVEL.finditer(log_text))
    error_lines = [line for line in log_text.splitlines() if _LEVEL.search(line) and " - WARNING - " not in line]
    warning_lines = [line for line in log_text.splitlines() if " - WARNING - " in line]
    failed = [row for row in run_rows if row.status == "FAILURE"]
    small_runs = runs_by["small"]
    return {
        "label": label,
        "segments": count,
        "sizes": kind,
        "small_batch_segments": batch,
        "outcome": outcome,
        "members_total": sum(sizes.values()),
        "segments_small": sum(1 for s in sizes.values() if s <= SMALL_MAX),
        "segments_large": sum(1 for s in sizes.values() if s > SMALL_MAX),
        "segments_failing": count - len(ok),
        "stored_small": len(small_stored),
        "stored_large": len(large_stored),
        "not_stored": sorted(set(ok) - set(stored), key=int)[:50],
        # wall time against the floor
        "daemon_start_to_kickoff_s": _r(day_start - daemon_started, 1),
        "kickoff_s": _r(kickoff_end - day_start, 1) if kickoff_end else None,
        "first_read_s": _r(first_read - day_start, 1) if first_read else None,
        "last_read_stored_s": _r(last_read - day_start, 1),
        "day_s": _r(wall, 1),
        "requests_in_day": len(served),
        "floor_s": _r(floor, 1),
        "day_over_floor": _r(wall / floor if floor else None),
        "requests_by_kind": {
            "starts": by_kind["start"],
            "polls": by_kind["result"] - reads,
            "reads": reads,
            "listings": by_kind["listing"],
        },
        "requests_total": sim_stats["requests"],
        "statuses": sim_stats["by_status"],
        "max_requests_in_any_second": sim_stats["max_requests_in_any_second"],
        "requests_429": sim_stats["by_status"].get("429", 0),
        # CPU
        "run_cpu_s": _r(run_cpu, 1),
        "run_cpu_s_by_group": {name: _r(value, 1) for name, value in sorted(cpu.items())},
        "cpu_s_per_small_segment": _r(cpu["small"] / len(small_stored) if small_stored else None),
        "cpu_s_per_large_segment": _r(cpu["large"] / len(large_stored) if large_stored else None),
        "cpu_s_per_segment_all_runs": _r(run_cpu / len(stored) if stored else None),
        "kickoff_and_catalog_cpu_s_per_segment": _r((cpu["kickoff"] + cpu["catalog"]) / count),
        "runs_unmeasured": unmeasured,
        "cross_check": {
            "sampled_run_processes_s": _r(sampled_runs, 1),
            "rusage_children_s": _r(children_cpu, 1),
            "other_processes_last_sampled_s": _r(long_lived_cpu, 1),
            "run_processes_by_rusage_s": _r(runs_by_rusage, 1),
            "difference_s": _r(runs_by_rusage - sampled_runs, 1),
            "difference_share": _r((runs_by_rusage - sampled_runs) / sampled_runs if sampled_runs else None),
            "daemon_stopped_cleanly": clean_stop,
        },
        "daemon_cpu_s": _r(role_cpu["daemon"], 1),
        "code_server_cpu_s": _r(role_cpu["code server"], 1),
        "other_processes_cpu_s": _r(role_cpu["other"], 1),
        "code_servers_started": sum(1 for p in procs if p.role == "code server"),
        "simulator_cpu_s": _r(sim_stats["cpu_s"], 1),
        "sampler_cpu_s": _r(sampler.sample_cpu_s, 1),
        # runs
        "runs_total": runs_total,
        "runs_by_job": dict(sorted(per_job.items())),
        "runs_by_group": dict(sorted(runs_by.items())),
        "runs_per_1000_small_segments": _r(1000 * small_runs / len(small_stored) if small_stored else None, 1),
        "changes_runs_for_small_partitions": small_changes_runs,
        "runs_failed": [f"{row.job} {','.join(row.partitions[:3])}" for row in failed][:20],
        "runs_failed_count": len(failed),
        "batch_runs_segments_and_cpu_s": [
            [len(row.partitions), _r(row.cpu_s, 2)] for row in run_rows if row.kind == "batch"
        ],
        # memory
        "peak_rss_mb_deployment": _r(sampler.peak_stack_mb, 0),
        "peak_rss_mb_with_simulator": _r(sampler.peak_with_simulator_mb, 0),
        "largest_run_process_mb": _r(max((max(p.hwm_mb, p.rss_peak_mb) for p in workers), default=0.0), 0),
        "simulator_peak_rss_mb": _r(sim_stats["peak_rss_mb"], 0),
        # the daemon's log
        "daemon_log_levels": dict(levels),
        "daemon_log_errors": [line[:300] for line in error_lines[:10]],
        "daemon_log_warnings": [line[:300] for line in warning_lines[:10]],
        "daemon_log_tracebacks": log_text.count("Traceback"),
        "daemon_log_429s": log_text.count("429 Too Many Requests"),
        "daemon_log_code_server_heartbeat_shutdowns": log_text.count("No heartbeat received"),
        "processes_seen": Counter(p.role for p in procs),
        "samples": sampler.samples,
        "benchmark_wall_s": _r(benchmark_wall, 1),
    }


# -- the report ------------------------------------------------------------------------------------

ROWS = (
    ("segments (small / large / failing)", None),
    ("outcome", "outcome"),
    ("stored (small / large)", None),
    ("day: kick-off start → last change stored (s)", "day_s"),
    ("floor: requests in the day ÷ 5/s (s)", "floor_s"),
    ("day ÷ floor (target ≤ 1.2)", "day_over_floor"),
    ("requests: starts / polls / reads / listings", None),
    ("429s; most requests in any second", None),
    ("kick-off ends; first read; last read stored (s)", None),
    ("run CPU per small segment, with checks and changes (s; target ≤ 0.3)", "cpu_s_per_small_segment"),
    ("run CPU per large segment, read and changes (s)", "cpu_s_per_large_segment"),
    ("run CPU per segment, every run (s)", "cpu_s_per_segment_all_runs"),
    ("run CPU: total; kick-off + catalog; failed-run checks (s)", None),
    ("runs launched", "runs_total"),
    ("runs per job", None),
    ("runs per 1,000 small segments", "runs_per_1000_small_segments"),
    ("changes runs for small partitions", "changes_runs_for_small_partitions"),
    ("failed runs", "runs_failed_count"),
    ("CPU cross-check: sampled / by getrusage / difference (s)", None),
    ("daemon CPU; code server CPU; simulator CPU (s)", None),
    ("peak summed RSS: deployment / with simulator (MB)", None),
    ("largest run process (MB)", "largest_run_process_mb"),
    ("daemon log: errors / warnings / tracebacks / 429s", None),
    ("code servers started (the daemon reloads its workspace)", "code_servers_started"),
    ("benchmark wall (s)", "benchmark_wall_s"),
)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    return f"{value:,}" if isinstance(value, int | float) else str(value)


def cell(day: dict[str, Any], name: str, key: str | None) -> str:
    if key is not None:
        return _fmt(day.get(key))
    cpu = day["run_cpu_s_by_group"]
    values: dict[str, str] = {
        "segments (small / large / failing)": f"{day['segments_small']:,} / {day['segments_large']:,} / "
        f"{day['segments_failing']}",
        "stored (small / large)": f"{day['stored_small']:,} / {day['stored_large']:,}",
        "requests: starts / polls / reads / listings": " / ".join(
            _fmt(day["requests_by_kind"][k]) for k in ("starts", "polls", "reads", "listings")
        ),
        "429s; most requests in any second": f"{day['requests_429']}; {day['max_requests_in_any_second']}",
        "kick-off ends; first read; last read stored (s)": f"{_fmt(day['kickoff_s'])}; {_fmt(day['first_read_s'])}; "
        f"{_fmt(day['last_read_stored_s'])}",
        "run CPU: total; kick-off + catalog; failed-run checks (s)": f"{_fmt(day['run_cpu_s'])}; "
        f"{_fmt(round(cpu.get('kickoff', 0) + cpu.get('catalog', 0), 1))}; {_fmt(cpu.get('check', 0))}",
        "runs per job": ", ".join(f"{job} {n}" for job, n in day["runs_by_job"].items()),
        "CPU cross-check: sampled / by getrusage / difference (s)": " / ".join(
            _fmt(day["cross_check"][k])
            for k in ("sampled_run_processes_s", "run_processes_by_rusage_s", "difference_s")
        ),
        "daemon CPU; code server CPU; simulator CPU (s)": f"{_fmt(day['daemon_cpu_s'])}; "
        f"{_fmt(day['code_server_cpu_s'])}; {_fmt(day['simulator_cpu_s'])}",
        "peak summed RSS: deployment / with simulator (MB)": f"{_fmt(day['peak_rss_mb_deployment'])} / "
        f"{_fmt(day['peak_rss_mb_with_simulator'])}",
        "daemon log: errors / warnings / tracebacks / 429s": f"{day['daemon_log_levels'].get('ERROR', 0)} / "
        f"{day['daemon_log_levels'].get('WARNING', 0)} / {day['daemon_log_tracebacks']} / {day['daemon_log_429s']}",
    }
    return values[name]


def markdown(report: dict[str, Any]) -> str:
    days = [day for day in (report.get("baseline"), report.get("batched")) if day]
    heads = [
        ("today (batches off)" if day["small_batch_segments"] == 0 else f"batches of {day['small_batch_segments']}")
        + f": {day['segments']:,} {day['sizes']} segments"
        for day in days
    ]
    lines = [
        "The whole day with the real `dagster-daemon` (`python -m benchmarks.day`): the project's `dagster.yaml` "
        "(SQLite, pool 2, 4 runs at once), the simulator in its own process enforcing 5 requests/s, runs ready "
        "after 2 s to a minute. Today's CPU per small segment (the issue): about 6 s.",
        "",
        f"Command: `{report['command']}`",
        "",
        "| figure | " + " | ".join(heads) + " |",
        "|---|" + "---|" * len(days),
    ]
    lines += [f"| {name} | " + " | ".join(cell(day, name, key) for day in days) + " |" for name, key in ROWS]
    comparison = report.get("comparison")
    if comparison:
        lines += ["", " ".join(f"{name.replace('_', ' ')}: {_fmt(value)}." for name, value in comparison.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, default=10_000, help="the batched day's segments (mixed sizes)")
    parser.add_argument("--baseline-segments", type=int, default=40, help="today's day, small segments; 0 skips it")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="MATCHALL_SMALL_BATCH_SEGMENTS of that day")
    parser.add_argument("--seed", type=int, default=20261201)
    parser.add_argument("--ready-scale", type=float, default=1.0, help="multiplies the runs' ready-after delays")
    parser.add_argument("--sample-interval", type=float, default=0.2, help="seconds between process samples")
    parser.add_argument("--timeout", type=float, help="seconds a day may last (default: from its size)")
    parser.add_argument("--stall", type=float, default=300.0, help="end a day with nothing in progress this long")
    parser.add_argument("--keep-logs", type=Path, help="copy each day's daemon log into this folder")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument(
        "--live-code", action="store_true", help="the deployment imports the working tree, not a copy made at the start"
    )
    parser.add_argument("--json", action="store_true", help="one JSON line instead of the report")
    parser.add_argument("--out", help="also save benchmarks/results/OUT.json and OUT.md")
    parser.add_argument("--serve", choices=("mixed", "small"), help=argparse.SUPPRESS)  # the simulator's process
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.segments, args.seed, args.serve, args.ready_scale)
        return
    subreaper = become_subreaper()
    options = {
        "seed": args.seed,
        "ready_scale": args.ready_scale,
        "interval": args.sample_interval,
        "timeout": args.timeout,
        "stall": args.stall,
        "keep_logs": args.keep_logs,
        "verbose": not args.quiet,
        "snapshot": not args.live_code,
    }
    report: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.day", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpus": os.cpu_count(), "load_at_start": [round(x, 2) for x in os.getloadavg()]},
        "subreaper": subreaper,
    }
    if args.baseline_segments:
        report["baseline"] = run_day("baseline", "small", args.baseline_segments, 0, **options)
    if args.segments:
        report["batched"] = run_day("batched", "mixed", args.segments, args.batch, **options)
    report["machine"]["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    baseline, batched = report.get("baseline"), report.get("batched")
    if baseline and batched:
        today, now = baseline["cpu_s_per_small_segment"], batched["cpu_s_per_small_segment"]
        report["comparison"] = {
            "cpu_s_per_small_segment_today": today,
            "cpu_s_per_small_segment_batched": now,
            "cpu_reduction_x": _r(today / now, 1) if today and now else None,
            "cpu_target_met": bool(now is not None and now <= CPU_TARGET_PER_SMALL),
            "day_over_floor_target_met": bool(batched["day_over_floor"] and batched["day_over_floor"] <= FLOOR_TARGET),
            "runs_per_1000_small_today": baseline["runs_per_1000_small_segments"],
            "runs_per_1000_small_batched": batched["runs_per_1000_small_segments"],
        }
    if args.out:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / f"{args.out}.md").write_text(markdown(report))
    if args.json:
        print(json.dumps(report))
        return
    print(markdown(report))


if __name__ == "__main__":
    main()
