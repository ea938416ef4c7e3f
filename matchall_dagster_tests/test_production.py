"""The production instance (deploy/dagster.yaml): it passes Dagster's own validation, names no
secret, keeps the account's 5 requests/s from the numbers in the code, and runs the whole
project end to end on PostgreSQL with a real daemon and webserver."""

from __future__ import annotations

import itertools
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
import psycopg
import pytest
import yaml
from dagster._core.instance.config import dagster_instance_config  # what loading DAGSTER_HOME runs

from matchall_dagster.api.budget import BudgetStore
from matchall_dagster.definitions import defs as project_defs
from matchall_dagster.orchestration.account import DEFAULT_ACCOUNT
from matchall_dagster.orchestration.names import MATCHES_COMPLETE, RUN_NOT_EXPIRED, RUN_NOT_FAILED
from matchall_dagster.orchestration.resource import ActiveCampaignResource
from matchall_dagster.settings import Settings
from matchall_dagster.simulator import DEFAULT_TOKEN, Simulator
from matchall_dagster.storage.history import CHANGES_TABLE, JOINED, LEFT, STEPS_TABLE
from matchall_dagster.storage.postgres_store import partition_table
from matchall_dagster.storage.store import MATCHES_TABLE, StoreUrl, open_store
from matchall_dagster_tests import deployment as harness
from matchall_dagster_tests.deployment import DEPLOY_CONFIG, REPO, Deployment, database_exists, free_port

ROOT_CONFIG = REPO / "dagster.yaml"
INSTANCE_FILES = {"deploy": DEPLOY_CONFIG, "embedded": ROOT_CONFIG}
ACCOUNT_REQUESTS_PER_SECOND = 5  # ActiveCampaign: 5 requests/s per account (API.md)
PG_FIELDS = ("username", "password", "hostname", "db_name", "port")
SECRET_WORDS = ("password", "secret", "token", "api_key", "apikey", "credential")
SCHEDULE = "match_all_kickoff_schedule"
DISCOVERY = "segment_discovery_sensor"
READINESS = "match_all_readiness_sensor"
CHANGES_SENSOR = DEFAULT_ACCOUNT.name("membership_changes_automation")
ASSET_KEY = DEFAULT_ACCOUNT.matches_key
CHANGES_KEY = DEFAULT_ACCOUNT.changes_key
API_POOL = DEFAULT_ACCOUNT.pool
# About 90 s on 2 idle cores; a loaded machine (other test sessions) has needed 190 s. The test's
# own pytest time-out leaves room for the stack's start and stop.
E2E_TIMEOUT = 330.0
# The evolving segment's second step of membership changes: the next kick-off (every minute) and
# the automation sensor's next evaluation (every 30 s) after the outcome above.
CHANGES_TIMEOUT = 240.0


def load(path: Path) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    return config


def validated(path: Path, home: Path) -> dict[str, Any]:
    """The file as Dagster validates it when DAGSTER_HOME holds it."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, home / "dagster.yaml")
    config, custom_class = dagster_instance_config(str(home))
    assert custom_class is None
    return dict(config)


@pytest.mark.parametrize("name", INSTANCE_FILES)
def test_instance_file_passes_dagsters_validation(name: str, tmp_path: Path) -> None:
    config = validated(INSTANCE_FILES[name], tmp_path / "home")
    assert config["telemetry"] == {"enabled": False}
    assert config["concurrency"]["pools"]["default_limit"] == 2
    assert config["concurrency"]["runs"]["max_concurrent_runs"] >= 1
    # No legacy queue settings beside `concurrency.runs` (a config error), no run launcher here:
    # locally the default one, on Kubernetes the Helm chart's.
    assert not {"run_queue", "run_coordinator", "run_launcher"} & config.keys()


def test_validation_rejects_a_broken_instance_file(tmp_path: Path) -> None:
    """The validation above is Dagster's, live: a misspelt field fails it."""
    broken = load(DEPLOY_CONFIG)
    broken["storage"]["postgres"]["postgres_db"]["hostnmae"] = broken["storage"]["postgres"]["postgres_db"].pop(
        "hostname"
    )
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    with pytest.raises(dg.DagsterInvalidConfigError, match="hostnmae"):
        validated(path, tmp_path / "home")


