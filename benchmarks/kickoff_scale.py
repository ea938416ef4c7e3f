"""The kick-off at 10,000 segments, killed part-way and re-executed.

`python -m benchmarks.kickoff_scale` prints a report (`--json` for one JSON line). The project's
kick-off job runs in a process of its own (`execute_job` on a SQLite instance in a temporary
DAGSTER_HOME) against the simulator over HTTP, which enforces the account's limit. When about
half the runs are started, the run's process group is killed (SIGKILL); the run is marked failed
(what Dagster's run monitoring does) and re-executed from failure, as from the UI. Each start takes
its place in the account's request budget (`api.budget`), kept where the project keeps it (a
SQLite file in DAGSTER_HOME), shared by the killed process and the re-execution; nothing else
takes from it here, so the kick-off has the account's whole limit. Reported: segments started
once and twice, records per segment, the most requests the server saw in any second against the
limit, its statuses (no 429), how long the re-execution took to find what was already started,
and the rates achieved against the limit.

`--speedup K` multiplies the account's limit (the resource's `requests_per_second`, 5/s) and the
server's by K, so that 10,000 segments take minutes instead of 34. The budget's window is widened
by a fixed 15 ms (`WINDOW_GUARD_MS`), not by a share of the spacing: at K times the rate, arrival
jitter on a loaded machine has K times the chances to put one request too many into a second
(`--speedup 1` is the real case).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import dagster as dg

from matchall_dagster import ActiveCampaignResource
from matchall_dagster.definitions import account_definitions
from matchall_dagster.lifecycle.record import STATUS
from matchall_dagster.orchestration.account import DEFAULT_ACCOUNT
from matchall_dagster.orchestration.kickoff import KICKOFF, PENDING, started_segments
from matchall_dagster.settings import BUDGET_FILE
from matchall_dagster.simulator import (
    DEFAULT_TOKEN,
    SimAccount,
    SimSegment,
    Simulator,
    SimulatorConfig,
    SimulatorServer,
)

REPO = Path(__file__).resolve().parents[1]
RATE_VARIABLE = "KICKOFF_BENCH_RATE"
BUDGET_VARIABLE = "KICKOFF_BENCH_BUDGET"
ACCOUNT_RATE = 5.0  # the account's limit: the resource's requests_per_second, and the server's
_RUN = """
import sys
import dagster as dg
job = dg.build_reconstructable_job(
    "benchmarks.kickoff_scale", "kickoff_job", reconstructor_working_directory=sys.argv[1]
)
with dg.DagsterInstance.get() as instance:
    dg.execute_job(job, instance, run_config={"ops": {"start_match_all_runs": {"config": {}}}})
