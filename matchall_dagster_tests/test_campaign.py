"""A seeded fault-injection campaign: does `segment_matches` ever store a wrong list?

Each scenario materializes one partition through the real Dagster definitions (`materialize_segment`,
the asset and its three checks, the IO manager on a DuckDB store) against a simulator that injects a seeded
random mix of faults: 429 bursts with and without Retry-After, 5xx, connection resets, read
time-outs, truncated and non-JSON bodies, slow answers, runs re-kicked mid-read, page totals that
drift, ids duplicated across pages, short pages, failed runs and runs that expire (before or during
the read). Every partition was materialized well before, so each scenario ends in one of:

- exact: the partition's rows are the simulator's ground truth in position order, all three checks
  passed, and every other partition is untouched;
- failed-cleanly: the run failed with a `dg.Failure` whose description names a cause that the
  scenario really injected, and every partition (this one too) holds exactly its previous rows;
- wrong: anything else. The campaign asserts there are none.

Then a run writing a million rows is SIGKILLed at seeded random moments (some inside the write
transaction): the partition must hold exactly the old or exactly the new rows, and the DuckDB file
must open, replay its log and checkpoint.

The short campaign runs by default; the long one (`-m campaign`) at least 500 scenarios and several
kills, in two worker processes (one simulator, one Dagster instance and one DuckDB file each, reused
across their scenarios). The seed is printed; MATCHALL_CAMPAIGN_SEED replays another. The
scenarios, their faults and the simulator's fault draws follow the seed; what time decides (which
concurrent page meets a fault first, when a run expires mid-read) may differ from one replay to the
next, but every outcome must be exact or failed-cleanly.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import random
import re
import signal
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import numpy as np
import numpy.typing as npt
import pytest

from matchall_dagster import ActiveCampaignClient, ActiveCampaignResource
from matchall_dagster.definitions import build_definitions
from matchall_dagster.orchestration.names import MATCHES_COMPLETE, RUN_NOT_EXPIRED, RUN_NOT_FAILED
from matchall_dagster.simulator import (
    DEFAULT_TOKEN,
    Behavior,
    Faults,
    SimAccount,
    SimSegment,
    Simulator,
    SimulatorConfig,
    SimulatorServer,
)
from matchall_dagster.simulator.app import SimRun
from matchall_dagster.storage.duckdb_store import DuckDBStore
from matchall_dagster_tests.conftest import ServeSimulator, materialize_segment

SEED_VARIABLE = "MATCHALL_CAMPAIGN_SEED"
DEFAULT_SEED = 20_261_127
SHORT_SCENARIOS = 36
LONG_SCENARIOS = 520
LONG_KILLS = 6
WORKERS = 2
DAY = 86_400.0
CHECKS = (RUN_NOT_FAILED, RUN_NOT_EXPIRED, MATCHES_COMPLETE)

# Segments of every size class, many of them at page boundaries of the page sizes below.
SEGMENTS: tuple[tuple[str, int], ...] = (
    ("600", 0),
    ("601", 1),
    ("602", 999),
    ("603", 1_000),
    ("604", 1_001),
    ("605", 2_001),
    ("606", 2_500),
    ("607", 4_999),
    ("608", 5_000),
    ("609", 5_001),
    ("610", 12_345),
    ("611", 20_000),
    ("612", 30_000),
    ("0c1e2a7b-campaign-4f6d-9a51-7777", 7_777),
)
SORTS = ("id", "-id", "email", "-phone", "last_name,-first_name", "score2", "-field9,cdate")
PAGE_SIZES = (1_000, 2_000, 2_500, 5_000)
REQUEST_TIMEOUT = 0.3  # seconds: the client's; "timeout" faults answer after TIMEOUT_SLOW_MS
TIMEOUT_SLOW_MS = 450.0
EXPIRY_WINDOW = 0.3  # seconds: runs that expire, or a clock that jumps, within this of the start
KINDS = (
    "burst_429",
    "http_5xx",
    "reset",
    "timeout",
    "slow",
    "truncated",
    "non_json",
    "rekick",
    "total_drift",
    "duplicate",
    "short_page",
)
# ok: the run becomes ready. fail: the segment's runs fail. expire: its runs are forgotten within
# EXPIRY_WINDOW of their start. gone: an existing run is read after the clock passed its 90 days.
# clock_jump: the simulator's clock jumps 91 days within EXPIRY_WINDOW of the materialization's start.
FATES = ("ok", "fail", "expire", "gone", "clock_jump")
FATE_WEIGHTS = (80, 6, 5, 4, 5)
FATE_CAUSES = {"ok": "", "fail": "run_failed", "expire": "run_gone", "gone": "run_gone", "clock_jump": "run_gone"}

# What a failure's description may say, and which injected causes would explain it.
EXPLANATIONS: tuple[tuple[re.Pattern[str], frozenset[str]], ...] = (
    (re.compile(r"failed: it ended at .* without becoming ready"), frozenset({"run_failed"})),
    (re.compile(r"is gone \(404"), frozenset({"run_gone"})),
    (re.compile(r"answered 429 "), frozenset({"burst_429"})),
    (re.compile(r"answered 50[0234] "), frozenset({"http_5xx"})),
    (re.compile(r"failed on the network"), frozenset({"reset"})),
    (re.compile(r"timed out after"), frozenset({"timeout"})),
    (re.compile(r"not what the contract promises"), frozenset({"truncated", "non_json"})),
    (re.compile(r"disagrees with the first page"), frozenset({"total_drift"})),
    (re.compile(r"holds \d+ ids where \d+ were due"), frozenset({"short_page", "total_drift"})),
    (re.compile(r"more than once across its pages"), frozenset({"duplicate"})),
    (re.compile(r"reads as not ready: the run was started again"), frozenset({"rekick"})),
)
# A known client bug (see test_a_first_page_that_alone_tells_a_smaller_total_is_not_believed):
# a first page whose total drifted down to a whole number of pages is believed.

Ids = npt.NDArray[np.int64]


def campaign_seed() -> int:
    return int(os.environ.get(SEED_VARIABLE, DEFAULT_SEED))


# -- scenarios ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    index: int
    seed: int
    segment_id: str
    size: int
    sort: str
    page_size: int
    max_concurrent_requests: int
    max_retries: int
    max_restarts: int
    fate: str
    existing_run: bool
    moment: float  # seconds: when the run expires (expire) or the clock jumps (clock_jump)
    kinds: tuple[str, ...]
    faults: Faults

    @property
    def causes(self) -> frozenset[str]:
        return frozenset(self.kinds) | ({FATE_CAUSES[self.fate]} - {""})

    def describe(self) -> str:
        defaults = asdict(Faults())
        faults = {name: value for name, value in asdict(self.faults).items() if value != defaults[name]}
        return (
            f"#{self.index} segment {self.segment_id} ({self.size:,}) sort {self.sort!r} page_size {self.page_size} "
            f"concurrency {self.max_concurrent_requests} retries {self.max_retries} restarts {self.max_restarts} "
            f"fate {self.fate}{f' at {self.moment:.3f} s' if self.fate in ('expire', 'clock_jump') else ''}"
            f"{' (existing run)' if self.existing_run else ''} kinds {list(self.kinds)} faults {faults}"
        )


def _rate(rng: random.Random, heavy: bool, low: float = 0.01, high: float = 0.3) -> float:
    if heavy:
        return round(rng.uniform(0.5, 1.0), 3)
    return round(rng.uniform(low, high), 3)


def make_scenario(seed: int, index: int) -> Scenario:
    """Scenario `index` of the campaign of `seed`: the same pair always gives the same scenario."""
    rng = random.Random(f"matchall-campaign/{seed}/{index}")  # reproducible, not secret
    segment_id, size = rng.choice(SEGMENTS)
    kinds = sorted(rng.sample(KINDS, rng.choices((0, 1, 2, 3, 4), weights=(1, 4, 4, 3, 2))[0]))
    if "timeout" in kinds and "slow" in kinds:  # both are slow answers; one delay per scenario
        kinds.remove(rng.choice(("timeout", "slow")))
    heavy = rng.choice(kinds) if kinds and rng.random() < 0.12 else None  # a fault that rarely lets go
    settings: dict[str, Any] = {}
    for kind in kinds:
        strong = kind == heavy
        if kind == "burst_429":
            settings.update(
                burst_429_rate=_rate(rng, strong, high=0.15),
                burst_429_length=rng.randint(1, 4),
                burst_429_retry_after=rng.random() < 0.5,
                burst_429_retry_after_seconds=1 if rng.random() < 0.08 else 0,
            )
        elif kind == "http_5xx":
            settings["error_rate"] = _rate(rng, strong)
        elif kind == "reset":
            settings["reset_rate"] = _rate(rng, strong, high=0.2)
        elif kind == "timeout":
            settings.update(slow_rate=_rate(rng, strong, high=0.12), slow_ms=TIMEOUT_SLOW_MS)
        elif kind == "slow":
            settings.update(slow_rate=_rate(rng, strong, high=0.5), slow_ms=round(rng.uniform(5, 60), 1))
            if rng.random() < 0.3:
                settings.update(latency_ms=round(rng.uniform(0, 3), 2), latency_jitter_ms=round(rng.uniform(0, 5), 2))
        elif kind == "truncated":
            settings["truncate_rate"] = _rate(rng, strong, high=0.2)
        elif kind == "non_json":
            settings["non_json_rate"] = _rate(rng, strong, high=0.2)
        elif kind == "rekick":
            settings.update(rekick_rate=_rate(rng, strong, 0.005, 0.08), rekick_ms=30.0 if rng.random() < 0.2 else 0.0)
        else:  # total_drift, duplicate, short_page: faults of a page's data
            settings[f"{kind}_rate"] = _rate(rng, strong, 0.005, 0.12)
    fate = rng.choices(FATES, weights=FATE_WEIGHTS)[0]
    return Scenario(
        index=index,
        seed=rng.getrandbits(63),
        segment_id=segment_id,
        size=size,
        sort=rng.choice(SORTS),
        page_size=rng.choice(PAGE_SIZES),
        max_concurrent_requests=rng.choice((1, 2, 4, 8)),
        max_retries=rng.randint(2, 5),
        max_restarts=rng.randint(0, 3),
        fate=fate,
        existing_run=fate == "gone" or (fate != "clock_jump" and rng.random() < 0.2),
        moment=round(rng.uniform(0, EXPIRY_WINDOW), 4),
        kinds=tuple(kinds),
        faults=Faults(**settings),
    )


# -- playing scenarios --------------------------------------------------------------------------


@dataclass
class Outcome:
    index: int
    verdict: str  # exact, failed-cleanly or wrong
    detail: str
    scenario: str
    injected: dict[str, int]
    requests: int
    seconds: float


@dataclass
class WorkerReport:
    worker: int
    outcomes: list[Outcome] = field(default_factory=list)
    injected: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    log: str = ""


def read_partitions(database: Path) -> dict[str, tuple[Ids, Ids]]:
    """Every partition's (positions, contact ids), in position order, straight from the file."""
    connection = duckdb.connect(str(database))
    try:
        segment_ids = [
            row[0] for row in connection.execute("select distinct segment_id from segment_matches").fetchall()
        ]
        partitions = {}
        for segment_id in segment_ids:
            arrays = connection.execute(
                "select position, contact_id from segment_matches where segment_id = ? order by position", [segment_id]
            ).fetchnumpy()
            partitions[segment_id] = (np.asarray(arrays["position"]), np.asarray(arrays["contact_id"]))
    finally:
        connection.close()
    return partitions


