"""MatchAllComponent: configured in YAML, two accounts side by side, and in someone else's `dg` project."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import dagster as dg
import duckdb
import pytest
from psycopg import sql

from matchall_dagster.api.validation import DEFAULT_SORT
from matchall_dagster.orchestration.account import Account
from matchall_dagster.orchestration.names import MATCHES_COMPLETE, RUN_NOT_EXPIRED, RUN_NOT_FAILED
from matchall_dagster.orchestration.resource import ActiveCampaignResource
from matchall_dagster.simulator import DEFAULT_TOKEN, SimAccount, SimSegment, SimulatorServer
from matchall_dagster.storage.postgres_store import PostgresStore
from matchall_dagster.storage.store import StoreUrl, open_store
from matchall_dagster_tests.conftest import ServeSimulator

ROOT = Path(__file__).resolve().parent.parent

# The YAML of the two-account test (docs/component.md shows the same): one account on a DuckDB file,
# the other on PostgreSQL.
ACME = """\
type: matchall_dagster.MatchAllComponent
attributes:
  api_url: "{{ env.ACME_API_URL }}"
  api_key: "{{ env.ACME_API_KEY }}"
  requests_per_second: 3
  sort: "-id"
  kickoff_cron: "0 5 * * *"
  storage:
    url: "duckdb://{duckdb}"
  translation:
    key_prefix: [acme]
    group_name: acme
    owners: ["team:marketing-data"]
    tags: {client: acme}
"""
GLOBEX = """\
type: matchall_dagster.MatchAllComponent
attributes:
  api_url: "{{ env.GLOBEX_API_URL }}"
  api_key: "{{ env.GLOBEX_API_KEY }}"
  requests_per_second: 2
  segments:
    name_pattern: "^Newsletter"
  readiness_interval_seconds: 30
  storage:
    url: "{postgresql}"
  translation:
    key_prefix: [globex]
    group_name: globex
"""


def write_project(root: Path, package: str, components: dict[str, str]) -> None:
    """A `dg` project: pyproject.toml with [tool.dg], a package, and one folder per component in its defs/."""
    root.mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""\
            [project]
            name = "{package}"
            version = "0.0.1"

            [tool.dg]
            directory_type = "project"

            [tool.dg.project]
            root_module = "{package}"
            defs_module = "{package}.defs"
            """
        )
    )
    defs = root / package / "defs"
    defs.mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    (defs / "__init__.py").write_text("")
    (root / package / "definitions.py").write_text(
        "from pathlib import Path\n\nimport dagster as dg\n\n\n@dg.definitions\ndef defs() -> dg.Definitions:\n"
        "    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)\n"
    )
    for folder, yaml in components.items():
        (defs / folder).mkdir()
        (defs / folder / "defs.yaml").write_text(yaml)


@pytest.fixture
def agency(
    tmp_path: Path,
    serve_simulator: ServeSimulator,
    monkeypatch: pytest.MonkeyPatch,
    fast_budget: None,
    postgres_store: str,
) -> tuple[dg.Definitions, SimulatorServer, SimulatorServer]:
    """Two accounts, each with its own simulator and store (acme a DuckDB file, globex a PostgreSQL
    schema), loaded from one defs folder."""
    acme = serve_simulator(SimAccount(seed=1, segments=[SimSegment("1", "VIP", 30), SimSegment("2", "Trial", 12)]))
    globex = serve_simulator(
        SimAccount(
            seed=2,
            segments=[SimSegment("1", "Newsletter weekly", 7), SimSegment("5", "Churned", 9)],
        ),
        api_token="globex-token",
    )
    monkeypatch.setenv("ACME_API_URL", acme.url)
    monkeypatch.setenv("ACME_API_KEY", DEFAULT_TOKEN)
    monkeypatch.setenv("GLOBEX_API_URL", globex.url)
    monkeypatch.setenv("GLOBEX_API_KEY", "globex-token")
    monkeypatch.delenv("MATCHALL_SEGMENTS", raising=False)
    project = tmp_path / "agency_project"
    write_project(
        project,
        f"agency_{tmp_path.name}",  # a package name of its own: Python keeps an imported package for the session
        {
            "acme": ACME.replace("{duckdb}", str(tmp_path / "acme.duckdb")),
            "globex": GLOBEX.replace("{postgresql}", postgres_store),
        },
    )
    monkeypatch.syspath_prepend(str(project))
    return dg.load_from_defs_folder(path_within_project=project), acme, globex


