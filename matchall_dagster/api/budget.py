"""The account's request budget: one sliding window per account, shared by every process that calls it.

ActiveCampaign allows 5 requests a second per account, for everything that uses it. Each request
of every client (run steps, the daemon's sensors, `matchall fetch`) takes one place in a window
kept where all of them can see it:

- `memory`: this process alone (a lone CLI call, a notebook; what a client gets by default);
- `sqlite:///path/budget.sqlite` (or a bare path): every process of one machine; the Dagster
  project keeps it in `$DAGSTER_HOME`;
- `postgresql://user@host:port/db`: every pod of a deployment, in a table of its own.

The storage is pyrate-limiter's: its `SQLiteBucket` (WAL, its file lock held from the clock to
the insert) and its `PostgresBucket` (table, index, clean-up), with one method of ours that
counts and inserts under `LOCK TABLE ... NOWAIT`, stamping the place with the server's clock
(`_ServerStampedBucket`). The window is keyed by the account's API URL, so two deployments or a
CLI pull on one account share one window, and two accounts never do.

The priority rule, in one place (`RETRY_AFTER_SLOT_MS`): a request that is due (the sensors'
polls and listings, which must end within a tick) tries again 1 ms after a place frees up, any
other request (reads, kick-off starts, checks, the CLI) 10 ms after. When both wait for the same
place, the due request takes it; when only one kind waits, it has the whole budget.

Faults: a store that cannot be reached raises `BudgetStoreError` naming it (the password left
out); no request is ever sent without its place. A process killed while it holds the store's
lock releases it with its file descriptor or connection; the places it took stay counted until
they leave the window, as the requests they stand for were sent.
"""

from __future__ import annotations

import enum
import hashlib
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import filelock
from pyrate_limiter import PostgresBucket, Rate, RateItem, SQLiteBucket
from pyrate_limiter.abstracts import AbstractBucket

from matchall_dagster.api.errors import BudgetStoreError, InvalidInputError

__all__ = [
    "MEMORY",
    "RETRY_AFTER_SLOT_MS",
    "WINDOW_GUARD_MS",
    "BudgetStore",
    "Priority",
    "RequestBudget",
    "request_budget",
    "window_rate",
]

MEMORY = "memory"
# Requests leave a process a few milliseconds after their place is stamped (thread hand-off, sleep
# overshoot, the store's commit); what the server sees is the difference of two such lags.
# Widening each window by this much keeps the server's count within the limit. No guard covers a
# process that stalls between its place and its send (175 ms were seen once on a busy 2-core
# machine, benchmarks/mixed_load.py): the server then answers 429, and the request is retried.
WINDOW_GUARD_MS = 15
# How long the store may take to answer before a step fails (connecting, or waiting for the lock).
STORE_TIMEOUT_SECONDS = 10.0
LEAK_EVERY_SECONDS = 10.0  # places older than every window are deleted this often, by whoever takes one


class Priority(enum.Enum):
    DUE = "due"  # the sensors: polls and listings that must finish within their tick
    BULK = "bulk"  # everything else: reads, kick-off starts, checks, the CLI


# The priority rule: after the window says when a place frees up, a waiting request tries again
# this many milliseconds later. The smaller wins a place both wait for; neither reserves anything.
RETRY_AFTER_SLOT_MS = {Priority.DUE: 1, Priority.BULK: 10}


def window_rate(requests_per_second: float) -> Rate:
    """A sliding window that never lets more than the limit into any one second.

    A one-second window holds whole requests, so a fractional limit above 1 rounds down (2.5
    allows 2 in any second); below 1 it spaces single requests (0.5: one every 2 s).
    """
    if requests_per_second >= 1:
        return Rate(math.floor(requests_per_second), 1000 + WINDOW_GUARD_MS)
    return Rate(1, math.ceil(1000 / requests_per_second) + WINDOW_GUARD_MS)


@dataclass(frozen=True)
class BudgetStore:
    """Where the budget lives: `memory`, a SQLite file, or a PostgreSQL database."""

    kind: str  # "memory", "sqlite" or "postgresql"
    location: str = ""  # the file's absolute path, or the PostgreSQL URL (password included)

    def __repr__(self) -> str:
        return f"BudgetStore({str(self)!r})"

    @classmethod
    def parse(cls, text: str) -> BudgetStore:
        """`memory`, `sqlite:///abs/path`, a path, or `postgresql://...`; anything else is refused."""
        value = text.strip()
        if value == MEMORY:
            return cls(MEMORY)
        scheme = value.split("://", 1)[0].lower() if "://" in value else ""
        if scheme in ("postgresql", "postgres"):
            if not urlsplit(value).hostname:
                raise InvalidInputError(
                    f"The request budget's store {_redact(value)!r} names no host: write "
                    f"postgresql://USER@HOST:PORT/DATABASE (the password from PGPASSWORD or ~/.pgpass)."
                )
            return cls("postgresql", value)
        if scheme == "sqlite":
            value = value[len("sqlite://") :]
        elif scheme:
            raise InvalidInputError(
                f"The request budget's store {_redact(value)!r} is not one this project keeps: write "
                f"'memory', a SQLite file (sqlite:///path/budget.sqlite or a path) or postgresql://USER@HOST/DB."
            )
        if not value:
            raise InvalidInputError("The request budget's store is empty: write 'memory', a file path or a URL.")
        return cls("sqlite", str(Path(value).expanduser().absolute()))

    def __str__(self) -> str:
        """The store as logs and errors show it: never the password."""
        if self.kind == "sqlite":
            return f"sqlite://{self.location}"
        return _redact(self.location) if self.kind == "postgresql" else MEMORY


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _table(account: str) -> str:
    """The window's table: one per account, from its normalized API URL (no secret in it)."""
    parts = urlsplit(account.strip().rstrip("/"))
    key = f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}:{parts.port or ''}{parts.path}"
    return "matchall_budget_" + hashlib.sha256(key.encode()).hexdigest()[:16]