def differences(stored: Mapping[str, tuple[Ids, Ids]], expected: Mapping[str, Ids]) -> list[str]:
    """What differs between the stored partitions and the expected lists (an empty one has no rows)."""
    problems = []
    for segment_id in sorted(set(stored) | set(expected)):
        if segment_id not in expected:
            problems.append(f"partition {segment_id} should not exist")
            continue
        due = expected[segment_id]
        positions, contact_ids = stored.get(segment_id, (np.empty(0, np.int64), np.empty(0, np.int64)))
        if not np.array_equal(positions, np.arange(1, positions.size + 1)):
            problems.append(f"partition {segment_id}: positions are not 1..{positions.size}")
        if not np.array_equal(contact_ids, due):
            problems.append(f"partition {segment_id}: {contact_ids.size:,} rows differ from the {due.size:,} due")
    return problems


def explain(description: str, causes: frozenset[str]) -> str | None:
    """Why a failure's description is not a clean one, or None when it names injected causes only."""
    named = [why for pattern, why in EXPLANATIONS if pattern.search(description)]
    if not named:
        return "the failure names no cause the campaign knows"
    for why in named:
        if not why & causes:
            return f"the failure blames {'/'.join(sorted(why))}, which this scenario did not inject"
    return None


def failure_of(result: dg.ExecuteInProcessResult) -> tuple[bool, str]:
    """(whether the step failed with a dg.Failure, its description or the error's message)."""
    failures = [event for event in result.all_events if event.is_step_failure]
    if len(failures) != 1:
        return False, f"{len(failures)} step failures"
    data = failures[0].step_failure_data
    if data.user_failure_data is None:
        error = data.error
        return False, f"not a dg.Failure: {error.cls_name if error else '?'}: {error.message if error else '?'}"
    return True, str(data.user_failure_data.description or "")


