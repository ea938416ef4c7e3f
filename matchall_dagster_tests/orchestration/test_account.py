"""What every account's definitions carry: blocking checks, the freshness policy, table metadata."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import dagster as dg
import pytest

from matchall_dagster import ActiveCampaignResource
from matchall_dagster.definitions import account_definitions, kickoff_freshness
from matchall_dagster.orchestration.account import DEFAULT_ACCOUNT, Account, SegmentSelection
from matchall_dagster.orchestration.catalog import read_catalog
from matchall_dagster.orchestration.names import MATCHES_COMPLETE
from matchall_dagster.settings import ConfigurationError
from matchall_dagster.simulator import DEFAULT_TOKEN, SimAccount, SimSegment, SimulatorServer
from matchall_dagster.storage.store import StoreUrl, open_store
from matchall_dagster_tests.conftest import ServeSimulator, materialize_segment, set_setting
from matchall_dagster_tests.orchestration.stores import execute

MATCHES = DEFAULT_ACCOUNT.matches_key
CHANGES = DEFAULT_ACCOUNT.changes_key


def test_a_partition_whose_blocking_check_failed_is_never_diffed(
    defs: dg.Definitions, instance: dg.DagsterInstance, server: SimulatorServer, duckdb_file: Path
) -> None:
    """Rows lost between the write and the check: matches_complete fails, and the membership history
    of that partition waits, while the partition beside it is diffed."""
    selection = dg.AssetSelection.assets(CHANGES)
    idle = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=selection)
    materialize_segment(defs, instance, "9999")  # its checks pass
    # "10000": the asset alone, then a row lost, then its checks in a run of their own.
    instance.add_dynamic_partitions(DEFAULT_ACCOUNT.partitions_name, ["10000"])
    assert dg.materialize(
        [defs.get_assets_def(MATCHES)], partition_key="10000", instance=instance, resources=defs.resources
    ).success
    execute(duckdb_file, "delete from main.segment_matches where segment_id = '10000' and position = 7")
    complete = dg.AssetCheckKey(MATCHES, MATCHES_COMPLETE)
    job = defs.resolve_job_def("segment_matches_job").get_subset(
        asset_selection=set(), asset_check_selection={complete}
    )
    checks = job.execute_in_process(partition_key="10000", instance=instance, raise_on_error=False)
    (verdict,) = checks.get_asset_check_evaluations()
    assert not verdict.passed
    assert not checks.success  # a blocking check that fails fails its run
    assert verdict.description is not None
    assert "9999 rows stored where the run holds 10000" in verdict.description
    after = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, asset_selection=selection, cursor=idle.cursor
    )
    assert after.get_requested_partitions(CHANGES) == {"9999"}


def test_the_tables_are_described_for_the_ui(store_defs: dg.Definitions, store_url: str) -> None:
    """Columns with descriptions, the table's name (`<database>.<schema>.<table>` on each engine), the engine
    among the kinds, and the account's group on every asset."""
    defs = store_defs
    url = StoreUrl.parse(store_url)
    database = Path(url.location).stem if url.kind == "duckdb" else url.location.rsplit("/", 1)[-1]
    namespace = "main" if url.kind == "duckdb" else store_url.rsplit("schema=", 1)[-1]
    for key, table, columns in (
        (MATCHES, "segment_matches", ["segment_id", "position", "contact_id"]),
        (CHANGES, "segment_membership_changes", ["segment_id", "contact_id", "change", "run_id", "observed_at"]),
        (DEFAULT_ACCOUNT.catalog_key, "activecampaign_segments", None),
    ):
        spec = defs.get_assets_def(key).specs_by_key[key]
        schema = spec.metadata["dagster/column_schema"]
        assert isinstance(schema, dg.TableSchema)
        assert all(column.description for column in schema.columns)
        if columns is not None:
            assert [column.name for column in schema.columns] == columns
        assert spec.metadata["dagster/table_name"] == f"{database}.{namespace}.{table}"
        assert url.kind in spec.kinds
        assert spec.group_name == "activecampaign"
    assert isinstance(defs.get_assets_def(MATCHES).specs_by_key[MATCHES].freshness_policy, dg.FreshnessPolicy)


@pytest.mark.parametrize(
    ("cron", "gap"),
    [("0 6 * * *", timedelta(days=1)), ("0 6 * * 1-5", timedelta(days=1)), ("*/30 * * * *", timedelta(minutes=30))],
)
def test_the_freshness_window_is_the_shortest_gap_between_kickoffs(cron: str, gap: timedelta) -> None:
    policy = kickoff_freshness(cron)
    assert isinstance(policy, dg.FreshnessPolicy)
    assert (policy.deadline_cron, policy.lower_bound_delta) == (cron, gap)  # type: ignore[attr-defined]


def test_a_cron_that_never_fires_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"kickoff_cron .*'0 0 31 2 \*'.* Fix it"):
        kickoff_freshness("0 0 31 2 *")