def test_two_accounts_load_side_by_side_under_their_own_names(
    agency: tuple[dg.Definitions, SimulatorServer, SimulatorServer], tmp_path: Path, postgres_store: str
) -> None:
    defs, _, _ = agency
    keys = {key.to_user_string() for key in defs.resolve_all_asset_keys()}
    assert keys == {
        f"{account}/{asset}"
        for account in ("acme", "globex")
        for asset in ("segment_matches", "segment_membership_changes", "activecampaign_segments")
    }
    assert {sensor.name for sensor in defs.sensors or []} == {
        f"{account}_{sensor}"
        for account in ("acme", "globex")
        for sensor in ("segment_discovery_sensor", "match_all_readiness_sensor", "membership_changes_automation")
    }
    assert {schedule.name for schedule in defs.schedules or []} == {
        "acme_match_all_kickoff_schedule",
        "globex_match_all_kickoff_schedule",
    }
    resources = dict(defs.resources or {})
    assert set(resources) == {
        f"{account}_{kind}" for account in ("acme", "globex") for kind in ("activecampaign", "store", "io_manager")
    }
    # Each account's store, as its YAML names it, and the kind its assets show.
    globex_url = StoreUrl.parse(postgres_store)
    assert StoreUrl.parse(resources["acme_store"].url) == StoreUrl("duckdb", str(tmp_path / "acme.duckdb"))
    assert StoreUrl.parse(resources["globex_store"].url) == globex_url
    assert StoreUrl.parse(resources["globex_io_manager"].store) == globex_url
    acme, globex = Account(key_prefix=("acme",)), Account(key_prefix=("globex",))
    acme_matches, globex_matches = defs.get_assets_def(acme.matches_key), defs.get_assets_def(globex.matches_key)
    assert acme_matches.partitions_def == dg.DynamicPartitionsDefinition(name="acme_segments")
    assert globex_matches.partitions_def == dg.DynamicPartitionsDefinition(name="globex_segments")
    assert acme_matches.op.pool == "acme_activecampaign"
    # Each account's budget share and its own budget key (the URL); the key stays an environment variable.
    acme_api, globex_api = resources["acme_activecampaign"], resources["globex_activecampaign"]
    assert isinstance(acme_api, ActiveCampaignResource)
    assert isinstance(globex_api, ActiveCampaignResource)
    assert (acme_api.requests_per_second, globex_api.requests_per_second) == (3, 2)
    assert acme_api.api_key == dg.EnvVar("ACME_API_KEY")
    assert isinstance(acme_api.api_key, dg.EnvVar)
    # Translation and choices.
    spec = acme_matches.specs_by_key[acme.matches_key]
    assert (spec.group_name, spec.owners, spec.tags.get("client")) == ("acme", ["team:marketing-data"], "acme")
    assert spec.kinds == {"duckdb", "pandas"}
    assert globex_matches.specs_by_key[globex.matches_key].kinds == {"postgresql", "pandas"}
    assert defs.resolve_sensor_def("globex_match_all_readiness_sensor").minimum_interval_seconds == 30
    assert defs.resolve_schedule_def("acme_match_all_kickoff_schedule").cron_schedule == "0 5 * * *"
    assert defs.resolve_schedule_def("globex_match_all_kickoff_schedule").cron_schedule == "0 6 * * *"


