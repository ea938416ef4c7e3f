"""The answers a fault makes: 5xx pages, cut or dropped bodies, HTML for JSON, spoiled pages.

The `Faults` rates live in `config`; this module draws from the simulator's seeded random number
generator in a fixed order (so a seed replays the same faults) and counts what it injects. Callers
hold the simulator's lock around every function here.
"""

from __future__ import annotations

import math
import random
from collections import Counter

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from matchall_dagster.simulator.account import ContactIds
from matchall_dagster.simulator.config import Faults

# What a proxy or load balancer in front of the API sends when it answers for it.
HTML_ERROR_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Service Temporarily Unavailable</title></head>"
    b"<body><h1>Service Temporarily Unavailable</h1><p>Please try again in a few moments.</p></body></html>\n"
)


class InjectedResetError(Exception):
    """Raised after half a body was sent, so that the server drops the connection."""


class Injected(Response):
    """An answer a fault made: its body breaks the contract on purpose."""

    def __init__(self, content: bytes | memoryview, fault: str, *, status_code: int = 200, media_type: str) -> None:
        super().__init__(content, status_code=status_code, media_type=media_type)
        self.fault = fault


class ResetResponse(Injected):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body[: len(self.body) // 2], "more_body": True})
        raise InjectedResetError("injected connection reset")


def upstream_error(rng: random.Random, injected: Counter[str]) -> Injected:
    """A 500, 502, 503 or 504 with an HTML body, as a gateway answers when the API is down."""
    status = rng.choice((500, 502, 503, 504))
    injected[f"http_{status}"] += 1
    return Injected(b"<html>upstream error</html>", f"http_{status}", status_code=status, media_type="text/html")


def spoil_body(rng: random.Random, faults: Faults, injected: Counter[str], response: Response) -> Response:
    """A 200 answer as the body faults leave it: dropped half-way, cut short, HTML, or unchanged."""
    if response.status_code != 200:
        return response
    roll = rng.random()
    if roll < faults.reset_rate:
        injected["reset"] += 1
        return ResetResponse(response.body, "reset", media_type="application/json")
    if roll < faults.reset_rate + faults.truncate_rate:
        injected["truncated"] += 1
        cut = rng.randrange(0, max(1, len(response.body) - 1))
        return Injected(response.body[:cut], "truncated", media_type="application/json")
    if roll < faults.reset_rate + faults.truncate_rate + faults.non_json_rate:
        injected["non_json"] += 1
        return Injected(HTML_ERROR_PAGE, "non_json", media_type="text/html")
    return response


def spoil_page(
    rng: random.Random,
    faults: Faults,
    injected: Counter[str],
    ordered: ContactIds,
    page: int,
    page_size: int,
    matches: list[int],
) -> int:
    """Spoil a ready page's ids in place as the faults say; returns the total the page tells."""
    size = int(ordered.size)
    total = size
    if faults.total_drift_rate and rng.random() < faults.total_drift_rate:
        drift = rng.choice((-3, -2, -1, 1, 2, 3))
        total = size + (drift if size + drift >= 0 else -drift)
        injected["total_drift"] += 1
    others = size - len(matches)  # ids on the other pages
    if faults.duplicate_rate and matches and others > 0 and rng.random() < faults.duplicate_rate:
        other = rng.randrange(others)
        first = (page - 1) * page_size
        matches[rng.randrange(len(matches))] = int(ordered[other if other < first else other + len(matches)])
        injected["duplicate"] += 1
    last_page = math.ceil(size / page_size)
    if faults.short_page_rate and page < last_page and rng.random() < faults.short_page_rate:
        missing = rng.randint(1, len(matches))
        start = rng.randrange(len(matches) - missing + 1)
        del matches[start : start + missing]
        injected["short_page"] += 1
    return total
