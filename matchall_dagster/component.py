"""`MatchAllComponent`: one ActiveCampaign account's segment memberships, configured in a `defs.yaml`.

    type: matchall_dagster.MatchAllComponent
    attributes:
      api_url: "{{ env.ACME_API_URL }}"
      api_key: "{{ env.ACME_API_KEY }}"
      requests_per_second: 5
      segments: {name_pattern: "^Newsletter"}
      kickoff_cron: "0 5 * * *"
      translation: {key_prefix: [acme], group_name: acme, owners: [team:marketing-data]}

Every attribute but the two API ones is optional; left out, it is today's single-account default
(the MATCHALL_* settings where there is one). Each instance is an `Account` (`orchestration.account`)
with its own asset keys, partitions, jobs, sensors, schedule, pool and DuckDB file, so two instances
load side by side. The key never enters the definitions: `{{ env.NAME }}` becomes `dg.EnvVar("NAME")`,
read by the run that needs it, as the resource shows it in the UI.
"""

import re
from dataclasses import dataclass, field
from typing import Annotated

import dagster as dg
from pydantic import Field

from matchall_dagster.api.config import DEFAULT_REQUESTS_PER_SECOND, RequestsPerSecond
from matchall_dagster.api.validation import DEFAULT_SORT
from matchall_dagster.definitions import account_definitions, settings_account
from matchall_dagster.orchestration.account import SegmentSelection
from matchall_dagster.orchestration.resource import ActiveCampaignResource

__all__ = ["MatchAllComponent", "MatchAllScaffolder", "Segments", "Storage", "Translation"]

_ENV_TEMPLATE = re.compile(r"\{\{\s*env(?:\.(\w+)|\(\s*['\"](\w+)['\"]\s*\))\s*\}\}")


def _env_var(context: dg.ResolutionContext, raw: str) -> str:
    """`{{ env.NAME }}` as `dg.EnvVar("NAME")`: the value is read where a step uses it, never stored."""
    match = _ENV_TEMPLATE.fullmatch(raw.strip())
    if match is None:
        raise ValueError(  # the value itself is never repeated: it may be the key
            "api_url and api_key take '{{ env.NAME }}', the name of an environment variable, so that the key "
            "never lands in the definitions, the UI or a file; set the variable and name it there."
        )
    return dg.EnvVar(match.group(1) or match.group(2))


EnvTemplate = Annotated[
    str,
    dg.Resolver(
        _env_var,
        model_field_type=str,
        inject_before_resolve=False,
        description="'{{ env.NAME }}': an environment variable, read when a step calls the API.",
    ),
]


class Segments(dg.Model):
    """Which saved segments are tracked; neither given: every one (or MATCHALL_SEGMENTS when set)."""

    ids: list[str] | None = Field(default=None, description="Segment ids, e.g. ['1', '42'].")
    name_pattern: str | None = Field(
        default=None, description="A regular expression searched in the segment's name, e.g. '^Newsletter'."
    )


class Storage(dg.Model):
    """Where the account's memberships land."""

    url: str | None = Field(
        default=None,
        description="The membership store: duckdb:///path/to/file.duckdb or postgresql://USER@HOST:PORT/DATABASE"
        "[?schema=NAME] (the password from PGPASSWORD, never here). Default: MATCHALL_STORE, else matchall.duckdb "
        "in DAGSTER_HOME; with a key prefix, a file or schema of the account's own (matchall_<prefix>).",
    )


class Translation(dg.Model):
    """How the account's definitions are named and labelled in Dagster."""

    key_prefix: list[str] = Field(
        default_factory=list,
        description="Prefix of the asset keys and of every job, sensor, schedule, pool and resource name "
        "(e.g. ['acme']: acme/segment_matches, acme_segment_matches_job). Empty: today's names; one account only.",
    )
    group_name: str = Field(default="activecampaign", description="The assets' group.")
    owners: list[str] = Field(default_factory=list, description="e.g. ['team:marketing-data', 'ana@example.com'].")
    tags: dict[str, str] = Field(default_factory=dict, description="Tags on the assets and on the jobs' runs.")
    descriptions: dict[str, str] = Field(
        default_factory=dict,
        description="Descriptions by asset name: segment_matches, segment_membership_changes, activecampaign_segments.",
    )


class ScaffoldParams(dg.Model):
    """`dg scaffold defs matchall_dagster.MatchAllComponent PATH [--env-prefix ACME] [--key-prefix acme]`."""

    env_prefix: str = Field(
        default="ACTIVECAMPAIGN", description="The YAML reads {env_prefix}_API_URL and {env_prefix}_API_KEY."
    )
    key_prefix: str | None = Field(default=None, description="The account's key prefix; empty: today's names.")


class MatchAllScaffolder(dg.Scaffolder[ScaffoldParams]):
    """Writes a defs.yaml that loads as it is: the two variables are read when a step calls the API."""

    @classmethod
    def get_scaffold_params(cls) -> type[ScaffoldParams]:
        return ScaffoldParams

    def scaffold(self, request: dg.ScaffoldRequest[ScaffoldParams]) -> None:
        params = request.params or ScaffoldParams()
        attributes: dict[str, object] = {
            "api_url": f"{{{{ env.{params.env_prefix}_API_URL }}}}",
            "api_key": f"{{{{ env.{params.env_prefix}_API_KEY }}}}",
        }
        if params.key_prefix:
            attributes["translation"] = {"key_prefix": [params.key_prefix]}
        dg.scaffold_component(request, attributes)


@dg.scaffold_with(MatchAllScaffolder)
@dataclass
class MatchAllComponent(dg.Component, dg.Resolvable):
    """ActiveCampaign segment memberships (Segments Match-All API) for one account: discovery, kick-off,
    readiness, the partitioned members, their checks and the membership history."""

    api_url: EnvTemplate
    api_key: EnvTemplate
    requests_per_second: RequestsPerSecond = DEFAULT_REQUESTS_PER_SECOND
    request_budget: str | None = None
    segments: Segments | None = None
    sort: str = DEFAULT_SORT
    kickoff_cron: str | None = None
    readiness_interval_seconds: int = 15
    storage: Storage = field(default_factory=Storage)
    translation: Translation = field(default_factory=Translation)

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        try:
            account = settings_account(
                key_prefix=tuple(self.translation.key_prefix),
                segments=SegmentSelection(
                    ids=frozenset(self.segments.ids) if self.segments.ids is not None else None,
                    name_pattern=self.segments.name_pattern,
                )
                if self.segments is not None
                else None,
                sort=self.sort,
                kickoff_cron=self.kickoff_cron,
                readiness_interval_seconds=self.readiness_interval_seconds,
                group_name=self.translation.group_name,
                owners=tuple(self.translation.owners),
                tags=self.translation.tags,
                descriptions=self.translation.descriptions,
                store=self.storage.url,
            )
            api = ActiveCampaignResource(
                api_url=self.api_url,
                api_key=self.api_key,
                requests_per_second=self.requests_per_second,
                request_budget=self.request_budget,
            )
            return account_definitions(account, api)
        except ValueError as exc:  # a bad choice: the prefix, the pattern, the sort, the cron
            raise ValueError(f"{context.path}: {exc}") from None