def test_names_are_today_s_without_a_prefix_and_prefixed_with_one() -> None:
    assert (DEFAULT_ACCOUNT.matches_key, DEFAULT_ACCOUNT.pool, DEFAULT_ACCOUNT.name("segment_matches_job")) == (
        dg.AssetKey("segment_matches"),
        "activecampaign",
        "segment_matches_job",
    )
    acme = Account(key_prefix=("acme", "eu"))
    assert acme.matches_key == dg.AssetKey(["acme", "eu", "segment_matches"])
    assert (acme.pool, acme.partitions_name, acme.deleted_name) == (
        "acme_eu_activecampaign",
        "acme_eu_segments",
        "acme_eu_deleted_segments",
    )
    assert acme.check_op("matches_complete") == "acme__eu__segment_matches_matches_complete"


def test_a_prefixed_account_gets_a_duckdb_file_of_its_own(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    set_setting(monkeypatch, "MATCHALL_STORE", f"duckdb://{tmp_path / 'matchall.duckdb'}")
    assert DEFAULT_ACCOUNT.store_url() == StoreUrl("duckdb", str(tmp_path / "matchall.duckdb"))
    acme = Account(key_prefix=("acme", "eu"))
    assert acme.store_url() == StoreUrl("duckdb", str(tmp_path / "matchall_acme_eu.duckdb"))
    assert acme.table_name("segment_matches") == "matchall_acme_eu.main.segment_matches"
    own = Account(key_prefix=("acme",), store=f"duckdb://{tmp_path / 'elsewhere.duckdb'}")
    assert own.store_url() == StoreUrl("duckdb", str(tmp_path / "elsewhere.duckdb"))  # its own store, as given


def test_a_prefixed_account_gets_a_postgresql_schema_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    set_setting(monkeypatch, "MATCHALL_STORE", "postgresql://matchall@db.internal:5432/warehouse")
    default, acme = DEFAULT_ACCOUNT.store_url(), Account(key_prefix=("Acme", "eu")).store_url()
    assert (default.kind, default.schema, acme.kind, acme.schema) == (
        "postgresql",
        "matchall",
        "postgresql",
        "matchall_acme_eu",
    )
    assert acme.location == default.location  # the same server and database
    assert (
        Account(key_prefix=("Acme", "eu")).table_name("segment_matches") == "warehouse.matchall_acme_eu.segment_matches"
    )
    set_setting(monkeypatch, "MATCHALL_STORE", "postgresql://matchall@db.internal:5432/warehouse?schema=crm")
    assert Account(key_prefix=("acme",)).store_url().schema == "crm_acme"
    assert str(Account(key_prefix=("acme",)).store_url()).endswith("/warehouse?schema=crm_acme")


def test_two_accounts_sharing_a_store_write_apart(
    store_url: str,
    serve_simulator: ServeSimulator,
    instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On each engine, through Dagster: the default account and a prefixed one, both on MATCHALL_STORE, write
    their catalog (the same table name) to the store's file or schema and to their own, each reading back its own."""
    set_setting(monkeypatch, "MATCHALL_STORE", store_url)
    servers = {
        "": serve_simulator(SimAccount([SimSegment("1", "Default's", 3)])),
        "acme": serve_simulator(SimAccount([SimSegment("2", "Acme's", 5)])),
    }
    accounts = {prefix: Account(key_prefix=(prefix,) if prefix else ()) for prefix in servers}
    for prefix, account in accounts.items():
        api = ActiveCampaignResource(api_url=servers[prefix].url, api_key=DEFAULT_TOKEN, requests_per_second=1000)
        defs = account_definitions(account, api)
        assert (
            defs.resolve_job_def(account.name("activecampaign_segments_job"))
            .execute_in_process(instance=instance, resources=defs.resources)
            .success
        )
    default_store, acme_store = (open_store(account.store_url()) for account in accounts.values())
    assert default_store.url != acme_store.url
    assert {k: e.name for k, e in read_catalog(default_store).items()} == {"1": "Default's"}
    assert {k: e.name for k, e in read_catalog(acme_store).items()} == {"2": "Acme's"}
    if default_store.url.kind == "duckdb":
        assert Path(acme_store.url.location).name == f"{Path(default_store.url.location).stem}_acme.duckdb"
    else:
        assert acme_store.url.schema == f"{default_store.url.schema}_acme"


@pytest.mark.parametrize(
    ("selection", "admitted"),
    [
        (SegmentSelection(), ["1", "2", "3"]),
        (SegmentSelection(ids=frozenset({"2"})), ["2"]),
        (SegmentSelection(name_pattern="^News"), ["1"]),
    ],
)
def test_a_selection_admits_by_id_or_by_name(selection: SegmentSelection, admitted: list[str]) -> None:
    names = {"1": "Newsletter", "2": "VIP"}
    assert selection.tracked(["1", "2", "3"], names, unknown_name=selection.name_pattern is None) == admitted
    assert SegmentSelection(name_pattern="^News").tracked(["3"], names, unknown_name=True) == ["3"]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Account(key_prefix=("acme-eu",)), "key_prefix: 'acme-eu' is not a name part"),
        (lambda: SegmentSelection(name_pattern="["), "name_pattern: '\\[' is not a regular expression"),
        (lambda: Account(sort="shoe_size"), "shoe_size"),
        (lambda: Account(readiness_interval_seconds=1), "readiness_interval_seconds: 1 is too short; give 5 or more"),
    ],
    ids=["key-prefix", "pattern", "sort", "interval"],
)
def test_a_bad_choice_says_what_to_fix(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()
