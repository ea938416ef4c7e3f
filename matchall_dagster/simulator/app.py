"""The simulated API as an ASGI app: the endpoints of API.md, the account limit, and faults.

State lives in one `Simulator` object (runs, clock, counters); the Starlette app is a thin
routing layer over it, so tests can ask the same object for ground truth and statistics.

Every API route is a documented path of `matchall_dagster.contract`, with the documents' own
parameter names, and its parameter rules (paging bounds and defaults, sort enums and grammar,
the `instant` flag) are read from the documents, never from the client's validation: the two
must each follow the contract, not each other. Where the documents are silent the simulator
makes a guess, written down where it is made ("Guess:"), and varies on it where it can, seeded
by the account, so that the client meets every reading.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import threading
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from importlib import resources
from typing import Any, NamedTuple

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from matchall_dagster import contract
from matchall_dagster.simulator.account import Behavior, ContactIds, SimAccount, SimSegment, seed_of

START = "/api/3/segmentMatchAll/{segmentId}"
RESULT_SET = "/api/3/segmentMatchAll/{segmentId}/{runId}"
MATCH_SOME = "/api/3/segmentMatchSome/{segmentId}/{runId}"
AUDIENCES = "/api/3/audiences"
AUDIENCE = "/api/3/audiences/{segmentId}"
DEFAULT_TOKEN = "simulator-token"  # noqa: S105  # the simulator's public demo token, not a secret
# What a proxy or load balancer in front of the API sends when it answers for it.
_HTML_ERROR_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Service Temporarily Unavailable</title></head>"
    b"<body><h1>Service Temporarily Unavailable</h1><p>Please try again in a few moments.</p></body></html>\n"
)


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


@dataclass
class SimRun:
    run_id: str
    segment: SimSegment
    sort: str
    started_at: float  # simulator clock, epoch seconds
    ready_at: float
    generation: int = 0  # the segment's membership this run computes (see SimSegment.churn)


@dataclass(frozen=True)
class Answer:
    """One API answer as it leaves the simulator, for an `on_answer` hook (tests validate them)."""

    path: str  # the documented path template, e.g. /api/3/segmentMatchAll/{segmentId}/{runId}
    method: str
    status: int
    body: bytes
    content_type: str | None
    # The injected fault that replaced or spoiled the body on purpose ("truncated", "reset",
    # "non_json", "http_503", ...); None for answers meant to keep the contract.
    fault: str | None = None


class _InjectedResetError(Exception):
    """Raised after half a body was sent, so that the server drops the connection."""


class _Injected(Response):
    """An answer a fault made: its body breaks the contract on purpose."""

    def __init__(self, content: bytes | memoryview, fault: str, *, status_code: int = 200, media_type: str) -> None:
        super().__init__(content, status_code=status_code, media_type=media_type)
        self.fault = fault


class _ResetResponse(_Injected):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body[: len(self.body) // 2], "more_body": True})
        raise _InjectedResetError("injected connection reset")


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _error(
    status: int,
    code: str,
    detail: str,
    pointer: str | None = None,
    *,
    label: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """An error as ErrorResponseRootDO: `status` a string whose form varies, as in the field.

    No `title`: the seed document's ErrorDetailDO has one but the companion's does not (API.md
    says older endpoints send only `title`), so an error with a title would break the companion's
    closed form; status, code, detail and source are in both. The client reads `detail` and still
    shows a `title` when one comes.
    """
    error: dict[str, Any] = {"status": label or str(status), "code": code, "detail": detail}
    if pointer:
        error["source"] = {"pointer": pointer}
    return JSONResponse({"errors": [error]}, status_code=status, headers=headers)


class _BadParameterError(Exception):
    def __init__(self, name: str, detail: str) -> None:
        super().__init__(detail)
        self.name = name


def _int_param(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    # Whole numbers only, within the int32 the answer's PageDO can echo.
    if not re.fullmatch(r"-?[0-9]{1,10}", raw) or not -(2**31) <= int(raw) < 2**31:
        raise _BadParameterError(name, f"{name} must be an integer, not {raw[:40]!r}")
    return int(raw)


def _bound(schema: Mapping[str, Any] | None, key: str) -> int | None:
    value = (schema or {}).get(key)
    return None if value is None else int(value)


@dataclass(frozen=True)
class _Rules:
    """The query rules of one operation, read once from its published parameters."""

    page_default: int
    page_minimum: int | None
    size_default: int
    size_minimum: int | None
    size_maximum: int | None
    sort_default: str | None = None
    sort_enum: frozenset[str] | None = None  # the audiences' closed list
    sort_grammar: re.Pattern[str] | None = None  # the match-all keys, comma-separated
    instant_values: frozenset[str] | None = None

    @classmethod
    def of(cls, path: str) -> _Rules:
        page = contract.parameter(path, "page")
        size = contract.parameter(path, "page_size")
        sort = contract.parameter(path, "sort")
        instant = contract.parameter(path, "instant")
        listed = sort is not None and contract.sort_is_a_list(path)
        grammar = re.compile(contract.sort_grammar(path)) if listed else None
        return cls(
            # Guess: audiences' `page` has a minimum but no default; like the others it starts at 1.
            page_default=_bound(page, "default") or 1,
            page_minimum=_bound(page, "minimum"),
            size_default=_bound(size, "default") or 20,
            size_minimum=_bound(size, "minimum"),
            size_maximum=_bound(size, "maximum"),
            sort_default=None if sort is None else str(sort.get("default", "")),
            sort_enum=None if sort is None or grammar is not None else frozenset(sort["enum"]),
            sort_grammar=grammar,
            instant_values=None if instant is None else frozenset(instant.get("enum", ())),
        )


# Guess: the item `type` of a summary is not published; each account answers one of these.
_SUMMARY_TYPES = ("audience", "audiences", "segmentSummary")


class _Facts(NamedTuple):
    """What a segment's summary says that does not depend on its runs: seeded, drawn once."""

    summary_id: str
    created: float
    updated: float
    last_used: float | None  # before any run
    counted: float  # when the count before any run was taken
    counts_before_runs: int  # 0: no `counts`; 1: `last_total` alone; 2: and `last_active_total`
    active_total: bool  # `last_active_total` sent once the segment has run
    active_share: float  # of the members, the active ones
    count_as_float: bool