def _materialize(defs: dg.Definitions, instance: dg.DagsterInstance, account: Account, segment_id: str) -> None:
    instance.add_dynamic_partitions(account.partitions_name, [segment_id])
    result = defs.resolve_job_def(account.name("segment_matches_job")).execute_in_process(
        instance=instance, partition_key=segment_id
    )
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {RUN_NOT_FAILED: True, RUN_NOT_EXPIRED: True, MATCHES_COMPLETE: True}


def test_one_partition_of_each_account_lands_in_its_own_store(
    agency: tuple[dg.Definitions, SimulatorServer, SimulatorServer],
    tmp_path: Path,
    instance: dg.DagsterInstance,
    postgres_store: str,
) -> None:
    defs, acme_server, globex_server = agency
    acme, globex = Account(key_prefix=("acme",)), Account(key_prefix=("globex",))
    # Both accounts have a segment "1"; each partition reads its own account (30 and 7 members).
    _materialize(defs, instance, acme, "1")
    _materialize(defs, instance, globex, "1")
    with duckdb.connect(str(tmp_path / "acme.duckdb"), read_only=True) as connection:
        acme_rows = connection.execute(
            "select position, contact_id from main.segment_matches where segment_id = '1' order by position"
        ).fetchall()
    assert [contact for _, contact in acme_rows] == acme_server.simulator.truth("1", "-id")
    assert [position for position, _ in acme_rows] == list(range(1, 31))
    # globex's partition is in its PostgreSQL schema, in a partition table of its own; nothing of it in a file.
    globex_url = StoreUrl.parse(postgres_store)
    stored = open_store(globex_url).read_partition("1")
    assert stored["contact_id"].tolist() == globex_server.simulator.truth("1", DEFAULT_SORT)
    assert stored["position"].tolist() == list(range(1, 8))
    store = open_store(globex_url)
    assert isinstance(store, PostgresStore)
    with store.transaction() as connection:
        (count,) = connection.execute(
            sql.SQL("select count(*) from {}.{}").format(
                sql.Identifier(globex_url.schema), sql.Identifier("segment_matches")
            )
        ).fetchone() or (None,)
    assert count == 7
    assert sorted(path.name for path in tmp_path.glob("*.duckdb")) == ["acme.duckdb"]
    for account, sort, kind, table in (
        (acme, "-id", "duckdb", "acme.main.segment_matches"),
        (globex, DEFAULT_SORT, "postgresql", f"{globex_url.database}.{globex_url.schema}.segment_matches"),
    ):
        record = instance.fetch_materializations(account.matches_key, limit=1).records[0]
        assert record.asset_materialization is not None
        metadata = record.asset_materialization.metadata
        assert metadata["sort"].value == sort
        assert (metadata["dagster/storage_kind"].value, metadata["dagster/table_name"].value) == (kind, table)
    assert instance.get_dynamic_partitions("segments") == []  # the default account's names are untouched


