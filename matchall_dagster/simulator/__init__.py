"""A faithful, offline stand-in for ActiveCampaign's Segments Match-All API.

`SimAccount` holds the seeded segments and the ground truth; `Simulator` the server-side state
and the ASGI app; `SimulatorServer` serves it over real HTTP on 127.0.0.1.
"""

from matchall_dagster.simulator.account import Behavior, SimAccount, SimSegment, demo_account
from matchall_dagster.simulator.app import DEFAULT_TOKEN, Faults, Simulator, SimulatorConfig
from matchall_dagster.simulator.server import SimulatorServer, serve

__all__ = [
    "DEFAULT_TOKEN",
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
