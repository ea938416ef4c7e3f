"""A faithful, offline stand-in for ActiveCampaign's Segments Match-All API.

`SimAccount` holds the seeded segments and the ground truth; `Simulator` the server-side state
and the ASGI app; `SimulatorServer` serves it over real HTTP on 127.0.0.1.

The app and the server need the `simulator` extra (Starlette, uvicorn): `pip install
'matchall-dagster[simulator]'`. They are imported on first use, so that the account and the
configuration (what `matchall simulator` builds its options from) import without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from matchall_dagster.simulator.account import Behavior, SimAccount, SimSegment, demo_account
from matchall_dagster.simulator.config import DEFAULT_TOKEN, Faults, SimulatorConfig

if TYPE_CHECKING:
    from matchall_dagster.simulator.app import Answer, Simulator
    from matchall_dagster.simulator.server import SimulatorServer, serve

EXTRA_HINT = "pip install 'matchall-dagster[simulator]'"
_EXTRA_MODULES = frozenset({"starlette", "uvicorn"})
_NEEDS_THE_EXTRA = {"Answer": "app", "Simulator": "app", "SimulatorServer": "server", "serve": "server"}

__all__ = [
    "DEFAULT_TOKEN",
    "Answer",
    "Behavior",
    "Faults",
    "SimAccount",
    "SimSegment",
    "Simulator",
    "SimulatorConfig",
    "SimulatorServer",
    "demo_account",
    "serve",
]


def __getattr__(name: str) -> object:
    module = _NEEDS_THE_EXTRA.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in _EXTRA_MODULES:
            raise
        raise ModuleNotFoundError(
            f"matchall_dagster.simulator.{name} needs {missing}, of the simulator extra: {EXTRA_HINT}", name=exc.name
        ) from exc