class Campaign:
    """One simulator, one Dagster instance and one DuckDB file, shared by a run of scenarios."""

    def __init__(self, seed: int, server: SimulatorServer, instance: dg.DagsterInstance, database: Path) -> None:
        self.seed = seed
        self.server = server
        self.simulator = server.simulator
        self.instance = instance
        self.database = database
        self.defs = build_definitions(store=f"duckdb://{database}")
        self.expected: dict[str, Ids] = {}

    def resources(self, scenario: Scenario | None) -> dict[str, Any]:
        activecampaign = ActiveCampaignResource(
            api_url=self.server.url,
            api_key=DEFAULT_TOKEN,
            request_timeout=REQUEST_TIMEOUT,
            max_retries=scenario.max_retries if scenario else 3,
            retry_backoff=0.001,
            requests_per_second=1000,
            page_size=scenario.page_size if scenario else 5_000,
            max_concurrent_requests=scenario.max_concurrent_requests if scenario else 4,
        )
        return {**(self.defs.resources or {}), "activecampaign": activecampaign}

    def truth(self, segment_id: str, sort: str) -> Ids:
        return self.simulator.account.ordered(segment_id, sort)

    def materialize_all(self) -> None:
        """The previous good materialization of every partition, without faults."""
        self.simulator.set_faults(Faults())
        for segment_id, _ in SEGMENTS:
            result = materialize_segment(self.defs, self.instance, segment_id, resources=self.resources(None))
            assert result.success
            self.expected[segment_id] = self.truth(segment_id, "id")
        problems = differences(read_partitions(self.database), self.expected)
        assert not problems, problems

    @contextmanager
    def fate(self, scenario: Scenario) -> Iterator[dict[str, Any]]:
        """Set up the scenario's run fate; yields the asset's run config."""
        simulator = self.simulator
        account = simulator.account
        segments = account.segments
        config: dict[str, Any] = {"sort": scenario.sort, "max_restarts": scenario.max_restarts}
        config["wait_timeout_seconds"] = 60.0  # a safety net: nothing here should wait that long
        if scenario.fate == "fail":
            account.segments = [
                replace(s, behavior=Behavior.FAIL) if s.id == scenario.segment_id else s for s in segments
            ]
        elif scenario.fate == "expire":
            account.segments = [
                replace(s, behavior=Behavior.EXPIRE, expire_after=scenario.moment) if s.id == scenario.segment_id else s
                for s in segments
            ]
        if scenario.existing_run:
            with ActiveCampaignClient(self.server.url, DEFAULT_TOKEN, requests_per_second=1000) as client:
                config["run_id"] = client.start_run(scenario.segment_id, sort=scenario.sort).run_id
        if scenario.fate == "gone":
            simulator.advance_clock(91 * DAY)
        timer = threading.Timer(scenario.moment, simulator.advance_clock, [91 * DAY])
        try:
            simulator.reset_stats()
            simulator.set_faults(scenario.faults)
            if scenario.fate == "clock_jump":
                timer.start()
            yield config
        finally:
            timer.cancel()
            simulator.set_faults(Faults())
            account.segments = segments

    def play(self, scenario: Scenario) -> Outcome:
        began = time.perf_counter()
        self.simulator.set_faults(Faults())
        self.simulator.reseed(scenario.seed)
        with self.fate(scenario) as config:
            result = materialize_segment(
                self.defs,
                self.instance,
                scenario.segment_id,
                config,
                resources=self.resources(scenario),
                raise_on_error=False,
            )
        if "timeout" in scenario.kinds:
            time.sleep((TIMEOUT_SLOW_MS / 1000 - REQUEST_TIMEOUT) + 0.05)  # the abandoned answers finish
        stats = self.simulator.stats()
        verdict, detail = self.judge(scenario, result)
        return Outcome(
            scenario.index,
            verdict,
            detail,
            scenario.describe(),
            dict(stats["faults_injected"]),
            stats["requests"],
            time.perf_counter() - began,
        )

    def judge(self, scenario: Scenario, result: dg.ExecuteInProcessResult) -> tuple[str, str]:
        stored = read_partitions(self.database)
        segment_id = scenario.segment_id
        if result.success:
            truth = self.truth(segment_id, scenario.sort)
            expected = {**self.expected, segment_id: truth}
            problems = differences(stored, expected)
            checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
            if checks != dict.fromkeys(CHECKS, True):
                problems.append(f"checks {checks}")
            (materialization,) = result.asset_materializations_for_node("segment_matches")
            if materialization.metadata["dagster/row_count"].value != truth.size:
                problems.append(f"row_count {materialization.metadata['dagster/row_count'].value} != {truth.size}")
            if not problems:
                self.expected = expected
                return "exact", ""
            detail = "succeeded with wrong rows: "
        else:
            clean, description = failure_of(result)
            problems = differences(stored, self.expected)
            if not clean:
                problems.insert(0, description)
            elif (why := explain(description, scenario.causes)) is not None:
                problems.insert(0, f"{why}: {description!r}")
            if not problems:
                return "failed-cleanly", description
            detail = "failed badly: "
        # Go on from what is stored, so that one wrong scenario does not make the next ones wrong.
        self.expected = {sid: contact_ids for sid, (_, contact_ids) in stored.items()} | {
            sid: np.empty(0, np.int64) for sid in self.expected if sid not in stored
        }
        return "wrong", detail + "; ".join(problems)


