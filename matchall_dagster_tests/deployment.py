"""The production stack, for real, in one test session: deploy/dagster.yaml on PostgreSQL, a
`dagster-daemon` and a `dagster-webserver` as subprocesses, against a simulator with a small
account.

`run_deployment(artifacts)` creates a database of its own on the PostgreSQL server at
127.0.0.1:5432, starts everything, and on exit stops every process it started (by process
group, even when the test failed) and drops the database. That one database holds what
production keeps on its server: Dagster's instance, the memberships (MATCHALL_STORE, the schema
`matchall`) and the request budget. Logs of the daemon and the webserver and the DAGSTER_HOME
(with its compute logs) stay in the artifacts folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import psutil
import psycopg
import psycopg2
import pytest
from psycopg import sql

from matchall_dagster.simulator import (
    DEFAULT_TOKEN,
    Behavior,
    SimAccount,
    SimSegment,
    Simulator,
    SimulatorConfig,
    SimulatorServer,
)
from matchall_dagster.storage.store import MATCHES_TABLE, StoreUrl

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
DEPLOY_CONFIG = REPO / "deploy" / "dagster.yaml"
WORKSPACE = REPO / "workspace.yaml"

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"  # trust authentication on the test server: no password
STORE_SCHEMA = "matchall"  # the memberships' schema, as deploy/dagster.yaml and the Helm values name it

EVOLVING_SEGMENT = "204"
READY_SEGMENTS = ("201", "202", "203", EVOLVING_SEGMENT)
FAILING_SEGMENT = "209"
EXPIRING_SEGMENT = "210"
STOP_GRACE_SECONDS = 10.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Dagster's colored log format


def deployment_account() -> SimAccount:
    """Small segments that become ready in seconds (one of two pages, one empty, one whose
    membership changes from run to run: a tenth leaves and the size grows by 5%, so that its
    size-over-time plot moves), one whose runs fail, and one whose runs are gone (404) before the
    readiness sensor's first poll."""
    return SimAccount(
        seed=11,
        segments=[
            SimSegment("201", "Newsletter (small)", 1_234),
            SimSegment("202", "Two pages", 10_001),
            SimSegment("203", "Empty", 0),
            SimSegment(EVOLVING_SEGMENT, "Evolving membership", 3_000, churn=0.1, growth=0.05),
            SimSegment(FAILING_SEGMENT, "Broken definition", 40, behavior=Behavior.FAIL, ready_after=1.0),
            SimSegment(
                EXPIRING_SEGMENT,
                "Short-lived runs",
                30,
                behavior=Behavior.EXPIRE,
                expire_after=2.0,
                ready_after=3_600.0,
            ),
        ],
    )


def postgres_unreachable_reason() -> str | None:
    """Why the PostgreSQL server at 127.0.0.1:5432 cannot be used, or None when it can."""
    try:
        connection = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=3)
    except psycopg2.Error as exc:
        return f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT} as user {PG_USER!r}: {str(exc).strip()}"
    connection.close()
    return None


def require_postgres() -> None:
    """Skip without PostgreSQL, except under CI=true, where a missing server is a failure."""
    reason = postgres_unreachable_reason()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}. CI=true: the production end-to-end test must run; start PostgreSQL (trust auth).")
    pytest.skip(f"{reason}; skipping the production end-to-end test (under CI=true it fails instead).")


def _admin(statement: str) -> None:
    connection = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=5)
    try:
        connection.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
        with connection.cursor() as cursor:
            cursor.execute(statement)
    finally:
        connection.close()


@contextlib.contextmanager
def postgres_database(prefix: str = "matchall_e2e") -> Iterator[str]:
    """A database of our own for one session, dropped (with its open connections) at the end."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"  # letters, digits, underscores: safe as an identifier
    _admin(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def database_exists(name: str) -> bool:
    connection = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=5)
    try:
        with connection.cursor() as cursor:
            cursor.execute("select count(*) from pg_database where datname = %s", (name,))
            row = cursor.fetchone()
            return bool(row and row[0])
    finally:
        connection.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def patched_environ(values: Mapping[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass
class Service:
    """A subprocess in its own process group, its output in a log file."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    descendants: set[int] = field(default_factory=set)

    def alive(self) -> bool:
        return self.process.poll() is None

    def remember_descendants(self) -> None:
        """Run workers are started by the code server; note them while their parents live."""
        with contextlib.suppress(psutil.Error):
            self.descendants.update(child.pid for child in psutil.Process(self.process.pid).children(recursive=True))

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(_ANSI.sub("", line) for line in text.splitlines()[-lines:])

    def stop(self) -> None:
        """Ctrl-C to the group, then SIGKILL to the group and to any descendant that left it."""
        self.remember_descendants()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=STOP_GRACE_SECONDS)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in self.descendants:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        self.process.wait(timeout=10)


