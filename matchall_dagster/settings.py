"""Every `MATCHALL_*` setting of the project, declared once, read once, validated once.

`settings()` reads the environment on first use and keeps the result for the process; a bad
value raises `ConfigurationError`, which names the variable and says what to do. The table in
docs/configuration.md is generated from these fields (`settings_table`), and a test keeps it so.

The simulator's own options (`MATCHALL_SIM_*`) are options of `matchall simulator`, not settings
of the project, and the API's URL and key are read by the resource through Dagster's `EnvVar`.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    from matchall_dagster.storage.store import StoreUrl

__all__ = ["ConfigurationError", "Settings", "settings", "settings_table", "store_url"]

PREFIX = "MATCHALL_"
BUDGET_FILE = "matchall-request-budget.sqlite"
# Five fields of the characters cron allows; Dagster checks the expression itself when the
# schedule is built, and `orchestration.kickoff` turns its error into a ConfigurationError.
_CRON = re.compile(r"[0-9*/,\-A-Za-z?LW#]+( [0-9*/,\-A-Za-z?LW#]+){4}")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.~-]{0,127}")


class ConfigurationError(ValueError):
    """A setting's value is wrong; the message names the variable and what to do."""


class Settings(BaseSettings):
    """The project's settings; each field is the variable `MATCHALL_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, frozen=True, extra="ignore", case_sensitive=False)

    store: str | None = Field(
        default=None,
        description="Where the memberships land: `duckdb:///path/to/file.duckdb` (one machine) or "
        "`postgresql://USER@HOST:PORT/DATABASE[?schema=NAME]` (several writers; schema `matchall` by default; "
        "the password from `PGPASSWORD`). Default: `duckdb:///` `matchall.duckdb` in `DAGSTER_HOME` (else the "
        "working folder).",
    )
    segments: Annotated[frozenset[str] | None, NoDecode] = Field(
        default=None,
        description="Comma-separated segment ids to track (e.g. `1,42`). Default: every saved segment.",
    )
    kickoff_cron: str = Field(
        default="0 6 * * *", description="When the daily kick-off starts a run of every tracked segment (cron, UTC)."
    )
    max_run_attempts: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Runs a segment gets per kick-off when they keep failing (the first and the fresh ones).",
    )
    request_budget: str | None = Field(
        default=None,
        description="Where the account's request budget lives, shared by every process that calls the API: "
        "`memory`, a SQLite file (`sqlite:///path` or a path) or `postgresql://USER@HOST:PORT/DB` (password from "
        "`PGPASSWORD`). Default: `matchall-request-budget.sqlite` in `DAGSTER_HOME` (else `memory`).",
    )
    small_batch_segments: int = Field(
        default=100,
        ge=0,
        le=1000,
        description="At most this many small ready segments (one page or less) are read in one run of "
        "`read_small_segments`; 0 reads every segment in a run of its own.",
    )
    max_change_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="The share of a segment that may join or leave in one step before "
        "`membership_change_plausible` warns.",
    )

    @field_validator("segments", mode="before")
    @classmethod
    def _split_ids(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        ids = [part.strip() for part in value.split(",") if part.strip()]
        for segment_id in ids:
            if not _ID.fullmatch(segment_id) or ".." in segment_id:
                raise ValueError(f"{segment_id[:60]!r} is not a segment id (letters, digits, '-', '_', '.', '~')")
        return frozenset(ids) or None

    @field_validator("request_budget")
    @classmethod
    def _known_store(cls, value: str | None) -> str | None:
        from matchall_dagster.api.budget import BudgetStore
        from matchall_dagster.api.errors import InvalidInputError

        if value is None:
            return None
        try:
            BudgetStore.parse(value)
        except InvalidInputError as exc:
            raise ValueError(str(exc)) from None
        return value.strip()

    @field_validator("store")
    @classmethod
    def _known_engine(cls, value: str | None) -> str | None:
        from matchall_dagster.storage.store import StoreUrl

        return None if value is None else str(StoreUrl.parse(value))

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values: Any) -> Any:
        old = os.environ.get(f"{PREFIX}DUCKDB_PATH")
        if old:
            path = Path(old).expanduser().absolute()
            raise ValueError(
                f"{PREFIX}DUCKDB_PATH is no longer read: set {PREFIX}STORE=duckdb://{path} "
                f"instead (the same file), and unset {PREFIX}DUCKDB_PATH"
            )
        return values

    @field_validator("kickoff_cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        value = " ".join(value.split())
        if not _CRON.fullmatch(value):
            raise ValueError(f"{value[:60]!r} is not a cron expression of five fields, such as '0 6 * * *'")
        return value

    def store_url(self) -> StoreUrl:
        """The membership store: MATCHALL_STORE, else matchall.duckdb in DAGSTER_HOME, else here."""
        from matchall_dagster.storage.store import StoreUrl

        if self.store is not None:
            return StoreUrl.parse(self.store)
        return StoreUrl.parse(str(Path(os.environ.get("DAGSTER_HOME") or ".") / "matchall.duckdb"))

    def budget_store(self) -> str:
        """The request budget's store: MATCHALL_REQUEST_BUDGET, else a file in DAGSTER_HOME, else memory."""
        if self.request_budget is not None:
            return self.request_budget
        home = os.environ.get("DAGSTER_HOME")
        return str(Path(home) / BUDGET_FILE) if home else "memory"


@functools.cache
def settings() -> Settings:
    """The settings of this process, read from the environment once."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = PREFIX + str(error["loc"][0]).upper() if error["loc"] else PREFIX + "*"
            problems.append(f"{name}: {error['msg'].removeprefix('Value error, ')}")
        raise ConfigurationError(
            "Bad settings: " + "; ".join(problems) + ". Fix or unset the variable (docs/configuration.md lists "
            "every setting with its default)."
        ) from None


def store_url() -> StoreUrl:
    """The membership store of this process's settings (see `Settings.store_url`)."""
    return settings().store_url()


def settings_table() -> str:
    """The settings as a markdown table, for docs/configuration.md."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = "(none)" if field.default is None else f"`{field.default}`"
        rows.append(f"| `{PREFIX}{name.upper()}` | {default} | {field.description} |")
    return "\n".join(rows)
