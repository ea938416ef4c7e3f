"""Fixtures declared once: simulated accounts served over real HTTP on 127.0.0.1."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from matchall_dagster import ActiveCampaignClient
from matchall_dagster.api.budget import MEMORY, Priority, RequestBudget, request_budget
from matchall_dagster.definitions import build_definitions
from matchall_dagster.orchestration.names import MATCHES_COMPLETE, RUN_NOT_EXPIRED, RUN_NOT_FAILED
from matchall_dagster.orchestration.resource import ActiveCampaignResource
from matchall_dagster.settings import settings
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
from matchall_dagster_tests.strict import StrictAnswers

PAGING_SIZES = {"empty": 0, "one": 1, "9999": 9_999, "10000": 10_000, "10001": 10_001, "25001": 25_001}
UUID_SEGMENT = "1ab85f0e-3b5c-4a35-bc07-242c68a7d195132"
SEGMENT_MATCHES = dg.AssetKey("segment_matches")
CHECKS = (RUN_NOT_FAILED, RUN_NOT_EXPIRED, MATCHES_COMPLETE)


def make_account() -> SimAccount:
    """Every paging edge, both id styles, and every run fate."""
    segments = [SimSegment(f"{size}", name, size) for name, size in PAGING_SIZES.items() if size]
    return SimAccount(
        seed=7,
        segments=[
            *segments,
            SimSegment("100", "Empty", 0),
            SimSegment(UUID_SEGMENT, "UUID id", 12_345),
            SimSegment("500000", "Half a million", 500_000),
            SimSegment("1000000", "A million", 1_000_000),
            SimSegment("77", "Fails", 50, behavior=Behavior.FAIL),
            SimSegment("88", "Expires", 50, behavior=Behavior.EXPIRE, expire_after=60.0),
            SimSegment("99", "Slow", 50, ready_after=3_600.0),
        ],
    )


ServeSimulator = Callable[..., SimulatorServer]


@pytest.fixture
def fast_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """The account's budget at 1,000 requests/s for every resource built in this test: these
    simulators have no limit, and a tick would otherwise wait for its places at 5/s (what a tick
    may send, `REQUESTS_PER_TICK`, is unchanged)."""

    def fast(self: ActiveCampaignResource, priority: Priority = Priority.BULK) -> RequestBudget:
        return request_budget(MEMORY, self.api_url, 1000, priority)

    monkeypatch.setattr(ActiveCampaignResource, "budget", fast)


@pytest.fixture(autouse=True)
def fresh_settings() -> Iterator[None]:
    """Each test reads the settings of its own environment (a process reads them once)."""
    settings.cache_clear()
    yield
    settings.cache_clear()


def set_setting(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    """Set a MATCHALL_* variable for the rest of the test, as a new process would read it."""
    monkeypatch.setenv(name, value)
    settings.cache_clear()


@pytest.fixture
def serve_simulator() -> Iterator[ServeSimulator]:
    """Start simulators (torn down after the test): `serve_simulator(faults=..., ready_after=...)`.

    Every API answer they give is validated against the strict form of the published documents;
    the test fails at teardown if one broke it (injected faults excepted)."""
    servers: list[SimulatorServer] = []
    answers = StrictAnswers()

    def start(account: SimAccount | None = None, **config: Any) -> SimulatorServer:
        config.setdefault("ready_after", 0.0)
        config.setdefault("requests_per_second", 0)
        config.setdefault("faults", Faults())
        simulator = Simulator(account or make_account(), SimulatorConfig(**config), on_answer=answers)
        server = SimulatorServer(simulator).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
    report = answers.report()
    if report is not None:
        pytest.fail(report, pytrace=False)


@pytest.fixture
def server(serve_simulator: ServeSimulator) -> SimulatorServer:
    return serve_simulator()


class SleepRecorder:
    """Stands in for time.sleep in retry and polling paths: records, and moves its own clock
    (`clock`) forward instead of waiting."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self.now = 1_000.0

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


@pytest.fixture
def sleeps() -> SleepRecorder:
    return SleepRecorder()


@pytest.fixture
def make_client(sleeps: SleepRecorder) -> Iterator[Callable[..., ActiveCampaignClient]]:
    clients: list[ActiveCampaignClient] = []

    def build(server: SimulatorServer, **options: Any) -> ActiveCampaignClient:
        options.setdefault("requests_per_second", 1000)
        options.setdefault("sleep", sleeps)
        client = ActiveCampaignClient(server.url, options.pop("api_key", DEFAULT_TOKEN), **options)
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.close()


@pytest.fixture
def client(server: SimulatorServer, make_client: Callable[..., ActiveCampaignClient]) -> ActiveCampaignClient:
    return make_client(server)


@pytest.fixture
def duckdb_file(tmp_path: Path) -> Path:
    return tmp_path / "matchall.duckdb"


@pytest.fixture(scope="session")
def postgres_test_database() -> Iterator[str]:
    """One database on the local server (127.0.0.1:5432, trust auth) for the session's store tests, dropped at
    the end; each test takes a schema of its own in it (`postgres_store`)."""
    from matchall_dagster_tests.deployment import postgres_database, require_postgres

    require_postgres()
    with postgres_database("matchall_store") as name:
        yield name