class _Window:
    """One account's window in one store, as this process sees it: a bucket and the lock of its users.

    Every `RequestBudget` of the process for this account and store shares it, whatever its
    priority, so that the threads of one process take turns before they reach the store.
    """

    def __init__(self, store: BudgetStore, table: str, requests_per_second: float) -> None:
        self.store = store
        self.rate = window_rate(requests_per_second)
        self.lock = threading.Lock()
        self.bucket = _open(store, table, self.rate)
        # SQLite's cross-process file lock (re-entrant), held from the clock to the insert, so that a
        # place is stamped when it is taken, not before a wait for the lock. PostgreSQL's bucket
        # takes the table's lock and stamps inside one transaction (`_ServerStampedBucket`).
        self._store_lock: AbstractContextManager[object] = getattr(self.bucket, "lock", None) or nullcontext()
        self._leaked_at = -math.inf

    def try_take(self) -> int:
        """0 when a place was taken, else the milliseconds until one frees up (at least 1)."""
        with self.lock, _store_errors(self.store), self._store_lock:
            if time.monotonic() - self._leaked_at > LEAK_EVERY_SECONDS:  # inline, not a thread per window
                self.bucket.leak(self._now())
                self._leaked_at = time.monotonic()
            if isinstance(self.bucket, _ServerStampedBucket):
                return self.bucket.take_or_wait()
            item = RateItem("request", self._now())
            if self.bucket.put(item):
                return 0
            wait = self.bucket.waiting(item)
        assert isinstance(wait, int)
        return max(wait, 1)  # never 0 for a refused place: 0 would read as taken

    def _now(self) -> int:
        now = self.bucket.now()  # type: ignore[no-untyped-call]
        assert isinstance(now, int)
        return now


class _ServerStampedBucket(PostgresBucket):
    """pyrate-limiter's PostgreSQL bucket (its table, clean-up and clock), taking a place under the
    table's lock and stamping it with the server's clock as it is inserted.

    The stock `put` stamps the place before it takes the lock, and is refused without a wait when
    another process holds it; under load its stamps were up to 16 ms early, enough for a sixth
    request in one second at the server (benchmarks/mixed_load.py, matchall_dagster_tests/test_budget.py).
    """

    def take_or_wait(self) -> int:
        """0 when a place was taken, else the milliseconds until one frees up (at least 1)."""
        from psycopg import errors, sql

        rate = self.rates[0]
        table = sql.Identifier(self._full_tbl)
        window = {"interval": rate.interval / 1000, "limit": rate.limit}
        with self._get_conn() as conn:
            try:
                conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE NOWAIT").format(table))
            except errors.LockNotAvailable:
                return 1  # another process is taking a place this very moment
            row = conn.execute(sql.SQL(_COUNT).format(table=table), window).fetchone()
            if row is not None and row[0] < rate.limit:
                conn.execute(sql.SQL(_INSERT).format(table=table))
                return 0
            row = conn.execute(sql.SQL(_WAIT).format(table=table), {**window, "offset": rate.limit - 1}).fetchone()
        return max(int(row[0]) + 1, 1) if row is not None and row[0] is not None else 1


_COUNT = "SELECT count(*) FROM {table} WHERE item_timestamp >= clock_timestamp() - make_interval(secs => %(interval)s)"
_INSERT = "INSERT INTO {table} (name, weight, item_timestamp) VALUES ('request', 1, clock_timestamp())"
# When the place `limit` from the newest leaves the window, in milliseconds from now.
_WAIT = """
SELECT ceil(extract(epoch FROM item_timestamp + make_interval(secs => %(interval)s) - clock_timestamp()) * 1000)
FROM {table} ORDER BY item_timestamp DESC OFFSET %(offset)s LIMIT 1"""


