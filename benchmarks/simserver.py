"""The simulator in a process of its own, so that its CPU is never counted as the client's.

`python -m benchmarks.simserver --sizes 100000,1000000 --requests-per-second 5` prints one JSON
line with the URL once it serves, then serves until stdin closes or it is terminated. Segment ids
are the sizes as text ("1000000"); `--copies 2` adds "1000000-b" and so on, for parallel runs.
"""

from __future__ import annotations

import argparse
import json
import sys

from matchall_dagster.simulator import Simulator, SimulatorConfig, SimulatorServer
from matchall_dagster.simulator.account import SimAccount, SimSegment

SUFFIXES = ("", "-b", "-c", "-d")


def segment_id(size: int, copy: int = 0) -> str:
    return f"{size}{SUFFIXES[copy]}"


def build_account(sizes: list[int], copies: int) -> SimAccount:
    segments = [
        SimSegment(segment_id(size, copy), f"{size:,} members", size) for size in sizes for copy in range(copies)
    ]
    return SimAccount(segments=segments, seed=7)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", required=True, help="comma-separated segment sizes")
    parser.add_argument("--copies", type=int, default=1, choices=range(1, len(SUFFIXES) + 1))
    parser.add_argument("--requests-per-second", type=float, default=5.0, help="the account limit; 0 turns it off")
    parser.add_argument("--ready-after", type=float, default=0.0)
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    account = build_account(sizes, args.copies)
    for segment in account.segments:  # build members and the id order before any timing
        account.ordered(segment.id, "id")
    config = SimulatorConfig(requests_per_second=args.requests_per_second, ready_after=args.ready_after)
    with SimulatorServer(Simulator(account, config)) as server:
        print(json.dumps({"url": server.url}), flush=True)
        sys.stdin.read()  # until the parent closes our stdin (or ends us)


if __name__ == "__main__":
    main()
