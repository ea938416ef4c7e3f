"""The readiness sensor at 10,000 pending runs: the real sensor, the real simulator over HTTP.

`python -m benchmarks.sensor_scale` prints a report (add `--json` for one JSON line). Three parts:

1. **Simulated day** (the figures of the issue): a kick-off starts 10,000 runs at its 4 requests/s
   (one every 0.25 s of simulated time; each run turns ready after a delay drawn from a mix of
   seconds to hours, 0.5 % of segments fail); the real sensor (`evaluate_tick` on a
   `build_sensor_context`, SQLite instance, the simulator over HTTP) is evaluated back to back
   until every run is requested. Wall time is shrunk: the sensor's client runs without its
   1 request/s pause, and a clock shared by the sensor and the simulator moves forward after each
   tick by what the tick would have lasted in production (its requests at 1/s plus its own work,
   at least the sensor's 15 s interval). The request budget of a tick is the real one
   (`REQUESTS_PER_TICK`). Reported: polls per run, the worst delay from a run turning ready to its
   materialization being requested (seconds and ticks), the worst wait of a due run for its poll
   (ticks), tick durations, the cursor's size and (de)serialization time.
2. **Real ticks**: 10,000 runs pending at once, a few ticks at the real 1 request/s against a
   simulator enforcing the account's 5/s: wall time of each evaluation, requests a tick, the most
   requests the server saw in any second.
3. **Cursor worst case**: every one of 10,000 runs polled and still pending.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from matchall_dagster import ActiveCampaignClient
from matchall_dagster.api.models import RunStatus
from matchall_dagster.definitions import build_definitions
from matchall_dagster.lifecycle import policy
from matchall_dagster.lifecycle.cursor import ReadinessCursor
from matchall_dagster.orchestration import readiness, share
from matchall_dagster.orchestration.pending_runs import pending_observation
from matchall_dagster.simulator import (
    DEFAULT_TOKEN,
    Behavior,
    SimAccount,
    SimSegment,
    Simulator,
    SimulatorConfig,
    SimulatorServer,
)

SENSOR = "match_all_readiness_sensor"
KICKOFF_RATE = 4.0  # runs started a second: the kick-off's share of the account's limit
MIN_INTERVAL = 15.0  # the sensor's minimum_interval_seconds
LOG = logging.getLogger("sensor_scale")
# How long runs take to turn ready: (share of segments, shortest, longest seconds).
READY_MIX = (
    (0.50, 1.0, 10.0),
    (0.25, 10.0, 120.0),
    (0.15, 120.0, 900.0),
    (0.08, 900.0, 3_600.0),
    (0.02, 3_600.0, 10_800.0),
)
FAIL_SHARE = 0.005


def build_account(count: int, seed: int) -> SimAccount:
    rng = random.Random(seed)  # noqa: S311  # reproducible delays, not secrets
    segments = []
    for i in range(1, count + 1):
        share = rng.random()
        low, high = READY_MIX[-1][1:]
        for weight, shortest, longest in READY_MIX:
            if share < weight:
                low, high = shortest, longest
                break
            share -= weight
        behavior = Behavior.FAIL if rng.random() < FAIL_SHARE else Behavior.OK
        segments.append(SimSegment(str(i), f"Segment {i}", 3, behavior=behavior, ready_after=rng.uniform(low, high)))
    return SimAccount(segments=segments, seed=seed)


class VirtualClock:
    """Simulated wall time: real time plus an offset shared by the sensor and the simulator."""

    def __init__(self, simulator: Simulator) -> None:
        self.simulator = simulator
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds
        self.simulator.advance_clock(seconds)


@contextmanager
def environment(
    account: SimAccount, *, limit: float
) -> Iterator[tuple[SimulatorServer, dg.DagsterInstance, dg.Definitions]]:
    config = SimulatorConfig(requests_per_second=limit, ready_after=0.0)
    with tempfile.TemporaryDirectory() as folder, SimulatorServer(Simulator(account, config)) as server:
        os.environ["ACTIVECAMPAIGN_API_URL"] = server.url
        os.environ["ACTIVECAMPAIGN_API_KEY"] = DEFAULT_TOKEN
        os.environ.pop("MATCHALL_SEGMENTS", None)
        defs = build_definitions(duckdb_database=str(Path(folder) / "matchall.duckdb"))
        with dg.instance_for_test(temp_dir=folder) as instance:
            yield server, instance, defs


def evaluate(instance: dg.DagsterInstance, defs: dg.Definitions, cursor: str | None) -> dg.SensorExecutionData:
    with dg.build_sensor_context(
        instance_ref=instance.get_ref(), definitions=defs, resources=defs.resources, cursor=cursor
    ) as context:
        return defs.resolve_sensor_def(SENSOR).evaluate_tick(context)


def cursor_costs(raw: str | None, repeat: int = 5) -> tuple[float, float]:
    """Median seconds to read the cursor and to write it back."""
    loads, dumps = [], []
    for _ in range(repeat):
        began = time.perf_counter()
        cursor = ReadinessCursor.load(raw, LOG)
        loads.append(time.perf_counter() - began)
        began = time.perf_counter()
        cursor.dump()
        dumps.append(time.perf_counter() - began)
    return statistics.median(loads), statistics.median(dumps)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1)] if ordered else 0.0


@dataclass
class Day:
    ticks: list[float] = field(default_factory=list)  # simulated time of each evaluation
    walls: list[float] = field(default_factory=list)  # real seconds of each evaluation (requests unpaused)
    production: list[float] = field(default_factory=list)  # the same with its requests at the real rate
    requests: list[int] = field(default_factory=list)
    cursor_bytes: list[int] = field(default_factory=list)
    cursor_load: list[float] = field(default_factory=list)
    cursor_dump: list[float] = field(default_factory=list)
    polls: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # run id -> poll times
    requested: dict[str, float] = field(default_factory=dict)  # run id -> when its materialization was requested
    polls_tag: dict[str, int] = field(default_factory=dict)
    checks: int = 0
    restarts: int = 0


def simulated_day(
    count: int, seed: int, max_ticks: int, *, sensor_rate: float | None = None, kickoff_rate: float = KICKOFF_RATE
) -> dict[str, Any]:
    """Part 1. `sensor_rate` and `kickoff_rate` try another split of the account's 5/s (the tick's
    budget follows the sensor's rate as it would in production)."""
    account = build_account(count, seed)
    configured = share.SENSOR_REQUESTS_PER_SECOND
    budget = readiness.REQUESTS_PER_TICK
    rate = sensor_rate or configured
    day = Day()
    with environment(account, limit=0) as (server, instance, defs):
        simulator = server.simulator
        clock = VirtualClock(simulator)
        readiness.clock = clock
        share.SENSOR_REQUESTS_PER_SECOND = 1_000.0  # the client's pause only; the tick's budget is unchanged
        readiness.REQUESTS_PER_TICK = math.floor(rate * policy.POLL_WINDOW_SECONDS)
        real_poll = ActiveCampaignClient.poll_run

        tick_at = 0.0  # the simulated time of the tick in progress

        def poll(self: ActiveCampaignClient, segment_id: str, run_id: str, *, sort: str = "id") -> RunStatus:
            day.polls[run_id].append(tick_at)
            return real_poll(self, segment_id, run_id, sort=sort)

        ActiveCampaignClient.poll_run = poll  # type: ignore[method-assign]  # counts, then the real poll
        instance.add_dynamic_partitions("segments", [segment.id for segment in account.segments])
        starter = ActiveCampaignClient(server.url, DEFAULT_TOKEN, requests_per_second=1_000)
        began = clock()
        started = 0
        cursor: str | None = None
        nominal: dict[str, float] = {}  # run id -> its start, simulated
        try:
            for _ in range(max_ticks):
                now = clock()
                # The kick-off, running beside the sensor: every run due to have started by now, each
                # started at its own moment of simulated time and recorded as pending.
                while started < count and began + started / kickoff_rate <= now:
                    segment = account.segments[started]
                    at = began + started / kickoff_rate
                    back = at - clock()
                    simulator.advance_clock(back)  # to the run's own moment (no request is in flight)
                    run = starter.start_run(segment.id, sort="id")
                    simulator.advance_clock(-back)
                    instance.report_runless_asset_event(pending_observation(segment.id, run, "id", kickoff="day"))
                    nominal[run.run_id] = at
                    started += 1
                before = simulator.stats()["requests"]
                tick_at = now
                tick_began = time.monotonic()
                data = evaluate(instance, defs, cursor)
                wall = time.monotonic() - tick_began
                sent = simulator.stats()["requests"] - before
                for event in data.asset_events:  # what the daemon does with a tick's events
                    instance.report_runless_asset_event(event)
                    day.restarts += 1
                for request in data.run_requests:
                    if request.asset_check_keys:
                        day.checks += 1
                    else:
                        run_id = request.tags["matchall/run_id"]
                        day.requested[run_id] = now
                        day.polls_tag[run_id] = int(request.tags["matchall/polls"])
                cursor = data.cursor
                load, dump = cursor_costs(cursor, repeat=1)
                day.ticks.append(now)
                day.walls.append(wall)
                day.requests.append(sent)
                day.cursor_bytes.append(len(cursor or ""))
                day.cursor_load.append(load)
                day.cursor_dump.append(dump)
                production = wall + sent / rate  # its requests 1/rate apart instead of unpaused
                day.production.append(production)
                kicked_off = started == count
                idle = not data.run_requests and not data.asset_events and sent == 0
                if kicked_off and idle and not ReadinessCursor.load(cursor, LOG).waiting:
                    break
                if len(day.ticks) % 50 == 0:
                    print(
                        f"tick {len(day.ticks)}: {(now - began) / 3600:.2f} h simulated, {started} started, "
                        f"{len(day.requested)} requested",
                        file=sys.stderr,
                        flush=True,
                    )
                clock.advance(max(MIN_INTERVAL, production) - wall)
        finally:
            ActiveCampaignClient.poll_run = real_poll  # type: ignore[method-assign]
            share.SENSOR_REQUESTS_PER_SECOND = configured
            readiness.REQUESTS_PER_TICK = budget
            readiness.clock = time.time
            starter.close()
        runs = simulator.runs
    return {
        "sensor_requests_per_second": rate,
        "kickoff_requests_per_second": kickoff_rate,
        **summarize(day, runs, nominal, count, account, math.floor(rate * policy.POLL_WINDOW_SECONDS)),
    }


