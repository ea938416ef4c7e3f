"""What the `matchall` commands share: the API client from the environment, the Dagster instance,
the progress line and the one way to fail."""

from __future__ import annotations

import os
import sys
from typing import IO, Any, NoReturn

import click
import pyarrow.csv as pa_csv

from matchall_dagster.api.budget import request_budget
from matchall_dagster.api.client import ActiveCampaignClient
from matchall_dagster.api.config import DEFAULT_REQUESTS_PER_SECOND
from matchall_dagster.api.errors import InvalidInputError
from matchall_dagster.api.validation import validate_api_url
from matchall_dagster.settings import settings

# Plain CSV for every command that writes it: ids and counts need no quoting.
CSV_OPTIONS = pa_csv.WriteOptions(quoting_style="none", quoting_header="none")


def fail(message: str) -> NoReturn:
    """Print `Error: message` on stderr and exit 1: every failure of every command looks alike."""
    click.echo(f"Error: {message}", err=True)
    sys.exit(1)


def client_from_env(budget: str | None = None) -> ActiveCampaignClient:
    """The client of ACTIVECAMPAIGN_API_*, taking from the account's budget in `budget`, else in
    MATCHALL_REQUEST_BUDGET, else in DAGSTER_HOME's file (beside a running instance), else its own."""
    url = os.environ.get("ACTIVECAMPAIGN_API_URL", "")
    key = os.environ.get("ACTIVECAMPAIGN_API_KEY", "")
    missing = [name for name, value in (("ACTIVECAMPAIGN_API_URL", url), ("ACTIVECAMPAIGN_API_KEY", key)) if not value]
    if missing:
        raise InvalidInputError(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set. Set "
            f"ACTIVECAMPAIGN_API_URL and ACTIVECAMPAIGN_API_KEY to the account's API URL and key "
            f"(ActiveCampaign: Settings > Developer), or to a simulator's (`matchall simulator` prints both)."
        )
    store = budget or settings().budget_store()
    return ActiveCampaignClient(
        url, key, budget=request_budget(store, validate_api_url(url), DEFAULT_REQUESTS_PER_SECOND)
    )


def instance_or_none() -> Any:
    """The Dagster instance of DAGSTER_HOME, or None when DAGSTER_HOME is unset.

    Dagster is imported here, not at the top: it takes half a second, and `fetch` never needs it.
    """
    if not os.environ.get("DAGSTER_HOME"):
        return None
    import dagster as dg

    try:
        return dg.DagsterInstance.get()
    except Exception as exc:  # Dagster raises several kinds for a bad home; all mean the same to the user
        fail(
            f"Could not open the Dagster instance at DAGSTER_HOME={os.environ['DAGSTER_HOME']} "
            f"({str(exc).splitlines()[0][:200]}). Point DAGSTER_HOME at the folder holding the instance's "
            f"dagster.yaml, as `dagster dev` and the daemon use it."
        )


def one_line(text: str) -> str:
    """`text` safe for one tab-separated field: control characters and tabs become spaces."""
    return "".join(c if c.isprintable() and c != "\t" else " " for c in text)


def silence_closed_stdout() -> NoReturn:
    """The reader went away (`| head`): stop quietly, as other command-line tools do."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(1)


class Progress:
    """One self-rewriting status line on a terminal's stderr; silent when stderr is not a tty."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._live = stream.isatty()
        self._width = 0

    def show(self, text: str) -> None:
        if self._live:
            self._stream.write("\r" + text.ljust(self._width))
            self._stream.flush()
            self._width = len(text)

    def done(self) -> None:
        if self._live and self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()
