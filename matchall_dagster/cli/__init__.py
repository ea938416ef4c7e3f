"""The `matchall` command: fetch a segment's members, list segments, read changes, serve the simulator.

One module per command (`fetch`, `segments` with `forget`, `changes`, `simulator`); what they
share is in `shared`. The settings are `matchall_dagster.settings`, read and checked by `main`
before any command runs.
"""

from __future__ import annotations

import click

from matchall_dagster.cli import changes, fetch, segments, simulator
from matchall_dagster.cli.shared import fail
from matchall_dagster.settings import ConfigurationError, settings

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """ActiveCampaign segment memberships: fetch them, or serve the offline simulator."""
    settings.cache_clear()  # each command reads the settings of its own environment, checked first
    try:
        settings()
    except ConfigurationError as exc:
        fail(str(exc))


for _command in (fetch.fetch, segments.segments, segments.forget, changes.changes, simulator.simulator):
    main.add_command(_command)
