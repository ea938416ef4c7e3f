"""One ActiveCampaign account's definitions: every name they carry and the choices they are built with.

Every definition of the project is built from an `Account` (`definitions.account_definitions`,
which `MatchAllComponent` calls). The names (asset keys under `key_prefix`, the partitions and the
set of deleted segments, jobs, ops, sensors, the schedule, the pool, resource keys) are derived
here and nowhere else, so that two accounts load side by side in one code location without a
collision, and the default account (no prefix) keeps the names the project has always had.

Definitions reach their resources by key (`api`, `store`) rather than by parameter name, since
the keys differ per account.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import dagster as dg

from matchall_dagster.api.validation import DEFAULT_SORT, validate_sort
from matchall_dagster.orchestration.resource import ActiveCampaignResource
from matchall_dagster.settings import settings
from matchall_dagster.storage.io_manager import MembershipStoreResource
from matchall_dagster.storage.store import MembershipStore, StoreUrl

__all__ = ["DEFAULT_ACCOUNT", "Account", "SegmentSelection"]

_NAME_PART = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,39}")


@dataclass(frozen=True)
class SegmentSelection:
    """Which of the account's segments are tracked: all (the default), a list of ids, or a name pattern."""

    ids: frozenset[str] | None = None
    name_pattern: str | None = None  # a regular expression, searched in the segment's name

    def __post_init__(self) -> None:
        if self.ids is not None and self.name_pattern is not None:
            raise ValueError("segments: give either `ids` or `name_pattern`, not both")
        if self.name_pattern is not None:
            try:
                re.compile(self.name_pattern)
            except re.error as exc:
                raise ValueError(
                    f"segments.name_pattern: {self.name_pattern!r} is not a regular expression ({exc})"
                ) from None

    def admits(self, segment_id: str, name: str | None, *, unknown_name: bool = False) -> bool:
        """Whether the segment is tracked; by a pattern, a segment whose name is unknown is `unknown_name`."""
        if self.ids is not None:
            return segment_id in self.ids
        if self.name_pattern is not None:
            return unknown_name if name is None else re.search(self.name_pattern, name) is not None
        return True

    def tracked(
        self, segment_ids: Iterable[str], names: Mapping[str, str] | None = None, *, unknown_name: bool = False
    ) -> list[str]:
        """The given ids this selection admits, in their order. Discovery knows every listed name; the
        kick-off knows the catalog's, and admits a partition whose name it does not know (discovery did)."""
        known = names or {}
        return [s for s in segment_ids if self.admits(s, known.get(s), unknown_name=unknown_name)]

    def describe(self) -> str:
        if self.ids is not None:
            return f"the segments {', '.join(sorted(self.ids))}"
        if self.name_pattern is not None:
            return f"the segments whose name matches {self.name_pattern!r}"
        return "every saved segment"


@dataclass(frozen=True)
class Account:
    """The names and choices one account's definitions are built with."""

    key_prefix: tuple[str, ...] = ()
    segments: SegmentSelection = field(default_factory=SegmentSelection)
    sort: str = DEFAULT_SORT
    kickoff_cron: str = "0 6 * * *"
    readiness_interval_seconds: int = 15
    group_name: str = "activecampaign"
    owners: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)
    descriptions: Mapping[str, str] = field(default_factory=dict)  # by asset name, e.g. "segment_matches"
    store: str | None = None  # a store URL; None: MATCHALL_STORE, else matchall.duckdb in DAGSTER_HOME

    def __post_init__(self) -> None:
        for part in self.key_prefix:
            if not _NAME_PART.fullmatch(part):
                raise ValueError(
                    f"key_prefix: {part!r} is not a name part (a letter, then up to 39 letters, digits or '_'); "
                    f"it becomes part of asset keys, job, sensor and pool names"
                )
        validate_sort(self.sort)  # an InvalidInputError (a ValueError) naming the bad key
        if self.store is not None:
            StoreUrl.parse(self.store)  # a ValueError naming what to write
        if self.readiness_interval_seconds < 5:
            raise ValueError(
                f"readiness_interval_seconds: {self.readiness_interval_seconds} is too short; give 5 or more "
                "(each tick polls for several seconds)"
            )

    # Names: the base name alone for the default account, else prefixed with its key prefix.
    def name(self, base: str) -> str:
        return "_".join([*self.key_prefix, base])

    def asset_key(self, base: str) -> dg.AssetKey:
        return dg.AssetKey([*self.key_prefix, base])

    @property
    def label(self) -> str:
        """How the account is named in descriptions: its key prefix, or "the account"."""
        return "/".join(self.key_prefix) or "the account"

    @property
    def matches_key(self) -> dg.AssetKey:
        return self.asset_key("segment_matches")

    @property
    def catalog_key(self) -> dg.AssetKey:
        return self.asset_key("activecampaign_segments")

    @property
    def changes_key(self) -> dg.AssetKey:
        return self.asset_key("segment_membership_changes")

    @functools.cached_property
    def segments_partitions(self) -> dg.DynamicPartitionsDefinition:
        return dg.DynamicPartitionsDefinition(name=self.partitions_name)

    @property
    def partitions_name(self) -> str:
        return self.name("segments")

    @property
    def deleted_name(self) -> str:
        """A set of segment ids (a dynamic partitions definition used as a set; see `deletions`)."""
        return self.name("deleted_segments")

    @property
    def pool(self) -> str:
        """Every step that may call the API; its limit is in dagster.yaml (`pools.default_limit`)."""
        return self.name("activecampaign")

    @property
    def api_resource(self) -> str:
        return self.name("activecampaign")

    @property
    def store_resource(self) -> str:
        return self.name("store")

    @property
    def io_manager_key(self) -> str:
        return self.name("io_manager")

    def check_op(self, check_name: str) -> str:
        """The op of a check on `segment_matches` (its run configuration's key)."""
        return f"{self.matches_key.to_python_identifier()}_{check_name}"

    # Resources, by this account's keys.
    def api(self, context: Any) -> ActiveCampaignResource:
        return cast(ActiveCampaignResource, getattr(context.resources, self.api_resource))

    def membership_store(self, context: Any) -> MembershipStore:
        return cast(MembershipStoreResource, getattr(context.resources, self.store_resource)).open()

    def store_url(self) -> StoreUrl:
        """Where the account's memberships land: `store`, else MATCHALL_STORE (or matchall.duckdb in DAGSTER_HOME)
        with the key prefix in the file's or the schema's name for a prefixed account, so that two accounts never
        share tables (they have the same names)."""
        if self.store:
            return StoreUrl.parse(self.store)
        return settings().store_url().for_account(self.key_prefix)

    def table_name(self, table: str) -> str:
        """A table's name as `dagster/table_name` gives it: database (a DuckDB file's stem), schema, table."""
        return self.store_url().table_name(table)

    def description(self, asset: str, default: str) -> str:
        return self.descriptions.get(asset, default)


DEFAULT_ACCOUNT = Account()
