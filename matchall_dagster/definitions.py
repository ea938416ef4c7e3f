"""The Dagster definitions: one account's, built from an `Account`; the project's, from its `defs/` folder.

Data flow, per account: segment_discovery_sensor (partitions, deletions, and the catalog
activecampaign_segments) -> match_all_kickoff_schedule / job (runs started, recorded as pending)
-> match_all_readiness_sensor (polls) -> segment_matches (pages read into the store) -> its blocking
checks run_not_failed, run_not_expired, matches_complete -> membership_changes_automation ->
segment_membership_changes (joined/left appended in the store) -> membership_change_plausible. Small
segments (one page) take a shortcut: the sensor reads them in batches (read_small_segments), each
run doing all of that for up to 100 segments.

`dagster dev`, `dg dev` and workspace.yaml load `defs` (the `defs/` folder: one `MatchAllComponent`);
a second account is a second folder there (see `component`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg

from matchall_dagster.orchestration.account import Account, SegmentSelection
from matchall_dagster.orchestration.assets import build_segment_matches
from matchall_dagster.orchestration.catalog import build_catalog
from matchall_dagster.orchestration.changes import build_changes
from matchall_dagster.orchestration.checks import build_matches_checks
from matchall_dagster.orchestration.discovery import build_discovery_sensor
from matchall_dagster.orchestration.kickoff import build_kickoff
from matchall_dagster.orchestration.preview import resolving_definitions
from matchall_dagster.orchestration.readiness import build_readiness
from matchall_dagster.orchestration.resource import ActiveCampaignResource
from matchall_dagster.orchestration.small_reads import build_small_reads
from matchall_dagster.settings import ConfigurationError, settings
from matchall_dagster.storage.io_manager import MatchallIOManager, MembershipStoreResource

__all__ = ["account_definitions", "build_definitions", "defs", "env_resource", "kickoff_freshness"]

PACKAGE = Path(__file__).resolve().parent  # a `dg` project of its own (dg.toml), in a checkout or installed
_CRON_SAMPLE_START = datetime(2026, 1, 5, tzinfo=UTC)  # a Monday; 60 kick-offs from here show the shortest gap


def kickoff_freshness(cron: str) -> dg.FreshnessPolicy:
    """Fresh while the asset was read since the previous kick-off: at each kick-off (the deadline), its
    last materialization must be younger than the gap between kick-offs. Dagster allows no window
    longer than the shortest gap, so a cron with uneven gaps (weekdays only) is judged by its shortest.
    Dagster 1.13 judges a partitioned asset by its latest materialization of any partition."""
    try:
        ticks = dg.TimeWindowPartitionsDefinition(
            cron_schedule=cron, start=_CRON_SAMPLE_START, fmt="%Y-%m-%dT%H:%M", timezone="UTC"
        )
    except dg.DagsterInvalidDefinitionError:  # also a cron that never fires, such as '0 0 31 2 *'
        raise ConfigurationError(
            f"kickoff_cron (MATCHALL_KICKOFF_CRON): {cron!r} is not a cron expression Dagster accepts (five "
            f"fields that fire, such as '0 6 * * *'). Fix it."
        ) from None
    window = ticks.get_first_partition_window()
    gaps: list[timedelta] = []
    while window is not None and len(gaps) < 60:
        gaps.append(window.end - window.start)
        window = ticks.get_next_partition_window(window.end, respect_bounds=False)
    return dg.FreshnessPolicy.cron(deadline_cron=cron, lower_bound_delta=min(gaps), timezone="UTC")


def env_resource() -> ActiveCampaignResource:
    """The account's API from ACTIVECAMPAIGN_API_URL and ACTIVECAMPAIGN_API_KEY, read when a step needs it."""
    return ActiveCampaignResource(
        api_url=dg.EnvVar("ACTIVECAMPAIGN_API_URL"), api_key=dg.EnvVar("ACTIVECAMPAIGN_API_KEY")
    )


def account_definitions(account: Account, api: ActiveCampaignResource) -> dg.Definitions:
    """Every definition of one account, under its names (see `Account`), with its resources."""
    matches = build_segment_matches(account, freshness=kickoff_freshness(account.kickoff_cron))
    changes, changes_sensor = build_changes(account)
    catalog, catalog_job = build_catalog(account)
    kickoff_job, kickoff_schedule = build_kickoff(account)
    small_reads_job = build_small_reads(account)
    matches_job, readiness_sensor = build_readiness(account, matches, small_reads_job)
    store = str(account.store_url())
    return dg.Definitions(
        assets=[catalog, matches, changes],
        asset_checks=build_matches_checks(account),
        jobs=[kickoff_job, catalog_job, matches_job, small_reads_job],
        schedules=[kickoff_schedule],
        sensors=[build_discovery_sensor(account, kickoff_job, catalog_job), readiness_sensor, changes_sensor],
        # One process per run: every Dagster process costs about 200 MiB and 2-3 s of imports
        # before any data, and a run's steps (the asset, then its checks) never run in parallel
        # anyway (the checks wait for the asset). A run of 10,000,000 members peaks at
        # about 470 MiB instead of 680 MiB over four processes, in a quarter of the time.
        # (The same executor object for every account: `Definitions.merge` accepts only one.)
        executor=dg.in_process_executor,
        resources={
            # Every process (runs, the daemon's sensors) takes from one request budget for the
            # account (its URL), kept in MATCHALL_REQUEST_BUDGET (default: a file in DAGSTER_HOME).
            account.api_resource: api,
            # segment_matches and the catalog land in the account's own store (a DuckDB file or a
            # PostgreSQL schema); the checks' PartitionSummary and the membership history are computed
            # in SQL in the same store.
            account.io_manager_key: MatchallIOManager(store=store),
            account.store_resource: MembershipStoreResource(url=store),
        },
    )


def settings_account(
    *, segments: SegmentSelection | None = None, kickoff_cron: str | None = None, **choices: Any
) -> Account:
    """An account with these choices; the two with a MATCHALL_* setting default to it (MATCHALL_SEGMENTS,
    MATCHALL_KICKOFF_CRON), the others to `Account`'s."""
    current = settings()
    return Account(
        segments=segments or SegmentSelection(ids=current.segments),
        kickoff_cron=kickoff_cron or current.kickoff_cron,
        **choices,
    )


def build_definitions(*, store: str | None = None) -> dg.Definitions:
    """The single default account's definitions from the environment, as the `defs/` folder builds them;
    `store` (a URL or a DuckDB file's path) overrides MATCHALL_STORE (for tests)."""
    defs = account_definitions(settings_account(store=store), env_resource())
    resolve(defs)
    return defs


def resolve(defs: dg.Definitions) -> None:
    # Resolved now (Dagster caches it on `defs`), so that Dagster's warning about its own use of a
    # beta parameter is silenced where it arises instead of in every process that loads `defs`.
    with resolving_definitions():
        dg.Definitions.validate_loadable(defs)


@dg.definitions
def defs() -> dg.Definitions:
    """The project's definitions: the components in matchall_dagster/defs (one account by default)."""
    loaded = dg.load_from_defs_folder(path_within_project=PACKAGE)
    resolve(loaded)
    return loaded