def start_service(name: str, command: list[str], env: Mapping[str, str], cwd: Path, log: Path) -> Service:
    with log.open("wb") as output:
        process = subprocess.Popen(  # our own commands, from the virtualenv
            command, env=dict(env), cwd=cwd, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Service(name, process, log)


@dataclass
class Deployment:
    """The running stack; the test reads the outcome from `instance()` and from the membership
    store (`store_url`, `store_query`, `stored_members`)."""

    webserver_url: str  # http://127.0.0.1:<ephemeral port>
    simulator_url: str
    dagster_home: Path  # holds deploy/dagster.yaml (copied); the PG variables are in `env`
    store_url: str  # MATCHALL_STORE of every process: postgresql://...?schema=matchall, no password
    postgres_db: str  # created for this session, dropped at the end
    ready_segments: list[str]
    evolving_segment: str  # one of ready_segments: each run of it sees the next generation
    failing_segment: str
    expiring_segment: str | None
    simulator: Simulator
    artifacts: Path
    env: dict[str, str]  # the children's environment (what differs from the test process's)
    services: list[Service] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)

    def instance(self) -> dg.DagsterInstance:
        """The same instance as the daemon's (deploy/dagster.yaml on this session's database);
        use it as a context manager so that its connections close."""
        with patched_environ(self.env):
            return dg.DagsterInstance.from_config(str(self.dagster_home))

    def store_query(self, *queries: str, params: Sequence[Any] = ()) -> list[list[tuple[Any, ...]]]:
        """The rows of each query (each given `params`), on the membership store's schema
        (search_path), in one repeatable-read transaction: one snapshot of the history's tables. (A partition of
        segment_matches is swapped in whole: a query sees the old rows or the new ones.)"""
        store = StoreUrl.parse(self.store_url)
        with psycopg.connect(store.location, connect_timeout=5) as connection:
            connection.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            with connection.transaction():
                connection.execute(sql.SQL("set local search_path to {}").format(sql.Identifier(store.schema)))
                return [connection.execute(query, list(params) or None).fetchall() for query in queries]

    def stored_members(self, segment_id: str) -> list[int]:
        """The partition's contact ids in position order, from the membership store."""
        (rows,) = self.store_query(
            f"select contact_id from {MATCHES_TABLE} where segment_id = %s order by position", params=[segment_id]
        )
        return [int(contact_id) for (contact_id,) in rows]

    def check_services(self) -> None:
        for service in self.services:
            service.remember_descendants()
            if not service.alive():
                raise AssertionError(
                    f"{service.name} exited with code {service.process.returncode}; its log ({service.log}) ends:\n"
                    f"{service.tail()}"
                )

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll `predicate` once a second until it holds; fail naming `what` and showing the logs."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_services()
            if predicate():
                return
            if time.monotonic() > deadline:
                tails = "\n\n".join(f"--- {s.name} ({s.log}):\n{s.tail(25)}" for s in self.services)
                raise AssertionError(f"Timed out after {timeout:.0f} s waiting for {what}. Logs:\n{tails}")
            time.sleep(1.0)

    def graphql(self, query: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A query to the webserver's GraphQL endpoint (what the UI itself asks)."""
        response = httpx.post(
            f"{self.webserver_url}/graphql", json={"query": query, "variables": dict(variables or {})}, timeout=30
        )
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        if body.get("errors"):
            raise AssertionError(f"GraphQL errors: {body['errors']}")
        data: dict[str, Any] = body["data"]
        return data


def store_url_in(database: str) -> str:
    """The membership store as production names it: the instance's server and database, the schema
    `matchall`, the password (none here: trust) from PGPASSWORD, never in the URL."""
    return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}?schema={STORE_SCHEMA}"


