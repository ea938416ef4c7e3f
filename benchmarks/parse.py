"""The page parser, old and new side by side: the hand-written byte scanner it replaced (copied here
as the baseline) against `models.parse_page` (msgspec for the ids, pydantic for the record).

`python -m benchmarks.parse` prints, for a 10,000-id page as the API sends it (compact JSON):
ms per page and million ids per CPU second of each parser alone, then the whole client reading
1,000,000 ids without a limit (`fetch_matches` at 1,000 requests/s against the simulator in a
process of its own, as `benchmarks.run` does), once with each parser, alternating, best of
`--rounds`. CPU is this process's (every page thread), so the simulator's CPU never counts.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from benchmarks.run import Sim
from benchmarks.simserver import segment_id
from matchall_dagster import ActiveCampaignClient
from matchall_dagster.api import client as client_module
from matchall_dagster.api import models
from matchall_dagster.simulator import DEFAULT_TOKEN

PAGE_IDS = 10_000
CLIENT_IDS = 1_000_000
UNLIMITED_RPS = 1000.0
Parsed = tuple[models.MatchAllRun, npt.NDArray[np.int64] | None]

# -- the baseline: the byte scanner as it was (models._parse_page_fast, before msgspec) -------------

_MATCHES_KEY = re.compile(rb'"matches"[ \t\n\r]*:[ \t\n\r]*\[')
_MAX_FAST_DIGITS = 18
_COMMA, _ZERO = ord(","), ord("0")


def _old_fast(body: bytes) -> tuple[models.MatchAllRun, npt.NDArray[np.int64]] | None:
    if b"\\" in body:
        return None
    key = _MATCHES_KEY.search(body)
    if key is None or body.find(b'"matches"', key.end()) != -1:
        return None
    start = key.end()
    end = body.find(b"]", start)
    if end < 0:
        return None
    inner = body[start:end]
    if inner.translate(None, b"0123456789,"):
        return None
    if inner:
        chars = np.frombuffer(inner, dtype=np.uint8)
        commas = np.flatnonzero(chars == _COMMA)
        bounds = np.concatenate(([-1], commas, [chars.size]))
        digits = np.diff(bounds) - 1
        if digits.min() < 1 or digits.max() > _MAX_FAST_DIGITS or (chars[bounds[:-1] + 1] == _ZERO).any():
            return None
        ids = np.fromstring(inner, dtype=np.int64, sep=",")  # type: ignore[call-overload]
        if ids.size != commas.size + 1:
            return None
    else:
        ids = np.empty(0, dtype=np.int64)
    try:
        run = models._MatchAllEnvelope.model_validate_json(body[:start] + body[end:]).data[0].attributes
    except ValidationError:
        return None
    if run.matches != []:
        return None
    return run.model_copy(update={"matches": None}), ids


def old_parse_page(body: bytes, what: str = "a match-all call") -> Parsed:
    fast = _old_fast(body)
    if fast is not None:
        return fast
    run = models.parse_run(body, what)
    if run.matches is None:
        return run, None
    ids = np.fromiter(run.matches, dtype=np.int64, count=len(run.matches))
    return run.model_copy(update={"matches": None}), ids


PARSERS: dict[str, Callable[[bytes], Parsed]] = {"old (byte scanner)": old_parse_page, "new": models.parse_page}


def sample_page() -> bytes:
    rng = np.random.default_rng(7)
    ids = np.sort(rng.choice(np.arange(1, 40_000_000, dtype=np.int64), PAGE_IDS, replace=False))
    attributes = {
        "run_id": "744390a5-208e-4c3d-b709-b3c3ea6e5948",
        "run_id_start": "2026-01-01T00:00:00.000Z",
        "run_id_end": "2026-01-01T00:00:02.000Z",
        "is_ready": True,
        "segment_id": "1000000",
        "segment_timestamp": "2026-01-01T00:00:00.000Z",
        "matches": ids.tolist(),
        "page": {"current_page": 1, "last_page": 100, "per_page": PAGE_IDS, "total": CLIENT_IDS},
    }
    envelope = {"data": [{"id": "x-1", "type": "matchAll", "attributes": attributes}]}
    return json.dumps(envelope, separators=(",", ":")).encode()


def time_parser(parse: Callable[[bytes], Parsed], body: bytes, rounds: int) -> float:
    """CPU seconds per page, the best of `rounds` batches of 200."""
    parse(body)
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(200):
            parse(body)
        best = min(best, (time.process_time() - started) / 200)
    return best


@contextmanager
def client_parsing_with(parse: Callable[[bytes], Parsed]) -> Iterator[None]:
    original = client_module.parse_page
    client_module.parse_page = parse  # type: ignore[assignment]
    try:
        yield
    finally:
        client_module.parse_page = original


def time_client(sim: Sim, segment: str, run_id: str) -> tuple[float, float]:
    """CPU and wall seconds of one unthrottled `fetch_matches` of the whole run."""
    with ActiveCampaignClient(sim.url, DEFAULT_TOKEN, requests_per_second=UNLIMITED_RPS) as client:
        cpu, wall = time.process_time(), time.monotonic()
        matches = client.fetch_matches(segment, run_id, sort="id")
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    assert matches.total == CLIENT_IDS
    return cpu, wall


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="client reads per parser (default: %(default)s)")
    args = parser.parse_args(argv)
    body = sample_page()
    old_run, old_ids = old_parse_page(body)
    new_run, new_ids = models.parse_page(body)
    assert old_run == new_run
    assert old_ids is not None
    assert new_ids is not None
    assert np.array_equal(old_ids, new_ids)
    print(f"A page of {PAGE_IDS:,} ids, {len(body):,} bytes:")
    for name, parse in PARSERS.items():
        seconds = time_parser(parse, body, rounds=7)
        print(f"  {name:<20} {seconds * 1e3:6.3f} ms per page  {PAGE_IDS / seconds / 1e6:6.1f} M ids per CPU second")
    print(f"The client, unthrottled, reading {CLIENT_IDS:,} ids from the simulator (best of {args.rounds}):")
    sim = Sim([CLIENT_IDS], limit=False, copies=1)
    try:
        segment = segment_id(CLIENT_IDS)
        run_id = sim.ready_run(segment)
        best = {name: (float("inf"), 0.0) for name in PARSERS}
        for _ in range(args.rounds):
            for name, parse in PARSERS.items():
                with client_parsing_with(parse):
                    best[name] = min(best[name], time_client(sim, segment, run_id))
        for name, (cpu, wall) in best.items():
            print(
                f"  {name:<20} {cpu:6.3f} CPU s  {wall:6.3f} wall s  {CLIENT_IDS / cpu / 1e6:6.1f} M ids per CPU second"
            )
    finally:
        sim.close()


if __name__ == "__main__":
    main()