def _warnings_as_in_pyproject() -> None:
    """A worker process is no pytest session: apply pyproject's filterwarnings to it by hand."""
    warnings.simplefilter("error")
    warnings.filterwarnings("ignore", "Specifying a partitions_def on an", dg.PreviewWarning)
    warnings.filterwarnings("ignore", "Parameter `owners` of initializer `SensorDefinition.__init__`", dg.BetaWarning)


def _log_to(path: Path) -> None:
    """Send this process's stdout and stderr (Dagster's console log) to a file."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    os.close(descriptor)


def campaign_account(seed: int) -> SimAccount:
    return SimAccount([SimSegment(sid, f"Campaign segment of {size:,}", size) for sid, size in SEGMENTS], seed=seed)


def run_scenarios(seed: int, indices: Sequence[int], workdir: str, worker: int) -> WorkerReport:
    """A worker: a simulator, an ephemeral Dagster instance and a DuckDB file of its own."""
    log = Path(workdir) / f"campaign-worker-{worker}.log"
    _log_to(log)
    _warnings_as_in_pyproject()
    report = WorkerReport(worker=worker, log=str(log))
    simulator = Simulator(campaign_account(seed), SimulatorConfig(requests_per_second=0, ready_after=0, seed=seed))
    with SimulatorServer(simulator) as server, dg.DagsterInstance.ephemeral() as instance:
        campaign = Campaign(seed, server, instance, Path(workdir) / f"campaign-{worker}.duckdb")
        campaign.materialize_all()
        for index in indices:
            outcome = campaign.play(make_scenario(seed, index))
            report.outcomes.append(outcome)
            report.injected.update(outcome.injected)
            report.requests += outcome.requests
            print(f"{outcome.verdict:15} {outcome.seconds:6.2f} s  {outcome.scenario}  {outcome.detail}", flush=True)
    return report


def run_campaign(seed: int, scenarios: int, workdir: Path) -> list[WorkerReport]:
    """The scenarios 0..n-1 of the campaign of `seed`, dealt round-robin to WORKERS processes."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=WORKERS, mp_context=context) as pool:
        futures = [
            pool.submit(run_scenarios, seed, range(worker, scenarios, WORKERS), str(workdir), worker)
            for worker in range(WORKERS)
        ]
        return [future.result() for future in futures]


