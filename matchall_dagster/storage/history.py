"""Membership history: who joined and who left each segment, one step per materialization, in SQL
written once for every engine.

The API keeps a run's result for 90 days; the history is ours to keep. Each step compares the
members now in `segment_matches` with the members as of the previous step (`segment_membership_state`)
and appends the difference to `segment_membership_changes`, which is never rewritten. The whole
step is SQL inside one transaction that the store opens (`MembershipStore.record_step`): no
contact id becomes a Python object, and a crash leaves the previous step intact. The statements
are plain SQL that DuckDB and PostgreSQL both run (`?` placeholders; the PostgreSQL session turns
them into its own).

A step's difference is one full outer join of the segment's members with its state: one pass
over each side, where two anti-joins (`not exists` each way) read both sides twice; and a full
join cannot be planned as a nested loop, which PostgreSQL picks for an anti-join when it
misjudges a side's size (a fresh partition, a state grown since its statistics): minutes at
10,000,000 members instead of seconds. The difference is analyzed before it is applied, so that
deleting the contacts that left is planned for their true number.

Tables:
- `segment_membership_changes` (segment_id, contact_id, change 'joined'|'left', run_id, observed_at): the log.
- `segment_membership_steps` (segment_id, source, run_id, observed_at, members, joined, left_count):
  one row per step; `source` identifies the `segment_matches` materialization it read, so that
  recording the same materialization twice changes nothing.
- `segment_membership_state` (segment_id, contact_id): the members as of the segment's last step.
  It is derivable from the log (the contacts whose latest change is 'joined'); it is kept so that
  a step costs the segment's size, not its history's, and it is updated by the step's changes
  only (1 % changed: 1 % of its rows touched, no table of dead rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

MATCHES_TABLE = "segment_matches"
CHANGES_TABLE = "segment_membership_changes"
STEPS_TABLE = "segment_membership_steps"
STATE_TABLE = "segment_membership_state"
TABLES = (CHANGES_TABLE, STEPS_TABLE, STATE_TABLE)
JOINED = "joined"
LEFT = "left"
_DIFF = "matchall_step_diff"  # a temporary table: this step's changes, before they are appended

SCHEMA = (
    f"create table if not exists {CHANGES_TABLE} (segment_id varchar not null, contact_id bigint not null, "
    f"change varchar not null check (change in ('{JOINED}', '{LEFT}')), run_id varchar not null, "
    f"observed_at timestamptz not null)",
    f"create table if not exists {STEPS_TABLE} (segment_id varchar not null, source varchar not null, "
    f"run_id varchar not null, observed_at timestamptz not null, members bigint not null, "
    f"joined bigint not null, left_count bigint not null, primary key (segment_id, source))",
    f"create table if not exists {STATE_TABLE} (segment_id varchar not null, contact_id bigint not null)",
)
COMMENTS = {
    CHANGES_TABLE: {
        "segment_id": "The segment (the partition key).",
        "contact_id": "The contact that joined or left.",
        "change": f"'{JOINED}' or '{LEFT}'.",
        "run_id": "The match-all run whose members showed the change.",
        "observed_at": "When that read of segment_matches was stored.",
    },
    STEPS_TABLE: {
        "segment_id": "The segment.",
        "source": "The segment_matches materialization compared (Dagster run id / storage id); one step each.",
        "run_id": "The match-all run that materialization read.",
        "observed_at": "When that materialization was stored.",
        "members": "Members after the step.",
        "joined": "Contacts that joined in the step.",
        "left_count": "Contacts that left in the step.",
    },
    STATE_TABLE: {
        "segment_id": "The segment.",
        "contact_id": "A member as of the segment's latest step.",
    },
}


class Sql(Protocol):
    """What the history needs of an engine's session, inside the transaction the store opened."""

    def rows(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def change(self, statement: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; the number of rows it inserted or deleted."""
        ...


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


def comment_statements(table: str) -> list[str]:
    """`comment on column` for each of a history table's columns (the same syntax on both engines)."""
    from matchall_dagster.storage.store import comment_statement

    return [comment_statement(table, column, text) for column, text in COMMENTS[table].items()]


def record(sql: Sql, segment_id: str, *, source: str, run_id: str, observed_at: datetime) -> Step:
    """Append the changes between the segment's previous step and its members in `segment_matches`."""
    ((steps_before, already),) = sql.rows(
        f"select count(*), count(*) filter (where source = ?) from {STEPS_TABLE} where segment_id = ?",  # noqa: S608
        [source, segment_id],
    )
    previous = _count(sql, STATE_TABLE, segment_id)
    if already:
        ((run, observed, members, joined, left),) = sql.rows(
            f"select run_id, observed_at, members, joined, left_count from {STEPS_TABLE} "  # noqa: S608
            "where segment_id = ? and source = ?",
            [segment_id, source],
        )
        return Step(segment_id, run, observed, previous, int(members), int(joined), int(left), False, False)
    members = _count(sql, MATCHES_TABLE, segment_id)
    if previous == 0:
        joined, left = _first(sql, segment_id, run_id, observed_at, members), 0
    else:
        joined, left = _difference(sql, segment_id, run_id, observed_at)
    sql.change(
        f"insert into {STEPS_TABLE} values (?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
        [segment_id, source, run_id, observed_at, members, joined, left],
    )
    return Step(segment_id, run_id, observed_at, previous, members, joined, left, int(steps_before) == 0, True)


def _first(sql: Sql, segment_id: str, run_id: str, observed_at: datetime, members: int) -> int:
    """No previous members: every member joined, and the state is the members."""
    if not members:
        return 0
    joined = sql.change(
        f"insert into {CHANGES_TABLE} select segment_id, contact_id, '{JOINED}', ?, ? from {MATCHES_TABLE} "  # noqa: S608
        "where segment_id = ?",
        [run_id, observed_at, segment_id],
    )
    sql.change(
        f"insert into {STATE_TABLE} select segment_id, contact_id from {MATCHES_TABLE} where segment_id = ?",  # noqa: S608
        [segment_id],
    )
    return joined


def _difference(sql: Sql, segment_id: str, run_id: str, observed_at: datetime) -> tuple[int, int]:
    """The changes, computed once into a temporary table, then appended and applied to the state."""
    # A member without a match in the state joined; a state row without a match among the members left
    # (contact_id is never null on either side, so a null side means no match).
    sql.change(
        f"create temporary table {_DIFF} as "  # noqa: S608
        f"select coalesce(m.contact_id, s.contact_id) as contact_id, "
        f"case when s.contact_id is null then '{JOINED}' else '{LEFT}' end as change "
        f"from (select contact_id from {MATCHES_TABLE} where segment_id = ?) m "
        f"full join (select contact_id from {STATE_TABLE} where segment_id = ?) s on s.contact_id = m.contact_id "
        f"where m.contact_id is null or s.contact_id is null",
        [segment_id] * 2,
    )
    # On an error the store rolls the transaction back, the temporary table with it.
    sql.change(f"analyze {_DIFF}")
    counts = dict(sql.rows(f"select change, count(*) from {_DIFF} group by change"))  # noqa: S608
    joined, left = int(counts.get(JOINED, 0)), int(counts.get(LEFT, 0))
    if joined or left:
        sql.change(
            f"insert into {CHANGES_TABLE} select ?, contact_id, change, ?, ? from {_DIFF}",  # noqa: S608
            [segment_id, run_id, observed_at],
        )
    if left:
        sql.change(
            f"delete from {STATE_TABLE} where segment_id = ? and contact_id in "  # noqa: S608
            f"(select contact_id from {_DIFF} where change = '{LEFT}')",
            [segment_id],
        )
    if joined:
        sql.change(
            f"insert into {STATE_TABLE} select ?, contact_id from {_DIFF} where change = '{JOINED}'",  # noqa: S608
            [segment_id],
        )
    sql.change(f"drop table {_DIFF}")
    return joined, left


def _count(sql: Sql, table: str, segment_id: str) -> int:
    ((exists,),) = sql.rows(
        "select count(*) from information_schema.tables where table_schema = current_schema() and table_name = ?",
        [table],
    )
    if not exists:
        return 0
    ((count,),) = sql.rows(f"select count(*) from {table} where segment_id = ?", [segment_id])  # noqa: S608
    return int(count)


STEPS_QUERY = (
    f"select observed_at, run_id, members, joined, left_count from {STEPS_TABLE} "  # noqa: S608
    "where segment_id = ? and (cast(? as timestamptz) is null or observed_at >= ?) order by observed_at, source"
)
ANY_STEP_QUERY = f"select 1 from {STEPS_TABLE} limit 1"  # noqa: S608
CHANGES_QUERY = (
    f"select observed_at, change, contact_id, run_id from {CHANGES_TABLE} "  # noqa: S608
    "where segment_id = ? and (cast(? as timestamptz) is null or observed_at >= ?) "
    "order by observed_at, change, contact_id"
)