def ticks_between(ticks: list[float], start: float, end: float) -> int:
    """Evaluations at or after `start` and before `end`: the ticks something waited through."""
    return sum(1 for moment in ticks if start <= moment < end)


def summarize(
    day: Day, runs: dict[str, Any], nominal: dict[str, float], count: int, account: SimAccount, budget: int
) -> dict[str, Any]:
    ok = {run_id: run for run_id, run in runs.items() if run.segment.behavior is Behavior.OK}
    delays, delay_ticks = [], []
    for run_id, run in ok.items():
        if run_id in day.requested:
            delays.append(day.requested[run_id] - run.ready_at)
            delay_ticks.append(ticks_between(day.ticks, run.ready_at, day.requested[run_id]))
    # Each poll's wait: from when the run was due (its start, then the backoff after its previous
    # poll) to the poll, in ticks that passed it by.
    waits = []
    for run_id, moments in day.polls.items():
        started = runs[run_id].started_at if run_id in runs else nominal.get(run_id, moments[0])
        due = started  # a new record is due at once
        for moment in moments:
            waits.append(ticks_between(day.ticks, math.ceil(due), moment))
            due = math.ceil(moment + policy.poll_delay(moment - started))
    polls = [len(moments) for moments in day.polls.values()]
    total_polls = sum(polls)
    ticks = len(day.ticks)
    span = day.ticks[-1] - day.ticks[0] if day.ticks else 0.0
    return {
        "runs": count,
        "runs_requested": len(day.requested),
        "ok_runs_not_requested": sum(1 for run_id in ok if run_id not in day.requested),
        "check_runs_requested": day.checks,
        "fresh_runs_started_by_sensor": day.restarts,
        "ticks": ticks,
        "simulated_hours": round(span / 3600, 2),
        "polls": total_polls,
        "polls_per_run": round(total_polls / max(1, len(polls)), 3),
        "polls_per_run_max": max(polls, default=0),
        "polls_per_run_p99": percentile([float(p) for p in polls], 0.99),
        "requests_per_tick_max": max(day.requests, default=0),
        "request_budget_per_tick": budget,
        "ready_to_request_s_max": round(max(delays, default=0.0), 1),
        "ready_to_request_s_p50": round(percentile(delays, 0.5), 1),
        "ready_to_request_ticks_max": max(delay_ticks, default=0),
        "due_to_poll_ticks_max": max(waits, default=0),
        "tick_wall_s_max": round(max(day.walls, default=0.0), 3),
        "tick_wall_s_p50": round(percentile(day.walls, 0.5), 3),
        "tick_production_s_max": round(max(day.production, default=0.0), 2),
        "tick_production_s_p50": round(percentile(day.production, 0.5), 2),
        "cursor_bytes_max": max(day.cursor_bytes, default=0),
        "cursor_bytes_p50": int(percentile([float(b) for b in day.cursor_bytes], 0.5)),
        "cursor_load_ms_max": round(1000 * max(day.cursor_load, default=0.0), 3),
        "cursor_dump_ms_max": round(1000 * max(day.cursor_dump, default=0.0), 3),
    }


