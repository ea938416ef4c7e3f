"""Membership history in DuckDB: who joined and who left each segment, one step per materialization.

The API keeps a run's result for 90 days; the history is ours to keep. Each step compares the
members now in `segment_matches` with the members as of the previous step (`segment_membership_state`)
and appends the difference to `segment_membership_changes`, which is never rewritten. The whole
step is SQL inside one transaction: no contact id becomes a Python object, and a crash leaves the
previous step intact.

Tables:
- `segment_membership_changes` (segment_id, contact_id, change 'joined'|'left', run_id, observed_at): the log.
- `segment_membership_steps` (segment_id, source, run_id, observed_at, members, joined, left_count):
  one row per step; `source` identifies the `segment_matches` materialization it read, so that
  recording the same materialization twice changes nothing.
- `segment_membership_state` (segment_id, contact_id): the members as of the segment's last step.
  It is derivable from the log (the contacts whose latest change is 'joined'); it is kept so that
  a step costs the segment's size, not its history's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

MATCHES_TABLE = "segment_matches"
CHANGES_TABLE = "segment_membership_changes"
STEPS_TABLE = "segment_membership_steps"
STATE_TABLE = "segment_membership_state"
TABLES = (CHANGES_TABLE, STEPS_TABLE, STATE_TABLE)
JOINED = "joined"
LEFT = "left"

_SCHEMA = (
    f"create table if not exists {CHANGES_TABLE} (segment_id varchar not null, contact_id bigint not null, "
    f"change varchar not null check (change in ('{JOINED}', '{LEFT}')), run_id varchar not null, "
    f"observed_at timestamptz not null)",
    f"create table if not exists {STEPS_TABLE} (segment_id varchar not null, source varchar not null, "
    f"run_id varchar not null, observed_at timestamptz not null, members bigint not null, "
    f"joined bigint not null, left_count bigint not null, primary key (segment_id, source))",
    f"create table if not exists {STATE_TABLE} (segment_id varchar not null, contact_id bigint not null)",
)


@dataclass(frozen=True)
class Step:
    """One recorded comparison of a segment's members with its previous step."""

    segment_id: str
    run_id: str
    observed_at: datetime
    previous_members: int
    members: int
    joined: int
    left: int
    first: bool  # the segment's first step: every member joined
    recorded: bool  # False when this materialization had been recorded before (nothing appended)

    @property
    def churn_rate(self) -> float:
        """The share of the previous members that changed: (joined + left) / previous members."""
        return (self.joined + self.left) / self.previous_members if self.previous_members else 0.0


def ensure_tables(connection: Any) -> None:
    for statement in _SCHEMA:
        connection.execute(statement)


def record_step(connection: Any, segment_id: str, *, source: str, run_id: str, observed_at: datetime) -> Step:
    """Append the changes between the segment's previous step and its members in `segment_matches`.

    `connection` is a DuckDB connection to the database holding `segment_matches`; the caller
    opens and closes it. The step runs in its own transaction.
    """
    ensure_tables(connection)
    connection.begin()
    try:
        step = _record(connection, segment_id, source=source, run_id=run_id, observed_at=observed_at)
        connection.commit()
    except BaseException:
        connection.rollback()
        raise
    return step


def _record(connection: Any, segment_id: str, *, source: str, run_id: str, observed_at: datetime) -> Step:
    previous_steps = connection.execute(
        f"select count(*), coalesce(sum(source = ?), 0) from {STEPS_TABLE} where segment_id = ?",  # noqa: S608
        [source, segment_id],
    ).fetchone()
    steps_before, already = int(previous_steps[0]), int(previous_steps[1])
    previous = _count(connection, STATE_TABLE, segment_id)
    if already:
        row = connection.execute(
            f"select run_id, observed_at, members, joined, left_count from {STEPS_TABLE} "  # noqa: S608
            "where segment_id = ? and source = ?",
            [segment_id, source],
        ).fetchone()
        return Step(segment_id, row[0], row[1], previous, int(row[2]), int(row[3]), int(row[4]), False, False)
    members = _count(connection, MATCHES_TABLE, segment_id)
    values = [segment_id, run_id, observed_at, segment_id, segment_id]
    joined = connection.execute(
        f"insert into {CHANGES_TABLE} select ?, m.contact_id, '{JOINED}', ?, ? from {MATCHES_TABLE} m "  # noqa: S608
        f"where m.segment_id = ? and m.contact_id not in (select contact_id from {STATE_TABLE} where segment_id = ?)",
        values,
    ).fetchone()[0]
    left = connection.execute(
        f"insert into {CHANGES_TABLE} select ?, s.contact_id, '{LEFT}', ?, ? from {STATE_TABLE} s "  # noqa: S608
        f"where s.segment_id = ? and s.contact_id not in (select contact_id from {MATCHES_TABLE} where segment_id = ?)",
        values,
    ).fetchone()[0]
    if joined or left:
        connection.execute(f"delete from {STATE_TABLE} where segment_id = ?", [segment_id])  # noqa: S608
        connection.execute(
            f"insert into {STATE_TABLE} select segment_id, contact_id from {MATCHES_TABLE} where segment_id = ?",  # noqa: S608
            [segment_id],
        )
    connection.execute(
        f"insert into {STEPS_TABLE} values (?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
        [segment_id, source, run_id, observed_at, members, joined, left],
    )
    return Step(segment_id, run_id, observed_at, previous, members, int(joined), int(left), steps_before == 0, True)


def _count(connection: Any, table: str, segment_id: str) -> int:
    exists = connection.execute(
        "select count(*) from information_schema.tables where table_name = ?", [table]
    ).fetchone()[0]
    if not exists:
        return 0
    return int(connection.execute(f"select count(*) from {table} where segment_id = ?", [segment_id]).fetchone()[0])  # noqa: S608


def has_history(connection: Any, segment_id: str) -> bool:
    query = f"select count(*) from {STEPS_TABLE} where segment_id = ?"  # noqa: S608
    return bool(connection.execute(query, [segment_id]).fetchone()[0])


def steps_since(connection: Any, segment_id: str, since: datetime | None) -> list[tuple[Any, ...]]:
    """The segment's steps, oldest first: (observed_at, run_id, members, joined, left)."""
    return list(
        connection.execute(
            f"select observed_at, run_id, members, joined, left_count from {STEPS_TABLE} "  # noqa: S608
            "where segment_id = ? and observed_at >= coalesce(?, '-infinity'::timestamptz) "
            "order by observed_at, source",
            [segment_id, since],
        ).fetchall()
    )


def changes_since(connection: Any, segment_id: str, since: datetime | None) -> Any:
    """The segment's changes, oldest first, as a DuckDB relation (streamed, never a Python list)."""
    return connection.sql(
        f"select observed_at, change, contact_id, run_id from {CHANGES_TABLE} "  # noqa: S608
        "where segment_id = ? and observed_at >= coalesce(?, '-infinity'::timestamptz) "
        "order by observed_at, change, contact_id",
        params=[segment_id, since],
    )