def test_embedded_instance_loads_from_dagster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The zero-configuration path: SQLite under DAGSTER_HOME, the queued coordinator, pool limit 2."""
    home = tmp_path / "home"
    validated(ROOT_CONFIG, home)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.global_op_concurrency_default_limit == 2


def _secret_like_literals(node: Any, path: str = "") -> Iterator[str]:
    """Paths of scalar values under keys that name a secret (a `{env: NAME}` mapping is fine)."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}" if path else str(key)
            if any(word in str(key).lower() for word in SECRET_WORDS) and not isinstance(value, dict):
                yield here
            yield from _secret_like_literals(value, here)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _secret_like_literals(item, f"{path}[{index}]")


def test_production_instance_takes_its_database_from_the_environment() -> None:
    config = load(DEPLOY_CONFIG)
    database = config["storage"]["postgres"]["postgres_db"]
    for name in PG_FIELDS:
        assert set(database[name]) == {"env"}, f"postgres_db.{name} must be {{env: VARIABLE}}, not a literal"
    assert "postgres_url" not in config["storage"]["postgres"]  # a URL would carry the password
    assert list(_secret_like_literals(config)) == []
    text = DEPLOY_CONFIG.read_text()
    assert DEFAULT_TOKEN not in text
    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text)  # no user:password@host anywhere


def test_documented_postgres_storage_records_a_run_as_written(tmp_path: Path) -> None:
    """deploy/dagster.yaml's storage is Dagster's documented dagster-postgres configuration, with no
    `scheme` line: an instance from it (a database of its own on the local server) runs an asset and
    stores its events. With SQLAlchemy 2.1 (psycopg 3 for `postgresql://`) the first event failed;
    pyproject.toml pins SQLAlchemy below 2.1."""
    harness.require_postgres()
    assert "scheme" not in load(DEPLOY_CONFIG)["storage"]["postgres"]["postgres_db"]
    home = tmp_path / "home"
    validated(DEPLOY_CONFIG, home)

    @dg.asset
    def probe() -> int:
        return 1

    with harness.postgres_database("matchall_instance") as database:
        env = {
            "DAGSTER_PG_USERNAME": harness.PG_USER,
            "DAGSTER_PG_PASSWORD": "",  # trust authentication on the test server
            "DAGSTER_PG_HOST": harness.PG_HOST,
            "DAGSTER_PG_DB": database,
            "DAGSTER_PG_PORT": str(harness.PG_PORT),
        }
        with harness.patched_environ(env), dg.DagsterInstance.from_config(str(home)) as instance:
            assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
            result = dg.materialize([probe], instance=instance)
            assert result.success
            records = instance.fetch_materializations(dg.AssetKey("probe"), limit=10).records
            assert [record.run_id for record in records] == [result.run_id]
            run = instance.get_run_by_id(result.run_id)
            assert run is not None
            assert run.status == dg.DagsterRunStatus.SUCCESS


def test_secret_scan_finds_a_literal_password() -> None:
    config = load(DEPLOY_CONFIG)
    config["storage"]["postgres"]["postgres_db"]["password"] = "hunter2"  # the scan's own test
    assert list(_secret_like_literals(config)) == ["storage.postgres.postgres_db.password"]


@pytest.mark.parametrize("name", INSTANCE_FILES)
def test_the_account_limit_is_one_budget_and_the_pool_lets_steps_share_it(name: str, tmp_path: Path) -> None:
    """No split to add up any more: every client takes from the account's budget at the account's
    rate, and the pool only says how many API steps run at once (more than one, to share it)."""
    config = validated(INSTANCE_FILES[name], tmp_path / "home")
    resource = (project_defs().resources or {})["activecampaign"]
    assert isinstance(resource, ActiveCampaignResource)
    assert resource.requests_per_second == ACCOUNT_REQUESTS_PER_SECOND
    assert resource.request_budget is None  # MATCHALL_REQUEST_BUDGET, else the file in DAGSTER_HOME
    assert config["concurrency"]["pools"]["default_limit"] > 1
    assert "MATCHALL_REQUEST_BUDGET" in DEPLOY_CONFIG.read_text()  # where production keeps it
    assert Settings.model_fields["request_budget"].default is None


