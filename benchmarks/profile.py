"""Where the time goes: pyinstrument over the client's unlimited read of 1,000,000 ids and over the
whole path (the asset, its checks and the DuckDB write, in-process so that one profiler sees them).

`./scripts/bench.sh --profile` (or `python -m benchmarks.profile`). pyinstrument samples the
thread it starts on, so each page thread gets a profiler of its own and the sessions are
combined; the simulator serves from its own process, as in the suite. Writes the profiles to
benchmarks/results/profile-*.txt and prints the functions that take the most time themselves.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pyinstrument import Profiler
from pyinstrument.frame import Frame
from pyinstrument.renderers import ConsoleRenderer
from pyinstrument.session import Session
from pyinstrument.stack_sampler import get_stack_sampler

from benchmarks.run import ROOT, Sim
from matchall_dagster import ActiveCampaignClient
from matchall_dagster.simulator import DEFAULT_TOKEN

INTERVAL = 0.0005


def cpu_profiler() -> Profiler:
    """A profiler of this thread's CPU time: waiting (for the server, a lock, a page) counts nothing."""
    get_stack_sampler().timer_func = time.thread_time
    return Profiler(interval=INTERVAL)


class ThreadProfiles:
    """A profiler per page thread around `ActiveCampaignClient._get_page`, combined at the end."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._profilers: list[Profiler] = []

    @contextmanager
    def patched(self) -> Iterator[None]:
        original = ActiveCampaignClient._get_page
        profiles = self

        main_thread = threading.get_ident()  # sampled by the main profiler already

        def profiled(client: ActiveCampaignClient, *args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == main_thread:
                return original(client, *args, **kwargs)
            profiler = getattr(profiles._local, "profiler", None)
            if profiler is None:
                profiler = profiles._local.profiler = cpu_profiler()
                with profiles._lock:
                    profiles._profilers.append(profiler)
            profiler.start()
            try:
                return original(client, *args, **kwargs)
            finally:
                profiler.stop()

        ActiveCampaignClient._get_page = profiled  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            ActiveCampaignClient._get_page = original  # type: ignore[method-assign]

    def sessions(self) -> list[Session]:
        return [session for profiler in self._profilers if (session := profiler.last_session) is not None]


def combined(main: Session, others: list[Session]) -> Session:
    session = main
    for other in others:
        session = Session.combine(session, other)
    return session


def self_times(session: Session, top: int = 15) -> list[tuple[str, float]]:
    """Seconds spent in each function itself (not in what it calls), summed over the call tree."""
    totals: dict[str, float] = defaultdict(float)

    def walk(frame: Frame) -> None:
        name = f"{frame.function} ({Path(frame.file_path or '?').name}:{frame.line_no})"
        totals[name] += frame.total_self_time
        for child in frame.children:
            if not child.is_synthetic:  # [self] and [await] are in their parent's self time
                walk(child)

    root = session.root_frame()
    if root is not None:
        walk(root)
    return sorted(totals.items(), key=lambda item: -item[1])[:top]


def library_times(session: Session) -> list[tuple[str, float]]:
    """Self time by library (httpx, h11, numpy, matchall_dagster, ...), for where a read's CPU goes."""
    totals: dict[str, float] = defaultdict(float)

    def library(path: str | None) -> str:
        if not path:
            return "(built-in)"
        parts = Path(path).parts
        if "site-packages" in parts:
            return parts[parts.index("site-packages") + 1].removesuffix(".py")
        if "matchall_dagster" in parts:
            return "matchall_dagster." + Path(path).stem
        return "stdlib " + Path(path).stem if "python3" in path else Path(path).stem

    def walk(frame: Frame, owner: str) -> None:
        # C functions have no file: charge them to the Python code that called them
        here = library(frame.file_path) if frame.file_path and not frame.file_path.startswith("<") else owner
        totals[here] += frame.total_self_time
        for child in frame.children:
            if not child.is_synthetic:
                walk(child, here)

    root = session.root_frame()
    if root is not None:
        walk(root, "(root)")
    return sorted(totals.items(), key=lambda item: -item[1])[:12]


def profile(label: str, work: Callable[[], None], output: Path) -> None:
    threads = ThreadProfiles()
    profiler = cpu_profiler()
    cpu, wall = time.process_time(), time.monotonic()
    with threads.patched():
        profiler.start()
        work()
        main = profiler.stop()
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    session = combined(main, threads.sessions())
    text = session_text(session)
    output.write_text(text)
    root = session.root_frame()
    sampled = root.time if root is not None else 0.0
    print(f"\n== {label}: {wall:.2f} s wall, {cpu:.2f} CPU s; {sampled:.2f} CPU s sampled (main + page threads) ==")
    print("  by library (self time; C calls charged to their caller):")
    for name, seconds in library_times(session):
        print(f"  {seconds:8.3f} s  {seconds / max(sampled, 1e-9):4.0%}  {name}")
    print("  by function (self time):")
    for name, seconds in self_times(session):
        print(f"  {seconds:8.3f} s  {seconds / max(sampled, 1e-9):4.0%}  {name}")
    print(f"(call tree: {output})")


def session_text(session: Session) -> str:
    return str(ConsoleRenderer(unicode=False, color=False, show_all=False).render(session))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    segment = str(args.size)
    sim = Sim([args.size], limit=False, copies=1)
    try:
        run_id = sim.ready_run(segment)

        def client_read() -> None:
            with ActiveCampaignClient(sim.url, DEFAULT_TOKEN, requests_per_second=1000) as client:
                client.fetch_matches(segment, run_id, sort="id")

        profile(f"client read of {args.size:,} ids, no limit", client_read, args.output_dir / "profile-client.txt")

        with tempfile.TemporaryDirectory(prefix="matchall-profile-") as folder:
            os.environ.update(
                ACTIVECAMPAIGN_API_URL=sim.url,
                ACTIVECAMPAIGN_API_KEY=DEFAULT_TOKEN,
                DAGSTER_HOME=folder,
                MATCHALL_BENCH_DB=str(Path(folder) / "bench.duckdb"),
                MATCHALL_BENCH_RPS="1000",
            )
            (Path(folder) / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
            import dagster as dg

            from benchmarks.whole_path import bench_definitions

            definitions = bench_definitions()
            job = definitions.resolve_job_def("bench_segment_matches")
            with dg.DagsterInstance.get() as instance:
                instance.add_dynamic_partitions("segments", [segment])

                def whole_path() -> None:
                    result = job.execute_in_process(
                        run_config={
                            "ops": {"segment_matches": {"config": {"run_id": run_id, "sort": "id"}}},
                            "loggers": {"console": {"config": {"log_level": "WARNING"}}},
                        },
                        instance=instance,
                        partition_key=segment,
                    )
                    assert result.success

                profile(
                    f"whole path of {args.size:,} ids (in-process executor), no limit",
                    whole_path,
                    args.output_dir / "profile-whole-path.txt",
                )
    finally:
        sim.close()


if __name__ == "__main__":
    main()
