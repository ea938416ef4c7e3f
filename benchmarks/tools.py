"""One benchmarked tool reading one ready run into a DuckDB file, in a process of its own.

`python -m benchmarks.tools TOOL --url URL --segment ID --run-id RUN --rps 5 --db FILE [--budget STORE]`
prints one JSON line: ids read, the work's wall and CPU seconds (after imports), the part of it
spent fetching (ours), requests and 429s seen. Every tool ends with the same table in DuckDB,
`segment_matches(position bigint, contact_id bigint)`, so that they do the same work:

- `ours`: `ActiveCampaignClient.fetch_matches` (concurrent pages, one place in the account's
  request budget per request: `--budget` `memory` (the default, the client's own), a SQLite file
  or `postgresql://...`), then the numpy array into DuckDB through Arrow.
- `loop`: what a user writes by hand: plain httpx, one page after the other, a sleep that keeps
  requests 1/rps apart, ids appended to a Python list, a DataFrame into DuckDB.
- `dlt`: dlt's `rest_api` source with its page-number paginator into dlt's DuckDB destination;
  dlt has no rate limiter, so the requests session it is given spaces its sends 1/rps apart
  (the way a dlt user throttles), and dlt's session retries 429s by itself.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from matchall_dagster.simulator import DEFAULT_TOKEN

# Far above any real account; without a limit at the server the client is the only brake.
UNLIMITED_RPS = 1000.0


class Throttle:
    """At most `rps` starts a second, spaced evenly: the sleep a user puts in a paging loop.

    Spaced 1.5 % wider than 1/rps, the margin our client's limiter keeps too (15 ms a second),
    since requests do not reach the server exactly as far apart as they leave.
    """

    def __init__(self, rps: float) -> None:
        self.interval = 1.015 / rps
        self._next = 0.0

    def wait(self) -> None:
        now = time.monotonic()
        if now < self._next:
            time.sleep(self._next - now)
            now = time.monotonic()
        self._next = now + self.interval


def _create_table(connection: duckdb.DuckDBPyConnection) -> None:
    connection.execute("create table segment_matches (position bigint, contact_id bigint)")


def run_ours(url: str, segment: str, run_id: str, rps: float, db: Path, budget: str) -> dict[str, Any]:
    from matchall_dagster import ActiveCampaignClient
    from matchall_dagster.api.budget import Priority, request_budget

    places = request_budget(budget, url, rps, Priority.BULK)  # opens the store, in the work's time as in a run
    with ActiveCampaignClient(url, DEFAULT_TOKEN, requests_per_second=rps, budget=places) as client:
        cpu, wall = time.process_time(), time.monotonic()
        matches = client.fetch_matches(segment, run_id, sort="id")
        fetch_cpu, fetch_wall = time.process_time() - cpu, time.monotonic() - wall
        ids = matches.contact_ids
        rows = pa.table({"position": np.arange(1, ids.size + 1, dtype=np.int64), "contact_id": ids})
        with duckdb.connect(str(db)) as connection:
            _create_table(connection)
            connection.register("rows", rows)
            connection.execute("insert into segment_matches select * from rows")
        return {
            "ids": int(ids.size),
            "requests": client.requests_sent,
            "fetch_cpu_s": fetch_cpu,
            "fetch_wall_s": fetch_wall,
            "first_ids": ids[:3].tolist(),
            "budget": str(places.store),
            "budget_wait_s": round(places.waited_seconds, 3),
        }


def run_loop(url: str, segment: str, run_id: str, rps: float, db: Path, budget: str) -> dict[str, Any]:
    del budget  # its own throttle: what a user writes
    import httpx
    import pandas as pd

    throttle = Throttle(rps)
    ids: list[int] = []
    requests = rejected = 0
    with httpx.Client(base_url=url, headers={"Api-Token": DEFAULT_TOKEN}, timeout=30) as http:
        page = 1
        while True:
            throttle.wait()
            response = http.get(
                f"/api/3/segmentMatchAll/{segment}/{run_id}", params={"sort": "id", "page": page, "page_size": 10_000}
            )
            requests += 1
            if response.status_code == 429:  # what a user adds after the first 429
                rejected += 1
                time.sleep(float(response.headers.get("Retry-After", "1")))
                continue
            response.raise_for_status()
            attributes = response.json()["data"][0]["attributes"]
            ids.extend(attributes["matches"])
            if page >= attributes["page"]["last_page"]:
                break
            page += 1
    frame = pd.DataFrame({"position": range(1, len(ids) + 1), "contact_id": ids})
    with duckdb.connect(str(db)) as connection:
        _create_table(connection)
        connection.register("frame", frame)
        connection.execute("insert into segment_matches select * from frame")
    return {"ids": len(ids), "requests": requests, "http_429": rejected, "first_ids": ids[:3]}


def run_dlt(url: str, segment: str, run_id: str, rps: float, db: Path, budget: str) -> dict[str, Any]:
    del budget  # dlt has no limiter: the throttle below
    import dlt
    from dlt.sources.helpers.requests import Client
    from dlt.sources.rest_api import rest_api_source

    throttle = Throttle(rps)
    session = Client(raise_for_status=False).session  # dlt's own session: retries 429 and 5xx
    sent: Callable[..., Any] = session.send
    counts = {"requests": 0, "http_429": 0}

    def throttled_send(request: Any, **kwargs: Any) -> Any:
        throttle.wait()
        counts["requests"] += 1
        response = sent(request, **kwargs)
        counts["http_429"] += response.status_code == 429
        return response

    session.send = throttled_send  # type: ignore[method-assign]
    source = rest_api_source(
        {
            "client": {"base_url": url, "headers": {"Api-Token": DEFAULT_TOKEN}, "session": session},
            "resources": [
                {
                    "name": "segment_matches",
                    "endpoint": {
                        "path": f"api/3/segmentMatchAll/{segment}/{run_id}",
                        "params": {"sort": "id", "page_size": 10_000},
                        "data_selector": "data[0].attributes.matches",
                        "paginator": {
                            "type": "page_number",
                            "base_page": 1,
                            "page_param": "page",
                            "total_path": "data[0].attributes.page.last_page",
                        },
                    },
                }
            ],
        }
    )
    pipelines_dir = db.parent / "dlt_pipelines"
    pipeline = dlt.pipeline(
        pipeline_name="matchall_bench",
        pipelines_dir=str(pipelines_dir),
        destination=dlt.destinations.duckdb(str(db)),
        dataset_name="matchall",
    )
    pipeline.run(source)
    with duckdb.connect(str(db), read_only=True) as connection:
        (rows,) = connection.execute("select count(*) from matchall.segment_matches").fetchone() or (0,)
        first = [row[0] for row in connection.execute("select value from matchall.segment_matches limit 3").fetchall()]
    return {"ids": int(rows), **counts, "first_ids": first}


def warm_up() -> None:
    """First uses that cost as much as an import (pyarrow's first table takes 0.4 s), for every tool
    alike, so that the work's wall and CPU are the work's."""
    import pandas as pd

    rows = pa.table({"x": np.zeros(1, dtype=np.int64)})
    frame = pd.DataFrame({"x": [1]})
    with duckdb.connect(":memory:") as connection:
        connection.register("rows", rows)
        connection.register("frame", frame)
        connection.execute("select * from rows, frame").fetchall()


TOOLS: dict[str, Callable[[str, str, str, float, Path, str], dict[str, Any]]] = {
    "ours": run_ours,
    "loop": run_loop,
    "dlt": run_dlt,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("tool", choices=sorted(TOOLS))
    parser.add_argument("--url", required=True)
    parser.add_argument("--segment", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--rps", type=float, required=True, help="requests a second; 0 for no client limit")
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--budget", default="memory", help="ours: the request budget's store (default: %(default)s)")
    args = parser.parse_args(argv)
    rps = args.rps or UNLIMITED_RPS
    warm_up()
    cpu, wall = time.process_time(), time.monotonic()
    result = TOOLS[args.tool](args.url, args.segment, args.run_id, rps, args.db, args.budget)
    result.update(work_cpu_s=time.process_time() - cpu, work_wall_s=time.monotonic() - wall)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