def summarize(seed: int, reports: Sequence[WorkerReport], seconds: float) -> dict[str, int]:
    outcomes = sorted((o for report in reports for o in report.outcomes), key=lambda o: o.index)
    verdicts = Counter(outcome.verdict for outcome in outcomes)
    injected: Counter[str] = Counter()
    for report in reports:
        injected.update(report.injected)
    causes = Counter(
        next((pattern.pattern for pattern, _ in EXPLANATIONS if pattern.search(o.detail)), "?")
        for o in outcomes
        if o.verdict == "failed-cleanly"
    )
    print(f"\nCampaign seed {seed} ({SEED_VARIABLE}): {len(outcomes)} scenarios in {seconds:.1f} s")
    print("  faults injected by kind: " + ", ".join(f"{kind} {count}" for kind, count in sorted(injected.items())))
    print(f"  faults injected in all: {sum(injected.values())}, requests: {sum(r.requests for r in reports)}")
    print(f"  exact: {verdicts['exact']}, failed-cleanly: {verdicts['failed-cleanly']}, wrong: {verdicts['wrong']}")
    print("  clean failures by cause: " + ", ".join(f"{cause!r} {n}" for cause, n in causes.most_common()))
    slowest = max(outcomes, key=lambda o: o.seconds)
    print(f"  slowest scenario: {slowest.seconds:.2f} s ({slowest.scenario})")
    for outcome in outcomes:
        if outcome.verdict == "wrong":
            print(f"  WRONG {outcome.scenario}\n    {outcome.detail}\n    injected {outcome.injected}")
    print("  worker logs: " + ", ".join(report.log for report in reports))
    return {"scenarios": len(outcomes), **verdicts, "faults": sum(injected.values())}