class Simulator:
    """The simulated account's server-side state; safe to read from other threads.

    `on_answer`, when set, is called with every API answer (an `Answer`) on the server's thread,
    before it is sent; unset, it costs one attribute test an answer.
    """

    def __init__(
        self,
        account: SimAccount,
        config: SimulatorConfig | None = None,
        *,
        on_answer: Callable[[Answer], None] | None = None,
    ) -> None:
        self.account = account
        self.config = config or SimulatorConfig()
        self.faults = self.config.faults
        self.on_answer = on_answer
        self.runs: dict[str, SimRun] = {}
        self._runs_of: defaultdict[str, list[SimRun]] = defaultdict(list)  # every run, for the summaries
        self._facts: dict[str, _Facts] = {}
        self._rules = {path: _Rules.of(path) for path in (START, RESULT_SET, MATCH_SOME, AUDIENCES)}
        self._runs_started: Counter[str] = Counter()  # per segment: its next run's generation
        self._clock_offset = 0.0
        self._rng = random.Random(self.config.seed)  # noqa: S311  # reproducible faults, not secrets
        self._lock = threading.Lock()
        self._admitted: deque[float] = deque()
        self._burst_left = 0
        self._arrivals: list[float] = []
        self._statuses: Counter[int] = Counter()
        self._injected: Counter[str] = Counter()
        self.app = self._build_app()

    # -- clock and control ------------------------------------------------------------------

    def now(self) -> float:
        return time.time() + self._clock_offset

    def advance_clock(self, seconds: float) -> None:
        """Move the simulator's clock forward (to age runs towards their 90-day expiry)."""
        self._clock_offset += seconds

    def set_faults(self, faults: Faults) -> None:
        self.faults = faults

    def reseed(self, seed: int) -> None:
        """Draw faults (and run ids) from `seed` from now on, and end a burst of 429s in progress,
        so that a campaign can give each scenario its own reproducible faults on one server."""
        with self._lock:
            self._rng.seed(seed)
            self._burst_left = 0

    def truth(self, segment_id: str, sort: str = "id", generation: int | None = None) -> list[int]:
        """The exact list a complete read of a run of this segment in this sort must give: of its
        latest run unless `generation` says which (an evolving segment changes from run to run)."""
        return [int(x) for x in self.account.ordered(segment_id, sort, self.generation(segment_id, generation))]

    def generation(self, segment_id: str, generation: int | None = None) -> int:
        """The membership generation of the segment's latest run (0 before any)."""
        if generation is not None:
            return generation
        with self._lock:
            return max(0, self._runs_started[segment_id] - 1)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            arrivals = sorted(self._arrivals)
            statuses = dict(self._statuses)
            injected = dict(self._injected)
        return {
            "requests": len(arrivals),
            "by_status": statuses,
            "faults_injected": injected,
            "max_requests_in_any_second": _max_in_window(arrivals, 1.0),
            "first_request_at": arrivals[0] if arrivals else None,
            "last_request_at": arrivals[-1] if arrivals else None,
            "arrivals": arrivals,
        }

    def reset_stats(self) -> None:
        with self._lock:
            self._arrivals.clear()
            self._statuses.clear()
            self._injected.clear()

    # -- runs -------------------------------------------------------------------------------

    def start_run(self, segment: SimSegment, sort: str) -> SimRun:
        now = self.now()
        run_id = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        ready_after = self.config.ready_after if segment.ready_after is None else segment.ready_after
        with self._lock:
            generation = self._runs_started[segment.id] if segment.evolves else 0
            self._runs_started[segment.id] += 1
        run = SimRun(run_id, segment, sort, started_at=now, ready_at=now + ready_after, generation=generation)
        self.runs[run_id] = run
        with self._lock:
            self._runs_of[segment.id].append(run)
        return run

    def _find_run(self, segment_id: str, run_id: str) -> SimRun | None:
        run = self.runs.get(run_id)
        if run is None or run.segment.id != segment_id:
            return None
        if self.now() >= run.started_at + run.segment.expire_after:
            del self.runs[run_id]
            return None
        return run

    def _rekick(self, run: SimRun, sort: str) -> None:
        ready_after = self.config.ready_after if run.segment.ready_after is None else run.segment.ready_after
        run.sort = sort
        run.ready_at = self.now() + ready_after

    def _run_body(self, run: SimRun, page: int, page_size: int, *, rekicked: bool = False) -> dict[str, Any]:
        now = self.now()
        finished = now >= run.ready_at and not rekicked
        ready = finished and run.segment.behavior is not Behavior.FAIL
        attributes: dict[str, Any] = {
            "run_id": run.run_id,
            "run_id_start": _iso(run.started_at),
            "is_ready": ready,
            "segment_id": run.segment.id,
            "segment_timestamp": _iso(self.account.segment_timestamp(run.segment).timestamp()),
        }
        if finished:
            attributes["run_id_end"] = _iso(run.ready_at)
        if ready:
            ordered = self.account.ordered(run.segment.id, run.sort, run.generation)
            total = int(ordered.size)
            matches = ordered[(page - 1) * page_size : page * page_size].tolist()
            if self.faults.page_faults:
                total = self._inject_page_fault(ordered, page, page_size, matches)
            attributes["matches"] = matches
            attributes["page"] = {
                "current_page": page,
                "last_page": max(1, math.ceil(total / page_size)),
                "per_page": page_size,
                "total": total,
            }
        return {"data": [{"id": f"{run.run_id}-{page}", "type": "matchAll", "attributes": attributes}]}

    def _inject_page_fault(self, ordered: ContactIds, page: int, page_size: int, matches: list[int]) -> int:
        """Spoil a ready page's ids in place as the faults say; returns the total the page tells."""
        faults = self.faults
        size = int(ordered.size)
        total = size
        with self._lock:
            rng = self._rng
            if faults.total_drift_rate and rng.random() < faults.total_drift_rate:
                drift = rng.choice((-3, -2, -1, 1, 2, 3))
                total = size + (drift if size + drift >= 0 else -drift)
                self._injected["total_drift"] += 1
            others = size - len(matches)  # ids on the other pages
            if faults.duplicate_rate and matches and others > 0 and rng.random() < faults.duplicate_rate:
                other = rng.randrange(others)
                first = (page - 1) * page_size
                matches[rng.randrange(len(matches))] = int(ordered[other if other < first else other + len(matches)])
                self._injected["duplicate"] += 1
            last_page = math.ceil(size / page_size)
            if faults.short_page_rate and page < last_page and rng.random() < faults.short_page_rate:
                missing = rng.randint(1, len(matches))
                start = rng.randrange(len(matches) - missing + 1)
                del matches[start : start + missing]
                self._injected["short_page"] += 1
        return total

    def _maybe_rekick(self, run: SimRun, page: int) -> bool:
        """The re-kick fault: a ready run read at page 2 or later searches again for a moment."""
        faults = self.faults
        if not faults.rekick_rate or page < 2 or run.segment.behavior is Behavior.FAIL:
            return False
        now = self.now()
        if now < run.ready_at:
            return False
        with self._lock:
            if self._rng.random() >= faults.rekick_rate:
                return False
            self._injected["rekick"] += 1
        run.ready_at = now + faults.rekick_ms / 1000
        return True

    # -- HTTP -------------------------------------------------------------------------------

    def _build_app(self) -> Starlette:
        # The documents' path templates, parameter names included: a test holds them to the documents.
        api = {
            START: self._start,
            RESULT_SET: self._result_set,
            MATCH_SOME: self._match_some,
            AUDIENCES: self._audiences,
            AUDIENCE: self._audience,
        }
        return Starlette(
            routes=[
                *(Route(path, self._api_endpoint(path, handler), methods=["GET"]) for path, handler in api.items()),
                Route("/_simulator/openapi", self._openapi_index, methods=["GET"]),
                Route("/_simulator/openapi/{name}", self._openapi, methods=["GET"]),
                Route("/_simulator/stats", self._admin_stats, methods=["GET"]),
                Route("/_simulator/stats/reset", self._admin_reset_stats, methods=["POST"]),
                Route("/_simulator/clock", self._admin_clock, methods=["POST"]),
                Route("/_simulator/faults", self._admin_faults, methods=["GET", "POST"]),
            ]
        )

    def _api_endpoint(
        self, path: str, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """Wrap an API handler in what every API call meets: the limit, auth, and faults."""

        async def endpoint(request: Request) -> Response:
            response = await self._admit(request)
            if response is None:
                try:
                    response = await handler(request)
                except _BadParameterError as exc:
                    response = _error(400, "invalid_parameter", str(exc), f"/{exc.name}")
                response = await self._inject_body_fault(response)
            with self._lock:
                self._statuses[response.status_code] += 1
            if self.on_answer is not None:
                fault = response.fault if isinstance(response, _Injected) else None
                content_type = response.headers.get("content-type")
                body = bytes(response.body)  # no copy: the simulator's bodies are bytes
                self.on_answer(Answer(path, request.method, response.status_code, body, content_type, fault))
            return response

        return endpoint

    async def _admit(self, request: Request) -> Response | None:
        """Count the request, then answer it early if the limit, the token or a fault says so."""
        arrival = time.monotonic()
        faults = self.faults
        authorised = request.headers.get("api-token") == self.config.api_token
        with self._lock:
            self._arrivals.append(arrival)
            limited = self._over_limit(arrival)
            in_burst = authorised and (
                self._burst_left > 0 or (faults.burst_429_rate and self._rng.random() < faults.burst_429_rate)
            )
            if in_burst and not limited:
                self._burst_left = (self._burst_left or faults.burst_429_length) - 1
                self._injected["429_burst"] += 1
            roll = self._rng.random()
            delay = faults.latency_ms + self._rng.random() * faults.latency_jitter_ms
            if faults.slow_rate and self._rng.random() < faults.slow_rate:
                delay += faults.slow_ms
                self._injected["slow"] += 1
        if limited:
            headers = {
                "Retry-After": str(self.config.retry_after),
                "RateLimit-Limit": str(max(1, math.floor(self.config.requests_per_second))),
                "RateLimit-Remaining": "0",
            }
            return _error(429, "too_many_requests", "The account's request limit was exceeded.", headers=headers)
        if not authorised:
            await asyncio.sleep(delay / 1000)
            return _error(403, "forbidden", "You do not have permission to access this resource.")
        if delay:
            await asyncio.sleep(delay / 1000)
        if in_burst:
            headers = {"Retry-After": str(faults.burst_429_retry_after_seconds)} if faults.burst_429_retry_after else {}
            return _error(429, "too_many_requests", "Slow down.", headers=headers)
        if roll < faults.error_rate:
            with self._lock:
                status = self._rng.choice((500, 502, 503, 504))
                self._injected[f"http_{status}"] += 1
            page = b"<html>upstream error</html>"
            return _Injected(page, f"http_{status}", status_code=status, media_type="text/html")
        return None

    def _over_limit(self, arrival: float) -> bool:
        rate = self.config.requests_per_second
        if rate <= 0:
            return False
        # Whole requests in any one second (as the client counts them); below 1/s, one per 1/rate s.
        limit, window = (math.floor(rate), 1.0) if rate >= 1 else (1, 1 / rate)
        while self._admitted and self._admitted[0] <= arrival - window:
            self._admitted.popleft()
        if len(self._admitted) >= limit:
            return True
        self._admitted.append(arrival)
        return False

    async def _inject_body_fault(self, response: Response) -> Response:
        if response.status_code != 200:
            return response
        faults = self.faults
        with self._lock:
            roll = self._rng.random()
            if roll < faults.reset_rate:
                self._injected["reset"] += 1
                return _ResetResponse(response.body, "reset", media_type="application/json")
            if roll < faults.reset_rate + faults.truncate_rate:
                self._injected["truncated"] += 1
                cut = self._rng.randrange(0, max(1, len(response.body) - 1))
                return _Injected(response.body[:cut], "truncated", media_type="application/json")
            if roll < faults.reset_rate + faults.truncate_rate + faults.non_json_rate:
                self._injected["non_json"] += 1
                return _Injected(_HTML_ERROR_PAGE, "non_json", media_type="text/html")
        return response

    # -- parameters, by the documents ---------------------------------------------------------

    def _segment(self, request: Request) -> SimSegment | None:
        """The segment a path names. The documents type `segmentId` as any string, so there is
        no malformed id here, only ids the account holds (compared exactly) and a 404 for others."""
        segment_id: str = request.path_params["segmentId"]
        return self.account.segment(segment_id)

    def _sort(self, request: Request, rules: _Rules) -> str:
        sort = request.query_params.get("sort")
        if sort is None:
            return rules.sort_default or ""
        if rules.sort_grammar is not None:
            allowed = rules.sort_grammar.fullmatch(sort) is not None
            wanted = "comma-separated keys of the documented sort enum, each optionally prefixed with '-'"
        else:
            allowed = sort in (rules.sort_enum or ())
            wanted = "one of " + ", ".join(sorted(rules.sort_enum or ()))
        if not allowed:
            raise _BadParameterError("sort", f"sort {sort[:60]!r} is not {wanted}")
        return sort

    def _paging(self, request: Request, rules: _Rules) -> tuple[int, int]:
        page = _int_param(request, "page", rules.page_default)
        page_size = _int_param(request, "page_size", rules.size_default)
        # A published minimum is enforced (400); where none is published (the match-all endpoints)
        # the API's paginator reads a page below 1 as 1 and a size below 1 as the default.
        if rules.page_minimum is not None and page < rules.page_minimum:
            raise _BadParameterError("page", f"page must be at least {rules.page_minimum}, not {page}")
        if rules.size_minimum is not None and page_size < rules.size_minimum:
            raise _BadParameterError("page_size", f"page_size must be at least {rules.size_minimum}, not {page_size}")
        if rules.size_maximum is not None and page_size > rules.size_maximum:
            raise _BadParameterError("page_size", f"page_size must be at most {rules.size_maximum}, not {page_size}")
        return max(1, page), page_size if page_size >= 1 else rules.size_default

    def _instant(self, request: Request, rules: _Rules) -> bool:
        """Whether `instant` was sent. The documents' enum for it is [""]: a flag with no value.
        Guess: another value is refused (400) rather than read as the flag, so that a client
        sending `instant=1` (what the words "present = return at once" invite) hears of it."""
        value = request.query_params.get("instant")
        if value is None:
            return False
        if rules.instant_values is not None and value not in rules.instant_values:
            raise _BadParameterError("instant", f"instant takes no value (send 'instant='), not {value[:40]!r}")
        return True

    # -- the match-all endpoints --------------------------------------------------------------

    async def _start(self, request: Request) -> Response:
        rules = self._rules[START]
        segment = self._segment(request)
        sort = self._sort(request, rules)
        page, page_size = self._paging(request, rules)
        instant = self._instant(request, rules)
        if segment is None:
            return _error(404, "not_found", "No Result found for Segment", label="404 NOT_FOUND")
        run = self.start_run(segment, sort)
        if not instant:
            # Without `instant` the API waits up to 4 s and may answer with the first page.
            # Timers may fire early (uvloop's are whole milliseconds): wait on the clock itself.
            deadline = min(run.ready_at, run.started_at + 4.0)
            while (left := deadline - self.now()) > 0:
                await asyncio.sleep(left)
        return JSONResponse(self._run_body(run, page, page_size))

    async def _result_set(self, request: Request) -> Response:
        rules = self._rules[RESULT_SET]
        sort = self._sort(request, rules)
        page, page_size = self._paging(request, rules)
        run = self._find_run(request.path_params["segmentId"], request.path_params["runId"])
        if run is None:
            return _error(404, "not_found", "Segment or RunId not found", label="404 NOT_FOUND")
        # Guess: the cache is keyed by the sort as written, so "id,id" is another sort than "id".
        if sort != run.sort:
            self._rekick(run, sort)  # a different sort throws the cached result-set away
        elif self._maybe_rekick(run, page):
            return JSONResponse(self._run_body(run, page, page_size, rekicked=True))
        return JSONResponse(self._run_body(run, page, page_size))

    async def _match_some(self, request: Request) -> Response:
        page, page_size = self._paging(request, self._rules[MATCH_SOME])
        run = self._find_run(request.path_params["segmentId"], request.path_params["runId"])
        if run is None:
            return _error(404, "not_found", "Segment or RunId not found", label="404 NOT_FOUND")
        return JSONResponse(self._run_body(run, page, page_size))

    # -- the saved segments -------------------------------------------------------------------

    async def _audiences(self, request: Request) -> Response:
        rules = self._rules[AUDIENCES]
        page, page_size = self._paging(request, rules)
        sort = self._sort(request, rules)
        # Guess: `search` matches a part of the name, whatever its case; an empty one matches all.
        search = (request.query_params.get("search") or "").casefold()
        segments = [s for s in self.account.segments if search in s.name.casefold()]
        if not segments:  # API.md: a 404 here means "no segments" (for this search)
            return _error(404, "not_found", "No Result found for Audience", label="404 NOT_FOUND")
        summaries = [self._summary(segment) for segment in segments]
        key = sort.removeprefix("-")
        summaries.sort(key=lambda summary: _audience_sort_key(summary["attributes"], key), reverse=sort.startswith("-"))
        return JSONResponse({"data": summaries[(page - 1) * page_size : page * page_size]})

    async def _audience(self, request: Request) -> Response:
        segment = self._segment(request)
        if segment is None:
            return _error(404, "not_found", "No Result found for Audience", label="404 NOT_FOUND")
        return JSONResponse({"data": [self._summary(segment)]})

    def _facts_of(self, segment: SimSegment) -> _Facts:
        facts = self._facts.get(segment.id)
        if facts is None:
            seed = self.account.seed
            draw = seed_of(seed, segment.id, "summary")
            updated = self.account.segment_timestamp(segment).timestamp()
            created = updated - (draw >> 8) % (400 * 86_400)
            # Guess: the item's own `id` is a number of its own, never the segment id (API.md).
            summary_id = str(1_000 + (draw >> 20) % 9_000_000)
            if summary_id == segment.id:
                summary_id = str(int(summary_id) + 1)
            facts = _Facts(
                summary_id=summary_id,
                created=created,
                updated=updated,
                # Guess: a segment never run may have been used (say, in a campaign) or never.
                last_used=None if (draw >> 44) % 3 == 0 else updated + (draw >> 46) % (30 * 86_400),
                counted=updated + (draw >> 2) % 86_400,
                counts_before_runs=(draw >> 60) % 3,
                active_total=bool(draw >> 62 & 1),
                active_share=0.5 + ((draw >> 50) % 501) / 1_000,
                count_as_float=bool(draw & 1),
            )
            self._facts[segment.id] = facts
        return facts

    def _latest_finished(self, segment: SimSegment) -> SimRun | None:
        """The segment's run that ended last with results (failed runs count nothing).

        Guess: the summary counts the latest run that is ready now; a run searching again after a
        sort change counts again when it ends, and an expired run's count and id stay shown.
        """
        if segment.behavior is Behavior.FAIL:
            return None
        now = self.now()
        with self._lock:
            runs = list(self._runs_of.get(segment.id, ()))
        finished = [run for run in runs if run.ready_at <= now]
        return max(finished, key=lambda run: run.ready_at, default=None)

    def _summary(self, segment: SimSegment) -> dict[str, Any]:
        """A saved segment's summary as the companion document publishes it (a JSON:API item).

        What the document leaves open varies by segment, seeded: `counts.*.count` is a `number`,
        sent as an integer or as a float of integral value; before any run, `counts` is absent,
        or holds `last_total` with only count and date, or `last_active_total` beside it; after a
        run, `last_total` is the latest finished run's count with its run id and times, and
        `last_active_total` (when sent) a seeded share of it with the same run.
        """
        facts = self._facts_of(segment)
        run = self._latest_finished(segment)

        def count(value: float) -> float | int:
            return float(round(value)) if facts.count_as_float else round(value)

        attributes: dict[str, Any] = {"segment_id": segment.id, "category": "audience", "name": segment.name}
        last_used = facts.last_used
        if run is not None:
            size = self.account.members(segment.id, run.generation).size if segment.evolves else segment.size
            last: dict[str, Any] = {
                "count": count(size),
                "last_total_updated": _iso(run.ready_at),
                "run_id": run.run_id,
                "run_id_start": _iso(run.started_at),
                "run_id_end": _iso(run.ready_at),
            }
            counts = {"last_total": last}
            if facts.active_total:
                counts["last_active_total"] = {**last, "count": count(size * facts.active_share)}
            attributes["counts"] = counts
            last_used = max(run.started_at, last_used or run.started_at)
        elif facts.counts_before_runs:
            last = {"count": count(segment.size), "last_total_updated": _iso(facts.counted)}
            counts = {"last_total": last}
            if facts.counts_before_runs == 2:
                counts["last_active_total"] = {**last, "count": count(segment.size * facts.active_share)}
            attributes["counts"] = counts
        attributes["created_date"] = _iso(facts.created)
        attributes["updated_date"] = _iso(facts.updated)
        if last_used is not None:
            attributes["last_used_date"] = _iso(last_used)
        summary_type = _SUMMARY_TYPES[seed_of(self.account.seed, "summary type") % len(_SUMMARY_TYPES)]
        return {"id": facts.summary_id, "type": summary_type, "attributes": attributes}

    # -- control ------------------------------------------------------------------------------

    async def _openapi_index(self, request: Request) -> Response:
        return JSONResponse({"documents": [f"/_simulator/openapi/{name}" for name in contract.DOCUMENTS]})

    async def _openapi(self, request: Request) -> Response:
        """A published document, byte for byte as the package ships it."""
        name = request.path_params["name"]
        if name not in contract.DOCUMENTS:
            return _error(404, "not_found", f"no document {name[:60]!r}; see /_simulator/openapi")
        return Response(resources.files(contract.__name__).joinpath(name).read_bytes(), media_type="application/json")

    async def _admin_stats(self, request: Request) -> Response:
        stats = self.stats()
        if request.query_params.get("arrivals") != "1":
            del stats["arrivals"]
        return JSONResponse(stats)

    async def _admin_reset_stats(self, request: Request) -> Response:
        self.reset_stats()
        return JSONResponse({"ok": True})

    async def _admin_clock(self, request: Request) -> Response:
        try:
            self.advance_clock(float(request.query_params.get("advance", "0")))
        except ValueError:
            return _error(400, "invalid_parameter", "advance must be a number of seconds", "/advance")
        return JSONResponse({"now": _iso(self.now())})

    async def _admin_faults(self, request: Request) -> Response:
        if request.method == "POST":
            try:
                self.set_faults(replace(self.faults, **json.loads(await request.body())))
            except (TypeError, ValueError) as exc:
                return _error(400, "invalid_faults", str(exc))
        return JSONResponse(asdict(self.faults))


def _audience_sort_key(attributes: Mapping[str, Any], key: str) -> Any:
    """A summary's value for an audiences sort (the enum without its '-').

    Guess: `name` sorts without regard to case; `recent` is the last use (`last_used_date`; a
    segment never used is the least recent); the counts sort by their `count`, a segment without
    one below every count. Equal values keep the account's order.
    """
    if key == "name":
        return attributes["name"].casefold()
    if key in ("updated_date", "recent"):
        # One ISO format throughout, so the text sorts as the time does.
        return attributes.get("updated_date" if key == "updated_date" else "last_used_date", "")
    count = attributes.get("counts", {}).get(key, {}).get("count")
    return -1 if count is None else count


def _max_in_window(sorted_times: list[float], window: float) -> int:
    """The most events that fall within any half-open interval of `window` seconds."""
    best = 0
    start = 0
    for end, moment in enumerate(sorted_times):
        while sorted_times[start] <= moment - window:
            start += 1
        best = max(best, end - start + 1)
    return best
