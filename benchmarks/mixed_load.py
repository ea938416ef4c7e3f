"""Everything that calls the account at once, in processes of their own, sharing ONE request budget.

`python -m benchmarks.mixed_load` (default 10 minutes; `--minutes 1` for a quick check; `--budget
postgres` keeps the budget in PostgreSQL instead of the SQLite file in DAGSTER_HOME) prints a
report and writes `--output` (default `benchmarks/results/budget-mixed-10min.json`) and `.md`.

One simulator process enforces the account's 5 requests/s (200 to 400 ms a request, runs ready
3 s after they start) and records which participant sent each request (by path and segment).
The participants, each a process of its own, all take from the same budget
(`MATCHALL_REQUEST_BUDGET`, or `--budget` for the CLI):

- **sensor** (due first): the project's readiness sensor, evaluated with `evaluate_tick` on a
  `build_sensor_context` of the real instance (SQLite, temporary DAGSTER_HOME) and the project's
  definitions, as the daemon does: a tick no sooner than 15 s after the previous one started
  (`minimum_interval_seconds`), back to back when a tick lasts longer (`--tick-interval 0`: always
  back to back). It polls the runs the kick-off starts and requests their materializations
  (requested, not launched).
- **kickoff**: the project's `match_all_kickoff_job` (its op `start_match_all_runs`) executed in
  process against the same instance, over 2,000 segment partitions: every start takes a place,
  every run is recorded as pending for the sensor.
- **reader 1..4**: the run steps' reads, as client reads (not the `segment_matches`
  materialization: the same `ActiveCampaignResource.get_client()` and `fetch_matches` a run
  makes, without Dagster's event log around it): each starts a run of a large segment, waits
  for it, reads every page, and goes on with its next segment until stopped.
- **fetch**: one `matchall fetch SEGMENT --budget STORE -o out.parquet` subprocess (the CLI's own
  entry point, started through this module so that its places are timed like the others').

Measured from the simulator's own counter: the most requests in any one-second window (target: at
most 5), the 429s (target: 0), and the rate while work was waiting, from the first request until
the participants are stopped (some participant always has a request waiting then: the kick-off
alone has 2,000 to send, the readers never run out; target at least 0.95 x 5/s; the window's
15 ms guard makes 4.93/s the most). Also each participant's requests, each priority's waits for a
place (the sensor's due polls against the bulk requests, timed around `RequestBudget.take` in the
instrumented processes), the sensor's ticks, and how long a started run waited to be requested.

Two diagnostics say why a second held more than 5: how old a place's timestamp is when the store
admits it (the window frees a place from its timestamp, so a stamp taken before a wait for the
store's lock frees the place that much early), and the lag from a place taken to its request at the
server (the window's guard is 15 ms); `over_limit` in the JSON lists every crowded second and
whose requests filled it.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "benchmarks" / "results" / "budget-mixed-10min.json"
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
ACCOUNT_LIMIT = 5.0
TARGET_SHARE = 0.95
SENSOR_INTERVAL = 15.0  # the readiness sensor's minimum_interval_seconds
STOP_GRACE = 20.0  # seconds a participant has to write its figures after SIGTERM
DUMP_EVERY = 5.0  # seconds between a participant's progress files (a killed one loses at most this)
KICKOFF_PREFIX, READER_PREFIX, FETCH_SEGMENT = "k", "r", "f1"
_RESULT = re.compile(r"^/api/3/segmentMatchAll/([^/]+)(/[^/]+)?$")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


# -- the simulator process ------------------------------------------------------------------------


def participant_of(path: str) -> str:
    """Who sent a request, from its path: the segments of each participant are its own."""
    match = _RESULT.match(path)
    if match is None:
        return "other"
    segment, run = match.groups()
    if segment.startswith(KICKOFF_PREFIX):
        return "kickoff" if run is None else "sensor"  # the kick-off starts, the sensor polls
    if segment.startswith(READER_PREFIX):
        return "reader " + segment[len(READER_PREFIX) :].split("-", 1)[0]
    return "fetch" if segment == FETCH_SEGMENT else "other"


class Attribution:
    """ASGI middleware: (arrival, participant, status) of every API request, served at /_mixed/log."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.log: list[tuple[float, str, int]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope["path"])
        if path == "/_mixed/log":
            body = json.dumps(self.log).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        arrival = time.monotonic()
        status = 0

        async def sending(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        await self.app(scope, receive, sending)
        if path.startswith("/api/"):
            self.log.append((arrival, participant_of(path), status))


def serve(argv: list[str]) -> None:
    """`_serve`: the simulator at the account's limit, until stdin closes; prints its URL."""
    from matchall_dagster.simulator import Faults, SimAccount, SimSegment, Simulator, SimulatorConfig, SimulatorServer

    parser = argparse.ArgumentParser(prog="mixed_load _serve")
    parser.add_argument("--segments", type=int, required=True)
    parser.add_argument("--readers", type=int, required=True)
    parser.add_argument("--read-size", type=int, required=True)
    parser.add_argument("--fetch-size", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, required=True)
    parser.add_argument("--jitter-ms", type=float, required=True)
    parser.add_argument("--ready-after", type=float, required=True)
    args = parser.parse_args(argv)
    segments = [SimSegment(f"{KICKOFF_PREFIX}{i}", f"Kick-off {i}", 100) for i in range(1, args.segments + 1)]
    segments += [
        SimSegment(reader_segment(reader, copy), f"Read {reader}/{copy}", args.read_size)
        for reader in range(1, args.readers + 1)
        for copy in range(2)
    ]
    segments.append(SimSegment(FETCH_SEGMENT, "Fetched", args.fetch_size))
    account = SimAccount(segments=segments, seed=11)
    for segment in segments[args.segments :]:  # the large ones' order, before any timing
        account.ordered(segment.id, "id")
    faults = Faults(latency_ms=args.latency_ms, latency_jitter_ms=args.jitter_ms)
    config = SimulatorConfig(requests_per_second=ACCOUNT_LIMIT, ready_after=args.ready_after, faults=faults)
    simulator = Simulator(account, config)
    recorder = Attribution(simulator.app)
    simulator.app = recorder  # type: ignore[assignment]  # the server serves the app through the recorder
    with SimulatorServer(simulator) as server:
        print(json.dumps({"url": server.url}), flush=True)
        sys.stdin.read()


def reader_segment(reader: int, copy: int) -> str:
    return f"{READER_PREFIX}{reader}-{copy}"


# -- what every participant records ---------------------------------------------------------------


class Record:
    """A participant's figures, written to its file every few seconds and when it ends (SIGTERM)."""

    def __init__(self, path: Path, role: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {"role": role, "takes": [], "started": time.monotonic()}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._dump_often, daemon=True).start()
        signal.signal(signal.SIGTERM, self._terminated)

    def _terminated(self, *_: object) -> None:
        raise SystemExit(0)

    def _dump_often(self) -> None:
        while not self._stop.wait(DUMP_EVERY):
            self.dump()

    def dump(self) -> None:
        with self.lock:
            text = json.dumps({**self.data, "written": time.monotonic()})
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(text)
        temporary.replace(self.path)

    def close(self) -> None:
        self._stop.set()
        self.dump()

    def time_takes(self) -> None:
        """Every place this process takes: when it asked, how long it waited, at which priority."""
        from matchall_dagster.api.budget import RequestBudget

        take = RequestBudget.take
        takes: list[tuple[float, float, str]] = self.data["takes"]

        def timed(budget: RequestBudget) -> None:
            asked = time.monotonic()
            take(budget)
            with self.lock:
                takes.append((asked, time.monotonic() - asked, budget.priority.value))

        RequestBudget.take = timed  # type: ignore[method-assign,assignment]
        self.time_stamps()

    def time_stamps(self) -> None:
        """How old each place's timestamp is when the store admits it (ms): the window counts a place
        from its timestamp, so a place stamped before a wait for the store's lock frees up early."""
        from pyrate_limiter import PostgresBucket, RateItem, SQLiteBucket

        ages: list[int] = []
        self.data["stamp_age_ms"] = ages
        for bucket in (SQLiteBucket, PostgresBucket):
            put = bucket.put

            def stamped(self: Any, item: RateItem, put: Callable[[Any, RateItem], Any] = put) -> Any:
                admitted = put(self, item)
                if admitted is True:
                    ages.append(time.time_ns() // 1_000_000 - item.timestamp)
                return admitted

            bucket.put = stamped  # type: ignore[method-assign]


def sensor(argv: list[str]) -> None:
    """`_sensor OUT INTERVAL`: the readiness sensor's ticks, one no sooner than INTERVAL s after the last began."""
    import dagster as dg

    from matchall_dagster.definitions import build_definitions
    from matchall_dagster.orchestration.account import DEFAULT_ACCOUNT

    record = Record(Path(argv[0]), "sensor")
    interval = float(argv[1])
    record.time_takes()
    ticks: list[dict[str, Any]] = []
    requested: dict[str, float] = {}
    record.data.update(ticks=ticks, requested=requested)
    defs = build_definitions()
    cursor: str | None = None
    try:
        with dg.DagsterInstance.get() as instance:
            while True:
                began = time.monotonic()
                takes_before = len(record.data["takes"])
                try:
                    with dg.build_sensor_context(
                        instance_ref=instance.get_ref(), definitions=defs, resources=defs.resources, cursor=cursor
                    ) as context:
                        data: Any = defs.resolve_sensor_def(
                            DEFAULT_ACCOUNT.name("match_all_readiness_sensor")
                        ).evaluate_tick(context)
                except Exception as exc:  # a failed tick, as the daemon records it; the next one goes on
                    with record.lock:
                        record.data.setdefault("errors", []).append(f"{type(exc).__name__}: {str(exc)[:300]}")
                    time.sleep(max(0.0, began + interval - time.monotonic()))
                    continue
                ended = time.monotonic()
                cursor = data.cursor
                with record.lock:
                    for request in data.run_requests or []:
                        requested.setdefault(str(request.partition_key), ended)
                    ticks.append(
                        {
                            "began": began,
                            "seconds": round(ended - began, 3),
                            "requests": len(record.data["takes"]) - takes_before,
                            "run_requests": len(data.run_requests or []),
                        }
                    )
                time.sleep(max(0.0, began + interval - time.monotonic()))
    finally:
        record.close()


def kickoff_job_run(argv: list[str]) -> None:
    """`_kickoff OUT`: the project's kick-off job, in process against the instance."""
    import dagster as dg

    from matchall_dagster import ActiveCampaignClient
    from matchall_dagster.definitions import build_definitions

    record = Record(Path(argv[0]), "kickoff")
    record.time_takes()
    starts: dict[str, float] = {}
    record.data["starts"] = starts
    start_run = ActiveCampaignClient.start_run

    def timed_start(self: ActiveCampaignClient, segment_id: str, *, sort: str = "id") -> Any:
        run = start_run(self, segment_id, sort=sort)
        with record.lock:
            starts[segment_id] = time.monotonic()
        return run

    ActiveCampaignClient.start_run = timed_start  # type: ignore[method-assign]
    try:
        job = build_definitions().resolve_job_def("match_all_kickoff_job")
        with dg.DagsterInstance.get() as instance:
            result = job.execute_in_process(instance=instance, raise_on_error=False)
        record.data["success"] = result.success
        record.data["ended"] = time.monotonic()
    finally:
        record.close()


def reader(argv: list[str]) -> None:
    """`_reader OUT INDEX`: reads this reader's large segments one after the other, until stopped."""
    from matchall_dagster import ActiveCampaignResource
    from matchall_dagster.api.errors import ActiveCampaignError
    from matchall_dagster.simulator import DEFAULT_TOKEN

    record = Record(Path(argv[0]), f"reader {argv[1]}")
    record.time_takes()
    reads: list[dict[str, Any]] = []
    record.data["reads"] = reads
    resource = ActiveCampaignResource(api_url=os.environ["ACTIVECAMPAIGN_API_URL"], api_key=DEFAULT_TOKEN)
    segments = [reader_segment(int(argv[1]), copy) for copy in range(2)]
    try:
        for turn in range(1_000_000):
            segment = segments[turn % len(segments)]
            began = time.monotonic()
            with resource.get_client() as client:  # a run step's client: bulk, the account's budget
                try:
                    run = client.start_run(segment, sort="id")
                    first = client.wait_until_ready(segment, run.run_id, sort="id")
                    matches = client.fetch_matches(segment, run.run_id, sort="id", first_page=first)
                except ActiveCampaignError as exc:  # a failed read fails its run; the next one goes on
                    with record.lock:
                        record.data.setdefault("errors", []).append(str(exc)[:300])
                    continue
                with record.lock:
                    reads.append(
                        {
                            "segment": segment,
                            "ids": matches.total,
                            "requests": client.requests_sent,
                            "seconds": round(time.monotonic() - began, 2),
                            "waited_s": round(client.budget.waited_seconds, 2),
                        }
                    )
    finally:
        record.close()


def fetch_command(argv: list[str]) -> None:
    """`_fetch OUT ARGS...`: `matchall ARGS...` (the CLI's own entry point), its places timed."""
    from matchall_dagster.cli import main as matchall

    record = Record(Path(argv[0]), "fetch")
    record.time_takes()
    sys.argv = ["matchall", *argv[1:]]
    try:
        matchall()
    except SystemExit as exit_:
        record.data["exit_code"] = exit_.code
        raise
    finally:
        record.close()


ROLES: dict[str, Callable[[list[str]], None]] = {
    "_serve": serve,
    "_sensor": sensor,
    "_kickoff": kickoff_job_run,
    "_reader": reader,
    "_fetch": fetch_command,
}


# -- the benchmark --------------------------------------------------------------------------------


class Participant:
    def __init__(self, name: str, command: list[str], env: dict[str, str], folder: Path) -> None:
        self.name = name
        self.log = folder / f"{name.replace(' ', '-')}.log"
        self.out = folder / f"{name.replace(' ', '-')}.json"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(  # noqa: S603  # this interpreter, our module or our CLI
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started = time.monotonic()
        self.ended: float | None = None
        self.stopped = False

    def poll(self) -> bool:
        """Whether it is still running."""
        if self.ended is None and self.process.poll() is not None:
            self.ended = time.monotonic()
        return self.ended is None

    def figures(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.out.read_text())
            return data
        except (OSError, ValueError):
            return {}


def stop(participants: list[Participant]) -> None:
    """SIGTERM to those still running (their figures are written), SIGKILL after STOP_GRACE."""
    for participant in participants:
        if participant.poll():
            participant.stopped = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(participant.process.pid, signal.SIGTERM)  # the group this script started
    deadline = time.monotonic() + STOP_GRACE
    for participant in participants:
        try:
            participant.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(participant.process.pid, signal.SIGKILL)
            participant.process.wait()


def _quantile(values: list[float], share: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def waits(takes: list[tuple[float, float, str]]) -> dict[str, Any]:
    seconds = [wait for _, wait, _ in takes]
    return {
        "takes": len(seconds),
        "median_s": round(_quantile(seconds, 0.5), 3),
        "p95_s": round(_quantile(seconds, 0.95), 3),
        "p99_s": round(_quantile(seconds, 0.99), 3),
        "max_s": round(max(seconds, default=0.0), 3),
    }


def ages(values: list[float]) -> dict[str, float]:
    return {"median": _quantile(values, 0.5), "p99": _quantile(values, 0.99), "max": max(values, default=0)}


def covered(intervals: list[tuple[float, float]], begin: float, end: float) -> float:
    """The share of [begin, end] during which at least one interval is open."""
    total, reach = 0.0, begin
    for start, finish in sorted(intervals):
        start, finish = max(start, reach), min(finish, end)
        if finish > start:
            total += finish - start
            reach = finish
    return total / (end - begin) if end > begin else 0.0


def slowest_window(arrivals: list[float], begin: float, end: float, width: float = 10.0) -> float:
    """The lowest rate over any `width`-second window of [begin, end] (stepped by a second)."""
    rates = []
    moment = begin
    while moment + width <= end:
        count = bisect.bisect_left(arrivals, moment + width) - bisect.bisect_left(arrivals, moment)
        rates.append(count / width)
        moment += 1.0
    return min(rates, default=0.0)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from matchall_dagster.simulator import DEFAULT_TOKEN

    seconds = args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="mixed-load-") as workdir:
        folder = Path(workdir)
        home = folder / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        store = args.postgres if args.budget == "postgres" else f"sqlite://{home / 'matchall-request-budget.sqlite'}"
        simulator = subprocess.Popen(  # noqa: S603  # this interpreter, this module
            [
                *(sys.executable, "-m", "benchmarks.mixed_load", "_serve"),
                *("--segments", str(args.segments), "--readers", str(args.readers)),
                *("--read-size", str(args.read_size), "--fetch-size", str(args.fetch_size)),
                *("--latency-ms", str(args.latency_ms), "--jitter-ms", str(args.jitter_ms)),
                *("--ready-after", str(args.ready_after)),
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert simulator.stdout is not None
        assert simulator.stdin is not None
        participants: list[Participant] = []
        try:
            url = json.loads(simulator.stdout.readline())["url"]
            env = {
                **os.environ,
                "ACTIVECAMPAIGN_API_URL": url,
                "ACTIVECAMPAIGN_API_KEY": DEFAULT_TOKEN,
                "DAGSTER_HOME": str(home),
                "MATCHALL_REQUEST_BUDGET": store,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            }
            env.pop("MATCHALL_SEGMENTS", None)
            setup = (
                "import sys, dagster as d\n"
                "with d.DagsterInstance.get() as i: i.add_dynamic_partitions('segments', sys.argv[1:])"
            )
            kickoff_ids = [f"{KICKOFF_PREFIX}{i}" for i in range(1, args.segments + 1)]
            subprocess.run([sys.executable, "-c", setup, *kickoff_ids], cwd=ROOT, env=env, check=True)  # noqa: S603
            module = [sys.executable, "-m", "benchmarks.mixed_load"]
            began = time.monotonic()

            def start(name: str, command: list[str]) -> Participant:
                participant = Participant(name, command, env, folder)
                participants.append(participant)
                return participant

            start("sensor", [*module, "_sensor", str(folder / "sensor.json"), str(args.tick_interval)])
            start("kickoff", [*module, "_kickoff", str(folder / "kickoff.json")])
            for index in range(1, args.readers + 1):
                start(f"reader {index}", [*module, "_reader", str(folder / f"reader-{index}.json"), str(index)])
            fetch_args = ["fetch", FETCH_SEGMENT, "--budget", store, "-o", str(folder / "f.parquet")]
            fetch = start("fetch", [*module, "_fetch", str(folder / "fetch.json"), *fetch_args])
            print(f"{len(participants)} participants on {url}, budget {store}; {args.minutes:g} min ...", flush=True)
            http = httpx.Client(base_url=url, timeout=60)
            deadline = began + seconds
            next_line = began + 30
            while time.monotonic() < deadline:
                time.sleep(0.5)
                for participant in participants:
                    participant.poll()
                if time.monotonic() >= next_line:
                    next_line += 30
                    stats = http.get("/_simulator/stats").json()
                    print(
                        f"  {time.monotonic() - began:5.0f} s: {stats['requests']} requests, "
                        f"{stats['by_status']}, at most {stats['max_requests_in_any_second']} in a second",
                        flush=True,
                    )
            stopped_at = time.monotonic()
            stop(participants)
            stats = http.get("/_simulator/stats", params={"arrivals": "1"}).json()
            log = [tuple(entry) for entry in http.get("/_mixed/log").json()]
            http.close()
            fetched = {"exit_code": fetch.process.returncode, "stopped": fetch.stopped}
            if fetch.ended is not None and fetch.process.returncode == 0:
                import pyarrow.parquet as pq

                fetched["rows"] = pq.read_metadata(folder / "f.parquet").num_rows
                fetched["seconds"] = round(fetch.ended - fetch.started, 1)
            figures = {participant.name: participant.figures() for participant in participants}
            logs = {
                participant.name: participant.log.read_text()[-2000:]
                for participant in participants
                if participant.process.returncode not in (0, -signal.SIGTERM) and not participant.stopped
            }
        finally:
            for participant in participants:
                if participant.poll():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(participant.process.pid, signal.SIGKILL)
                    participant.process.wait()
            simulator.stdin.close()
            try:
                simulator.wait(timeout=10)
            except subprocess.TimeoutExpired:
                simulator.kill()
                simulator.wait()
        if args.budget == "postgres":
            drop_table(args.postgres, url)
    return summarize(args, store, began, stopped_at, stats, log, figures, fetched, logs)


def drop_table(postgres: str, url: str) -> None:
    """This run's window in PostgreSQL (a table per simulator port): dropped, so runs leave nothing."""
    import psycopg
    from psycopg import sql

    from matchall_dagster.api.budget import _table

    with psycopg.connect(postgres, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(f"ratelimit___{_table(url)}")))


def place_to_arrival(takes: dict[str, list[tuple[Any, ...]]], log: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Per instrumented participant: from a place taken to its request reaching the server (ms).

    The n-th place a process took is paired with the n-th of its requests the server saw; exact
    for the sensor and the kick-off (one request at a time), close for a reader (its page threads
    take places in turn but may overtake one another on the way). The window's guard is 15 ms:
    a spread of lags wider than that can put 6 requests into one second at the server.
    """
    result = {}
    for name, taken in takes.items():
        places = sorted(asked + wait for asked, wait, _ in taken)
        arrivals = sorted(arrival for arrival, who, _ in log if who == name)
        lags = [(arrival - place) * 1000 for place, arrival in zip(places, arrivals, strict=False)]
        if lags:
            result[name] = {
                "median": round(_quantile(lags, 0.5), 1),
                "p99": round(_quantile(lags, 0.99), 1),
                "max": round(max(lags), 1),
            }
    return result


def crowded_seconds(log: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Every request that found 5 others in the second before it at the server, and whose they were."""
    ordered = sorted(log)
    crowded = []
    start = 0
    for end, (arrival, _who, status) in enumerate(ordered):
        while ordered[start][0] <= arrival - 1.0:
            start += 1
        if end - start + 1 > ACCOUNT_LIMIT:
            window = ordered[start : end + 1]
            crowded.append(
                {
                    "at_s": round(arrival - ordered[0][0], 3),
                    "status": status,
                    "second": [(round(moment - window[0][0], 3), name) for moment, name, _ in window],
                }
            )
    return crowded


def summarize(
    args: argparse.Namespace,
    store: str,
    began: float,
    stopped_at: float,
    stats: dict[str, Any],
    log: list[tuple[Any, ...]],
    figures: dict[str, dict[str, Any]],
    fetched: dict[str, Any],
    logs: dict[str, str],
) -> dict[str, Any]:
    arrivals: list[float] = stats["arrivals"]
    statuses = {str(status): count for status, count in stats["by_status"].items()}
    first = arrivals[0] if arrivals else began
    in_span = [moment for moment in arrivals if first <= moment <= stopped_at]
    span = stopped_at - first
    rate = len(in_span) / span if span > 0 else 0.0
    by_participant: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    for _, who, status in log:
        by_participant[str(who)] += 1
        rejected[str(who)] += status == 429
    takes = {name: [tuple(take) for take in data.get("takes", [])] for name, data in figures.items()}
    pending = [(asked, asked + wait) for name in takes for asked, wait, _ in takes[name]]
    due = [take for name in takes for take in takes[name] if take[2] == "due"]
    bulk = [take for name in takes for take in takes[name] if take[2] == "bulk"]
    sensor = figures.get("sensor", {})
    ticks = sensor.get("ticks", [])
    starts: dict[str, float] = figures.get("kickoff", {}).get("starts", {})
    requested: dict[str, float] = sensor.get("requested", {})
    to_request = [requested[segment] - starts[segment] for segment in requested if segment in starts]
    reads = [read for name, data in figures.items() if name.startswith("reader") for read in data.get("reads", [])]
    lags = place_to_arrival(takes, log)
    participants: dict[str, dict[str, Any]] = {}
    for name in sorted(set(by_participant) | set(figures) | {"fetch"}):
        entry = participants[name] = {
            "requests": by_participant.get(name, 0),
            "http_429": rejected.get(name, 0),
            "share_of_requests": round(by_participant.get(name, 0) / max(1, len(log)), 3),
        }
        if takes.get(name):
            entry["waits"] = waits(takes[name])
        if name in lags:
            entry["place_to_arrival_ms"] = lags[name]
        if figures.get(name, {}).get("errors"):
            entry["errors"] = figures[name]["errors"][:5]
            entry["error_count"] = len(figures[name]["errors"])
        if figures.get(name, {}).get("stamp_age_ms"):
            entry["stamp_age_ms"] = ages(figures[name]["stamp_age_ms"])
    participants["kickoff"]["runs_started"] = len(starts)
    participants["sensor"]["ticks"] = len(ticks)
    participants["sensor"]["materializations_requested"] = len(requested)
    participants["fetch"].update(fetched)
    for name, data in figures.items():
        if name.startswith("reader"):
            participants[name]["reads_completed"] = len(data.get("reads", []))
    return {
        "minutes": args.minutes,
        "budget": args.budget,
        "store": store if args.budget != "postgres" else "postgresql (local server)",
        "simulator": {
            "limit_per_s": ACCOUNT_LIMIT,
            "latency_ms": f"{args.latency_ms:g} to {args.latency_ms + args.jitter_ms:g}",
            "ready_after_s": args.ready_after,
        },
        "requests": stats["requests"],
        "statuses": statuses,
        "http_429": int(statuses.get("429", 0)),
        "max_requests_in_any_second": stats["max_requests_in_any_second"],
        "span_s": round(span, 1),
        "rate_per_s": round(rate, 3),
        "rate_over_limit": round(rate / ACCOUNT_LIMIT, 3),
        "slowest_10s_rate_per_s": round(slowest_window(in_span, first, stopped_at), 2),
        "a_take_pending_share": round(covered(pending, first, stopped_at), 4),
        "stamp_age_ms": ages([age for data in figures.values() for age in data.get("stamp_age_ms", [])]),
        "due_waits": waits(due),
        "bulk_waits": waits(bulk),
        "sensor_ticks": {
            "count": len(ticks),
            "longest_s": max((tick["seconds"] for tick in ticks), default=0.0),
            "median_s": round(statistics.median([tick["seconds"] for tick in ticks]), 2) if ticks else 0.0,
            "most_requests": max((tick["requests"] for tick in ticks), default=0),
        },
        "started_to_requested_s": {
            "runs": len(to_request),
            "median": round(_quantile(to_request, 0.5), 1),
            "max": round(max(to_request, default=0.0), 1),
        },
        "reads": {
            "completed": len(reads),
            "ids_each": sorted({read["ids"] for read in reads}),
            "median_s": round(statistics.median([read["seconds"] for read in reads]), 1) if reads else None,
        },
        "participants": participants,
        "over_limit": crowded_seconds(log),
        "targets": {
            "max_in_any_second_at_most_5": stats["max_requests_in_any_second"] <= ACCOUNT_LIMIT,
            "no_429": int(statuses.get("429", 0)) == 0,
            "rate_at_least_95_percent": rate >= TARGET_SHARE * ACCOUNT_LIMIT,
        },
        **({"failed_participants": logs} if logs else {}),
    }


def markdown(report: dict[str, Any]) -> str:
    targets = report["targets"]
    due, bulk, stamp = report["due_waits"], report["bulk_waits"], report["stamp_age_ms"]
    lag_figures = [
        data["place_to_arrival_ms"] for data in report["participants"].values() if "place_to_arrival_ms" in data
    ]

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    lines = [
        "| measure | value | target |",
        "|---|---|---|",
        f"| requests in {report['span_s']:.0f} s | {report['requests']:,} | |",
        f"| most requests in any 1 s window | {report['max_requests_in_any_second']} | "
        f"at most 5: {verdict(targets['max_in_any_second_at_most_5'])} |",
        f"| 429 answers | {report['http_429']} | 0: {verdict(targets['no_429'])} |",
        f"| rate while work was waiting | {report['rate_per_s']:.2f}/s ({report['rate_over_limit']:.3f} x 5/s) | "
        f"at least 4.75/s: {verdict(targets['rate_at_least_95_percent'])} |",
        f"| slowest 10 s of it | {report['slowest_10s_rate_per_s']:.1f}/s | |",
        f"| time with a place being waited for | {report['a_take_pending_share'] * 100:.1f} % | |",
        f"| due (sensor) waits for a place: median / p99 / max | {due['median_s']:.2f} / {due['p99_s']:.2f} / "
        f"{due['max_s']:.2f} s ({due['takes']} takes) | |",
        f"| bulk waits for a place: median / p99 / max | {bulk['median_s']:.2f} / {bulk['p99_s']:.2f} / "
        f"{bulk['max_s']:.2f} s ({bulk['takes']} takes) | |",
        f"| a place's timestamp age when the store admits it: median / p99 / max | {stamp['median']} / "
        f"{stamp['p99']} / {stamp['max']} ms | at most the 15 ms guard |",
        f"| place taken -> request at the server: worst p99 / max of a participant | "
        f"{max((lag['p99'] for lag in lag_figures), default=0):.1f} / "
        f"{max((lag['max'] for lag in lag_figures), default=0):.1f} ms | |",
        f"| sensor ticks: count, longest, most requests | {report['sensor_ticks']['count']}, "
        f"{report['sensor_ticks']['longest_s']:.1f} s, {report['sensor_ticks']['most_requests']} | |",
        f"| run started -> materialization requested: median / max | "
        f"{report['started_to_requested_s']['median']:.1f} / {report['started_to_requested_s']['max']:.1f} s "
        f"({report['started_to_requested_s']['runs']} runs) | |",
        "",
        "| participant | requests | share | 429 | done |",
        "|---|---|---|---|---|",
    ]
    for name, data in report["participants"].items():
        done = ""
        if name == "kickoff":
            done = f"{data['runs_started']:,} runs started"
        elif name == "sensor":
            done = f"{data['ticks']} ticks, {data['materializations_requested']:,} materializations requested"
        elif name.startswith("reader"):
            done = f"{data.get('reads_completed', 0)} reads completed"
        elif name == "fetch":
            done = (
                f"{data['rows']:,} rows in {data['seconds']:.0f} s"
                if "rows" in data
                else ("stopped at the end" if data.get("stopped") else f"exit {data.get('exit_code')}")
            )
        lines.append(
            f"| {name} | {data['requests']:,} | {data['share_of_requests'] * 100:.1f} % | {data['http_429']} | {done} |"
        )
    sim = report["simulator"]
    lines += [
        "",
        f"{report['minutes']:g} min, the budget in {report['store']}; the simulator at 5/s, {sim['latency_ms']} ms "
        f"a request, runs ready after {sim['ready_after_s']:g} s. {report['machine']['cpu']}, "
        f"{report['machine']['cores']} cores; load average before "
        f"{', '.join(f'{x:.1f}' for x in report['load_before']['loadavg'])}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments and arguments[0] in ROLES:
        ROLES[arguments[0]](arguments[1:])
        return
    from benchmarks.run import load, machine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long everything runs (default: %(default)s)")
    parser.add_argument("--budget", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--postgres", default=LOCAL_POSTGRES, help="the postgres budget's server (%(default)s)")
    parser.add_argument("--segments", type=int, default=2_000, help="segments the kick-off starts")
    parser.add_argument("--readers", type=int, default=4, help="run processes reading large segments")
    parser.add_argument("--read-size", type=int, default=1_000_000, help="members of a reader's segment")
    parser.add_argument("--fetch-size", type=int, default=1_000_000, help="members of the fetched segment")
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--jitter-ms", type=float, default=200.0)
    parser.add_argument("--ready-after", type=float, default=3.0, help="seconds until a started run is ready")
    parser.add_argument(
        "--tick-interval",
        type=float,
        default=SENSOR_INTERVAL,
        help="seconds from a sensor tick's start to the next (default: the sensor's minimum interval, "
        "%(default)s; 0: back to back)",
    )
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(arguments)
    info, before = machine(), load()
    print(f"{info['cpu']}, {info['cores']} cores; {before['uptime']}", flush=True)
    report = measure(args)
    report.update(machine=info, load_before=before, load_after=load())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(report) + "\n")
    print()
    print(markdown(report))
    print(f"\nWritten: {args.output} and {args.output.with_suffix('.md')}")


if __name__ == "__main__":
    main()