# -- end to end on PostgreSQL ------------------------------------------------------------------


def test_two_sessions_at_once_get_artifact_folders_of_their_own(tmp_path: Path) -> None:
    with harness._claim(tmp_path / "deployment") as first, harness._claim(tmp_path / "deployment") as second:
        assert first == tmp_path / "deployment"
        assert second != first
    with harness._claim(tmp_path / "deployment") as again:  # released at the end of the session
        assert again == first


@pytest.mark.parametrize(("ci", "outcome"), [("", pytest.skip.Exception), ("true", pytest.fail.Exception)])
def test_without_postgres_the_stack_test_skips_except_under_ci(
    ci: str, outcome: type[BaseException], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(harness, "PG_PORT", free_port())  # nothing listens there
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match=r"PostgreSQL is not reachable at 127\.0\.0\.1"):
        harness.require_postgres()


def _latest_materialization(instance: dg.DagsterInstance, segment_id: str) -> dg.EventLogRecord | None:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=ASSET_KEY, asset_partitions=[segment_id]), limit=1
    ).records
    return records[0] if records else None


def _check_outcomes(instance: dg.DagsterInstance, check_name: str) -> dict[tuple[str | None, str], list[str]]:
    """(partition, status) -> the Dagster run ids of the check's executions."""
    outcomes: dict[tuple[str | None, str], list[str]] = {}
    history = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(ASSET_KEY, check_name), limit=500
    )
    for record in history:
        outcomes.setdefault((record.partition, record.status.value), []).append(record.run_id)
    return outcomes


def _runs(instance: dg.DagsterInstance, **tags: str) -> list[dg.RunRecord]:
    return list(instance.get_run_records(dg.RunsFilter(tags=tags) if tags else None))


def _outcome_reached(instance: dg.DagsterInstance, deployment: Deployment) -> bool:
    """Every ready segment materialized and complete, both failures judged, the schedule's run done."""
    complete = _check_outcomes(instance, MATCHES_COMPLETE)
    if not all((segment, "SUCCEEDED") in complete for segment in deployment.ready_segments):
        return False
    if (deployment.failing_segment, "FAILED") not in _check_outcomes(instance, RUN_NOT_FAILED):
        return False
    if deployment.expiring_segment is not None and (
        (deployment.expiring_segment, "FAILED") not in _check_outcomes(instance, RUN_NOT_EXPIRED)
    ):
        return False
    scheduled = _runs(instance, **{"dagster/schedule_name": SCHEDULE})
    return any(record.dagster_run.status == dg.DagsterRunStatus.SUCCESS for record in scheduled)


def _ticks(instance: dg.DagsterInstance) -> dict[str, list[Any]]:
    """Every stored tick of each schedule and sensor, by name."""
    return {
        state.instigator_name: list(instance.get_ticks(state.instigator_origin_id, state.selector_id))
        for state in instance.all_instigator_state()
    }


def _stored_rows(deployment: Deployment) -> dict[str, list[int]]:
    """The stored members per segment, in position order, from the PostgreSQL store."""
    (rows,) = deployment.store_query(
        f"select segment_id, contact_id from {MATCHES_TABLE} order by segment_id, position"
    )
    members: dict[str, list[int]] = {}
    for segment_id, contact_id in rows:
        members.setdefault(segment_id, []).append(int(contact_id))
    return members


def _materialized_truth(instance: dg.DagsterInstance, simulator: Simulator, segments: list[str]) -> dict[str, Any]:
    """segment -> (storage id of its latest materialization, the simulator's list for that
    materialization's run: its sort and its generation, which for an evolving segment is not the
    latest run's)."""
    truth: dict[str, Any] = {}
    for segment_id in segments:
        record = _latest_materialization(instance, segment_id)
        assert record is not None
        assert record.asset_materialization is not None
        metadata = {key: value.value for key, value in record.asset_materialization.metadata.items()}
        generation = simulator.runs[str(metadata["run_id"])].generation
        truth[segment_id] = (record.storage_id, simulator.truth(segment_id, str(metadata["sort"]), generation))
    return truth


