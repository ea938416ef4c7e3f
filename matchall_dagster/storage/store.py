"""The membership store: where `segment_matches`, the catalog and the membership history live.

One interface, `MembershipStore`, and one engine behind it per kind of database, chosen by a URL
(`MATCHALL_STORE`, or the component's `storage.url`):
- `duckdb:///path/to/file.duckdb` (`storage.duckdb_store`): the embedded default, one file, one
  writer at a time (writers wait their turn);
- `postgresql://USER@HOST:PORT/DATABASE[?schema=NAME]` (`storage.postgres_store`): several writers
  at once, from run pods on any node; the password from PGPASSWORD or ~/.pgpass, never the URL.

Everything Dagster's side needs goes through this interface: the IO manager (`io_manager`) writes
and summarizes partitions with it, the batch of small segments writes its partitions with it, the
history asset records its steps with it, and the catalog and the CLI read with it. A warehouse
(Snowflake, BigQuery...) is one more subclass: what it must provide is the abstract methods
below, each with the guarantee its docstring states (docs/architecture.md, "The store").
"""

from __future__ import annotations

import abc
import re
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pandas as pd

if TYPE_CHECKING:
    from matchall_dagster.storage.history import Step

__all__ = [
    "CATALOG_TABLE",
    "MATCHES_TABLE",
    "Column",
    "MembershipStore",
    "PartitionSummary",
    "StoreUnavailableError",
    "StoreUrl",
    "open_store",
]

MATCHES_TABLE = "segment_matches"
CATALOG_TABLE = "activecampaign_segments"
DUCKDB = "duckdb"
POSTGRESQL = "postgresql"
DEFAULT_PG_SCHEMA = "matchall"
_PG_NAME_LIMIT = 63  # PostgreSQL's identifiers  # a schema of its own in the named database

# Column comments, the same on every engine (and in the UI's Columns tab, from `dagster/column_schema`).
MATCHES_COMMENTS = {
    "segment_id": "The segment (the partition key), as the API gives it.",
    "position": "1-based place of the contact in the run's sort order.",
    "contact_id": "The member contact's id.",
}


def comment_statement(table: str, column: str, text: str) -> str:
    """`comment on column`, the same on every engine; the text is ours (a constant), quoted as SQL."""
    quoted = text.replace("'", "''")
    return f"comment on column {table}.{column} is '{quoted}'"


class StoreUnavailableError(RuntimeError):
    """The store could not be reached or opened; the message says which store (never a password) and why."""


