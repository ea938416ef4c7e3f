"""The Dagster definitions: `dagster dev` and workspace.yaml load `defs` from here.

Data flow: segment_discovery_sensor (partitions, deletions, and the catalog
activecampaign_segments) -> match_all_kickoff_schedule / job (runs started, recorded as pending)
-> match_all_readiness_sensor (polls) -> segment_matches (pages read into DuckDB) -> matches_complete
(rows checked) -> membership_changes_automation -> segment_membership_changes (joined/left
appended in DuckDB) -> membership_change_plausible. Small segments (one page) take a shortcut:
the sensor reads them in batches (read_small_segments), each run doing all of that for up to
100 segments.
"""

from __future__ import annotations

import dagster as dg
from dagster_duckdb import DuckDBResource

from matchall_dagster.orchestration.assets import segment_matches
from matchall_dagster.orchestration.catalog import activecampaign_segments, activecampaign_segments_job
from matchall_dagster.orchestration.changes import membership_changes_sensor, segment_membership_changes
from matchall_dagster.orchestration.checks import matches_complete, run_not_expired, run_not_failed
from matchall_dagster.orchestration.discovery import segment_discovery_sensor
from matchall_dagster.orchestration.kickoff import match_all_kickoff_job, match_all_kickoff_schedule
from matchall_dagster.orchestration.preview import resolving_definitions
from matchall_dagster.orchestration.readiness import match_all_readiness_sensor, segment_matches_job
from matchall_dagster.orchestration.resource import ActiveCampaignResource
from matchall_dagster.orchestration.small_reads import read_small_segments
from matchall_dagster.settings import duckdb_path
from matchall_dagster.storage.io_manager import DEFAULT_MEMORY_LIMIT, MatchallDuckDBIOManager


def build_definitions(*, duckdb_database: str | None = None) -> dg.Definitions:
    """The project's definitions; `duckdb_database` overrides MATCHALL_DUCKDB_PATH (for tests)."""
    database = duckdb_database or duckdb_path()
    defs = dg.Definitions(
        assets=[activecampaign_segments, segment_matches, segment_membership_changes],
        asset_checks=[run_not_failed, run_not_expired, matches_complete],
        jobs=[match_all_kickoff_job, activecampaign_segments_job, segment_matches_job, read_small_segments],
        schedules=[match_all_kickoff_schedule],
        sensors=[segment_discovery_sensor, match_all_readiness_sensor, membership_changes_sensor],
        # One process per run: every Dagster process costs about 200 MiB and 2-3 s of imports
        # before any data, and a run's steps (the asset, then its checks) never run in parallel
        # anyway (the checks wait for the asset). A run of 10,000,000 members peaks at
        # about 470 MiB instead of 680 MiB over four processes, in a quarter of the time.
        executor=dg.in_process_executor,
        resources={
            # No fallback to the simulator: unset variables fail loudly when something needs the API.
            # Every process (runs, the daemon's sensors) takes from one request budget of 5/s for
            # the account, kept in MATCHALL_REQUEST_BUDGET (default: a file in DAGSTER_HOME).
            "activecampaign": ActiveCampaignResource(
                api_url=dg.EnvVar("ACTIVECAMPAIGN_API_URL"), api_key=dg.EnvVar("ACTIVECAMPAIGN_API_KEY")
            ),
            # Swap in the pandas IO manager of a warehouse (Snowflake, BigQuery, ...) here; the asset
            # declares its partition column as `partition_expr`.
            "io_manager": MatchallDuckDBIOManager(database=database, schema="main"),
            # The membership history is computed in SQL in the same file, under the same memory cap;
            # the kick-off, the discovery sensor and segment_matches read the catalog's names there.
            "duckdb": DuckDBResource(database=database, connection_config={"memory_limit": DEFAULT_MEMORY_LIMIT}),
        },
    )
    # Resolved now (Dagster caches it on `defs`), so that Dagster's warning about its own use of a
    # beta parameter is silenced where it arises instead of in every process that loads `defs`.
    # A `defs/` folder merged in later (`Definitions.merge`) makes a new object: resolve that one here too.
    with resolving_definitions():
        dg.Definitions.validate_loadable(defs)
    return defs


defs = build_definitions()