"""


def kickoff_job() -> dg.JobDefinition:
    """The project's kick-off job, its resource at the benchmark's account limit (rebuilt in the run's processes).

    The budget's store is where the project keeps it by default (a SQLite file in DAGSTER_HOME),
    named here so that a MATCHALL_REQUEST_BUDGET of the shell does not change the benchmark.
    """
    resource = ActiveCampaignResource(
        api_url=dg.EnvVar("ACTIVECAMPAIGN_API_URL"),
        api_key=dg.EnvVar("ACTIVECAMPAIGN_API_KEY"),
        requests_per_second=float(os.environ[RATE_VARIABLE]),
        request_budget=os.environ[BUDGET_VARIABLE],
    )
    # The kick-off reads names from the catalog in the membership store, MATCHALL_STORE (none here: no names).
    defs = account_definitions(DEFAULT_ACCOUNT, resource)
    return defs.resolve_job_def(DEFAULT_ACCOUNT.name("match_all_kickoff_job"))


def records_of(instance: dg.DagsterInstance, kickoff: str) -> Counter[str]:
    found: Counter[str] = Counter()
    cursor = None
    while True:
        page = instance.fetch_observations(
            dg.AssetRecordsFilter(asset_key=DEFAULT_ACCOUNT.matches_key), limit=5_000, cursor=cursor, ascending=True
        )
        for record in page.records:
            metadata = record.asset_observation.metadata if record.asset_observation else {}
            if STATUS in metadata and metadata[STATUS].value == PENDING and metadata[KICKOFF].value == kickoff:
                found[str(record.partition_key)] += 1
        cursor = page.cursor
        if not page.has_more:
            return found


def run(segments: int, speedup: float, kill_at: float) -> dict[str, Any]:
    rate = limit = ACCOUNT_RATE * speedup
    ids = [str(i) for i in range(1, segments + 1)]
    account = SimAccount([SimSegment(segment_id, f"S{segment_id}", 1) for segment_id in ids])
    config = SimulatorConfig(requests_per_second=limit, ready_after=0.0)
    with tempfile.TemporaryDirectory() as home, SimulatorServer(Simulator(account, config)) as server:
        Path(home, "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        os.environ.update(
            DAGSTER_HOME=home,
            ACTIVECAMPAIGN_API_URL=server.url,
            ACTIVECAMPAIGN_API_KEY=DEFAULT_TOKEN,
            **{RATE_VARIABLE: str(rate), BUDGET_VARIABLE: str(Path(home) / BUDGET_FILE)},
        )
        os.environ.pop("MATCHALL_SEGMENTS", None)
        os.environ.pop("MATCHALL_STORE", None)  # the store in DAGSTER_HOME, whatever the shell says
        simulator = server.simulator
        with dg.DagsterInstance.get() as instance:
            instance.add_dynamic_partitions("segments", ids)
            began = time.monotonic()
            process = subprocess.Popen(  # noqa: S603  # our own interpreter and script
                [sys.executable, "-c", _RUN, str(REPO)], cwd=REPO, start_new_session=True
            )
            try:
                while len(simulator.runs) < kill_at * segments and process.poll() is None:
                    time.sleep(0.02)
                if process.poll() is not None:
                    raise RuntimeError("the kick-off ended before it could be killed; raise --segments")
                os.killpg(process.pid, signal.SIGKILL)
                killed = time.monotonic()
            finally:
                process.wait(timeout=60)
            killed_after = time.monotonic() - began
            started_when_killed = len(simulator.runs)
            (first,) = instance.get_runs()
            recorded_when_killed = sum(records_of(instance, first.run_id).values())
            in_run_log = {
                entry.dagster_event.partition
                for entry in instance.all_logs(first.run_id, of_type=dg.DagsterEventType.ASSET_OBSERVATION)
                if entry.dagster_event is not None
            }
            instance.report_run_failed(first, message="The run's process was killed.")
            lookup = time.monotonic()
            already = started_segments(instance, DEFAULT_ACCOUNT, first.run_id)
            lookup_s = time.monotonic() - lookup
            resumed = time.monotonic()
            result = dg.execute_job(
                dg.build_reconstructable_job(
                    "benchmarks.kickoff_scale", "kickoff_job", reconstructor_working_directory=str(REPO)
                ),
                instance,
                reexecution_options=dg.ReexecutionOptions.from_failure(first.run_id, instance),
            )
            resumed_s = time.monotonic() - resumed
            records = records_of(instance, first.run_id)
            started = Counter(run.segment.id for run in simulator.runs.values())
        stats = simulator.stats()
    arrivals = stats["arrivals"]
    before = _rate([moment for moment in arrivals if moment < killed])
    after = _rate([moment for moment in arrivals if moment >= killed])
    return {
        "segments": segments,
        "account_limit_per_s": rate,
        "server_limit_per_s": limit,
        "budget_store": "sqlite file in DAGSTER_HOME",
        "killed_after_s": round(killed_after, 1),
        "started_when_killed": started_when_killed,
        "recorded_when_killed": recorded_when_killed,
        "in_run_log_when_killed": len(in_run_log),
        "already_started_found": len(already),
        "finding_them_s": round(lookup_s, 2),
        "reexecution_success": result.success,
        "reexecution_s": round(resumed_s, 1),
        "segments_started": len(started),
        "segments_started_twice": sum(1 for count in started.values() if count > 1),
        "segments_never_started": segments - len(started),
        "records_per_segment": sorted(Counter(records.values()).items()),
        "segments_without_record": segments - len(records),
        "requests": stats["requests"],
        "statuses": stats["by_status"],
        "max_requests_in_any_second": stats["max_requests_in_any_second"],
        "rate_before_kill_per_s": before,
        "rate_after_resume_per_s": after,
        "share_of_limit_before_kill": round(before / limit, 3),
        "share_of_limit_after_resume": round(after / limit, 3),
        "no_429": 429 not in stats["by_status"],
        "within_limit": stats["max_requests_in_any_second"] <= limit,
    }


def _rate(arrivals: list[float]) -> float:
    return round((len(arrivals) - 1) / (arrivals[-1] - arrivals[0]), 2) if len(arrivals) > 1 else 0.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, default=10_000)
    parser.add_argument("--speedup", type=float, default=10.0, help="multiplies the account's 5/s limit")
    parser.add_argument("--kill-at", type=float, default=0.5, help="share of runs started when the process is killed")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = run(args.segments, args.speedup, args.kill_at)
    if args.json:
        print(json.dumps(report))
        return
    for name, value in report.items():
        print(f"{name:30} {value}")


if __name__ == "__main__":
    main()