def assert_no_wrong(reports: Sequence[WorkerReport]) -> None:
    wrong = [o for report in reports for o in report.outcomes if o.verdict == "wrong"]
    assert not wrong, f"{len(wrong)} scenario(s) ended wrong: " + "; ".join(f"{o.scenario}: {o.detail}" for o in wrong)


# -- killing a run mid-write --------------------------------------------------------------------

BIG = "1000000"
NEIGHBOUR = "5000"
KILL_SORTS = ("id", "-email")
KILL_MODES = ("mid-write", "anytime", "around-commit")


def kill_account(seed: int) -> SimAccount:
    return SimAccount([SimSegment(BIG, "A million", 1_000_000), SimSegment(NEIGHBOUR, "Neighbour", 5_000)], seed=seed)


def _materialize_in_child(
    url: str,
    database: str,
    targets: Sequence[tuple[str, str]],
    started: Any,
    writing: Any,
    written: Any,
    log: str,
) -> None:
    """A Dagster run in a process of its own (to be SIGKILLed): materialize each (segment, sort).

    `started` is set just before the last target's materialization, `writing` once its write
    transaction has begun (DuckDB's BEGIN done) and `written` once it is committed and closed.
    """
    _log_to(Path(log))
    _warnings_as_in_pyproject()
    replace_partition = DuckDBStore.replace_partition
    transaction = DuckDBStore.transaction
    writes = 0

    @contextmanager
    def observed_transaction(store: DuckDBStore) -> Iterator[Any]:
        with transaction(store) as connection:
            writing.set()
            yield connection
        written.set()  # committed, and the connection closed

    def observed_replace_partition(store: DuckDBStore, segment_id: str, frame: Any) -> None:
        nonlocal writes
        writes += 1  # the partitions written, one per materialization (the checks only read)
        if writes == len(targets):
            store.transaction = functools.partial(observed_transaction, store)  # type: ignore[method-assign]
        replace_partition(store, segment_id, frame)

    DuckDBStore.replace_partition = observed_replace_partition  # type: ignore[method-assign,assignment]
    defs = build_definitions(store=f"duckdb://{database}")
    activecampaign = ActiveCampaignResource(api_url=url, api_key=DEFAULT_TOKEN, requests_per_second=1000)
    resources = {**(defs.resources or {}), "activecampaign": activecampaign}
    with dg.DagsterInstance.ephemeral() as instance:
        for number, (segment_id, sort) in enumerate(targets):
            if number == len(targets) - 1:
                started.set()
            materialize_segment(defs, instance, segment_id, {"sort": sort}, resources=resources)


@dataclass
class KillOutcome:
    attempt: int
    mode: str
    delay: float
    killed: bool
    moment: str  # where the kill landed: before the write, inside it, after it, or no kill
    rows: str  # old, new