def real_ticks(count: int, seed: int, ticks: int) -> dict[str, Any]:
    """`ticks` evaluations at the real rate with `count` runs pending, the server enforcing 5/s."""
    account = SimAccount([SimSegment(str(i), f"S{i}", 3, ready_after=86_400.0) for i in range(1, count + 1)], seed=seed)
    walls, sent = [], []
    with environment(account, limit=0) as (server, instance, defs):
        instance.add_dynamic_partitions("segments", [segment.id for segment in account.segments])
        with ActiveCampaignClient(server.url, DEFAULT_TOKEN, requests_per_second=1_000) as fast:
            for segment in account.segments:  # set up without the limit: the runs are pending at once
                run = fast.start_run(segment.id)
                instance.report_runless_asset_event(pending_observation(segment.id, run, "id", kickoff="burst"))
        server.simulator.config = SimulatorConfig(requests_per_second=5.0, ready_after=0.0)  # the account's limit
        server.simulator.advance_clock(policy.FIRST_POLL_DELAY)
        readiness.clock = lambda: time.time() + policy.FIRST_POLL_DELAY
        server.simulator.reset_stats()
        cursor = None
        try:
            for _ in range(ticks):
                before = server.simulator.stats()["requests"]
                began = time.monotonic()
                data = evaluate(instance, defs, cursor)
                walls.append(time.monotonic() - began)
                sent.append(server.simulator.stats()["requests"] - before)
                cursor = data.cursor
        finally:
            readiness.clock = time.time
        stats = server.simulator.stats()
    return {
        "pending_runs": count,
        "ticks": ticks,
        "tick_wall_s": [round(w, 2) for w in walls],
        "requests_per_tick": sent,
        "max_requests_in_any_second": stats["max_requests_in_any_second"],
        "statuses": stats["by_status"],
        "cursor_bytes_after": len(cursor or ""),
    }


