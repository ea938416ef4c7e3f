"""What the account's request budget costs a request: one place taken in memory, a SQLite file, PostgreSQL.

`python -m benchmarks.budget_cost` (options: `--takes 2000`, `--seconds 20`, `--stores
memory,sqlite,postgres`, `--postgres URL`) prints a table and writes
`benchmarks/results/budget-cost.json` and `.md`. For each store, in this process:

- **take**: `_window(...).try_take()` when a place is free (the store's count-and-insert under its
  lock: the file lock and a SQLite transaction, or `LOCK TABLE ... NOWAIT`, a count and an insert
  in PostgreSQL, plus the clock read, which for PostgreSQL is a query of its own). The window is
  so wide that nothing waits, and every 50 takes the table is emptied outside the timing, so it
  holds at most what it holds at 5/s between two leaks (5 a second for 10 s). Wall time per take
  (median, p95) and CPU time per take (`time.process_time`, mean).
- **refused**: `try_take()` when the window is full (a count and a look at the place that frees
  next, no insert): what a waiting request pays each time it asks again.
- **clock**: the bucket's `now()` alone (local for memory and SQLite, `clock_timestamp()` in
  PostgreSQL).
- **CPU share at 5/s**: 5 x CPU per take / 1e6, and measured: `RequestBudget.take()` at the
  account's real 5/s for about `--seconds`, alone, CPU seconds over wall seconds (refused tries
  and the waits included); also the rate it achieved over whole windows (5 places each time the
  oldest 5 leave: the window's guard, 15 ms, 40 ms in PostgreSQL, and the bulk retry's 10 ms
  after a place frees make 4.87/s the most, 4.75/s in PostgreSQL).

The PostgreSQL server is the local one (`postgresql://postgres@127.0.0.1:5432/postgres`) unless
`--postgres` names another; a store that cannot be reached is reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from matchall_dagster.api.budget import BudgetStore, Priority, _table, _Window, _window, request_budget
from matchall_dagster.api.errors import BudgetStoreError

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "benchmarks" / "results" / "budget-cost.json"
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
ACCOUNT = "https://budget-cost.benchmark.invalid"  # a window of its own, in any store
ACCOUNT_LIMIT = 5.0
WIDE_OPEN = 1_000_000.0  # requests a second: a window that never fills during the timing
FLUSH_EVERY = 50  # takes: the most places the table holds at 5/s between two leaks (10 s)


@dataclass
class StoreCost:
    store: str
    takes: int
    take_us_median: float
    take_us_p95: float
    take_cpu_us: float
    refused_us_median: float
    refused_us_p95: float
    refused_cpu_us: float
    clock_us_median: float
    cpu_share_at_5_per_s: float  # 5 x CPU per take / 1e6, as a share of one core
    loop_seconds: float
    loop_rate_per_s: float  # take() at the real 5/s, once the window is full
    loop_cpu_share: float  # measured: CPU seconds / wall seconds of that loop
    loop_worst_wait_ms: float


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def _timed(call: Any, count: int, between: Any = None) -> tuple[list[float], list[float], list[Any]]:
    """Wall and CPU microseconds of `count` calls; `between(i)` runs untimed before each."""
    walls, cpus, results = [], [], []
    for index in range(count):
        if between is not None:
            between(index)
        cpu, wall = time.process_time(), time.perf_counter()
        result = call()
        walls.append((time.perf_counter() - wall) * 1e6)
        cpus.append((time.process_time() - cpu) * 1e6)
        results.append(result)
    return walls, cpus, results


def _fill(window: _Window) -> None:
    """Take places until the window refuses one."""
    while window.try_take() == 0:
        pass


def measure(text: str, takes: int, seconds: float) -> StoreCost:
    store = BudgetStore.parse(text)
    table = _table(ACCOUNT)
    # Two windows of one table: a wide one (nothing waits) and the account's 5/s.
    wide = _window(store, table, WIDE_OPEN)
    limited = _window(store, table, ACCOUNT_LIMIT)
    wide.bucket.flush()
    for _ in range(20):  # connections, statements and pages warm
        wide.try_take()
    wide.bucket.flush()

    def flush_sometimes(index: int) -> None:
        if index % FLUSH_EVERY == 0:
            wide.bucket.flush()

    take_walls, take_cpus, taken = _timed(wide.try_take, takes, flush_sometimes)
    assert all(wait == 0 for wait in taken), "the wide window refused a place"

    limited.bucket.flush()
    _fill(limited)
    refused_walls, refused_cpus, waits = _timed(limited.try_take, takes, lambda _: _fill(limited))
    refused = [(wall, cpu) for wall, cpu, wait in zip(refused_walls, refused_cpus, waits, strict=True) if wait > 0]
    clock_walls, _, _ = _timed(limited.bucket.now, takes)

    limited.bucket.flush()
    time.sleep(1.1)
    budget = request_budget(store, ACCOUNT, ACCOUNT_LIMIT, Priority.BULK)
    worst = 0.0
    moments: list[float] = []
    # The first 5 places are free; then the window admits 5 at a time as the oldest 5 leave it, so
    # the rate is measured over whole windows: 5 x `seconds` places after the first 5.
    limit = int(ACCOUNT_LIMIT)
    cpu, began = time.process_time(), time.monotonic()
    for _ in range(limit * (1 + max(1, round(seconds)))):
        asked = time.monotonic()
        budget.take()
        moments.append(time.monotonic())
        worst = max(worst, moments[-1] - asked)
    loop_wall, loop_cpu = time.monotonic() - began, time.process_time() - cpu
    steady_rate = (len(moments) - limit) / (moments[-1] - moments[limit - 1])
    limited.bucket.flush()

    take_cpu = statistics.fmean(take_cpus)
    return StoreCost(
        store=store.kind,
        takes=takes,
        take_us_median=round(statistics.median(take_walls), 1),
        take_us_p95=round(_percentile(take_walls, 0.95), 1),
        take_cpu_us=round(take_cpu, 1),
        refused_us_median=round(statistics.median([wall for wall, _ in refused]), 1),
        refused_us_p95=round(_percentile([wall for wall, _ in refused], 0.95), 1),
        refused_cpu_us=round(statistics.fmean([cpu for _, cpu in refused]), 1),
        clock_us_median=round(statistics.median(clock_walls), 1),
        cpu_share_at_5_per_s=round(ACCOUNT_LIMIT * take_cpu / 1e6, 6),
        loop_seconds=round(loop_wall, 2),
        loop_rate_per_s=round(steady_rate, 3),
        loop_cpu_share=round(loop_cpu / loop_wall, 6),
        loop_worst_wait_ms=round(worst * 1000, 1),
    )


HEADER = (
    "store",
    "take µs (median)",
    "take µs (p95)",
    "CPU µs / take",
    "refused try µs (median)",
    "clock µs",
    "CPU share at 5/s (5 x CPU/take)",
    "take() at 5/s: rate, CPU share",
)


def cells(row: StoreCost) -> tuple[str, ...]:
    return (
        row.store,
        f"{row.take_us_median:,.0f}",
        f"{row.take_us_p95:,.0f}",
        f"{row.take_cpu_us:,.0f}",
        f"{row.refused_us_median:,.0f}",
        f"{row.clock_us_median:,.0f}",
        f"{row.cpu_share_at_5_per_s * 100:.3f} %",
        f"{row.loop_rate_per_s:.2f}/s, {row.loop_cpu_share * 100:.3f} %",
    )


def plain(rows: list[StoreCost]) -> str:
    lines = [HEADER, *(cells(row) for row in rows)]
    widths = [max(len(line[column]) for line in lines) for column in range(len(HEADER))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines)


def markdown(rows: list[StoreCost], skipped: dict[str, str], info: dict[str, Any], load: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in rows]
    lines += [""] + [f"{store}: not measured ({reason})." for store, reason in skipped.items()]
    takes = rows[0].takes if rows else 0
    seconds = rows[0].loop_seconds if rows else 0
    lines.append(
        f"{takes:,} takes a store (the table emptied every {FLUSH_EVERY}, as at 5/s between leaks); the last "
        f"column: `take()` alone at the account's 5/s for {seconds:.0f} s. {info['cpu']}, {info['cores']} cores, "
        f"Python {info['python']}; load average {', '.join(f'{x:.1f}' for x in load['loadavg'])} before."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from benchmarks.run import load, machine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--takes", type=int, default=2_000, help="timed takes per store (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=20.0, help="take() at 5/s per store (default: %(default)s)")
    parser.add_argument("--stores", default="memory,sqlite,postgres", help="of memory,sqlite,postgres")
    parser.add_argument("--postgres", default=LOCAL_POSTGRES, help="the PostgreSQL store (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    info, before = machine(), load()
    rows: list[StoreCost] = []
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="budget-cost-") as folder:
        locations = {"memory": "memory", "sqlite": str(Path(folder) / "budget.sqlite"), "postgres": args.postgres}
        for name in [name for name in args.stores.split(",") if name]:
            print(f"- {name} ...", end=" ", flush=True)
            try:
                row = measure(locations[name], args.takes, args.seconds)
            except BudgetStoreError as exc:
                skipped[name] = str(exc)
                print(f"skipped: {exc}", flush=True)
                continue
            rows.append(row)
            print(f"{row.take_us_median:,.0f} µs a take, {row.take_cpu_us:,.0f} CPU µs", flush=True)
    after = load()
    report = {
        "machine": info,
        "load_before": before,
        "load_after": after,
        "rows": [asdict(row) for row in rows],
        "skipped": skipped,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(rows, skipped, info, before) + "\n")
    print()
    print(plain(rows))
    print(f"\n{after['uptime']}\nWritten: {args.output} and {args.output.with_suffix('.md')}")


if __name__ == "__main__":
    main()