class KillCampaign:
    def __init__(self, seed: int, server: SimulatorServer, workdir: Path) -> None:
        self.seed = seed
        self.server = server
        self.workdir = workdir
        self.database = workdir / "kill.duckdb"
        self.context = multiprocessing.get_context("spawn")
        self.stored_sort = ""
        self.run_seconds = 0.0
        self.write_seconds = 0.0

    def child(self, targets: Sequence[tuple[str, str]], attempt: int) -> tuple[Any, Any, Any, Any]:
        started, writing, written = self.context.Event(), self.context.Event(), self.context.Event()
        process = self.context.Process(
            target=_materialize_in_child,
            args=(
                self.server.url,
                str(self.database),
                list(targets),
                started,
                writing,
                written,
                str(self.workdir / f"kill-{attempt}.log"),
            ),
            daemon=True,
        )
        process.start()
        assert started.wait(120), "the child never started its materialization"
        return process, started, writing, written

    def baseline(self) -> None:
        """The old rows: the neighbour and the million, complete; and how long each phase takes."""
        process, _, writing, written = self.child([(NEIGHBOUR, "id"), (BIG, KILL_SORTS[0])], 0)
        began = time.perf_counter()
        assert writing.wait(120)
        write_began = time.perf_counter()
        assert written.wait(120)
        self.write_seconds = time.perf_counter() - write_began
        self.run_seconds = time.perf_counter() - began
        process.join(120)
        assert process.exitcode == 0, f"the baseline child failed (see {self.workdir / 'kill-0.log'})"
        self.stored_sort = KILL_SORTS[0]
        assert self.verify() == self.stored_sort

    def verify(self) -> str:
        """Open the file (replaying its log), checkpoint it, and say whose rows the million holds."""
        account = self.server.simulator.account
        connection = duckdb.connect(str(self.database))
        try:
            connection.execute("checkpoint")
            counts = dict(connection.execute("select segment_id, count(*) from segment_matches group by 1").fetchall())
            assert counts == {BIG: 1_000_000, NEIGHBOUR: 5_000}, counts
            columns = [(name, kind) for name, kind, *_ in connection.execute("describe segment_matches").fetchall()]
            assert columns == [("segment_id", "VARCHAR"), ("position", "BIGINT"), ("contact_id", "BIGINT")], columns
        finally:
            connection.close()
        partitions = read_partitions(self.database)
        assert not differences({NEIGHBOUR: partitions[NEIGHBOUR]}, {NEIGHBOUR: account.ordered(NEIGHBOUR, "id")})
        for sort in KILL_SORTS:
            if not differences({BIG: partitions[BIG]}, {BIG: account.ordered(BIG, sort)}):
                return sort
        raise AssertionError("the million's rows are neither the old nor the new list")

    def attempt(self, attempt: int, rng: random.Random, mode: str) -> KillOutcome:
        new_sort = KILL_SORTS[1] if self.stored_sort == KILL_SORTS[0] else KILL_SORTS[0]
        process, _, writing, written = self.child([(BIG, new_sort)], attempt)
        if mode == "anytime":  # at any moment of the run, or just after it
            delay = rng.uniform(0, 1.25 * self.run_seconds)
        else:  # inside the write transaction (delete, insert, commit), or around its commit
            delay = rng.uniform(0, 0.8 * self.write_seconds if mode == "mid-write" else 3 * self.write_seconds)
            assert writing.wait(120)
        time.sleep(delay)
        moment = "after the write" if written.is_set() else "inside the write" if writing.is_set() else "before it"
        killed = process.is_alive()
        if killed:
            os.kill(process.pid, signal.SIGKILL)
        else:
            moment = "no kill: the run had ended"
        process.join(120)
        assert process.exitcode == (-signal.SIGKILL if killed else 0), process.exitcode
        stored = self.verify()
        if moment == "before it":
            assert stored == self.stored_sort, "rows changed though the kill came before the write"
        elif moment != "inside the write":
            assert stored == new_sort, "the write was done, yet the new rows are not there"
        rows = "new" if stored == new_sort else "old"
        self.stored_sort = stored
        return KillOutcome(attempt, mode, delay, killed, moment, rows)


def run_kills(seed: int, serve_simulator: ServeSimulator, workdir: Path, attempts: int) -> list[KillOutcome]:
    rng = random.Random(f"matchall-campaign-kills/{seed}")  # reproducible, not secret
    server = serve_simulator(kill_account(seed))
    for sort in KILL_SORTS:
        server.simulator.account.ordered(BIG, sort)  # compute the ground truth before the clock runs
    kills = KillCampaign(seed, server, workdir)
    kills.baseline()
    modes = [KILL_MODES[number % len(KILL_MODES)] for number in range(attempts)]
    outcomes = [kills.attempt(number, rng, mode) for number, mode in enumerate(modes, 1)]
    print(
        f"\nKill campaign (seed {seed}): a run writing 1,000,000 rows takes {kills.run_seconds:.2f} s, "
        f"its write transaction {kills.write_seconds:.2f} s"
    )
    for outcome in outcomes:
        print(
            f"  kill {outcome.attempt} ({outcome.mode}) after {outcome.delay:.3f} s: {outcome.moment}; "
            f"the partition holds exactly the {outcome.rows} rows, the file opens and checkpoints"
        )
    return outcomes