@dataclass(frozen=True)
class StoreUrl:
    """A parsed `MATCHALL_STORE`: the engine, and where (a file, or a server, database and schema)."""

    kind: str
    location: str  # DuckDB: the file's absolute path. PostgreSQL: the URL without `schema` (and no password).
    schema: str = "main"

    @classmethod
    def parse(cls, text: str) -> StoreUrl:
        """`duckdb:///abs/path.duckdb`, `duckdb://rel/path.duckdb`, a bare path (a DuckDB file), or
        `postgresql://USER@HOST[:PORT]/DATABASE[?schema=NAME]`; anything else is refused with what to write."""
        value = text.strip()
        if not value:
            raise ValueError("The store is empty: write duckdb:///path/to/file.duckdb or postgresql://USER@HOST/DB.")
        scheme = value.split("://", 1)[0].lower() if "://" in value else ""
        if scheme in (POSTGRESQL, "postgres"):
            return cls._postgresql(value)
        if scheme == DUCKDB:
            value = value[len("duckdb://") :]
        elif scheme:
            raise ValueError(
                f"The store {_redact(value)!r} is not one this project keeps: write duckdb:///path/to/file.duckdb "
                f"or postgresql://USER@HOST:PORT/DATABASE (the password from PGPASSWORD)."
            )
        if not value:
            raise ValueError("The store names no DuckDB file: write duckdb:///path/to/file.duckdb.")
        return cls(DUCKDB, str(Path(value).expanduser().absolute()))

    @classmethod
    def _postgresql(cls, value: str) -> StoreUrl:
        parts = urlsplit(value)
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        if parts.password is not None or _SECRET_OPTIONS & set(options):
            raise ValueError(
                f"The store {_redact(value)!r} carries a password: remove it from the URL and set PGPASSWORD "
                f"(or ~/.pgpass) instead, so that it never shows in logs or the UI."
            )
        if not parts.hostname or not parts.path.strip("/"):
            raise ValueError(
                f"The store {_redact(value)!r} names no host or database: write postgresql://USER@HOST:PORT/DATABASE."
            )
        query = options
        schema = query.pop("schema", DEFAULT_PG_SCHEMA)
        if not _is_name(schema):
            raise ValueError(
                f"The store's schema {schema!r} is not a plain name (a lowercase letter or '_', then lowercase "
                f"letters, digits or '_')."
            )
        location = urlunsplit(parts._replace(scheme=POSTGRESQL, query=urlencode(query)))
        return cls(POSTGRESQL, location, schema)

    def for_account(self, key_prefix: Sequence[str]) -> StoreUrl:
        """The store of a prefixed account sharing this URL: its own file (`<stem>_<prefix>.duckdb`) or schema
        (`<schema>_<prefix>`), since every account's tables have the same names."""
        if not key_prefix:
            return self
        suffix = "_".join(key_prefix)
        if self.kind == DUCKDB:
            path = Path(self.location)
            return StoreUrl(DUCKDB, str(path.with_name(f"{path.stem}_{suffix}{path.suffix}")))
        schema = f"{self.schema}_{suffix}".lower()
        if len(schema) > _PG_NAME_LIMIT:  # PostgreSQL would cut it short, and two accounts could share it
            raise ValueError(
                f"The account's schema {schema!r} is longer than PostgreSQL's {_PG_NAME_LIMIT} characters: give the "
                f"account a shorter key prefix, or a store URL of its own (storage.url, with ?schema=NAME)."
            )
        return StoreUrl(POSTGRESQL, self.location, schema)

    @property
    def database(self) -> str:
        """The catalog part of `dagster/table_name`: the DuckDB file's stem, or the PostgreSQL database."""
        if self.kind == DUCKDB:
            return Path(self.location).stem
        return urlsplit(self.location).path.strip("/")

    def table_name(self, table: str) -> str:
        return f"{self.database}.{self.schema}.{table}"

    def __str__(self) -> str:
        """The store as logs, metadata and errors show it (never a password: none is ever in the URL)."""
        if self.kind == DUCKDB:
            return f"duckdb://{self.location}"
        return self.location + ("&" if "?" in self.location else "?") + f"schema={self.schema}"


def _is_name(text: str) -> bool:
    """A lowercase identifier PostgreSQL needs no quotes for (what `forget` prints stays right)."""
    return re.fullmatch(r"[a-z_][a-z0-9_]{0,47}", text) is not None


_SECRET_OPTIONS = frozenset({"password", "sslpassword"})  # libpq's connection options that hold a secret


def _redact(url: str) -> str:
    parts = urlsplit(url)
    options = parse_qsl(parts.query, keep_blank_values=True)
    query = urlencode([(key, "***" if key in _SECRET_OPTIONS else value) for key, value in options], safe="*")
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


@dataclass(frozen=True)
class PartitionSummary:
    """What a check needs to judge a stored partition of `segment_matches`, without its rows.

    `repeated_contacts` and `repeated_positions` count the rows beyond the first of each value
    (0 when all are distinct); the positions are exactly 1..rows when `min_position` is 1,
    `max_position` is `rows` and none repeats.
    """

    rows: int
    min_position: int | None
    max_position: int | None
    repeated_contacts: int
    repeated_positions: int

    @property
    def positions_exact(self) -> bool:
        return self.rows == 0 or (
            self.min_position == 1 and self.max_position == self.rows and self.repeated_positions == 0
        )


