"""Serving the simulator: in a background thread for tests, or in the foreground for the CLI."""

from __future__ import annotations

import logging
import socket
import threading
import time
from types import TracebackType

import uvicorn

from matchall_dagster.simulator.app import Simulator
from matchall_dagster.simulator.faults import InjectedResetError


class _HideInjectedResets(logging.Filter):
    """Injected resets are the point, not a server error; keep them out of the logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], InjectedResetError))


def _config(simulator: Simulator, log_level: str) -> uvicorn.Config:
    logging.getLogger("uvicorn.error").addFilter(_HideInjectedResets())
    # One event loop serves every request, like one account's front end; httptools parses fast.
    return uvicorn.Config(simulator.app, log_level=log_level, access_log=False, lifespan="off", timeout_keep_alive=30)


def serve(simulator: Simulator, host: str = "127.0.0.1", port: int = 8765, log_level: str = "info") -> None:
    """Serve until interrupted (the `matchall simulator` command)."""
    config = _config(simulator, log_level)
    config.host, config.port = host, port
    uvicorn.Server(config).run()


class SimulatorServer:
    """A real HTTP server of a `Simulator` on 127.0.0.1 and an ephemeral port, in a thread.

    `with SimulatorServer(Simulator(account)) as server: server.url`
    """

    def __init__(self, simulator: Simulator, host: str = "127.0.0.1") -> None:
        self.simulator = simulator
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, 0))
        self.host, self.port = self._socket.getsockname()[:2]
        self._server = uvicorn.Server(_config(simulator, "warning"))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="matchall-simulator", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> SimulatorServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the simulator did not start; see the log above")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
