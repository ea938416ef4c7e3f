"""How Dagster reaches the membership store: an IO manager and a resource, both named by the store's URL.

The IO manager writes what the assets return and loads what the checks read, through
`MembershipStore` only, so that it works the same on every engine:
- a partition of `segment_matches` (a DataFrame of segment_id, position, contact_id) replaces the
  partition's rows, atomically (`replace_partition`);
- an unpartitioned frame (the catalog) replaces its whole table, with the column types and
  comments of the asset's `dagster/column_schema`;
- an input annotated `PartitionSummary` (`matches_complete`) is answered by the database
  (`summarize`), never by loading the rows; an input annotated DataFrame loads them.

The resource gives the assets that read or write beside the IO manager (the catalog's readers,
the history, the batch of small segments) the same store.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
import pandas as pd
from pydantic import ConfigDict, Field, field_validator

from matchall_dagster.storage.store import Column, MembershipStore, PartitionSummary, StoreUrl, open_store

__all__ = ["MatchallIOManager", "MembershipStoreResource", "store_metadata"]

_URL_DESCRIPTION = (
    "The membership store: duckdb:///path/to/file.duckdb or postgresql://USER@HOST:PORT/DATABASE[?schema=NAME] "
    "(the password from PGPASSWORD, never in the URL)."
)


def _known_store(value: Any) -> Any:
    """A URL given as a string is checked when the resource is made: Dagster keeps its configuration in each
    run's snapshot, so a password must be refused before (an EnvVar is checked when the store is opened)."""
    if isinstance(value, str) and not isinstance(value, dg.EnvVar):
        StoreUrl.parse(value)
    return value


def _columns(schema: Any) -> list[Column] | None:
    if not isinstance(schema, dg.TableSchema):
        return None
    return [Column(column.name, column.type, column.description) for column in schema.columns]


def store_metadata(store: MembershipStore, table: str, rows: int, *, partitioned: bool) -> dict[str, Any]:
    """The storage metadata of a materialization written to `store`."""
    return {
        "dagster/partition_row_count" if partitioned else "dagster/row_count": rows,
        "dagster/storage_kind": store.kind,
        "dagster/table_name": store.url.table_name(table),
        "store": str(store.url),
    }


class MatchallIOManager(dg.ConfigurableIOManager):
    """Writes `segment_matches` partitions and the catalog to the membership store; loads partition summaries."""

    model_config = ConfigDict(hide_input_in_errors=True)  # a refused URL would show its password

    store: str = Field(description=_URL_DESCRIPTION)
    _check_store = field_validator("store")(_known_store)

    def _open(self) -> MembershipStore:
        return open_store(self.store)

    def handle_output(self, context: dg.OutputContext, obj: pd.DataFrame) -> None:
        if not isinstance(obj, pd.DataFrame):
            raise TypeError(
                f"The membership store keeps DataFrames; {context.asset_key.to_user_string()} returned "
                f"a {type(obj).__name__}: return a pandas DataFrame, or give the asset another IO manager."
            )
        store = self._open()
        table = context.asset_key.path[-1]
        if context.has_partition_key:
            store.replace_partition(context.partition_key, obj)
        else:
            store.replace_table(table, obj, _columns(context.definition_metadata.get("dagster/column_schema")))
        context.add_output_metadata(store_metadata(store, table, len(obj), partitioned=context.has_partition_key))

    def load_input(self, context: dg.InputContext) -> Any:
        store = self._open()
        wanted = context.dagster_type.typing_type
        table = context.asset_key.path[-1]
        if context.has_asset_partitions:
            segment_id = context.asset_partition_key
            if wanted is PartitionSummary:
                return store.summarize(segment_id)
            return store.read_partition(segment_id)
        if wanted is PartitionSummary:
            raise TypeError("A PartitionSummary is read from one partition of segment_matches; the input has none.")
        frame = store.read_table(table, patience=60.0)
        if frame is None:
            raise dg.Failure(
                description=f"The table {table} is not in the store {store.url} yet: materialize it first."
            )
        return frame


class MembershipStoreResource(dg.ConfigurableResource["MembershipStoreResource"]):
    """The membership store, for the steps that read or write beside the IO manager."""

    model_config = ConfigDict(hide_input_in_errors=True)

    url: str = Field(description=_URL_DESCRIPTION)
    _check_url = field_validator("url")(_known_store)

    def open(self) -> MembershipStore:
        return open_store(self.url)