def _children_env(*, dagster_home: Path, simulator_url: str, database: str) -> dict[str, str]:
    return {
        "DAGSTER_HOME": str(dagster_home),
        "DAGSTER_PG_USERNAME": PG_USER,
        "DAGSTER_PG_PASSWORD": "",
        "DAGSTER_PG_HOST": PG_HOST,
        "DAGSTER_PG_DB": database,
        "DAGSTER_PG_PORT": str(PG_PORT),
        "ACTIVECAMPAIGN_API_URL": simulator_url,
        "ACTIVECAMPAIGN_API_KEY": DEFAULT_TOKEN,
        # The memberships in this session's database, schema `matchall`, as production keeps them.
        "MATCHALL_STORE": store_url_in(database),
        # The account's budget in this session's database, as deploy/dagster.yaml says production keeps it.
        "MATCHALL_REQUEST_BUDGET": f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}",
        "MATCHALL_KICKOFF_CRON": "* * * * *",  # the schedule fires within the session
        "MATCHALL_MAX_RUN_ATTEMPTS": "1",  # one failed run per kick-off: fewer runs on 2 cores
        "PYTHONUNBUFFERED": "1",
    }


def _wait_for_webserver(service: Service, url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive():
            raise AssertionError(f"dagster-webserver exited; its log ({service.log}) ends:\n{service.tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/server_info", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise AssertionError(f"dagster-webserver did not answer at {url} within {timeout:.0f} s:\n{service.tail()}")


@contextlib.contextmanager
def _claim(artifacts: Path) -> Iterator[Path]:
    """`artifacts`, locked for this session; when another session (a second pytest run at the same
    time) holds it, a sibling named after this process, so that neither empties the other's."""
    artifacts.parent.mkdir(parents=True, exist_ok=True)
    with (artifacts.parent / f".{artifacts.name}.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield artifacts.with_name(f"{artifacts.name}-{os.getpid()}")
            return
        try:
            yield artifacts
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def run_deployment(artifacts: Path) -> Iterator[Deployment]:
    """Start the stack with its logs in `artifacts` (emptied first); stop it all on exit."""
    with _claim(artifacts) as claimed, _started(claimed) as deployment:
        yield deployment


@contextlib.contextmanager
def _started(artifacts: Path) -> Iterator[Deployment]:
    shutil.rmtree(artifacts, ignore_errors=True)
    dagster_home = artifacts / "dagster_home"
    dagster_home.mkdir(parents=True)
    shutil.copy(DEPLOY_CONFIG, dagster_home / "dagster.yaml")
    bin_dir = Path(sys.executable).parent
    port = free_port()
    account = deployment_account()
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(
            # The account's own limit (5/s) is enforced: a request over it would be answered 429.
            SimulatorServer(Simulator(account, SimulatorConfig(ready_after=2.0, requests_per_second=5.0)))
        )
        database = stack.enter_context(postgres_database())
        overrides = _children_env(
            dagster_home=dagster_home,
            simulator_url=server.url,
            database=database,
        )
        deployment = Deployment(
            webserver_url=f"http://127.0.0.1:{port}",
            simulator_url=server.url,
            dagster_home=dagster_home,
            store_url=overrides["MATCHALL_STORE"],
            postgres_db=database,
            ready_segments=list(READY_SEGMENTS),
            evolving_segment=EVOLVING_SEGMENT,
            failing_segment=FAILING_SEGMENT,
            expiring_segment=EXPIRING_SEGMENT,
            simulator=server.simulator,
            artifacts=artifacts,
            env=overrides,
        )
        # Create the schema once, before two processes race to migrate an empty database.
        with deployment.instance():
            pass
        env = {name: value for name, value in os.environ.items() if not name.startswith(("MATCHALL_", "DAGSTER_"))}
        env.update(overrides)

        def stop_services() -> None:
            for service in reversed(deployment.services):
                service.stop()

        stack.callback(stop_services)
        deployment.services.append(
            start_service(
                "dagster-webserver",
                [str(bin_dir / "dagster-webserver"), "-w", str(WORKSPACE), "-h", "127.0.0.1", "-p", str(port)],
                env,
                dagster_home,  # not the repository: Dagster warns about a dagster.yaml outside DAGSTER_HOME
                artifacts / "webserver.log",
            )
        )
        deployment.services.append(
            start_service(
                "dagster-daemon",
                [str(bin_dir / "dagster-daemon"), "run", "-w", str(WORKSPACE)],
                env,
                dagster_home,
                artifacts / "daemon.log",
            )
        )
        _wait_for_webserver(deployment.services[0], deployment.webserver_url)
        deployment.started_at = time.time()
        yield deployment