def test_a_name_pattern_tracks_only_the_segments_it_matches(
    agency: tuple[dg.Definitions, SimulatorServer, SimulatorServer], instance: dg.DagsterInstance
) -> None:
    defs, _, _ = agency
    sensor = defs.resolve_sensor_def("globex_segment_discovery_sensor")
    with dg.build_sensor_context(
        instance_ref=instance.get_ref(), definitions=defs, resources=defs.resources
    ) as context:
        result = sensor.evaluate_tick(context)
    (added,) = [r for r in result.dynamic_partitions_requests or [] if isinstance(r, dg.AddDynamicPartitionsRequest)]
    assert (added.partitions_def_name, list(added.partition_keys)) == ("globex_segments", ["1"])
    (kickoff,) = [r for r in result.run_requests or [] if r.job_name == "globex_match_all_kickoff_job"]
    assert kickoff.run_config == {"ops": {"globex_start_match_all_runs": {"config": {"segment_ids": ["1"]}}}}


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ('api_url: "https://x.api-us1.com"\n  api_key: "{{ env.K }}"', "'{{ env.NAME }}'"),
        ('api_url: "{{ env.U }}"\n  api_key: "{{ env.K }}"\n  translation: {key_prefix: ["a-b"]}', "key_prefix"),
        ('api_url: "{{ env.U }}"\n  api_key: "{{ env.K }}"\n  segments: {name_pattern: "(" }', "name_pattern"),
        ('api_url: "{{ env.U }}"\n  api_key: "{{ env.K }}"\n  sort: "shoe_size"', "shoe_size"),
        ('api_url: "{{ env.U }}"\n  api_key: "{{ env.K }}"\n  kickoff_cron: "every day"', "every day"),
        ('api_url: "{{ env.U }}"\n  api_key: "{{ env.K }}"\n  storage: {url: "mysql://m@db/w"}', "postgresql://"),
        ('api_url: "{{ env.U }}"\n  api_key: "{{ env.K }}"\n  storage: {url: "postgresql://m@db"}', "DATABASE"),
        (
            'api_url: "{{ env.U }}"\n  api_key: "{{ env.K }}"\n  storage: {url: "postgresql://m:secret@db/w"}',
            "set PGPASSWORD",
        ),
    ],
    ids=[
        "inline key",
        "key prefix",
        "name pattern",
        "sort",
        "cron",
        "store engine",
        "store database",
        "store password",
    ],
)
def test_bad_yaml_is_refused_with_what_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attributes: str, message: str
) -> None:
    project = tmp_path / "bad_project"
    write_project(
        project,
        f"bad_{tmp_path.name}",
        {"one": f"type: matchall_dagster.MatchAllComponent\nattributes:\n  {attributes}\n"},
    )
    monkeypatch.syspath_prepend(str(project))
    with pytest.raises(Exception) as raised:  # noqa: PT011  # Dagster wraps the component's error
        dg.load_from_defs_folder(path_within_project=project)
    text = "".join(str(e) for e in (raised.value, raised.value.__cause__) if e is not None)
    assert message in text
    assert "secret" not in text


def _run(command: str, *args: str, cwd: Path, env: dict[str, str]) -> str:
    """A command of this virtualenv (`dg`, `create-dagster`), in `cwd`."""
    done = subprocess.run(
        [str(Path(sys.executable).with_name(command)), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_added_to_someone_elses_dg_project_in_three_commands(tmp_path: Path) -> None:
    """The README's steps in a fresh project made by `create-dagster` (no network, no uv): install
    matchall-dagster (already in this virtualenv), `dg scaffold defs`, then `dg check defs` and
    `dg list defs` show the account's assets, checks, sensors and schedule."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("ACTIVECAMPAIGN_", "MATCHALL_", "DAGSTER_"))},
        "DAGSTER_HOME": str(tmp_path / "home"),
        "DAGSTER_DG_UPDATE_CHECK_ENABLED": "0",
        "NO_COLOR": "1",
        "COLUMNS": "200",
    }
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    _run("create-dagster", "project", "their_project", "--no-uv-sync", cwd=tmp_path, env=env)
    project = tmp_path / "their_project"
    env["PYTHONPATH"] = str(project / "src")  # what `pip install -e .` of their project would give
    assert "matchall_dagster.MatchAllComponent" in _run("dg", "list", "components", cwd=project, env=env)
    _run("dg", "scaffold", "defs", "matchall_dagster.MatchAllComponent", "activecampaign", cwd=project, env=env)
    yaml = (project / "src" / "their_project" / "defs" / "activecampaign" / "defs.yaml").read_text()
    assert "{{ env.ACTIVECAMPAIGN_API_KEY }}" in yaml
    # The scaffolded YAML loads as it is: no variable is read before a step calls the API.
    assert "All definitions loaded successfully" in _run("dg", "check", "defs", cwd=project, env=env)
    listed = json.loads(_run("dg", "list", "defs", "--json", cwd=project, env=env))
    names = json.dumps(listed)
    for name in (
        "segment_matches",
        "segment_membership_changes",
        "activecampaign_segments",
        "matches_complete",
        "run_not_failed",
        "match_all_readiness_sensor",
        "segment_discovery_sensor",
        "match_all_kickoff_schedule",
    ):
        assert name in names