def _open(store: BudgetStore, table: str, rate: Rate) -> AbstractBucket:
    with _store_errors(store):
        if store.kind == MEMORY:
            return SQLiteBucket.init_from_file([rate], table=table, db_path=":memory:")
        if store.kind == "sqlite":
            Path(store.location).parent.mkdir(parents=True, exist_ok=True)
            bucket = SQLiteBucket.init_from_file([rate], table=table, db_path=store.location, use_file_lock=True)
            # A holder that hangs fails the step, not blocks it; given to the constructor, since
            # filelock keeps a setting made later for the thread that made it only.
            bucket.lock = filelock.FileLock(store.location + ".lock", timeout=STORE_TIMEOUT_SECONDS)  # type: ignore[assignment]
            return bucket
        return _postgres_bucket(store, table, rate)
    raise AssertionError("unreachable")


def _postgres_bucket(store: BudgetStore, table: str, rate: Rate) -> AbstractBucket:
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool(
        store.location,
        min_size=1,
        max_size=4,
        timeout=STORE_TIMEOUT_SECONDS,
        check=ConnectionPool.check_connection,  # a server restarted since: reconnect, do not fail
        kwargs={
            "connect_timeout": int(STORE_TIMEOUT_SECONDS),
            "application_name": "matchall-budget",
            # A session that stalls holding the table's lock (a stopped process) is ended by the
            # server, and a statement waiting for the lock (the clean-up's DELETE) fails, not hangs.
            # Every session reads the table's stamps (timestamp without time zone) in one zone. A
            # commit does not wait for the disk: a place is stamped before its commit, and a commit
            # that waits for an fsync (tens of ms on a busy disk) sent its request that much later
            # than its stamp said (6 in one second, measured). A crash of the server may forget the
            # places of its last fraction of a second; a clean restart forgets nothing.
            "options": f"-c lock_timeout={int(STORE_TIMEOUT_SECONDS * 1000)} "
            f"-c idle_in_transaction_session_timeout={int(STORE_TIMEOUT_SECONDS * 1000)} -c TimeZone=UTC "
            "-c synchronous_commit=off",
        },
        open=False,
        name="matchall-budget",
    )
    try:
        pool.open(wait=True, timeout=STORE_TIMEOUT_SECONDS)
        return _ServerStampedBucket(pool, table, [rate])
    except BaseException:
        pool.close()
        raise


@contextmanager
def _store_errors(store: BudgetStore) -> Iterator[None]:
    """The store's own errors, as a `BudgetStoreError` naming the store and what to do."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, BudgetStoreError) or not _is_store_error(exc):
            raise
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        password = urlsplit(store.location).password if store.kind == "postgresql" else None
        if password:
            detail = detail.replace(password, "***")
        raise BudgetStoreError(
            f"The request budget's store {store} could not be used ({type(exc).__name__}: {detail[:300]}). "
            f"No request was sent without its place in the budget. Check that the store is reachable "
            f"(MATCHALL_REQUEST_BUDGET), then re-execute."
        ) from None


def _is_store_error(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error | filelock.Timeout | OSError):
        return True
    import psycopg  # here, not at the top: a client without PostgreSQL never pays for the import
    import psycopg_pool

    return isinstance(exc, psycopg.Error | psycopg_pool.PoolTimeout | psycopg_pool.PoolClosed)


class RequestBudget:
    """Takes one place of the account's budget per request, at one priority.

    `take()` blocks until a place is taken; it raises `BudgetStoreError` when the store fails.
    Thread-safe. Build it with `request_budget` so that a process shares one window per account.
    `waited_seconds` is the time this object's places were waited for (what a materialization
    reports), not the window's.
    """

    def __init__(self, window: _Window, priority: Priority, sleep: Callable[[float], None] = time.sleep) -> None:
        self._window = window
        self.priority = priority
        self._after_slot = RETRY_AFTER_SLOT_MS[priority] / 1000
        self._sleep = sleep
        self._count_lock = threading.Lock()
        self.waited_seconds = 0.0

    @property
    def store(self) -> BudgetStore:
        return self._window.store

    @property
    def requests_per_second(self) -> float:
        return self._window.rate.limit * 1000 / (self._window.rate.interval - WINDOW_GUARD_MS)

    def __repr__(self) -> str:
        return f"RequestBudget(store={str(self.store)!r}, rate={self._window.rate}, priority={self.priority.value})"

    def take(self) -> None:
        started = time.monotonic()
        while (wait_ms := self._window.try_take()) > 0:
            self._sleep(wait_ms / 1000 + self._after_slot)
        with self._count_lock:
            self.waited_seconds += time.monotonic() - started


def request_budget(
    store: BudgetStore | str, account: str, requests_per_second: float, priority: Priority = Priority.BULK
) -> RequestBudget:
    """The budget of `account` in `store` at `priority`; one window per account, store and rate per process."""
    parsed = store if isinstance(store, BudgetStore) else BudgetStore.parse(store)
    return RequestBudget(_window(parsed, _table(account), float(requests_per_second)), priority)


@cache
def _window(store: BudgetStore, table: str, requests_per_second: float) -> _Window:
    return _Window(store, table, requests_per_second)