# -- the campaigns ------------------------------------------------------------------------------


def test_scenarios_follow_the_seed() -> None:
    seed = campaign_seed()
    assert [make_scenario(seed, i) for i in range(50)] == [make_scenario(seed, i) for i in range(50)]
    assert [make_scenario(seed, i) for i in range(50)] != [make_scenario(seed + 1, i) for i in range(50)]
    long = [make_scenario(seed, i) for i in range(LONG_SCENARIOS)]
    assert {kind for s in long for kind in s.kinds} == set(KINDS)  # every fault is met
    assert {s.fate for s in long} == set(FATES)
    assert {s.size for s in long} == {size for _, size in SEGMENTS}
    assert {s.page_size for s in long} == set(PAGE_SIZES)
    assert sum(not s.kinds and s.fate == "ok" for s in long) > 5  # and some scenarios are fault-free


def test_short_campaign(tmp_path: Path, serve_simulator: ServeSimulator) -> None:
    seed = campaign_seed()
    print(f"\nShort fault-injection campaign, seed {seed} (set {SEED_VARIABLE} to replay another)")
    began = time.perf_counter()
    reports = run_campaign(seed, SHORT_SCENARIOS, tmp_path)
    totals = summarize(seed, reports, time.perf_counter() - began)
    assert totals["scenarios"] == SHORT_SCENARIOS
    (kill,) = run_kills(seed, serve_simulator, tmp_path, attempts=1)
    assert kill.mode == "mid-write"
    assert kill.killed
    assert_no_wrong(reports)


@pytest.mark.campaign
@pytest.mark.timeout(900)
def test_long_campaign(tmp_path: Path, serve_simulator: ServeSimulator) -> None:
    seed = campaign_seed()
    print(f"\nLong fault-injection campaign, seed {seed} (set {SEED_VARIABLE} to replay another)")
    began = time.perf_counter()
    reports = run_campaign(seed, LONG_SCENARIOS, tmp_path)
    totals = summarize(seed, reports, time.perf_counter() - began)
    assert totals["scenarios"] == LONG_SCENARIOS
    kills = run_kills(seed, serve_simulator, tmp_path, attempts=LONG_KILLS)
    assert any(kill.killed and kill.moment == "inside the write" for kill in kills), "no kill landed in a write"
    print(f"\nLong campaign: {time.perf_counter() - began:.1f} s in all")
    assert_no_wrong(reports)


# -- the client bug the campaign can meet -------------------------------------------------------


class FirstPageTellsOneLess(Simulator):
    """A run whose first page alone drifted: it tells one member less than the run holds (and the
    last page that goes with that total); every other page tells the truth."""

    def _run_body(self, run: SimRun, page: int, page_size: int, *, rekicked: bool = False) -> dict[str, Any]:
        body = super()._run_body(run, page, page_size, rekicked=rekicked)
        attributes = body["data"][0]["attributes"]
        if page == 1 and "page" in attributes:
            paging = attributes["page"]
            paging["total"] -= 1
            paging["last_page"] = max(1, math.ceil(paging["total"] / page_size))
        return body


def test_a_first_page_that_alone_tells_a_smaller_total_is_not_believed(
    instance: dg.DagsterInstance, duckdb_file: Path
) -> None:
    simulator = FirstPageTellsOneLess(
        SimAccount([SimSegment("1001", "Just over a page", 1_001)], seed=5),
        SimulatorConfig(requests_per_second=0, ready_after=0),
    )
    truth = simulator.account.ordered("1001", "id")
    with SimulatorServer(simulator) as server:
        defs = build_definitions(store=str(duckdb_file))
        activecampaign = ActiveCampaignResource(
            api_url=server.url, api_key=DEFAULT_TOKEN, requests_per_second=1000, page_size=1_000, retry_backoff=0.001
        )
        resources = {**(defs.resources or {}), "activecampaign": activecampaign}
        result = materialize_segment(defs, instance, "1001", resources=resources, raise_on_error=False)
    if result.success:
        checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        stored = read_partitions(duckdb_file)
        assert not differences(stored, {"1001": truth}), f"stored {stored['1001'][1].size:,} rows, checks {checks}"
    else:
        clean, description = failure_of(result)
        assert clean
        assert "disagrees with the first page" in description
