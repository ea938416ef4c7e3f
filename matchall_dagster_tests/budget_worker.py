"""A process of its own sharing an account's request budget, for test_budget.py.

python -m matchall_dagster_tests.budget_worker take STORE ACCOUNT COUNT
    takes COUNT places at 5/s, then says {"taken": [time.time() of each place]}.
python -m matchall_dagster_tests.budget_worker read STORE API_URL SEGMENT PAGE_SIZE
    builds its client, says "ready", waits for a line on stdin, then reads the segment, saying
    "took T" as it takes each place, "page DONE/LAST" as pages arrive and, at the end,
    {"total": members, "done": T} (T: time.monotonic(), CLOCK_MONOTONIC, the simulator's clock too).
"""

from __future__ import annotations

import json
import sys
import threading
import time

from matchall_dagster.api.budget import RequestBudget, request_budget
from matchall_dagster.api.client import ActiveCampaignClient
from matchall_dagster.simulator import DEFAULT_TOKEN

RATE = 5
_output = threading.Lock()


def say(line: str) -> None:
    """One whole line to stdout, whichever thread says it."""
    with _output:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def take(store: str, account: str, count: int) -> None:
    budget = request_budget(store, account, RATE)
    taken = []
    for _ in range(count):
        budget.take()
        taken.append(time.time())
    say(json.dumps({"taken": taken}))


class ReportingBudget(RequestBudget):
    """The budget, saying when it took each place."""

    def __init__(self, budget: RequestBudget) -> None:
        super().__init__(budget._window, budget.priority)

    def take(self) -> None:
        super().take()
        say(f"took {time.monotonic()}")


def read(store: str, url: str, segment_id: str, page_size: int) -> None:
    budget = ReportingBudget(request_budget(store, url, RATE))
    with ActiveCampaignClient(url, DEFAULT_TOKEN, requests_per_second=RATE, page_size=page_size, budget=budget) as c:
        c.get_segment(segment_id)  # a process's first request is slow to leave (connection, first use)
        say("ready")
        sys.stdin.readline()
        run = c.start_run(segment_id)
        first = c.wait_until_ready(segment_id, run.run_id, poll_interval=0.2)
        matches = c.fetch_matches(
            segment_id,
            run.run_id,
            first_page=first,
            on_page=lambda done, last: say(f"page {done}/{last}"),
        )
        say(json.dumps({"total": int(matches.contact_ids.size), "done": time.monotonic()}))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "take":
        take(args[0], args[1], int(args[2]))
    else:
        read(args[0], args[1], args[2], int(args[3]))
