"""What a simulator is told: its token, limit and timing, and the faults it injects.

Plain dataclasses with no web framework, so that the `matchall simulator` command can build its
options from them (and `matchall --help` work) where the `simulator` extra is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

DEFAULT_TOKEN = "simulator-token"  # noqa: S105  # the simulator's public demo token, not a secret


@dataclass(frozen=True)
class Faults:
    """Faults injected into API answers; rates are chances per request, from 0 to 1."""

    latency_ms: float = 0.0  # added to every API answer
    latency_jitter_ms: float = 0.0  # plus a uniform random share of this
    error_rate: float = 0.0  # answered 500, 502, 503 or 504
    reset_rate: float = 0.0  # connection closed half-way through the body
    truncate_rate: float = 0.0  # body cut short: invalid JSON with a consistent length
    burst_429_rate: float = 0.0  # starts a burst of 429 answers
    burst_429_length: int = 3
    burst_429_retry_after: bool = True  # send Retry-After with burst 429s
    burst_429_retry_after_seconds: int = 1  # its value (0: retry at once)
    slow_rate: float = 0.0  # answered after `slow_ms` (to provoke client time-outs)
    slow_ms: float = 0.0
    non_json_rate: float = 0.0  # answered 200 with an HTML page instead of JSON
    # Faults of the data of a ready run's page (every match-all call that answers one):
    total_drift_rate: float = 0.0  # page.total (and last_page with it) differs from the run's by 1 to 3
    duplicate_rate: float = 0.0  # one id of the page replaced by an id of another page
    short_page_rate: float = 0.0  # a page before the last one holds fewer than per_page ids
    # A read of page 2 or later finds the run not ready, as after a sort change elsewhere: the
    # run searches again for `rekick_ms` (its ready_at moves that far into the future).
    rekick_rate: float = 0.0
    rekick_ms: float = 100.0

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name.endswith("_rate") and not 0.0 <= value <= 1.0:
                raise ValueError(f"fault {item.name} must be between 0 and 1, not {value!r}")
            if item.name.endswith(("_ms", "_length", "_seconds")) and value < 0:
                raise ValueError(f"fault {item.name} must not be negative, not {value!r}")

    @property
    def page_faults(self) -> bool:
        return bool(self.total_drift_rate or self.duplicate_rate or self.short_page_rate)


@dataclass(frozen=True)
class SimulatorConfig:
    api_token: str = DEFAULT_TOKEN
    requests_per_second: float = 5.0  # the account limit; 0 turns it off
    retry_after: int = 1  # seconds, sent with 429 at the limit (the reference's example says 30)
    ready_after: float = 2.0  # seconds until a run is ready, unless its segment says otherwise
    seed: int = 0
    faults: Faults = field(default_factory=Faults)