def cursor_worst_case(count: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)  # noqa: S311
    now = time.time()
    ids = sorted(rng.sample(range(1, 4 * count), count))
    waiting = {i: (now + rng.uniform(0, policy.MAX_POLL_DELAY), rng.randint(1, 14)) for i in ids}
    raw = ReadinessCursor(after=4 * count, waiting=waiting).dump()
    load, dump = cursor_costs(raw, repeat=21)
    return {
        "waiting_runs": count,
        "cursor_bytes": len(raw),
        "bytes_per_run": round(len(raw) / count, 2),
        "load_ms": round(1000 * load, 2),
        "dump_ms": round(1000 * dump, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=20261128)
    parser.add_argument("--max-ticks", type=int, default=5_000)
    parser.add_argument("--real-ticks", type=int, default=3, help="ticks at the real rate (part 2); 0 skips it")
    parser.add_argument("--skip-day", action="store_true", help="skip part 1")
    parser.add_argument("--sensor-rate", type=float, help="part 1 with another sensor share (requests/s)")
    parser.add_argument("--kickoff-rate", type=float, default=KICKOFF_RATE, help="part 1: runs started a second")
    parser.add_argument("--json", action="store_true", help="one JSON line instead of the report")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # the sensor's per-run log lines; the report is the output
    report: dict[str, Any] = {
        "budget": {
            "sensor_requests_per_second": share.SENSOR_REQUESTS_PER_SECOND,
            "requests_per_tick": readiness.REQUESTS_PER_TICK,
            "poll_window_s": policy.POLL_WINDOW_SECONDS,
            "tick_deadline_s": policy.TICK_DEADLINE_SECONDS,
        }
    }
    began = time.monotonic()
    if not args.skip_day:
        report["simulated_day"] = simulated_day(
            args.segments, args.seed, args.max_ticks, sensor_rate=args.sensor_rate, kickoff_rate=args.kickoff_rate
        )
    if args.real_ticks:
        report["real_ticks"] = real_ticks(args.segments, args.seed, args.real_ticks)
    report["cursor_worst_case"] = cursor_worst_case(args.segments, args.seed)
    report["benchmark_wall_s"] = round(time.monotonic() - began, 1)
    if args.json:
        print(json.dumps(report))
        return
    for part, figures in report.items():
        if isinstance(figures, dict):
            print(f"{part}:")
            for name, value in figures.items():
                print(f"  {name:32} {value}")
        else:
            print(f"{part}: {figures}")


if __name__ == "__main__":
    main()