def _stored_rows_match_materializations(deployment: Deployment, instance: dg.DagsterInstance) -> dict[str, list[int]]:
    """The store's rows of each ready segment, once they equal the simulator's list for the run of
    the segment's latest materialization, read before and after the rows (so that no
    materialization came in between). The stack keeps materializing every minute, and a run
    writes its rows a moment before its materialization is recorded: a mismatch is retried for a
    while, then fails."""
    segments = deployment.ready_segments
    deadline = time.monotonic() + 60
    while True:
        before = _materialized_truth(instance, deployment.simulator, segments)
        stored = _stored_rows(deployment)
        after = _materialized_truth(instance, deployment.simulator, segments)
        expected = {segment: truth for segment, (_, truth) in after.items()}
        if before == after and stored == {k: v for k, v in expected.items() if v}:
            return expected
        if time.monotonic() > deadline:
            differing = sorted(k for k in segments if stored.get(k, []) != expected[k])
            raise AssertionError(
                f"The store's rows of segments {differing} are not the simulator's lists for the runs of their latest "
                f"materializations; see {deployment.artifacts}"
            )
        time.sleep(1.0)


def _stored_in_postgresql(deployment: Deployment, truth: dict[str, list[int]]) -> None:
    """The memberships are in the session's PostgreSQL database, schema `matchall`, as production keeps
    them: a partition table per ready segment attached to segment_matches, summaries computed there,
    and no DuckDB file anywhere."""
    url = StoreUrl.parse(deployment.store_url)
    assert (url.kind, url.schema, url.database) == ("postgresql", "matchall", deployment.postgres_db)
    assert urlsplit(url.location).password is None
    ((schema,),), attached = deployment.store_query(
        "select current_schema()",
        "select child.relname from pg_inherits join pg_class child on child.oid = pg_inherits.inhrelid "
        "join pg_class parent on parent.oid = pg_inherits.inhparent "
        "join pg_namespace on pg_namespace.oid = parent.relnamespace "
        f"where parent.relname = '{MATCHES_TABLE}' and pg_namespace.nspname = 'matchall'",
    )
    assert schema == "matchall"
    # Every ready segment, the empty one too, has its partition; the failing and expiring ones none.
    assert {name for (name,) in attached} == {partition_table(s) for s in deployment.ready_segments}
    store = open_store(url)
    for segment_id, members in truth.items():
        summary = store.summarize(segment_id)
        assert summary.positions_exact, (segment_id, summary)
        assert summary.repeated_contacts == 0, (segment_id, summary)
        if segment_id != deployment.evolving_segment:  # its size moves from run to run
            assert summary.rows == len(members), (segment_id, summary)
    assert sorted(deployment.artifacts.rglob("*.duckdb")) == [], "a process wrote to DuckDB, not to MATCHALL_STORE"


def _changes_materializations(instance: dg.DagsterInstance, segment_id: str) -> list[dg.EventLogRecord]:
    return list(
        instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=CHANGES_KEY, asset_partitions=[segment_id]), limit=1_000
        ).records
    )


def _steps_and_changes(deployment: Deployment) -> dict[str, list[tuple[str, int, set[int], set[int]]]]:
    """segment -> its recorded steps, oldest first: (run_id, members, joined ids, left ids), read in
    one snapshot of the store."""
    steps, changes = deployment.store_query(
        f"select segment_id, run_id, observed_at, members from {STEPS_TABLE} order by segment_id, observed_at",
        f"select segment_id, run_id, observed_at, change, contact_id from {CHANGES_TABLE}",
    )
    by_step: dict[tuple[str, str, Any], dict[str, set[int]]] = {}
    for segment_id, run_id, observed_at, change, contact_id in changes:
        by_step.setdefault((segment_id, run_id, observed_at), {JOINED: set(), LEFT: set()})[change].add(int(contact_id))
    recorded: dict[str, list[tuple[str, int, set[int], set[int]]]] = {}
    for segment_id, run_id, observed_at, members in steps:
        step = by_step.pop((segment_id, run_id, observed_at), {JOINED: set(), LEFT: set()})
        recorded.setdefault(segment_id, []).append((run_id, int(members), step[JOINED], step[LEFT]))
    assert not by_step, f"changes without a step: {sorted(by_step)[:5]}"
    return recorded