@pytest.fixture
def postgres_store(postgres_test_database: str) -> str:
    """A store URL on the local PostgreSQL server, in a schema of this test's own."""
    from matchall_dagster_tests.deployment import PG_HOST, PG_PORT, PG_USER

    schema = f"t_{uuid.uuid4().hex[:12]}"
    return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{postgres_test_database}?schema={schema}"


@pytest.fixture(params=["duckdb", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A membership store of each engine: a DuckDB file, then a PostgreSQL schema (the same contract)."""
    if request.param == "duckdb":
        return f"duckdb://{tmp_path / 'matchall.duckdb'}"
    return str(request.getfixturevalue("postgres_store"))


@pytest.fixture
def simulator_env(server: SimulatorServer, monkeypatch: pytest.MonkeyPatch) -> SimulatorServer:
    """The environment the definitions read, pointed at the test's simulator."""
    monkeypatch.setenv("ACTIVECAMPAIGN_API_URL", server.url)
    monkeypatch.setenv("ACTIVECAMPAIGN_API_KEY", DEFAULT_TOKEN)
    monkeypatch.delenv("MATCHALL_SEGMENTS", raising=False)
    return server


@pytest.fixture
def defs(simulator_env: SimulatorServer, duckdb_file: Path) -> dg.Definitions:
    """The project's real definitions, against the test's simulator and DuckDB file."""
    return build_definitions(store=str(duckdb_file))


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


@contextmanager
def sensor_context(
    instance: dg.DagsterInstance, defs: dg.Definitions, cursor: str | None = None
) -> Iterator[dg.SensorEvaluationContext]:
    """A sensor context that can add partitions and request partitioned runs, as the daemon's does."""
    with dg.build_sensor_context(
        instance_ref=instance.get_ref(), definitions=defs, resources=defs.resources, cursor=cursor
    ) as context:
        yield context


def apply_tick(instance: dg.DagsterInstance, data: dg.SensorExecutionData) -> None:
    """What the daemon does with a tick's result besides launching runs: store its asset events,
    then add and delete the dynamic partitions it asks for."""
    for event in data.asset_events:
        instance.report_runless_asset_event(event)
    for request in data.dynamic_partitions_requests or []:
        keys = list(request.partition_keys)
        if isinstance(request, dg.AddDynamicPartitionsRequest):
            known = set(instance.get_dynamic_partitions(request.partitions_def_name))
            instance.add_dynamic_partitions(request.partitions_def_name, [k for k in keys if k not in known])
        else:
            for key in keys:
                if instance.has_dynamic_partition(request.partitions_def_name, key):
                    instance.delete_dynamic_partition(request.partitions_def_name, key)


def materialize_catalog(
    defs: dg.Definitions, instance: dg.DagsterInstance, *, raise_on_error: bool = True
) -> dg.ExecuteInProcessResult:
    """A run of the catalog's job, as discovery requests it."""
    return defs.resolve_job_def("activecampaign_segments_job").execute_in_process(
        instance=instance, resources=defs.resources, raise_on_error=raise_on_error
    )


def materialize_segment(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    segment_id: str,
    config: Mapping[str, Any] | None = None,
    *,
    resources: Mapping[str, Any] | None = None,
    raise_on_error: bool = True,
    tags: Mapping[str, str] | None = None,
) -> dg.ExecuteInProcessResult:
    """The asset with its checks, as the UI's "Materialize" of one partition runs them."""
    if segment_id not in instance.get_dynamic_partitions("segments"):
        instance.add_dynamic_partitions("segments", [segment_id])
    return dg.materialize(
        [
            defs.get_assets_def(SEGMENT_MATCHES),
            *(
                defs.get_asset_checks_def(dg.AssetCheckKey(SEGMENT_MATCHES, c))
                for c in (RUN_NOT_FAILED, RUN_NOT_EXPIRED, MATCHES_COMPLETE)
            ),
        ],
        partition_key=segment_id,
        run_config={"ops": {"segment_matches": {"config": dict(config or {})}}},
        instance=instance,
        resources=resources if resources is not None else defs.resources,
        raise_on_error=raise_on_error,
        tags=tags,
    )


@pytest.fixture(scope="session")
def deployment() -> Iterator[Any]:
    """The production stack (deploy/dagster.yaml on PostgreSQL, dagster-daemon, dagster-webserver,
    a small simulated account), started once per session; logs in test-artifacts/deployment/.
    Skips without PostgreSQL at 127.0.0.1:5432, except under CI=true."""
    from matchall_dagster_tests.deployment import ARTIFACTS, require_postgres, run_deployment

    require_postgres()
    with run_deployment(ARTIFACTS / "deployment") as running:
        yield running


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the production stack run last, so that its daemon (and the runs it launches every
    minute) does not share the machine with the rest of the suite."""
    items.sort(key=lambda item: "deployment" in getattr(item, "fixturenames", ()))
