"""The simulated API as an ASGI app: the endpoints of API.md, the account limit, and the state.

State lives in one `Simulator` object (runs, clock, counters); the Starlette app is a thin
routing layer over it, so tests can ask the same object for ground truth and statistics.

Every API route is a documented path of `matchall_dagster.contract`, with the documents' own
parameter names; its parameter rules are read from the documents (`rules`), never from the
client's validation. The faults' answers are made in `faults`, the summaries in `summaries`,
the limit is counted in `limit`.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from matchall_dagster import contract
from matchall_dagster.simulator import faults as injection
from matchall_dagster.simulator import rules as documented
from matchall_dagster.simulator import summaries
from matchall_dagster.simulator.account import Behavior, ContactIds, SimAccount, SimSegment
from matchall_dagster.simulator.answers import Answer, error
from matchall_dagster.simulator.config import DEFAULT_TOKEN, Faults, SimulatorConfig
from matchall_dagster.simulator.limit import RequestLimit, max_in_window
from matchall_dagster.simulator.rules import AUDIENCE, AUDIENCES, MATCH_SOME, RESULT_SET, START, BadParameterError
from matchall_dagster.simulator.runs import SimRun, iso, run_body

__all__ = ["DEFAULT_TOKEN", "Answer", "Faults", "SimRun", "Simulator", "SimulatorConfig"]


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
        self._facts: dict[str, summaries.Facts] = {}
        self._rules = {path: documented.Rules.of(path) for path in (START, RESULT_SET, MATCH_SOME, AUDIENCES)}
        self._runs_started: Counter[str] = Counter()  # per segment: its next run's generation
        self._clock_offset = 0.0
        self._rng = random.Random(self.config.seed)  # noqa: S311  # reproducible faults, not secrets
        self._lock = threading.Lock()
        self._limit = RequestLimit()
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
            "max_requests_in_any_second": max_in_window(arrivals, 1.0),
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
        spoil = self._spoil_page if self.faults.page_faults else None
        return run_body(self.account, run, page, page_size, now=self.now(), rekicked=rekicked, spoil=spoil)

    def _spoil_page(self, ordered: ContactIds, page: int, page_size: int, matches: list[int]) -> int:
        with self._lock:
            return injection.spoil_page(self._rng, self.faults, self._injected, ordered, page, page_size, matches)

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
                except BadParameterError as exc:
                    response = error(400, "invalid_parameter", str(exc), f"/{exc.name}")
                with self._lock:
                    response = injection.spoil_body(self._rng, self.faults, self._injected, response)
            with self._lock:
                self._statuses[response.status_code] += 1
            if self.on_answer is not None:
                fault = response.fault if isinstance(response, injection.Injected) else None
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
            limited = self._limit.over(arrival, self.config.requests_per_second)
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
            return error(429, "too_many_requests", "The account's request limit was exceeded.", headers=headers)
        if not authorised:
            await asyncio.sleep(delay / 1000)
            return error(403, "forbidden", "You do not have permission to access this resource.")
        if delay:
            await asyncio.sleep(delay / 1000)
        if in_burst:
            headers = {"Retry-After": str(faults.burst_429_retry_after_seconds)} if faults.burst_429_retry_after else {}
            return error(429, "too_many_requests", "Slow down.", headers=headers)
        if roll < faults.error_rate:
            with self._lock:
                return injection.upstream_error(self._rng, self._injected)
        return None

    def _segment(self, request: Request) -> SimSegment | None:
        """The segment a path names. The documents type `segmentId` as any string, so there is
        no malformed id here, only ids the account holds (compared exactly) and a 404 for others."""
        segment_id: str = request.path_params["segmentId"]
        return self.account.segment(segment_id)

    # -- the match-all endpoints --------------------------------------------------------------

    async def _start(self, request: Request) -> Response:
        rules, query = self._rules[START], request.query_params
        segment = self._segment(request)
        sort = documented.sort_param(query, rules)
        page, page_size = documented.paging(query, rules)
        instant = documented.instant_flag(query, rules)
        if segment is None:
            return error(404, "not_found", "No Result found for Segment", label="404 NOT_FOUND")
        run = self.start_run(segment, sort)
        if not instant:
            # Without `instant` the API waits up to 4 s and may answer with the first page.
            # Timers may fire early (uvloop's are whole milliseconds): wait on the clock itself.
            deadline = min(run.ready_at, run.started_at + 4.0)
            while (left := deadline - self.now()) > 0:
                await asyncio.sleep(left)
        return JSONResponse(self._run_body(run, page, page_size))

    async def _result_set(self, request: Request) -> Response:
        rules, query = self._rules[RESULT_SET], request.query_params
        sort = documented.sort_param(query, rules)
        page, page_size = documented.paging(query, rules)
        run = self._find_run(request.path_params["segmentId"], request.path_params["runId"])
        if run is None:
            return error(404, "not_found", "Segment or RunId not found", label="404 NOT_FOUND")
        # Guess: the cache is keyed by the sort as written, so "id,id" is another sort than "id".
        if sort != run.sort:
            self._rekick(run, sort)  # a different sort throws the cached result-set away
        elif self._maybe_rekick(run, page):
            return JSONResponse(self._run_body(run, page, page_size, rekicked=True))
        return JSONResponse(self._run_body(run, page, page_size))

    async def _match_some(self, request: Request) -> Response:
        page, page_size = documented.paging(request.query_params, self._rules[MATCH_SOME])
        run = self._find_run(request.path_params["segmentId"], request.path_params["runId"])
        if run is None:
            return error(404, "not_found", "Segment or RunId not found", label="404 NOT_FOUND")
        return JSONResponse(self._run_body(run, page, page_size))

    # -- the saved segments -------------------------------------------------------------------

    async def _audiences(self, request: Request) -> Response:
        rules, query = self._rules[AUDIENCES], request.query_params
        page, page_size = documented.paging(query, rules)
        sort = documented.sort_param(query, rules)
        # Guess: `search` matches a part of the name, whatever its case; an empty one matches all.
        search = (query.get("search") or "").casefold()
        segments = [s for s in self.account.segments if search in s.name.casefold()]
        if not segments:  # API.md: a 404 here means "no segments" (for this search)
            return error(404, "not_found", "No Result found for Audience", label="404 NOT_FOUND")
        items = [self._summary(segment) for segment in segments]
        key = sort.removeprefix("-")
        items.sort(key=lambda item: summaries.audience_sort_key(item["attributes"], key), reverse=sort.startswith("-"))
        return JSONResponse({"data": items[(page - 1) * page_size : page * page_size]})

    async def _audience(self, request: Request) -> Response:
        segment = self._segment(request)
        if segment is None:
            return error(404, "not_found", "No Result found for Audience", label="404 NOT_FOUND")
        return JSONResponse({"data": [self._summary(segment)]})

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
        """A saved segment's summary (see `summaries.summary`), its seeded facts drawn once."""
        facts = self._facts.get(segment.id)
        if facts is None:
            facts = self._facts[segment.id] = summaries.facts_of(self.account, segment)
        return summaries.summary(self.account, segment, facts, self._latest_finished(segment))

    # -- control ------------------------------------------------------------------------------

    async def _openapi_index(self, request: Request) -> Response:
        return JSONResponse({"documents": [f"/_simulator/openapi/{name}" for name in contract.DOCUMENTS]})

    async def _openapi(self, request: Request) -> Response:
        """A published document, byte for byte as the package ships it."""
        name = request.path_params["name"]
        if name not in contract.DOCUMENTS:
            return error(404, "not_found", f"no document {name[:60]!r}; see /_simulator/openapi")
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
            return error(400, "invalid_parameter", "advance must be a number of seconds", "/advance")
        return JSONResponse({"now": iso(self.now())})

    async def _admin_faults(self, request: Request) -> Response:
        if request.method == "POST":
            try:
                self.set_faults(replace(self.faults, **json.loads(await request.body())))
            except (TypeError, ValueError) as exc:
                return error(400, "invalid_faults", str(exc))
        return JSONResponse(asdict(self.faults))
