"""`matchall simulator`: serve a simulated account of the Match-All API in the foreground.

The options are built from `SimulatorConfig` and `Faults` (plain dataclasses), so that `matchall
--help` works without the `simulator` extra; the app and the server (Starlette, uvicorn) are
imported when the command runs, and their absence is one clear error naming the install command.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from matchall_dagster.cli.shared import fail
from matchall_dagster.simulator.config import DEFAULT_TOKEN, Faults, SimulatorConfig

_EXTRA_MODULES = frozenset({"starlette", "uvicorn"})
EXTRA_HINT = "pip install 'matchall-dagster[simulator]'"

_FAULT_HELP = [
    ("latency_ms", "Milliseconds added to every answer."),
    ("latency_jitter_ms", "Plus up to this many random milliseconds."),
    ("error_rate", "Share of requests answered 500/502/503/504."),
    ("reset_rate", "Share of answers whose connection drops mid-body."),
    ("truncate_rate", "Share of answers cut short (invalid JSON)."),
    ("burst_429_rate", "Chance that a request starts a burst of 429s."),
    ("burst_429_length", "429s in a burst."),
    ("burst_429_retry_after_seconds", "Retry-After of burst 429s (0: retry at once)."),
    ("slow_rate", "Share of answers delayed by --slow-ms (time-outs)."),
    ("slow_ms", "Delay of slow answers."),
    ("non_json_rate", "Share of answers that are 200 with an HTML page instead of JSON."),
    ("total_drift_rate", "Share of ready pages whose page.total differs from the run's."),
    ("duplicate_rate", "Share of ready pages with one id of another page in place of one of theirs."),
    ("short_page_rate", "Share of ready pages before the last that hold fewer than per_page ids."),
    ("rekick_rate", "Share of reads of page 2+ that find the run searching again (as after a sort change)."),
    ("rekick_ms", "How long such a run searches again."),
]


def _fault_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for name, help_text in reversed(_FAULT_HELP):
        default = getattr(Faults(), name)
        option = click.option(
            f"--{name.replace('_', '-')}",
            name,
            type=type(default),
            default=default,
            show_default=True,
            envvar=f"MATCHALL_SIM_{name.upper()}",
            help=help_text,
        )
        func = option(func)
    return func


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, envvar="MATCHALL_SIM_HOST")
@click.option("--port", default=8765, show_default=True, envvar="MATCHALL_SIM_PORT")
@click.option(
    "--token", default=DEFAULT_TOKEN, show_default=True, envvar="MATCHALL_SIM_TOKEN", help="The accepted Api-Token."
)
@click.option(
    "--seed", default=0, show_default=True, envvar="MATCHALL_SIM_SEED", help="Seed of the account and the faults."
)
@click.option(
    "--ready-after",
    default=2.0,
    show_default=True,
    envvar="MATCHALL_SIM_READY_AFTER",
    help="Seconds until a run is ready.",
)
@click.option(
    "--requests-per-second",
    default=5.0,
    show_default=True,
    envvar="MATCHALL_SIM_REQUESTS_PER_SECOND",
    help="The account limit; 0 turns it off.",
)
@click.option(
    "--retry-after", default=1, show_default=True, envvar="MATCHALL_SIM_RETRY_AFTER", help="Retry-After of 429s."
)
@click.option(
    "--burst-429-retry-after/--no-burst-429-retry-after", default=True, envvar="MATCHALL_SIM_BURST_429_RETRY_AFTER"
)
@_fault_options
def simulator(
    host: str,
    port: int,
    token: str,
    seed: int,
    ready_after: float,
    requests_per_second: float,
    retry_after: int,
    **faults: Any,
) -> None:
    """Serve a simulated account of the Match-All API (every option also reads MATCHALL_SIM_<NAME>)."""
    try:
        from matchall_dagster.simulator import Simulator, demo_account, serve
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in _EXTRA_MODULES:
            raise
        fail(f"`matchall simulator` needs the simulator extra ({missing} is not installed): {EXTRA_HINT}")
    try:
        config = SimulatorConfig(
            api_token=token,
            requests_per_second=requests_per_second,
            retry_after=retry_after,
            ready_after=ready_after,
            seed=seed,
            faults=Faults(**faults),
        )
    except ValueError as exc:
        fail(str(exc))
    account = demo_account(seed)
    url_host = f"[{host}]" if ":" in host else host
    click.echo(
        f"Simulated ActiveCampaign account with {len(account.segments)} segments.\n"
        f"  export ACTIVECAMPAIGN_API_URL=http://{url_host}:{port}\n"
        f"  export ACTIVECAMPAIGN_API_KEY={token if token == DEFAULT_TOKEN else '<your --token>'}",
        err=True,
    )
    serve(Simulator(account, config), host=host, port=port, log_level="warning")