def _pool_steps() -> set[str]:
    """The step keys of every op in the API pool, from the project's jobs."""
    defs = project_defs()
    jobs = (defs.resolve_implicit_global_asset_job_def(), defs.resolve_job_def("match_all_kickoff_job"))
    steps = {name for job in jobs for name, node in job.graph.node_dict.items() if API_POOL in node.definition.pools}
    assert {"segment_matches", "start_match_all_runs"} <= steps
    return steps


def _pool_step_intervals(instance: dg.DagsterInstance, run_ids: list[str]) -> list[tuple[float, float, str]]:
    """(start, end, run/step) of every API step of these runs, from their events."""
    intervals = []
    pool_steps = _pool_steps()
    kinds = {dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE}
    for run_id in run_ids:
        started: dict[str, float] = {}
        for record in instance.get_records_for_run(run_id, of_type=kinds).records:
            entry = record.event_log_entry
            if entry.step_key not in pool_steps:
                continue
            if entry.dagster_event_type == dg.DagsterEventType.STEP_START:
                started[entry.step_key] = entry.timestamp
            elif entry.step_key in started:
                intervals.append((started.pop(entry.step_key), entry.timestamp, f"{run_id}/{entry.step_key}"))
    return sorted(intervals)


def _finished(instance: dg.DagsterInstance, run_id: str) -> bool:
    run = instance.get_run_by_id(run_id)
    return run is not None and run.is_finished


def _most_at_once(intervals: list[tuple[float, float, str]]) -> int:
    """The most intervals open at one moment (an end before a start at the same instant)."""
    edges = sorted([(start, 1) for start, _, _ in intervals] + [(end, -1) for _, end, _ in intervals])
    return max(itertools.accumulate(step for _, step in edges), default=0)


def _budget_places(deployment: Deployment) -> int:
    """Places in the account's budget table in PostgreSQL (those not yet cleaned out of the window)."""
    store = BudgetStore.parse(deployment.env["MATCHALL_REQUEST_BUDGET"])
    assert store.kind == "postgresql"
    with psycopg.connect(store.location) as connection:
        tables = connection.execute(
            "select tablename from pg_tables where tablename like 'ratelimit___matchall_budget_%'"
        ).fetchall()
        assert len(tables) == 1, tables  # one account, one window
        total = connection.execute(f'select count(*) from "{tables[0][0]}"').fetchone()
    assert total is not None
    return int(total[0])


