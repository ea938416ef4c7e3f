"""The whole path: a Dagster run of `segment_matches` for one partition into a real membership store.

`python -m benchmarks.whole_path --segment ID --run-id RUN` (with DAGSTER_HOME, the simulator's
ACTIVECAMPAIGN_API_URL/KEY, MATCHALL_BENCH_DB and MATCHALL_BENCH_RPS in the environment) launches
what the readiness sensor launches: the asset and its checks for the partition, with the run id,
through the project's definitions, executor (in-process) and IO manager;
MATCHALL_BENCH_EXECUTOR=multiprocess runs each step in a subprocess of its own instead.
MATCHALL_BENCH_DB (or `--store`) is the membership store: a DuckDB file's path or a store URL
(`duckdb:///path`, `postgresql://USER@HOST:PORT/DATABASE?schema=NAME`), as MATCHALL_STORE takes it.
`--budget STORE` names the account's request budget (`memory`, a SQLite file, `postgresql://...`)
the way a deployment does, through MATCHALL_REQUEST_BUDGET (inherited by step subprocesses);
without it, the project's default: `matchall-request-budget.sqlite` in DAGSTER_HOME.
Only the activecampaign resource's requests_per_second differs:
the benchmark's, since the project gives runs 4 of the account's 5 requests/s and keeps 1 for its
sensors. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import dagster as dg

from matchall_dagster.definitions import build_definitions
from matchall_dagster.orchestration.account import DEFAULT_ACCOUNT
from matchall_dagster.orchestration.resource import ActiveCampaignResource
from matchall_dagster.settings import settings

RPS_VARIABLE = "MATCHALL_BENCH_RPS"
DB_VARIABLE = "MATCHALL_BENCH_DB"  # the membership store: a DuckDB file's path or a store URL
# "multiprocess": each step in a subprocess of its own, to show what the project's in-process saves.
EXECUTOR_VARIABLE = "MATCHALL_BENCH_EXECUTOR"
JOB = "bench_segment_matches"
BUDGET_VARIABLE = "MATCHALL_REQUEST_BUDGET"  # the project's own setting (settings.Settings.request_budget)


def bench_definitions() -> dg.Definitions:
    project = build_definitions(store=os.environ[DB_VARIABLE])
    assert project.executor is dg.in_process_executor, "the benchmark runs the project's executor"
    return dg.Definitions(
        assets=project.assets,
        asset_checks=project.asset_checks,
        jobs=[
            dg.define_asset_job(
                JOB,
                selection=dg.AssetSelection.assets(DEFAULT_ACCOUNT.matches_key),
                executor_def=dg.multiprocess_executor
                if os.environ.get(EXECUTOR_VARIABLE) == "multiprocess"
                else dg.in_process_executor,  # the project's (definitions.py)
            )
        ],
        resources={
            **(project.resources or {}),
            "activecampaign": ActiveCampaignResource(
                api_url=dg.EnvVar("ACTIVECAMPAIGN_API_URL"),
                api_key=dg.EnvVar("ACTIVECAMPAIGN_API_KEY"),
                requests_per_second=float(os.environ[RPS_VARIABLE]),
            ),
        },
    )


def bench_job() -> dg.JobDefinition:
    """Rebuilt in the step subprocess from this module (a reconstructable job)."""
    return bench_definitions().resolve_job_def(JOB)


def step_timeline(instance: dg.DagsterInstance, run_id: str) -> dict[str, dict[str, float]]:
    """Each step's start (seconds after the run started) and duration: where Dagster's time goes."""
    started: dict[str, float] = {}
    timeline: dict[str, dict[str, float]] = {}
    run_start = None
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None:
            continue
        if event.event_type is dg.DagsterEventType.RUN_START:
            run_start = entry.timestamp
        elif event.event_type is dg.DagsterEventType.STEP_START and event.step_key:
            started[event.step_key] = entry.timestamp
        elif event.is_step_success or event.is_step_failure:
            key = event.step_key or "?"
            begin = started.get(key, entry.timestamp)
            timeline[key] = {
                "start_s": round(begin - (run_start or begin), 3),
                "duration_s": round(entry.timestamp - begin, 3),
            }
    return timeline


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--segment", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--budget", help="the request budget's store (default: the project's, in DAGSTER_HOME)")
    parser.add_argument("--store", help=f"the membership store (default: {DB_VARIABLE} from the environment)")
    args = parser.parse_args(argv)
    if args.store:
        os.environ[DB_VARIABLE] = args.store  # read again by the step subprocesses (multiprocess)
    if args.budget:
        os.environ[BUDGET_VARIABLE] = args.budget
        settings.cache_clear()  # read again, with the store, by this process and its step subprocesses
    cpu, wall = time.process_time(), time.monotonic()
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(DEFAULT_ACCOUNT.partitions_name, [args.segment])
        result = dg.execute_job(
            dg.reconstructable(bench_job),
            instance=instance,
            run_config={"ops": {"segment_matches": {"config": {"run_id": args.run_id, "sort": "id"}}}},
            tags={"dagster/partition": args.segment},
        )
        work_wall = time.monotonic() - wall
        figures: dict[str, Any] = {"success": result.success}
        if not result.success:
            figures["errors"] = [
                entry.message or str(entry.dagster_event.event_specific_data)
                for entry in instance.all_logs(result.run_id)
                if entry.dagster_event is not None and entry.dagster_event.is_failure
            ]
        for event in result.get_asset_materialization_events():
            materialization = event.step_materialization_data.materialization
            if materialization.asset_key == DEFAULT_ACCOUNT.matches_key:
                metadata = materialization.metadata
                for name in (
                    "dagster/row_count",
                    "dagster/partition_row_count",
                    "requests",
                    "pages_read",
                    "elapsed_seconds",
                    "request_budget",
                    "budget_wait_seconds",
                    "dagster/storage_kind",
                ):
                    if name in metadata:
                        figures[name] = metadata[name].value
        figures["steps"] = step_timeline(instance, result.run_id)
        figures["checks"] = {
            event.asset_check_evaluation_data.check_name: event.asset_check_evaluation_data.passed
            for event in result.all_events
            if event.event_type is dg.DagsterEventType.ASSET_CHECK_EVALUATION
        }
    stored = figures.get("dagster/partition_row_count", figures.get("dagster/row_count", 0))  # what the store holds
    figures.update(ids=stored, work_wall_s=work_wall, run_cpu_s=time.process_time() - cpu)
    print(json.dumps(figures, default=str), flush=True)


if __name__ == "__main__":
    main()
