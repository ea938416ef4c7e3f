"""The readiness sensor at 10,000 pending runs, in the account's one request budget.

`python -m benchmarks.sensor_scale` prints a report (add `--json` for one JSON line, `--out NAME`
to save `benchmarks/results/NAME.json` and `.md`; `--quick` for 1,000 segments). About 15 minutes
on 2 cores at 10,000 segments, most of it the real sensor's ticks. Three parts:

1. **Simulated day**: one kick-off starts 10,000 runs (each turns ready after a delay drawn from a
   mix of seconds to hours; 0.5 % of segments fail), the real readiness sensor (`evaluate_tick` on
   a `build_sensor_context`, SQLite instance, the simulator over HTTP) is evaluated back to back,
   and a simulated clock shared by the sensor and the simulator moves forward by what each tick's
   interval would last in production. The model of that clock (``Budget``):

   - The account has one budget of 5 requests/s: a place every 0.2 s of simulated time.
   - Tick k starts at t_k and sends p_k requests (measured: the real sensor's polls, and the starts
     of fresh runs for failed ones; its client runs unpaused, from a `memory` budget). Its polls go
     first (`Priority.DUE`): they take the first p_k places from t_k. The tick lasts
     d_k = wall_k + p_k / 5 (wall_k: the evaluation's own measured time, its requests unpaused), and
     the next starts at t_{k+1} = t_k + max(15 s, d_k) (`minimum_interval_seconds`; Dagster's
     daemon looks every 5 s, which this ignores: ticks follow each other as soon as allowed).
   - Every other place of [t_k, t_{k+1}) goes to `Priority.BULK`, in arrival order: the API steps
     in the `activecampaign` pool (at most 4 at once, waiting in launch order for a slot) each
     have one request waiting for the budget at a time (the client's gate lets one thread of a
     process wait), so the steps in the pool take places in turn. A place nothing waits for is
     lost (idle). Request latency and process start-up are taken as 0.
   - The kick-off is one op queued at time 0 (one step of the pool from the start): 10,000 starts,
     one request each, one after the other. A run is started in the simulator (over HTTP, its
     clock set to that moment) at the simulated time its start gets its place, and recorded as
     pending as the kick-off records it; the next tick reads it.
   - Each materialization the sensor requests (at its tick's end, t_k + d_k) becomes a read
     step: what the real asset sends, `read_requests(members)`: the readiness check that brings
     page 1 when ready, the pages after it (one request a page of 10,000), and the empty page past
     the end when the total fills its last page exactly: ceil(members / 10,000), at least 1, plus
     that one. Each check run the sensor requests (a failed or expired run) is a step of 1 request.
   - Segment sizes: drawn from `SIZE_MIX` (`--members mixed`, the default), or 3 members each as
     before (`--members small`). The simulator's segments hold at most one page (10,000 members):
     what a sensor's poll of a ready run receives (page 1) is the same for any larger one.

   Reported: the wait from a run turning ready to its materialization being requested (worst and
   median, against 8,958 s measured with the old fixed split and the target of a quarter of it);
   the first read against the kick-off's end; the day's requests by kind and its duration (to the
   last read stored) against the floor requests / 5/s, over the whole day and over its busy time
   (the day less the stretches where nothing could be done: no request waiting and every run that
   had turned ready already stored; the model hands every place to whatever waits, so the day
   less every idle stretch is the floor exactly); the lag from ready to stored; polls per run;
   ticks, the cursor's size and (de)serialization time.

   Variants, to see what a change of policy would do (each a day of its own; `--compare` puts
   their days beside this one in OUT.md): `--kickoff-share` (the kick-off's share of the BULK
   places it contends for, instead of one turn among the pool's steps), `--pool`, `--poll-share`,
   `--max-poll-delay`, and `--poll-rate` (the polls' rate while BULK waits: a sensor sending one
   request at a time does not take every place; part 2 measures what it takes).
2. **Real ticks**: 10,000 runs pending at once, a few ticks at the real rate against a simulator
   enforcing the account's 5/s, the sensor's client taking from a budget in a SQLite file, while
   another process reads from the same budget at `Priority.BULK` without pause: the sensor's
   requests a second within each tick, the other process's, the most requests the server saw in
   any second, and its statuses (no 429).
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
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from matchall_dagster import ActiveCampaignClient, ActiveCampaignResource
from matchall_dagster.api.models import RunStatus
from matchall_dagster.api.validation import MAX_PAGE_SIZE
from matchall_dagster.definitions import build_definitions
from matchall_dagster.lifecycle import policy
from matchall_dagster.lifecycle.cursor import ReadinessCursor
from matchall_dagster.orchestration import readiness
from matchall_dagster.orchestration.account import DEFAULT_ACCOUNT
from matchall_dagster.orchestration.pending_runs import pending_observation
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
from matchall_dagster.simulator.rules import AUDIENCE, RESULT_SET

SENSOR = "match_all_readiness_sensor"
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
ACCOUNT_RATE = policy.ACCOUNT_REQUESTS_PER_SECOND  # the account's budget, shared by everything
POOL_LIMIT = 2  # the `activecampaign` pool (dagster.yaml): API steps at once (the kick-off is one of them)
MIN_INTERVAL = 15.0  # the sensor's minimum_interval_seconds
UNPAUSED = 1_000.0  # requests/s of the benchmark's own clients (the clock is simulated)
OLD_WORST_WAIT = 8_958.0  # s, ready -> requested with the fixed split (sensors 1/s, runs 4/s)
WAIT_TARGET = OLD_WORST_WAIT / 4
FLOOR_TARGET = 1.15  # the day's duration against requests / 5/s
LOG = logging.getLogger("sensor_scale")
# The instance's SQLite files in memory when the machine has a tmpfs: the same queries, without
# the disk's syncs (the day writes 10,000 records; a tick's own time is a small part of it).
SCRATCH = "/dev/shm" if Path("/dev/shm").is_dir() else None  # noqa: S108  # a private temporary folder
# How long runs take to turn ready: (share of segments, shortest, longest seconds).
READY_MIX = (
    (0.50, 1.0, 10.0),
    (0.25, 10.0, 120.0),
    (0.15, 120.0, 900.0),
    (0.08, 900.0, 3_600.0),
    (0.02, 3_600.0, 10_800.0),
)
FAIL_SHARE = 0.005
# Segment sizes: (share of segments, smallest, largest members), log-uniform within a band.
SIZE_MIX = (
    (0.60, 10, 5_000),
    (0.25, 5_000, 50_000),
    (0.12, 50_000, 250_000),
    (0.03, 250_000, 1_000_000),
)
SMALL_SEGMENT = 3


def draw(rng: random.Random, mix: tuple[tuple[float, float, float], ...]) -> tuple[float, float]:
    """The band of `mix` a uniform draw falls in."""
    share = rng.random()
    for weight, low, high in mix:
        if share < weight:
            return low, high
        share -= weight
    return mix[-1][1], mix[-1][2]


def build_account(count: int, seed: int, members: str = "mixed") -> tuple[SimAccount, dict[str, int]]:
    """The account and each segment's true size (the simulator's segments hold at most one page)."""
    rng = random.Random(seed)  # noqa: S311  # reproducible delays, not secrets
    sizes_rng = random.Random(seed + 1)  # noqa: S311  # a stream of its own: the delays stay those of the old day
    segments, sizes = [], {}
    for i in range(1, count + 1):
        low, high = draw(rng, READY_MIX)
        behavior = Behavior.FAIL if rng.random() < FAIL_SHARE else Behavior.OK
        ready_after = rng.uniform(low, high)
        if members == "small":
            size = SMALL_SEGMENT
        else:
            smallest, largest = draw(sizes_rng, SIZE_MIX)
            size = round(math.exp(sizes_rng.uniform(math.log(smallest), math.log(largest))))
        sizes[str(i)] = size
        segments.append(
            SimSegment(str(i), f"Segment {i}", min(size, MAX_PAGE_SIZE), behavior=behavior, ready_after=ready_after)
        )
    return SimAccount(segments=segments, seed=seed), sizes


def read_requests(members: int, page_size: int = MAX_PAGE_SIZE) -> int:
    """The requests of `segment_matches` reading a ready run: page 1 (the readiness check), the pages
    after it, and the empty page past the end when the total fills its last page exactly."""
    pages = max(1, math.ceil(members / page_size))
    return pages + (1 if members and members % page_size == 0 else 0)


class VirtualClock:
    """Simulated wall time shared by the sensor and the simulator: set to a moment, then running at
    real speed (a tick's own work takes its real time)."""

    def __init__(self, simulator: Simulator) -> None:
        self.simulator = simulator
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def set(self, moment: float) -> None:
        delta = moment - self()
        self.offset += delta
        self.simulator.advance_clock(delta)


class AnswerCounter:
    """Counts the simulator's answers by path template (an `on_answer` hook), with their times."""

    def __init__(self, keep_times: bool = False) -> None:
        self.count = 0
        self.by_path: Counter[str] = Counter()
        self.times: list[tuple[float, str, int]] = []
        self.keep_times = keep_times
        self._lock = threading.Lock()

    def __call__(self, answer: Answer) -> None:
        with self._lock:
            self.count += 1
            self.by_path[answer.path] += 1
            if self.keep_times:
                self.times.append((time.monotonic(), answer.path, answer.status))


@contextmanager
def environment(
    account: SimAccount, *, limit: float
) -> Iterator[tuple[SimulatorServer, dg.DagsterInstance, dg.Definitions, Path]]:
    config = SimulatorConfig(requests_per_second=limit, ready_after=0.0)
    with tempfile.TemporaryDirectory(dir=SCRATCH) as folder, SimulatorServer(Simulator(account, config)) as server:
        os.environ["ACTIVECAMPAIGN_API_URL"] = server.url
        os.environ["ACTIVECAMPAIGN_API_KEY"] = DEFAULT_TOKEN
        os.environ.pop("MATCHALL_SEGMENTS", None)
        defs = build_definitions(store=f"duckdb://{Path(folder) / 'matchall.duckdb'}")
        with dg.instance_for_test(temp_dir=folder) as instance:
            yield server, instance, defs, Path(folder)


def sensor_resources(defs: dg.Definitions, resource: ActiveCampaignResource) -> dict[str, Any]:
    return {**(defs.resources or {}), "activecampaign": resource}


def evaluate(
    instance: dg.DagsterInstance, defs: dg.Definitions, resources: dict[str, Any], cursor: str | None
) -> dg.SensorExecutionData:
    with dg.build_sensor_context(
        instance_ref=instance.get_ref(), definitions=defs, resources=resources, cursor=cursor
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


# -- the budget model ---------------------------------------------------------------------------


@dataclass
class Step:
    """An API step of the pool: the kick-off, a read, or a check run."""

    kind: str  # "kickoff", "read" or "check"
    requests: int
    arrived: float  # simulated seconds: launched (the kick-off at 0, the others at their tick's end)
    run_id: str = ""
    sent: int = 0
    began: float | None = None  # its first place
    ended: float | None = None  # its last place (a read: its last page, stored)


class Budget:
    """The account's places at `rate` a second of simulated time, shared as the module says.

    `spend(start, end, polls)` hands out the places of [start, end): the first `polls` to the
    sensor's tick, each of the others to the step of the pool whose request has waited longest.
    """

    def __init__(
        self, rate: float, pool: int, on_place: Callable[[Step, float], None], kickoff_share: float | None = None
    ) -> None:
        self.rate = rate
        self.pool = pool
        self.on_place = on_place
        # None: arrival order (the kick-off is one step among those of the pool). A share: the
        # kick-off takes that share of the places it and other steps both wait for (a variant).
        self.kickoff_share = kickoff_share
        self._contested = 0
        self._kickoff_won = 0
        self.queue: deque[Step] = deque()  # launched, waiting for a slot in the pool
        self.turns: deque[Step] = deque()  # in the pool, each with one request waiting for a place
        self.steps: list[Step] = []
        self.place = 0  # the next place: at place / rate seconds
        self.poll_places = 0
        self.bulk_places = 0
        self.idle: list[list[float]] = []  # stretches where no request waited for the places

    def submit(self, step: Step) -> None:
        self.queue.append(step)
        self.steps.append(step)

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.turns)

    def _index(self, moment: float) -> int:
        return math.ceil(moment * self.rate - 1e-9)

    def _lost(self, start: float, end: float) -> None:
        if self.idle and abs(self.idle[-1][1] - start) < 1e-9:
            self.idle[-1][1] = end
        else:
            self.idle.append([start, end])

    def spend(self, start: float, end: float, polls: int, poll_rate: float | None = None) -> None:
        """The places of [start, end) (`end` infinite: until no step is left).

        The tick's polls leave at `poll_rate` a second from `start` (the whole budget by default:
        the sensor waits for every place) and each takes the first place from its moment on.
        """
        spacing = 1 / (poll_rate or self.rate)
        n = max(self.place, self._index(start))
        next_poll, polls_left = start, polls
        self.poll_places += polls
        last = self._index(end) if math.isfinite(end) else None
        while last is None or n < last or polls_left:
            moment = n / self.rate
            if polls_left and (next_poll <= moment + 1e-9 or (last is not None and n >= last)):  # due first
                polls_left -= 1
                next_poll += spacing
                n += 1
                continue
            while self.queue and len(self.turns) < self.pool and self.queue[0].arrived <= moment:
                self.turns.append(self.queue.popleft())
            if not self.turns:
                wake = [self._index(next_poll)] if polls_left else []
                if self.queue:
                    wake.append(self._index(self.queue[0].arrived))
                if last is not None:
                    wake.append(last)
                if not wake:
                    break
                resume = max(n + 1, min(wake))
                self._lost(moment, resume / self.rate)
                n = resume
                continue
            step = self._next()
            step.began = moment if step.began is None else step.began
            step.sent += 1
            self.bulk_places += 1
            self.on_place(step, moment)
            if step.sent < step.requests:
                self.turns.append(step)
            else:
                step.ended = moment
            n += 1
        self.place = n

    def _next(self) -> Step:
        """The step whose request takes the place: the longest waiting, unless a kick-off share is set."""
        if self.kickoff_share is not None and len(self.turns) > 1:
            kickoff = next((step for step in self.turns if step.kind == "kickoff"), None)
            if kickoff is not None:
                self._contested += 1
                if self._kickoff_won < self.kickoff_share * self._contested:
                    self._kickoff_won += 1
                    self.turns.remove(kickoff)
                    return kickoff
                other = next(step for step in self.turns if step.kind != "kickoff")
                self.turns.remove(other)
                return other
        return self.turns.popleft()


# -- part 1: the simulated day ------------------------------------------------------------------


@dataclass
class Day:
    ticks: list[float] = field(default_factory=list)  # simulated start of each evaluation
    walls: list[float] = field(default_factory=list)  # real seconds of each evaluation (requests unpaused)
    durations: list[float] = field(default_factory=list)  # the same with its requests at 5/s
    requests: list[int] = field(default_factory=list)
    cursor_bytes: list[int] = field(default_factory=list)
    cursor_load: list[float] = field(default_factory=list)
    cursor_dump: list[float] = field(default_factory=list)
    polls: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # run id -> poll times
    requested: dict[str, float] = field(default_factory=dict)  # run id -> when its materialization was requested
    checks: int = 0
    restarts: int = 0


def simulated_day(
    count: int,
    seed: int,
    max_ticks: int,
    *,
    members: str = "mixed",
    poll_share: float | None = None,
    max_poll_delay: float | None = None,
    pool: int = POOL_LIMIT,
    poll_rate: float = ACCOUNT_RATE,
    kickoff_share: float | None = None,
) -> dict[str, Any]:
    """Part 1. `poll_share` and `max_poll_delay` try another policy (the tick's request cap
    floor(share x 5/s x 24 s), the longest wait between polls of a run); `poll_rate` lets the
    tick's polls leave no faster than that (a round trip per poll: the sensor sends one at a time),
    the other places going to BULK, and caps a tick at what the 24 s window then allows;
    `kickoff_share` gives the kick-off that share of the BULK places it contends for."""
    account, sizes = build_account(count, seed, members)
    per_tick = readiness.REQUESTS_PER_TICK
    longest = policy.MAX_POLL_DELAY
    if poll_share is not None:
        readiness.REQUESTS_PER_TICK = math.floor(poll_share * ACCOUNT_RATE * policy.POLL_WINDOW_SECONDS)
    readiness.REQUESTS_PER_TICK = min(readiness.REQUESTS_PER_TICK, math.floor(poll_rate * policy.POLL_WINDOW_SECONDS))
    if max_poll_delay is not None:
        policy.MAX_POLL_DELAY = max_poll_delay
    cap = readiness.REQUESTS_PER_TICK
    day = Day()
    with environment(account, limit=0) as (server, instance, defs, _):
        simulator = server.simulator
        answers = AnswerCounter()
        simulator.on_answer = answers
        clock = VirtualClock(simulator)
        readiness.clock = clock
        # The sensor's client unpaused (the clock is simulated); the tick's cap is unchanged.
        resource = ActiveCampaignResource(
            api_url=server.url, api_key=DEFAULT_TOKEN, requests_per_second=UNPAUSED, request_budget="memory"
        )
        resources = sensor_resources(defs, resource)
        real_poll = ActiveCampaignClient.poll_run
        tick_at = 0.0  # the simulated time of the tick in progress

        def poll(self: ActiveCampaignClient, segment_id: str, run_id: str, *, sort: str = "id") -> RunStatus:
            day.polls[run_id].append(tick_at)
            return real_poll(self, segment_id, run_id, sort=sort)

        ActiveCampaignClient.poll_run = poll  # type: ignore[method-assign]  # counts, then the real poll
        instance.add_dynamic_partitions("segments", [segment.id for segment in account.segments])
        starter = ActiveCampaignClient(server.url, DEFAULT_TOKEN, requests_per_second=UNPAUSED)
        began = clock()

        def on_place(step: Step, moment: float) -> None:
            if step.kind != "kickoff":
                return
            segment = account.segments[step.sent - 1]
            clock.set(began + moment)  # the run starts when its request gets its place
            run = starter.start_run(segment.id, sort="id")
            instance.report_runless_asset_event(
                pending_observation(DEFAULT_ACCOUNT, segment.id, run, "id", kickoff="day")
            )

        budget = Budget(ACCOUNT_RATE, pool, on_place, kickoff_share)
        kickoff = Step("kickoff", count, 0.0)
        budget.submit(kickoff)
        cursor: str | None = None
        now = 0.0
        wall_began = time.monotonic()
        try:
            for _ in range(max_ticks):
                clock.set(began + now)
                tick_at = now
                before = answers.count
                tick_began = time.monotonic()
                data = evaluate(instance, defs, resources, cursor)
                wall = time.monotonic() - tick_began
                sent = answers.count - before
                duration = wall + sent / poll_rate
                ended = now + duration  # when the daemon gets its run requests
                for event in data.asset_events:  # what the daemon does with a tick's events
                    instance.report_runless_asset_event(event)
                    day.restarts += 1
                for request in data.run_requests:
                    run_id = request.tags["matchall/run_id"]
                    if request.asset_check_keys:
                        day.checks += 1
                        budget.submit(Step("check", 1, ended, run_id))
                    else:
                        day.requested[run_id] = ended
                        size = sizes[str(request.partition_key)]
                        budget.submit(Step("read", read_requests(size), ended, run_id))
                cursor = data.cursor
                load, dump = cursor_costs(cursor, repeat=1)
                day.ticks.append(now)
                day.walls.append(wall)
                day.requests.append(sent)
                day.cursor_bytes.append(len(cursor or ""))
                day.cursor_load.append(load)
                day.cursor_dump.append(dump)
                day.durations.append(duration)
                idle = not data.run_requests and not data.asset_events and sent == 0
                if kickoff.ended is not None and idle and not ReadinessCursor.load(cursor, LOG).waiting:
                    budget.spend(now, math.inf, sent, poll_rate)  # the reads left, with no tick to wait for
                    break
                if len(day.ticks) % 100 == 0:
                    print(
                        f"tick {len(day.ticks)}: {now / 3600:.2f} h simulated, {kickoff.sent} started, "
                        f"{len(day.requested)} requested, {time.monotonic() - wall_began:.0f} s wall",
                        file=sys.stderr,
                        flush=True,
                    )
                interval = max(MIN_INTERVAL, duration)
                budget.spend(now, now + interval, sent, poll_rate)
                now += interval
        finally:
            ActiveCampaignClient.poll_run = real_poll  # type: ignore[method-assign]
            readiness.REQUESTS_PER_TICK = per_tick
            policy.MAX_POLL_DELAY = longest
            readiness.clock = time.time
            starter.close()
        runs = {run_id: (run, run.started_at - began, run.ready_at - began) for run_id, run in simulator.runs.items()}
    figures = summarize(day, budget, runs, count, sizes, cap)
    return {
        "members": members,
        "requests_per_tick_cap": cap,
        "max_poll_delay_s": max_poll_delay or policy.MAX_POLL_DELAY,
        "pool": pool,
        "poll_rate_per_s": poll_rate,
        "kickoff_share": "arrival order" if kickoff_share is None else kickoff_share,
        **figures,
        "benchmark_wall_s": round(time.monotonic() - wall_began, 1),
    }


def ticks_between(ticks: list[float], start: float, end: float) -> int:
    """Evaluations at or after `start` and before `end`: the ticks something waited through."""
    return sum(1 for moment in ticks if start <= moment < end)


def union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(spans):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


def overlap(spans: list[tuple[float, float]], others: list[tuple[float, float]]) -> float:
    """Seconds both sorted, disjoint lists of spans cover."""
    total, j = 0.0, 0
    for start, end in spans:
        while j < len(others) and others[j][1] <= start:
            j += 1
        k = j
        while k < len(others) and others[k][0] < end:
            total += max(0.0, min(end, others[k][1]) - max(start, others[k][0]))
            k += 1
    return total


def summarize(
    day: Day, budget: Budget, runs: dict[str, tuple[Any, float, float]], count: int, sizes: dict[str, int], cap: int
) -> dict[str, Any]:
    """The day's figures; every time is simulated seconds from the kick-off's launch."""
    steps = budget.steps
    kickoff = next(step for step in steps if step.kind == "kickoff")
    reads = {step.run_id: step for step in steps if step.kind == "read"}
    checks = [step for step in steps if step.kind == "check"]
    ok = {run_id: times for run_id, times in runs.items() if times[0].segment.behavior is Behavior.OK}
    waits, wait_ticks, lags = [], [], []
    for run_id, (_, _, ready_at) in ok.items():
        if run_id in day.requested:
            waits.append(day.requested[run_id] - ready_at)
            wait_ticks.append(ticks_between(day.ticks, ready_at, day.requested[run_id]))
            read = reads[run_id]
            if read.ended is not None:
                lags.append(read.ended - ready_at)
    # Each poll's wait: from when the run was due (its start, then the backoff after its previous
    # poll) to the poll, in ticks that passed it by.
    due_waits = []
    for run_id, moments in day.polls.items():
        started = runs[run_id][1] if run_id in runs else moments[0]
        due = started  # a new record is due at once
        for moment in moments:
            due_waits.append(ticks_between(day.ticks, due, moment))
            due = moment + policy.poll_delay(moment - started)
    polls = [len(moments) for moments in day.polls.values()]
    poll_requests = sum(day.requests)
    read_requests_total = sum(step.requests for step in reads.values())
    total = poll_requests + kickoff.requests + read_requests_total + len(checks)
    floor = total / budget.rate
    stored = [step.ended for step in reads.values() if step.ended is not None]
    end = max(stored, default=0.0)
    # Idle stretches (no request waiting) within the day, split by whether work existed: a run
    # turned ready and not yet stored (the sensor had not found it, or its read had not begun), or
    # a failed run not yet judged by its check. Only the rest is time the floor cannot use.
    idle = [(start, min(stop, end)) for start, stop in budget.idle if start < end]
    outstanding = [(ready_at, reads[run_id].ended or end) for run_id, (_, _, ready_at) in ok.items() if run_id in reads]
    outstanding += [(runs[step.run_id][2], step.ended or end) for step in checks if step.run_id in runs]
    outstanding += [(ready_at, end) for run_id, (_, _, ready_at) in ok.items() if run_id not in reads]
    idle_total = sum(stop - start for start, stop in idle)
    idle_with_work = overlap(idle, union(outstanding))
    idle_nothing = idle_total - idle_with_work
    busy = end - idle_nothing
    first_read = min((step.began for step in reads.values() if step.began is not None), default=None)
    reads_during_kickoff = sum(
        1 for step in reads.values() if step.began is not None and kickoff.ended and step.began < kickoff.ended
    )
    kickoff_places = max(1.0, (kickoff.ended or 0.0) * budget.rate)
    polls_during_kickoff = sum(
        sent for moment, sent in zip(day.ticks, day.requests, strict=True) if moment < (kickoff.ended or 0.0)
    )
    ticks = len(day.ticks)
    return {
        "runs": count,
        "members_total": sum(sizes.values()),
        "runs_requested": len(day.requested),
        "ok_runs_not_requested": sum(1 for run_id in ok if run_id not in day.requested),
        "reads_not_stored": sum(1 for step in reads.values() if step.ended is None),
        "check_runs_requested": day.checks,
        "fresh_runs_started_by_sensor": day.restarts,
        # (1) ready -> materialization requested
        "ready_to_request_s_max": round(max(waits, default=0.0), 1),
        "ready_to_request_s_p50": round(percentile(waits, 0.5), 1),
        "ready_to_request_s_p99": round(percentile(waits, 0.99), 1),
        "ready_to_request_ticks_max": max(wait_ticks, default=0),
        "ready_to_request_old_worst_s": OLD_WORST_WAIT,
        "ready_to_request_target_s": WAIT_TARGET,
        "ready_to_request_target_met": max(waits, default=0.0) <= WAIT_TARGET,
        # (2) reads beside the kick-off
        "kickoff_end_s": round(kickoff.ended or 0.0, 1),
        "last_ready_s": round(max((ready_at for _, _, ready_at in ok.values()), default=0.0), 1),
        "kickoff_starts_per_s": round(kickoff.requests / max(kickoff.ended or 0.0, 1e-9), 3),
        "first_read_s": round(first_read, 1) if first_read is not None else None,
        "reads_begun_during_kickoff": reads_during_kickoff,
        "poll_share_of_places_during_kickoff": round(polls_during_kickoff / kickoff_places, 3),
        # (3) requests and the day against the floor
        "requests_total": total,
        "requests_polls": poll_requests,
        "requests_kickoff": kickoff.requests,
        "requests_reads": read_requests_total,
        "requests_checks": len(checks),
        "day_s": round(end, 1),
        "floor_s": round(floor, 1),
        "day_over_floor": round(end / floor, 3) if floor else None,
        "idle_s": round(idle_total, 1),
        "idle_with_ready_work_s": round(idle_with_work, 1),
        "idle_nothing_to_do_s": round(idle_nothing, 1),
        "busy_s": round(busy, 1),
        "busy_over_floor": round(busy / floor, 3) if floor else None,
        "floor_target": FLOOR_TARGET,
        # (4) ready -> stored
        "ready_to_stored_s_p50": round(percentile(lags, 0.5), 1),
        "ready_to_stored_s_p99": round(percentile(lags, 0.99), 1),
        "ready_to_stored_s_max": round(max(lags, default=0.0), 1),
        # (5) polls
        "polls": sum(polls),
        "polls_per_run": round(sum(polls) / max(1, len(polls)), 3),
        "polls_per_run_p99": percentile([float(p) for p in polls], 0.99),
        "polls_per_run_max": max(polls, default=0),
        "requests_per_tick_max": max(day.requests, default=0),
        "ticks_at_cap": sum(1 for sent in day.requests if sent >= cap),
        "due_to_poll_ticks_max": max(due_waits, default=0),
        "ticks": ticks,
        "tick_wall_s_max": round(max(day.walls, default=0.0), 3),
        "tick_wall_s_p50": round(percentile(day.walls, 0.5), 3),
        "tick_duration_s_max": round(max(day.durations, default=0.0), 2),
        "tick_duration_s_p50": round(percentile(day.durations, 0.5), 2),
        "cursor_bytes_max": max(day.cursor_bytes, default=0),
        "cursor_bytes_p50": int(percentile([float(b) for b in day.cursor_bytes], 0.5)),
        "cursor_load_ms_max": round(1000 * max(day.cursor_load, default=0.0), 3),
        "cursor_dump_ms_max": round(1000 * max(day.cursor_dump, default=0.0), 3),
    }


# -- part 2: real ticks ---------------------------------------------------------------------------

# Another process of the deployment (a read, a kick-off) taking from the same budget, without pause.
_BULK = """
import sys
from matchall_dagster.api.budget import Priority, request_budget
from matchall_dagster.api.client import ActiveCampaignClient
url, key, store, rate = sys.argv[1:5]
budget = request_budget(store, url, float(rate), Priority.BULK)
with ActiveCampaignClient(url, key, requests_per_second=float(rate), budget=budget) as client:
    while True:
        client.get_segment("1")
"""


def real_ticks(count: int, seed: int, ticks: int, *, bulk: bool = True) -> dict[str, Any]:
    """`ticks` evaluations at the real rate with `count` runs pending, the server enforcing 5/s, the
    sensor's client and (with `bulk`) another process taking from one budget in a SQLite file."""
    account = SimAccount([SimSegment(str(i), f"S{i}", 3, ready_after=86_400.0) for i in range(1, count + 1)], seed=seed)
    walls: list[float] = []
    spans: list[tuple[float, float]] = []
    sent: list[int] = []
    with environment(account, limit=0) as (server, instance, defs, folder):
        instance.add_dynamic_partitions("segments", [segment.id for segment in account.segments])
        with ActiveCampaignClient(server.url, DEFAULT_TOKEN, requests_per_second=UNPAUSED) as fast:
            for segment in account.segments:  # set up without the limit: the runs are pending at once
                run = fast.start_run(segment.id)
                instance.report_runless_asset_event(
                    pending_observation(DEFAULT_ACCOUNT, segment.id, run, "id", kickoff="burst")
                )
        simulator = server.simulator
        simulator.config = SimulatorConfig(requests_per_second=ACCOUNT_RATE, ready_after=0.0)  # the account's limit
        simulator.advance_clock(policy.FIRST_POLL_DELAY)
        readiness.clock = lambda: time.time() + policy.FIRST_POLL_DELAY
        store = f"sqlite://{folder / 'budget.sqlite'}"
        resource = ActiveCampaignResource(api_url=server.url, api_key=DEFAULT_TOKEN, request_budget=store)
        resources = sensor_resources(defs, resource)
        answers = AnswerCounter(keep_times=True)
        simulator.on_answer = answers
        other = None
        if bulk:
            other = subprocess.Popen(  # noqa: S603  # our own interpreter and script
                [sys.executable, "-c", _BULK, server.url, DEFAULT_TOKEN, store, str(ACCOUNT_RATE)], cwd=REPO
            )
            time.sleep(3.0)  # its imports, then a few seconds alone in the budget
        simulator.reset_stats()
        cursor = None
        began = time.monotonic()
        try:
            for _ in range(ticks):
                before = answers.by_path[RESULT_SET]
                start = time.monotonic()
                data = evaluate(instance, defs, resources, cursor)
                end = time.monotonic()
                walls.append(end - start)
                spans.append((start, end))
                sent.append(answers.by_path[RESULT_SET] - before)
                cursor = data.cursor
            time.sleep(2.0 if bulk else 0.0)  # the other process alone again
        finally:
            readiness.clock = time.time
            if other is not None:
                other.terminate()
                other.wait(timeout=30)
        ended = time.monotonic()
        stats = simulator.stats()
        times = list(answers.times)

    def rate(path: str, start: float, end: float) -> float:
        return round(sum(1 for moment, kind, _ in times if kind == path and start <= moment < end) / (end - start), 2)

    between = [(spans[i][1], spans[i + 1][0]) for i in range(len(spans) - 1)] + [(spans[-1][1], ended)]
    return {
        "pending_runs": count,
        "ticks": ticks,
        "budget_store": "sqlite (a temporary file), shared with another process" if bulk else "sqlite",
        "tick_wall_s": [round(w, 2) for w in walls],
        "requests_per_tick": sent,
        "sensor_requests_per_s_in_tick": [rate(RESULT_SET, start, end) for start, end in spans],
        "other_process_requests_per_s_in_tick": [rate(AUDIENCE, start, end) for start, end in spans],
        "other_process_requests_per_s_outside_ticks": round(
            sum(
                1
                for moment, kind, _ in times
                if kind == AUDIENCE and began <= moment < ended and not any(s <= moment < e for s, e in spans)
            )
            / max(1e-9, sum(e - s for s, e in between) + (spans[0][0] - began)),
            2,
        ),
        "server_requests_per_s": round(stats["requests"] / max(1e-9, ended - began), 2),
        "max_requests_in_any_second": stats["max_requests_in_any_second"],
        "statuses": stats["by_status"],
        "cursor_bytes_after": len(cursor or ""),
    }


# -- part 3 ---------------------------------------------------------------------------------------


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


# -- the report -----------------------------------------------------------------------------------

MARKDOWN_ROWS = (
    ("ready → materialization requested, worst (s)", "ready_to_request_s_max"),
    ("ready → materialization requested, median (s)", "ready_to_request_s_p50"),
    ("ready → materialization requested, p99 (s)", "ready_to_request_s_p99"),
    ("kick-off ends (s)", "kickoff_end_s"),
    ("kick-off starts a second", "kickoff_starts_per_s"),
    ("first read begins (s)", "first_read_s"),
    ("reads begun before the kick-off ended", "reads_begun_during_kickoff"),
    ("polls' share of the places during the kick-off", "poll_share_of_places_during_kickoff"),
    ("last run turns ready (s)", "last_ready_s"),
    ("requests: total", "requests_total"),
    ("requests: polls / starts / reads / checks", None),
    ("day, to the last read stored (s)", "day_s"),
    ("floor, requests ÷ 5/s (s)", "floor_s"),
    ("day ÷ floor (target ≤ 1.15)", "day_over_floor"),
    ("idle (s): nothing to do / a ready run not yet found", None),
    ("day less idle with nothing to do, ÷ floor", "busy_over_floor"),
    ("ready → stored, median (s)", "ready_to_stored_s_p50"),
    ("ready → stored, p99 (s)", "ready_to_stored_s_p99"),
    ("ready → stored, worst (s)", "ready_to_stored_s_max"),
    ("polls per run (p99, max)", None),
    ("ticks (at the request cap)", None),
    ("tick duration, median / max (s)", None),
    ("benchmark wall time (s)", "benchmark_wall_s"),
)


def label(day: dict[str, Any]) -> str:
    """A day's column heading: what it changes from the project's policy and the brief's model."""
    changes = []
    if day.get("kickoff_share", "arrival order") != "arrival order":
        changes.append(f"kick-off takes {day['kickoff_share']:.0%} of contended BULK")
    if day["requests_per_tick_cap"] != readiness.REQUESTS_PER_TICK:
        changes.append(f"cap {day['requests_per_tick_cap']}/tick")
    if day["max_poll_delay_s"] != policy.MAX_POLL_DELAY:
        changes.append(f"max poll delay {day['max_poll_delay_s']:.0f} s")
    if day.get("poll_rate_per_s", ACCOUNT_RATE) != ACCOUNT_RATE:
        changes.append(f"polls at {day['poll_rate_per_s']}/s")
    if day["pool"] != POOL_LIMIT:
        changes.append(f"pool {day['pool']}")
    return "; ".join(changes) or "as built (arrival order)"


def cell(day: dict[str, Any], name: str, key: str | None) -> str:
    if key is not None:
        value = day.get(key)
        return f"{value:,}" if isinstance(value, int | float) and not isinstance(value, bool) else str(value)
    if name.startswith("requests: polls"):
        return " / ".join(
            f"{day[k]:,}" for k in ("requests_polls", "requests_kickoff", "requests_reads", "requests_checks")
        )
    if name.startswith("idle"):
        return f"{day['idle_nothing_to_do_s']:,} / {day['idle_with_ready_work_s']:,}"
    if name.startswith("polls per run"):
        return f"{day['polls_per_run']} ({day['polls_per_run_p99']:.0f}, {day['polls_per_run_max']})"
    if name.startswith("ticks"):
        return f"{day['ticks']:,} ({day['ticks_at_cap']:,})"
    return f"{day['tick_duration_s_p50']} / {day['tick_duration_s_max']}"


def markdown(report: dict[str, Any]) -> str:
    lines = []
    day = report.get("simulated_day")
    if day:
        days = [day, *report.get("variants", [])]
        lines += [
            f"Simulated day (`python -m benchmarks.sensor_scale`): {day['runs']:,} segments ({day['members']} "
            f"sizes, {day['members_total']:,} members), one budget of 5/s, polls first (at most "
            f"{day['requests_per_tick_cap']} a tick), a pool of {day['pool']} API steps. The old fixed split "
            f"(sensors 1/s, runs 4/s): worst ready → requested 8,958 s.",
            "",
            *([f"Command: `{report['command']}`", ""] if report.get("command") else []),
            *(
                [
                    "Variant columns, each a run of its own: "
                    + "; ".join(f"`{c}`" for c in report["variant_commands"]),
                    "",
                ]
                if report.get("variant_commands")
                else []
            ),
            "| figure | " + " | ".join(label(d) for d in days) + " |",
            "|---|" + "---|" * len(days),
        ]
        lines += [f"| {name} | " + " | ".join(cell(d, name, key) for d in days) + " |" for name, key in MARKDOWN_ROWS]
    real = report.get("real_ticks")
    if real:
        lines += [
            "",
            f"Real ticks ({real['pending_runs']:,} runs pending, the simulator enforcing 5/s, the budget in a SQLite "
            f"file shared with another process reading at BULK without pause):",
            "",
            "| tick | sensor requests | wall s | sensor /s | other process /s |",
            "|---|---|---|---|---|",
        ]
        for i, requests in enumerate(real["requests_per_tick"]):
            lines.append(
                f"| {i + 1} | {requests} | {real['tick_wall_s'][i]} | {real['sensor_requests_per_s_in_tick'][i]} | "
                f"{real['other_process_requests_per_s_in_tick'][i]} |"
            )
        lines += [
            "",
            f"The other process between ticks: {real['other_process_requests_per_s_outside_ticks']}/s. The server: "
            f"{real['server_requests_per_s']}/s overall, at most {real['max_requests_in_any_second']} in any second, "
            f"statuses {real['statuses']}.",
        ]
    kickoffs = report.get("kickoff_scale", [])
    if kickoffs:
        lines += [
            "",
            "Kick-off (`python -m benchmarks.kickoff_scale`: the real job taking from the budget in a SQLite file, "
            "killed half-way, re-executed from failure):",
            "",
            "| options | limit /s | before kill /s | after resume /s | max in any second | statuses | "
            "started twice | never started |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| `--segments {k['segments']} --speedup {k['account_limit_per_s'] / ACCOUNT_RATE:g}` | "
            f"{k['account_limit_per_s']:g} | {k['rate_before_kill_per_s']} | "
            f"{k['rate_after_resume_per_s']} | {k['max_requests_in_any_second']} | {k['statuses']} | "
            f"{k['segments_started_twice']} | {k['segments_never_started']} |"
            for k in kickoffs
        ]
    worst = report.get("cursor_worst_case")
    if worst:
        lines += [
            "",
            f"Cursor, {worst['waiting_runs']:,} runs waiting: {worst['cursor_bytes']:,} bytes, "
            f"load {worst['load_ms']} ms, dump {worst['dump_ms']} ms.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=20261128)
    parser.add_argument("--max-ticks", type=int, default=10_000)
    parser.add_argument("--members", choices=("mixed", "small"), default="mixed", help="segment sizes (part 1)")
    parser.add_argument("--poll-share", type=float, help="part 1 with another POLL_SHARE (the tick's request cap)")
    parser.add_argument("--max-poll-delay", type=float, help="part 1 with another MAX_POLL_DELAY (s)")
    parser.add_argument("--pool", type=int, default=POOL_LIMIT, help="API steps at once (part 1)")
    parser.add_argument(
        "--poll-rate", type=float, default=ACCOUNT_RATE, help="part 1: the polls' rate while BULK waits (requests/s)"
    )
    parser.add_argument(
        "--kickoff-share", type=float, help="part 1: the kick-off's share of contended BULK places (a variant)"
    )
    parser.add_argument("--real-ticks", type=int, default=3, help="ticks at the real rate (part 2); 0 skips it")
    parser.add_argument("--no-bulk", action="store_true", help="part 2 without the other process")
    parser.add_argument("--skip-day", action="store_true", help="skip part 1")
    parser.add_argument("--quick", action="store_true", help="1,000 segments, 1 real tick")
    parser.add_argument("--json", action="store_true", help="one JSON line instead of the report")
    parser.add_argument("--out", help="also save benchmarks/results/OUT.json and OUT.md")
    parser.add_argument(
        "--compare", action="append", default=[], help="another run's --json output: its day as a column of OUT.md"
    )
    parser.add_argument(
        "--kickoff-results", action="append", default=[], help="a `kickoff_scale --json` output to include in OUT"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.segments, args.real_ticks = min(args.segments, 1_000), min(args.real_ticks, 1)
    logging.disable(logging.WARNING)  # the sensor's per-run log lines; the report is the output
    report: dict[str, Any] = {
        "budget": {
            "account_requests_per_second": ACCOUNT_RATE,
            "poll_share": policy.POLL_SHARE,
            "requests_per_tick": readiness.REQUESTS_PER_TICK,
            "poll_window_s": policy.POLL_WINDOW_SECONDS,
            "tick_deadline_s": policy.TICK_DEADLINE_SECONDS,
            "max_poll_delay_s": policy.MAX_POLL_DELAY,
        }
    }
    report["command"] = " ".join(["python -m benchmarks.sensor_scale", *(argv if argv is not None else sys.argv[1:])])
    began = time.monotonic()
    if not args.skip_day:
        report["simulated_day"] = simulated_day(
            args.segments,
            args.seed,
            args.max_ticks,
            members=args.members,
            poll_share=args.poll_share,
            max_poll_delay=args.max_poll_delay,
            pool=args.pool,
            poll_rate=args.poll_rate,
            kickoff_share=args.kickoff_share,
        )
    if args.real_ticks:
        report["real_ticks"] = real_ticks(args.segments, args.seed, args.real_ticks, bulk=not args.no_bulk)
    report["cursor_worst_case"] = cursor_worst_case(args.segments, args.seed)
    report["benchmark_wall_s"] = round(time.monotonic() - began, 1)
    others = [json.loads(Path(path).read_text()) for path in args.compare]
    if others:
        report["variants"] = [other["simulated_day"] for other in others if "simulated_day" in other]
    if args.kickoff_results:
        report["kickoff_scale"] = [json.loads(Path(path).read_text()) for path in args.kickoff_results]
    if args.out:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / f"{args.out}.md").write_text(markdown(report))
    if args.json:
        print(json.dumps(report))
        return
    for part, figures in report.items():
        if isinstance(figures, dict):
            print(f"{part}:")
            for name, value in figures.items():
                print(f"  {name:40} {value}")
        else:
            print(f"{part}: {figures}")


if __name__ == "__main__":
    main()
