"""`matchall segments` (what discovery would do with each segment) and `matchall forget`."""

from __future__ import annotations

import shlex
from typing import Any

import click

from matchall_dagster.api.errors import ActiveCampaignError, InvalidInputError
from matchall_dagster.api.models import Segment
from matchall_dagster.cli.shared import client_from_env, fail, instance_or_none, one_line

# What `matchall segments` says discovery would do with each segment (its `discovery` column).
_TRACKED, _NEW, _IGNORED, _RESTORE, _UNLISTED, _DELETED = "tracked", "new", "ignored", "restore", "unlisted", "deleted"


@click.command()
def segments() -> None:
    """List the account's saved segments and what discovery would do with each, as tab-separated lines.

    Columns: segment_id, last_total (ActiveCampaign's latest count), last_run_id (the run that counted
    it), discovery, name. `discovery` is: tracked (a partition), new (discovery adds it), ignored (left
    out by MATCHALL_SEGMENTS), restore (marked deleted, listed again: discovery unmarks it), and for
    partitions ActiveCampaign does not list: unlisted (marked deleted once two listings in a row miss
    it) or deleted (marked). Without DAGSTER_HOME every admitted segment shows as new. Read-only.
    """
    from matchall_dagster.orchestration.account import SegmentSelection
    from matchall_dagster.settings import settings

    selection = SegmentSelection(ids=settings().segments)  # read (and refused if bad) before anything is printed
    try:
        listed = _listing()
    except ActiveCampaignError as exc:
        fail(str(exc))
    partitions, deleted = _partitions_and_deleted(instance_or_none())
    admitted = set(selection.tracked([*(segment.id for segment in listed), *partitions]))
    click.echo("segment_id\tlast_total\tlast_run_id\tdiscovery\tname")
    for segment in listed:
        if segment.id not in admitted and segment.id not in partitions:
            action = _IGNORED
        elif segment.id in deleted:
            action = _RESTORE
        else:
            action = _TRACKED if segment.id in partitions else _NEW
        size = "" if segment.last_total is None else str(segment.last_total)
        run_id = segment.last_run.run_id if segment.last_run and segment.last_run.run_id else ""
        click.echo(f"{segment.id}\t{size}\t{one_line(run_id)}\t{action}\t{one_line(segment.name)}")
    _echo_unlisted(sorted(partitions - {segment.id for segment in listed}), deleted, admitted)


def _listing() -> list[Segment]:
    with client_from_env() as client:
        return client.list_segments(page_size=10_000)


def _partitions_and_deleted(instance: Any) -> tuple[set[str], set[str]]:
    """The instance's segment partitions and the ones marked deleted; none without an instance."""
    if instance is None:
        click.echo(
            "DAGSTER_HOME is not set: no instance to compare with; every admitted segment would be added.", err=True
        )
        return set(), set()
    from matchall_dagster.orchestration.account import DEFAULT_ACCOUNT
    from matchall_dagster.orchestration.deletions import deleted_ids

    with instance:
        partitions = instance.get_dynamic_partitions(DEFAULT_ACCOUNT.partitions_name)
        return set(partitions), deleted_ids(instance, DEFAULT_ACCOUNT)


def _echo_unlisted(unlisted: list[str], deleted: set[str], admitted: set[str]) -> None:
    """The rows of partitions ActiveCampaign does not list, from the catalog's last sight of them."""
    if unlisted:
        from matchall_dagster.orchestration.catalog import read_catalog
        from matchall_dagster.settings import store_url
        from matchall_dagster.storage.store import open_store

        known = read_catalog(open_store(store_url()), unlisted, patience=0.5)
        for segment_id in unlisted:
            entry = known.get(segment_id)
            size = "" if entry is None or entry.last_total is None else str(entry.last_total)
            run_id = entry.last_run_id or "" if entry else ""
            action = _DELETED if segment_id in deleted else _UNLISTED if segment_id in admitted else _IGNORED
            click.echo(
                f"{segment_id}\t{size}\t{one_line(run_id)}\t{action}\t{one_line(entry.name or '' if entry else '')}"
            )
    waiting = sum(1 for segment_id in unlisted if segment_id not in deleted and segment_id in admitted)
    if waiting:
        click.echo(
            f"{waiting} tracked partition(s) are not listed by ActiveCampaign: discovery marks each deleted once two "
            f"listings in a row miss it (rows kept).",
            err=True,
        )


@click.command()
@click.argument("segment_id")
@click.option(
    "--force", is_flag=True, help="Also forget a segment not marked deleted (discovery adds it again while listed)."
)
def forget(segment_id: str, force: bool) -> None:
    """Remove SEGMENT_ID's partition of segment_matches, typically after it was marked deleted.

    Its stored rows (tables segment_matches and segment_membership_changes in the DuckDB file) and its
    event history are kept; the command prints how to delete the rows. Needs DAGSTER_HOME.
    """
    from matchall_dagster.api.validation import validate_id
    from matchall_dagster.orchestration.account import DEFAULT_ACCOUNT
    from matchall_dagster.orchestration.deletions import NotForgettableError
    from matchall_dagster.orchestration.deletions import forget as forget_segment
    from matchall_dagster.settings import store_url
    from matchall_dagster.storage import history

    try:
        validate_id(segment_id)
    except InvalidInputError as exc:
        fail(str(exc))
    instance = instance_or_none()
    if instance is None:
        fail(
            "DAGSTER_HOME is not set: forget removes a partition from the Dagster instance. Set DAGSTER_HOME to the "
            "instance's folder (the one `dagster dev` and the daemon use) and run again."
        )
    with instance:
        try:
            forgotten = forget_segment(instance, DEFAULT_ACCOUNT, segment_id, force=force)
        except NotForgettableError as exc:
            fail(str(exc))
    store = store_url()
    tables = (history.MATCHES_TABLE, history.CHANGES_TABLE, history.STEPS_TABLE, history.STATE_TABLE)
    statements = " ".join(f"delete from {store.schema}.{table} where segment_id = '{segment_id}';" for table in tables)  # noqa: S608  # printed, never run; ids hold no quotes (validate_id)
    client = (
        f"duckdb {shlex.quote(store.location)}" if store.kind == "duckdb" else f"psql {shlex.quote(store.location)} -c"
    )
    click.echo(
        f"Removed the partition of segment {segment_id} from segment_matches"
        + (" and its deleted mark." if forgotten.was_deleted else ".")
        + f" Its stored rows are kept in {store}, its history in Dagster's event log. To delete the rows "
        + f"(tables missing from the store can be left out):\n  {client} {shlex.quote(statements)}"
    )