@pytest.mark.timeout(E2E_TIMEOUT + 120)
def test_production_stack_end_to_end(deployment: Deployment) -> None:
    """Discovery, the schedule, readiness polling, the queue, the pool, materializations and checks,
    all on PostgreSQL through a real daemon; the outcome read from the instance and from the
    membership store, PostgreSQL as well (MATCHALL_STORE, the schema `matchall`)."""
    started = time.monotonic()
    with deployment.instance() as instance:
        deployment.wait_for(
            lambda: _outcome_reached(instance, deployment),
            timeout=E2E_TIMEOUT,
            what="every ready segment materialized and complete, the failing and expiring segments judged, "
            "and a successful run of the schedule",
        )
        waited = time.monotonic() - started

        # The instance is PostgreSQL, with this session's database.
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert database_exists(deployment.postgres_db)
        all_segments = {*deployment.ready_segments, deployment.failing_segment, deployment.expiring_segment} - {None}
        assert set(instance.get_dynamic_partitions("segments")) == all_segments

        # The sensors ticked and the schedule fired, each launching runs.
        ticks = _ticks(instance)
        for name in (DISCOVERY, READINESS, SCHEDULE):
            launched = [tick for tick in ticks.get(name, []) if tick.status.value == "SUCCESS" and tick.run_ids]
            assert launched, f"{name} has no tick that launched a run: {[t.status.value for t in ticks.get(name, [])]}"

        # Every run went through the queue, was launched, and none failed.
        runs = _runs(instance)
        enqueued = {
            record.event_log_entry.run_id
            for record in instance.fetch_run_status_changes(dg.DagsterEventType.RUN_ENQUEUED, limit=10_000).records
        }
        finished = [
            r for r in runs if r.dagster_run.status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE)
        ]
        assert finished
        assert {r.dagster_run.run_id for r in finished} <= enqueued
        for record in finished:
            assert record.start_time is not None, f"run {record.dagster_run.run_id} finished without starting"
            tags = record.dagster_run.tags
            assert (
                tags.get("dagster/sensor_name") in (DISCOVERY, READINESS, CHANGES_SENSOR)
                or tags.get("dagster/schedule_name") == SCHEDULE
            ), f"run {record.dagster_run.run_id} was not launched by a sensor or the schedule: {tags}"
        # No run failed but the checks run alone on a failed or expired remote run: those checks block,
        # and a blocking check that fails fails its run.
        failing = (deployment.failing_segment, deployment.expiring_segment)
        failed = [r.dagster_run for r in runs if r.dagster_run.status == dg.DagsterRunStatus.FAILURE]
        unexpected = [
            run.run_id
            for run in failed
            if not (
                run.asset_check_selection and not run.asset_selection and run.tags.get("dagster/partition") in failing
            )
        ]
        assert unexpected == [], f"runs failed: {unexpected}; see {deployment.artifacts}"

        # The API pool's limit, from deploy/dagster.yaml, held: never more API steps at once.
        limit = instance.event_log_storage.get_concurrency_info(API_POOL).limit
        assert limit == 2
        # (The automation sensor's runs compute in the store alone: no API step.)
        api_runs = [r for r in finished if r.dagster_run.tags.get("dagster/sensor_name") != CHANGES_SENSOR]
        intervals = _pool_step_intervals(instance, [r.dagster_run.run_id for r in finished])
        assert len(intervals) >= len(api_runs)
        assert _most_at_once(intervals) <= limit
        # Every process took from the one budget in PostgreSQL (its table is there, with places).
        assert _budget_places(deployment) > 0

        # Each ready segment: materialized by a readiness-sensor run from a ready remote run, in its
        # sort, complete; its rows in the store are exactly the simulator's truth for that run (the
        # evolving segment's membership changes from one run to the next).
        simulator = deployment.simulator
        for segment_id in deployment.ready_segments:
            materialization = _latest_materialization(instance, segment_id)
            assert materialization is not None
            assert materialization.asset_materialization is not None
            metadata = {key: value.value for key, value in materialization.asset_materialization.metadata.items()}
            generation = simulator.runs[str(metadata["run_id"])].generation
            truth = simulator.truth(segment_id, str(metadata["sort"]), generation)
            assert metadata["dagster/row_count"] == metadata["page_total"] == len(truth)
            run = instance.get_run_by_id(materialization.run_id)
            assert run is not None
            assert run.tags.get("dagster/sensor_name") == READINESS
            if run.job_name == "read_small_segments":  # read in a batch: the run's config names the remote run
                ops: Any = run.run_config["ops"]
                (config,) = (op["config"] for op in ops.values())
                (read,) = (read for read in config["reads"] if read["segment_id"] == segment_id)
                assert read["run_id"] == metadata["run_id"]
            else:
                assert run.tags.get("matchall/run_id") == metadata["run_id"]
        for never_ready in (deployment.failing_segment, deployment.expiring_segment):
            if never_ready is not None:
                assert _latest_materialization(instance, never_ready) is None

        # The failing segment's run_not_failed failed in a run of its own, judging a run of that
        # segment that really failed; the expiring segment's run_not_expired likewise.
        judged: list[tuple[str, str]] = [(RUN_NOT_FAILED, deployment.failing_segment)]
        if deployment.expiring_segment is not None:
            judged.append((RUN_NOT_EXPIRED, deployment.expiring_segment))
        for check_name, judged_segment in judged:
            run_ids = _check_outcomes(instance, check_name)[(judged_segment, "FAILED")]
            for run_id in run_ids:
                run = instance.get_run_by_id(run_id)
                assert run is not None
                assert run.tags.get("dagster/sensor_name") == READINESS
                assert run.tags["matchall/run_id"] in simulator.runs or check_name == RUN_NOT_EXPIRED
                if check_name == RUN_NOT_FAILED:
                    assert simulator.runs[run.tags["matchall/run_id"]].segment.id == judged_segment

        # The store holds exactly the truth of every ready segment, nothing of the others.
        stored = _stored_rows_match_materializations(deployment, instance)
        _stored_in_postgresql(deployment, stored)

        # segment_membership_changes follows each ready segment, computed by the automation sensor
        # alone; the evolving segment has changed at least once.
        evolving = deployment.evolving_segment
        deployment.wait_for(
            lambda: (
                all(_changes_materializations(instance, s) for s in deployment.ready_segments)
                and len(_changes_materializations(instance, evolving)) >= 2
            ),
            timeout=CHANGES_TIMEOUT,
            what=f"segment_membership_changes of every ready segment, twice for the evolving segment {evolving}",
        )
        changes_waited = time.monotonic() - started - waited
        changes_records = {s: _changes_materializations(instance, s) for s in deployment.ready_segments}
        # A materialization is logged before its run ends: wait for those runs to finish.
        change_runs = {change.run_id for records in changes_records.values() for change in records}
        deployment.wait_for(
            lambda: all(_finished(instance, run_id) for run_id in change_runs),
            timeout=120,
            what="the runs of those membership changes to finish",
        )
        for segment_id, records in changes_records.items():
            for change in records:
                run = instance.get_run_by_id(change.run_id)
                assert run is not None
                # The automation's run, or the batch of small segments that read it (it records the changes).
                by_batch = run.job_name == "read_small_segments" and run.tags.get("dagster/sensor_name") == READINESS
                assert by_batch or run.tags.get("dagster/sensor_name") == CHANGES_SENSOR, (segment_id, run.tags)
                assert run.status == dg.DagsterRunStatus.SUCCESS
        for never_ready in (deployment.failing_segment, deployment.expiring_segment):
            if never_ready is not None:
                assert _changes_materializations(instance, never_ready) == []
        materialized_runs = {
            s: {str(r.asset_materialization.metadata["run_id"].value) for r in records if r.asset_materialization}
            for s, records in changes_records.items()
        }

    # Each step in the store is exactly the difference between the simulator's generations of the
    # runs it compared: the first step's run (everyone joined), then each next step's run.
    recorded = _steps_and_changes(deployment)
    assert sorted(recorded) == sorted(deployment.ready_segments)
    generations_seen: set[int] = set()
    for segment_id, steps in recorded.items():
        assert materialized_runs[segment_id] <= {run_id for run_id, *_ in steps}  # each materialization's step
        previous: set[int] = set()
        for run_id, members, joined, left in steps:
            generation = simulator.runs[run_id].generation
            current = set(simulator.truth(segment_id, "id", generation))
            assert members == len(current), (segment_id, run_id)
            assert joined == current - previous, f"segment {segment_id}, run {run_id}: joined differs"
            assert left == previous - current, f"segment {segment_id}, run {run_id}: left differs"
            previous = current
            if segment_id == evolving:
                generations_seen.add(generation)
    evolving_steps = recorded[evolving]
    assert len(generations_seen) == len(evolving_steps) >= 2
    assert all(joined and left for _, _, joined, left in evolving_steps[1:]), "the evolving segment did not change"

    # The whole deployment stayed within the account's limit: the simulator counts arrivals.
    stats = simulator.stats()
    assert stats["by_status"].get(429, 0) == 0, stats["by_status"]
    assert stats["max_requests_in_any_second"] <= ACCOUNT_REQUESTS_PER_SECOND

    # The webserver serves the same instance.
    data = deployment.graphql(
        'query { assetNodeOrError(assetKey: {path: ["segment_matches"]}) { ... on AssetNode { partitionKeys kinds } } }'
    )
    assert set(data["assetNodeOrError"]["partitionKeys"]) == all_segments
    assert set(data["assetNodeOrError"]["kinds"]) == {"postgresql", "pandas"}  # the code location's store
    print(
        f"\nproduction end to end: outcome {waited:.0f} s after the stack was up, membership changes "
        f"{changes_waited:.0f} s later ({len(evolving_steps)} steps of segment {evolving}); {len(runs)} runs, "
        f"{len(intervals)} API steps one at a time; {stats['requests']} API requests, at most "
        f"{stats['max_requests_in_any_second']} in any second"
    )