EMPTY_SUMMARY = PartitionSummary(0, None, None, 0, 0)


@dataclass(frozen=True)
class Column:
    """A column of a table replaced whole: its SQL type (one both engines know) and its comment."""

    name: str
    sql_type: str
    description: str | None = None


class MembershipStore(abc.ABC):
    """The contract every engine keeps. A store is cheap to make: it opens a connection per call.

    Tables: `segment_matches` (segment_id, position, contact_id; one partition per segment) and the
    history (`storage.history`), created on first use with their column comments; any other table
    (the catalog) is a small frame replaced whole.
    """

    kind: str

    def __init__(self, url: StoreUrl) -> None:
        self.url = url

    # segment_matches, a partition at a time
    @abc.abstractmethod
    def replace_partition(self, segment_id: str, frame: pd.DataFrame) -> None:
        """Replace the segment's rows with the frame's `position` and `contact_id`, atomically: readers see
        the old rows or the new, never a mix, and a process killed mid-write leaves the old. In bulk (never a
        row at a time); an empty frame is a real answer (the segment has no members)."""

    @abc.abstractmethod
    def summarize(self, segment_id: str) -> PartitionSummary:
        """The partition's summary, computed by the database (its rows never reach this process)."""

    @abc.abstractmethod
    def read_partition(self, segment_id: str) -> pd.DataFrame:
        """The partition's rows (segment_id, position, contact_id) in position order; empty if none."""

    # small tables replaced whole (the catalog)
    @abc.abstractmethod
    def replace_table(self, table: str, frame: pd.DataFrame, columns: Sequence[Column] | None = None) -> None:
        """Replace the whole table (columns included) with `frame`, atomically; `columns` gives their types
        and comments (else the frame's types)."""

    @abc.abstractmethod
    def read_table(self, table: str, *, patience: float = 2.0) -> pd.DataFrame | None:
        """The whole table, or None when it does not exist yet or the store stays unavailable for `patience` s:
        a read for names and sizes is never worth failing a step for."""

    # the membership history (`storage.history` holds the SQL, written once for every engine)
    @abc.abstractmethod
    def record_step(self, segment_id: str, *, source: str, run_id: str, observed_at: datetime) -> Step:
        """Append who joined and left since the segment's previous step, in one transaction, in the database;
        recording the same `source` (a materialization of segment_matches) again changes nothing."""

    @abc.abstractmethod
    def steps_since(self, segment_id: str, since: datetime | None) -> list[tuple[Any, ...]] | None:
        """The segment's steps, oldest first: (observed_at, run_id, members, joined, left); None when the store
        holds no step of any segment."""

    @abc.abstractmethod
    def changes_since(self, segment_id: str, since: datetime | None, batch_rows: int) -> Iterator[pd.DataFrame]:
        """The segment's changes (observed_at, change, contact_id, run_id), oldest first, in batches of
        `batch_rows`: a history can be millions of rows."""

    _held: Any = None  # the connection every call shares while `held()` lasts

    @contextmanager
    def held(self) -> Iterator[None]:
        """A context in which every call shares one connection (each call is still its own transaction):
        a batch of small segments connects once, not three times a segment."""
        with self._new_connection() as connection:
            self._held = connection
            try:
                yield
            finally:
                self._held = None

    @abc.abstractmethod
    def _new_connection(self) -> AbstractContextManager[Any]:
        """A read-write connection of its own, closed at the end; every call uses `_held` instead when set."""


def open_store(url: StoreUrl | str) -> MembershipStore:
    """The engine for `url`."""
    parsed = url if isinstance(url, StoreUrl) else StoreUrl.parse(url)
    if parsed.kind == DUCKDB:
        from matchall_dagster.storage.duckdb_store import DuckDBStore

        return DuckDBStore(parsed)
    from matchall_dagster.storage.postgres_store import PostgresStore

    return PostgresStore(parsed)
