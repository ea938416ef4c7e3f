"""The Dagster UI as an analyst uses it, in a real browser (Debian's Chromium) on the production
stack: the asset graph, the partitions of `segment_matches`, the failed check of the failing
segment with its run id, a materialization launched by hand from the launchpad with a sort
of the analyst's choosing, whose rows are then read from the membership store (PostgreSQL, as in
production), and the plot of the segments'
sizes over time from `segment_membership_changes`.

Small segments are read in batches (`read_small_segments`, one run for several partitions), so the
walk also checks that such a run reads well: the Runs page lists it as succeeded, and its log shows
one materialization of `segment_matches` per segment, each naming its partition. A batch-read
partition shows its latest materialization with the batch run's id, and each of its three checks
shows the batch run's pass in the check's partition detail; the check's partition list is compared
with the status Dagster resolves from the instance (a pass counts there only while its evaluation
names the partition's latest materialization as its target).

What the browser must show is read from the instance first, so the assertions compare the UI
with the truth rather than with remembered strings. Screenshots go to test-artifacts/ui/.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import dagster as dg
import pytest
import yaml
from playwright.sync_api import expect

from matchall_dagster.orchestration.account import DEFAULT_ACCOUNT
from matchall_dagster.orchestration.assets import MATCHES_COLUMNS
from matchall_dagster.orchestration.metadata import RUN_ID
from matchall_dagster.orchestration.names import BATCH_TAG, MATCHES_COMPLETE, RUN_NOT_EXPIRED, RUN_NOT_FAILED
from matchall_dagster_tests import browser
from matchall_dagster_tests.browser import (
    CHROMIUM_ARGS,
    TIMEOUT_MS,
    UI,
    automation_paused,
    drawn_pixels,
    graphql_response,
    open_ui,
    require_chromium,
)
from matchall_dagster_tests.deployment import ARTIFACTS, Deployment

UI_ARTIFACTS = ARTIFACTS / "ui"
ASSET_KEY = DEFAULT_ACCOUNT.matches_key
CHANGES_KEY = DEFAULT_ACCOUNT.changes_key
SMALL_READS_JOB = DEFAULT_ACCOUNT.name("read_small_segments")
CHOSEN_SORT = "-id"  # descending contact id: easy to verify, and not the sensor's default
OUTCOME_TIMEOUT = 300.0
RUN_TIMEOUT = 300.0
# A kick-off a minute, a one-minute window, the freshness daemon every 30 s: stale within about 2.5 minutes.
FRESHNESS_TIMEOUT = 300.0
RUN_ID_TAG = "matchall/run_id"  # the remote (ActiveCampaign) run a Dagster run was launched for
PLOTTED_STEPS = 3  # materializations of the evolving segment's membership changes before the plot
SIZE_PLOT = "07-membership-size-plot"
BATCH_CHECKS = (RUN_NOT_FAILED, RUN_NOT_EXPIRED, MATCHES_COMPLETE)  # what a batch logs on each partition
MATERIALIZED_MATCHES = "Materialized value segment_matches"  # the message of its materializations in a run's log
RUN_URL = re.compile(r"/runs/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


@pytest.fixture(scope="session")
def chromium() -> None:
    """Before the stack starts: no point starting it without a browser."""
    require_chromium()


# -- the browser harness itself ---------------------------------------------------------------


@pytest.mark.parametrize(("ci", "outcome"), [("", pytest.skip.Exception), ("true", pytest.fail.Exception)])
def test_without_chromium_the_ui_test_skips_except_under_ci(
    ci: str, outcome: type[BaseException], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(browser, "CHROMIUM", tmp_path / "chromium")  # nothing there
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match=r"chromium is missing .*apt-get install -y chromium"):
        require_chromium()


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>probe</title><h1>matchall probe</h1>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # keep the test output clean
        pass


@pytest.fixture
def probe_page() -> Iterator[str]:
    """A page on 127.0.0.1 for the browser harness's own test (no Dagster needed)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_failed_ui_step_names_the_step_and_keeps_a_screenshot(
    chromium: None, probe_page: str, tmp_path: Path
) -> None:
    """Chromium starts with the flags above and renders a page; a step that fails says which
    step, on which page, with a screenshot of what the browser showed."""
    with open_ui(probe_page, tmp_path) as ui:
        ui.goto("/")
        expect(ui.page.get_by_role("heading", name="matchall probe")).to_be_visible()
        assert ui.shot("probe").stat().st_size > 0
        with pytest.raises(AssertionError) as failure, ui.step("a heading that is not there"):
            expect(ui.page.get_by_text("no such text")).to_be_visible(timeout=1_000)
    message = str(failure.value)
    assert "UI step failed: a heading that is not there" in message
    assert f"page: {probe_page}/" in message
    screenshot = tmp_path / "FAILED-a-heading-that-is-not-there.png"
    assert f"screenshot: {screenshot}" in message
    assert screenshot.read_bytes().startswith(b"\x89PNG")


# -- the analyst's walk through the UI ---------------------------------------------------------


def _check_history(instance: dg.DagsterInstance, check_name: str) -> list[Any]:
    """The check's executions, newest first."""
    return list(
        instance.event_log_storage.get_asset_check_execution_history(dg.AssetCheckKey(ASSET_KEY, check_name), limit=500)
    )


def _latest_check_status(instance: dg.DagsterInstance, check_name: str) -> dict[str, str]:
    """partition -> status of its newest completed execution."""
    latest: dict[str, str] = {}
    for record in _check_history(instance, check_name):
        if record.partition is not None and record.status.value != "PLANNED":
            latest.setdefault(record.partition, record.status.value)
    return latest


def _latest_materialization(instance: dg.DagsterInstance, segment_id: str) -> dg.EventLogRecord | None:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=ASSET_KEY, asset_partitions=[segment_id]), limit=1
    ).records
    return records[0] if records else None


def _metadata(record: dg.EventLogRecord) -> dict[str, Any]:
    assert record.asset_materialization is not None
    return {key: value.value for key, value in record.asset_materialization.metadata.items()}


def _outcome_shown(instance: dg.DagsterInstance, deployment: Deployment) -> bool:
    """What the analyst comes to see exists: every ready segment materialized and complete, and
    the failing segment's run_not_failed failed."""
    complete = _latest_check_status(instance, MATCHES_COMPLETE)
    if not all(complete.get(segment) == "SUCCEEDED" for segment in deployment.ready_segments):
        return False
    return _latest_check_status(instance, RUN_NOT_FAILED).get(deployment.failing_segment) == "FAILED"


def _materialization_count(instance: dg.DagsterInstance, asset_key: dg.AssetKey, segment_id: str) -> int:
    return len(
        instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[segment_id]), limit=PLOTTED_STEPS
        ).records
    )


def _history_to_plot(instance: dg.DagsterInstance, deployment: Deployment) -> bool:
    """The evolving segment has enough steps of membership changes for a plot that moves."""
    segment = deployment.evolving_segment
    return all(_materialization_count(instance, key, segment) >= PLOTTED_STEPS for key in (ASSET_KEY, CHANGES_KEY))


def _plotted_sizes(instance: dg.DagsterInstance, segment_id: str) -> dict[str, int]:
    """Dagster run id -> `members` of each materialization of the segment's membership changes."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=CHANGES_KEY, asset_partitions=[segment_id]), limit=100
    ).records
    return {record.run_id: int(_metadata(record)["members"]) for record in records}


@dataclass(frozen=True)
class BatchRead:
    """A succeeded run of `read_small_segments` and a ready segment whose latest materialization it made."""

    run_id: str
    partitions: list[str]  # of segment_matches, in the order of the run's event log
    segment: str


@dataclass(frozen=True)
class CheckOnPartition:
    """What the UI should show of one check on one partition, read from the instance."""

    name: str
    status: str  # of the latest execution: SUCCEEDED, FAILED, ...
    run_id: str  # the Dagster run that logged it
    target_run_id: str | None  # the run of the materialization it names as its target, if any
    listed: str  # the partition's status in the check's partition list ("Passed", "Missing", ...)


def _matches_partitions(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """The partitions of segment_matches that a run materialized, in the order it logged them."""
    partitions = []
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        event = entry.dagster_event
        if event is not None and event.asset_key == ASSET_KEY and event.partition is not None:
            partitions.append(event.partition)
    return partitions


def _batch_read(instance: dg.DagsterInstance, deployment: Deployment) -> BatchRead | None:
    """Of the ready segments whose latest materialization of segment_matches a succeeded batch run
    of several segments made, the one of the batch with the most segments (the newest of those)."""
    candidates: list[tuple[int, int, BatchRead]] = []
    for segment in deployment.ready_segments:
        record = _latest_materialization(instance, segment)
        run = instance.get_run_by_id(record.run_id) if record is not None else None
        if record is None or run is None or run.job_name != SMALL_READS_JOB:
            continue
        if run.status != dg.DagsterRunStatus.SUCCESS:
            continue
        partitions = _matches_partitions(instance, run.run_id)
        if len(partitions) > 1:
            candidates.append((len(partitions), record.storage_id, BatchRead(run.run_id, partitions, segment)))
    return max(candidates, key=lambda c: (c[0], c[1]))[2] if candidates else None


# How the check's partition list (Dagster 1.13) names the status of a partition whose latest
# execution is finished: its own status while it targets the partition's latest materialization,
# "Missing" (not evaluated) once a newer materialization exists or when it names none.
_LISTED = {"SUCCEEDED": "Passed", "FAILED": "Failed"}


def _check_on_partition(instance: dg.DagsterInstance, check_name: str, segment_id: str) -> CheckOnPartition:
    key = dg.AssetCheckKey(ASSET_KEY, check_name)
    latest = next(
        r for r in _check_history(instance, check_name) if r.partition == segment_id and r.status.value != "PLANNED"
    )
    evaluation = latest.evaluation
    target = evaluation.target_materialization_data if evaluation is not None else None
    (info,) = instance.event_log_storage.get_asset_check_partition_info([key], partition_keys=[segment_id])
    assert info.latest_execution_status == latest.status, (info, latest)
    listed = _LISTED[latest.status.value] if info.is_current else "Missing"
    return CheckOnPartition(
        check_name, latest.status.value, latest.run_id, target.run_id if target is not None else None, listed
    )


def _show_asset_graph(ui: UI, partitions: list[str], materialized: set[str]) -> None:
    page = ui.page
    filled = f"{100 * len(materialized) // len(partitions)}% filled"
    with ui.step(f"the global asset graph shows segment_matches, its checks, {len(partitions)} partitions, {filled}"):
        ui.goto("/asset-groups")
        expect(page.get_by_text("Global asset lineage")).to_be_visible()
        title = page.get_by_text("segment_matches", exact=True).filter(visible=True).last
        expect(title).to_be_visible()
        # The innermost box holding the title and its rows is the node (segment_membership_changes,
        # downstream, shows the same partitions).
        node = page.locator("div").filter(has=title).filter(has_text="Partitions").last
        expect(node.get_by_text("Asset checks")).to_be_visible()
        expect(node.get_by_text(f"{len(partitions)} partitions", exact=True)).to_be_visible()
        expect(node.get_by_text(filled, exact=True)).to_be_visible()
        ui.shot("01-asset-graph")


def _freshness(instance: dg.DagsterInstance) -> str:
    """segment_matches' freshness as the daemon last evaluated it: PASS, FAIL, ... or "" (not yet)."""
    record = instance.get_freshness_state_records([ASSET_KEY]).get(ASSET_KEY)
    return "" if record is None else str(record.freshness_state.value)


def _show_columns_and_freshness(ui: UI) -> None:
    """The asset's overview: its table's columns with their descriptions (`dagster/column_schema`),
    and its freshness policy (from the kick-off cron), failed: nothing was read since the last kick-off."""
    page = ui.page
    with ui.step("segment_matches shows its columns, described, and its freshness policy failed"):
        ui.goto("/assets/segment_matches")
        expect(page.get_by_text("Columns", exact=True).first).to_be_visible()
        for column in MATCHES_COLUMNS.columns:
            expect(page.get_by_text(column.name, exact=True).filter(visible=True).first).to_be_visible()
            assert column.description is not None
            expect(page.get_by_text(column.description, exact=True).filter(visible=True).first).to_be_visible()
        label = page.get_by_text("Freshness policy", exact=True).filter(visible=True).first
        expect(label).to_be_visible()
        status = label.locator("xpath=following::*[normalize-space(text())][1]")
        expect(status).to_have_text(re.compile(r"^\s*(Failed|Failing)\s*$"))
        ui.shot("02b-columns-and-stale-freshness")


def _show_partitions(ui: UI, partitions: list[str], materialized: set[str], segment_id: str, run_id: str) -> None:
    """`run_id` is the Dagster run of the partition's latest materialization. (The metadata panel
    shows each entry's newest value, which for run_id is often the next kick-off's pending run.)"""
    page = ui.page
    with ui.step("the partitions view lists every segment and counts the materialized ones"):
        ui.goto("/assets/segment_matches?view=partitions")
        expect(page.get_by_text(f"Materialized ({len(materialized)})", exact=True)).to_be_visible()
        expect(page.get_by_text(f"Missing ({len(set(partitions) - materialized)})", exact=True)).to_be_visible()
        for key in partitions:
            expect(page.get_by_text(key, exact=True).filter(visible=True).first).to_be_visible()
    with ui.step(f"partition {segment_id} shows its latest materialization and the run that made it"):
        page.get_by_text(segment_id, exact=True).filter(visible=True).first.click()
        expect(page).to_have_url(re.compile(f"partition={segment_id}"))
        expect(page.get_by_text("Materialized", exact=True)).to_be_visible()
        expect(page.get_by_text("Latest materialization")).to_be_visible()
        expect(page.locator(f'a[href^="/runs/{run_id}"]', has_text=run_id[:8]).first).to_be_visible()
        expect(page.get_by_text("dagster/row_count", exact=True)).to_be_visible()
        ui.shot("02-partitions")


def _show_failed_check(ui: UI, failing_segment: str, dagster_run_id: str, remote_run_id: str, failed: int) -> None:
    page = ui.page
    with ui.step(f"run_not_failed shows Failed on partition {failing_segment} with run {remote_run_id}"):
        # The asset's tabs are links styled as tabs.
        checks_tab = page.get_by_role("tab", name="Checks", exact=True)
        page.get_by_role("link", name="Checks", exact=True).or_(checks_tab).first.click()
        page.get_by_text(RUN_NOT_FAILED, exact=True).filter(visible=True).first.click()
        expect(page).to_have_url(re.compile(f"checkDetail={RUN_NOT_FAILED}"))
        page.get_by_role("tab", name="Execution history").click()
        row = page.get_by_role("row").filter(has_text=remote_run_id)
        expect(row).to_have_count(1)
        expect(row.get_by_text("Failed", exact=True)).to_be_visible()
        expect(row.get_by_role("cell", name=failing_segment, exact=True)).to_be_visible()
        # The row's timestamp opens the Dagster run that judged the remote run.
        expect(row.get_by_role("link").first).to_have_attribute("href", re.compile(f"^/runs/{dagster_run_id}"))
        row.scroll_into_view_if_needed()
        ui.shot("03-check-run-not-failed")
    with ui.step("run_not_failed's partitions count the failed ones"):
        page.get_by_role("tab", name="Partitions").last.click()
        expect(page.get_by_text(f"Failed ({failed})", exact=True)).to_be_visible()
        ui.shot("04-check-partitions")


def _show_batch_run(ui: UI, run_id: str, partitions: list[str]) -> None:
    """Runs (filtered to the batch job, as its filter writes the URL) > the run > its log, filtered
    to the materializations of segment_matches: one per segment, each naming its partition."""
    page = ui.page
    with ui.step(f"the Runs page lists the {SMALL_READS_JOB} run {run_id[:8]} as succeeded"):
        ui.goto(f"/runs?q%5B0%5D={quote(f'job:{SMALL_READS_JOB}')}")
        link = page.locator(f'a[href="/runs/{run_id}"]', has_text=run_id[:8])
        row = page.locator('[class*="RunsFeedRow_rowGrid"]').filter(has=link)
        expect(row).to_have_count(1)
        expect(row.get_by_text(SMALL_READS_JOB, exact=True)).to_be_visible()
        expect(row.get_by_text("Success", exact=True)).to_be_visible()
        expect(row).to_contain_text(re.compile(rf"{re.escape(BATCH_TAG)}:\s*{len(partitions)}(?!\d)"))
        ui.shot("08-runs-batch")
    with ui.step(f"run {run_id[:8]} shows its materializations of segment_matches for {', '.join(partitions)}"):
        link.click()
        expect(page).to_have_url(re.compile(f"/runs/{run_id}"))
        # The log's filter, as typing the text into it writes the URL.
        ui.goto(f"/runs/{run_id}?logs={quote(MATERIALIZED_MATCHES)}")
        # Each materialization's row names its asset and partition in a small table.
        partition_cells = (
            page.locator("tr")
            .filter(has=page.locator("td:first-child", has_text=re.compile(r"^partition$")))
            .locator("td:nth-child(2)")
        )
        expect(partition_cells).to_have_text(partitions)
        ui.shot("09-batch-run")


def _show_batch_partition(ui: UI, batch: BatchRead, checks: list[CheckOnPartition]) -> dict[str, str]:
    """The partitions view of segment_matches at the batch-read segment, then each check's
    partitions at it (the asset's partition detail shows no checks). Returns check -> what the
    check's "Target materialization" showed."""
    page, segment, run_id = ui.page, batch.segment, batch.run_id
    with ui.step(f"partition {segment} shows its latest materialization by the {SMALL_READS_JOB} run {run_id[:8]}"):
        ui.goto("/assets/segment_matches?view=partitions")
        page.get_by_text(segment, exact=True).filter(visible=True).first.click()
        expect(page).to_have_url(re.compile(f"partition={segment}"))
        expect(page.get_by_text("Latest materialization")).to_be_visible()
        expect(page.locator(f'a[href^="/runs/{run_id}"]', has_text=run_id[:8]).first).to_be_visible()
        expect(page.get_by_text(SMALL_READS_JOB, exact=True).first).to_be_visible()
        ui.shot("10-batch-partition")
    targets: dict[str, str] = {}
    for check in checks:
        with ui.step(
            f"{check.name} on partition {segment}: {check.status} in run {check.run_id[:8]}, listed as {check.listed}"
        ):
            ui.goto(f"/assets/segment_matches?view=checks&checkDetail={check.name}")
            # The check's tabs follow the asset's (a "Partitions" too): wait for them to be drawn.
            expect(page.get_by_role("tab", name="Execution history")).to_be_visible()
            page.get_by_role("tab", name="Partitions").last.click()
            page.get_by_placeholder("Filter by partition").fill(segment)
            # The status counts are of the partitions the filter leaves: this one.
            expect(page.get_by_text(f"{check.listed} (1)", exact=True)).to_be_visible()
            page.get_by_text(segment, exact=True).filter(visible=True).first.click()
            expect(page.get_by_text("Latest execution", exact=True)).to_be_visible()
            expect(page.locator(f'a[href^="/runs/{check.run_id}"]', has_text=check.run_id[:8]).first).to_be_visible()
            label = {"SUCCEEDED": "Passed", "FAILED": "Failed"}[check.status]
            expect(page.get_by_text(label, exact=True).filter(visible=True).first).to_be_visible()
            target = page.get_by_text("Target materialization", exact=True).locator("xpath=..")
            if check.target_run_id is None:
                expect(target).to_contain_text("None")
            else:
                expect(target.locator(f'a[href="/runs/{check.target_run_id}"]')).to_be_visible()
            targets[check.name] = target.inner_text().replace("Target materialization", "").strip()
            ui.shot(f"11-check-{check.name}-{segment}")
    return targets


def _show_size_plot(ui: UI, segment_id: str, sizes: dict[str, int]) -> dict[str, int]:
    """Overview > Metadata > Plots > Events: `members` at each materialization of
    segment_membership_changes over time. (Dagster 1.13 has no per-partition time series: this view
    plots the asset's latest 100 events of every partition in time order; "Partitions" plots each
    partition's latest value.) Returns what the page was sent for `segment_id`: run id -> members."""
    page = ui.page
    asset = CHANGES_KEY.to_user_string()
    with ui.step(f"the overview of {asset} switches its metadata to plots"):
        ui.goto(f"/assets/{asset}?view=overview")
        # Buttons' accessible names start with their icon's ("asset_plot Plots").
        page.get_by_role("button", name=re.compile(r"(^|\s)Plots$")).click()
    with ui.step(f"the plots over time (Events) are fetched with segment {segment_id}'s {len(sizes)} sizes"):
        with graphql_response(page, "RecentAssetEventsQuery") as response:
            page.get_by_role("button", name=re.compile(r"(^|\s)Events$")).click()
        events = response.value.json()["data"]["assetOrError"]["assetEventHistory"]["results"]
        plotted = {
            event["runId"]: int(entry["intValue"])
            for event in events
            if event["partition"] == segment_id
            for entry in event["metadataEntries"]
            if entry["label"] == "members"
        }
        assert sizes.items() <= plotted.items(), f"the page plots {plotted}, the instance has {sizes}"
    with ui.step(f"the members plot is drawn, {len(plotted)} of its points segment {segment_id}'s"):
        title = page.get_by_text("members", exact=True).filter(visible=True)
        expect(title).to_have_count(1)
        chart = title.locator("xpath=../..").locator("canvas")
        expect(chart).to_be_visible()
        assert drawn_pixels(chart) > 1_000, "the members chart's canvas is blank"
        chart.scroll_into_view_if_needed()
        ui.shot(SIZE_PLOT)
    return plotted


def _launch_with_sort(ui: UI, segment_id: str, sort: str) -> str:
    """Assets > segment_matches > Materialize > Open launchpad, pick the partition, edit the sort
    in the run config, Materialize. Returns the Dagster run id the UI opened."""
    page = ui.page
    with ui.step("the launchpad opens for segment_matches"):
        ui.goto("/assets/segment_matches?view=partitions")
        materialize = page.get_by_role("button", name="Materialize…")
        expect(materialize).to_be_enabled()
        # The arrow beside "Materialize…" holds the other ways to launch.
        materialize.locator("xpath=following::button[1]").click()
        page.get_by_role("menuitem", name="Open launchpad").click()
        dialog = page.get_by_role("dialog")
        expect(dialog.get_by_text("Launchpad (configure assets)")).to_be_visible()
        editor = dialog.locator(".CodeMirror")
        expect(editor.locator(".CodeMirror-line").filter(has_text="segment_matches").first).to_be_visible()
    with ui.step(f"partition {segment_id} is chosen in the launchpad"):
        dialog.get_by_placeholder("Partition").fill(segment_id)
        page.get_by_role("menuitem", name=segment_id, exact=True).click()
        expect(dialog.get_by_placeholder("Partition")).to_have_value(segment_id)
        # Choosing a partition reloads the config for it; edit only what that reload produced.
        expect(editor.locator(".CodeMirror-line").filter(has_text=re.compile(r"^\s*sort: '")).first).to_be_visible()
    with ui.step(f"the sort of segment_matches is set to {sort!r} in the run config"):
        line = editor.locator(".CodeMirror-line").filter(has_text=re.compile(r"^\s*sort:")).first
        old_value = line.inner_text().split("sort:", 1)[1].strip()
        line.click()
        page.keyboard.press("End")
        for _ in old_value:
            page.keyboard.press("Backspace")
        page.keyboard.type(f"'{sort}'")
        config = yaml.safe_load(editor.evaluate("element => element.CodeMirror.getValue()"))
        assert config["ops"]["segment_matches"]["config"]["sort"] == sort, config["ops"]
        expect(dialog.get_by_text("No errors")).to_be_visible()
        # Its accessible name starts with the icon's ("open_in_new Materialize").
        launch = dialog.get_by_role("button", name=re.compile(r"(^|\s)Materialize$"))
        expect(launch).to_be_enabled()
        ui.shot("05-launchpad")
    with ui.step("Materialize launches a run and opens its page"):
        launch.click()
        page.wait_for_url(RUN_URL)
        match = RUN_URL.search(page.url)
        assert match is not None
        return match.group(1)


@pytest.mark.timeout(1200)  # the stack's start, its first outcome, a drained queue and a run, on 2 shared cores
def test_analyst_follows_segments_and_materializes_one_from_the_launchpad(
    chromium: None, deployment: Deployment
) -> None:
    started = time.monotonic()
    evolving = deployment.evolving_segment
    with deployment.instance() as instance:
        deployment.wait_for(
            lambda: (
                _outcome_shown(instance, deployment)
                and _history_to_plot(instance, deployment)
                and _batch_read(instance, deployment) is not None
            ),
            timeout=OUTCOME_TIMEOUT,
            what="every ready segment materialized and complete, the failing segment's run_not_failed failed, "
            f"{PLOTTED_STEPS} materializations of segment_matches and of its membership changes for segment "
            f"{evolving}, and a ready segment last materialized by a {SMALL_READS_JOB} run of several segments",
        )
    outcome_at = time.monotonic()

    with automation_paused(deployment), deployment.instance() as instance:
        paused_at = time.monotonic()
        # Nothing is read while paused: once a kick-off (every minute here) passes with no read since
        # the one before, the freshness daemon (every 30 s) finds segment_matches stale.
        deployment.wait_for(
            lambda: _freshness(instance) == "FAIL",
            timeout=FRESHNESS_TIMEOUT,
            what="segment_matches stale by its freshness policy: no read since the previous kick-off",
        )
        stale_at = time.monotonic()
        partitions = sorted(instance.get_dynamic_partitions(DEFAULT_ACCOUNT.partitions_name))
        materialized = instance.get_materialized_partitions(ASSET_KEY)
        assert set(deployment.ready_segments) <= materialized
        assert deployment.failing_segment not in materialized
        # The largest ready segment: its order says the most about the sort.
        latest: dict[str, dict[str, Any]] = {}
        for segment in deployment.ready_segments:
            record = _latest_materialization(instance, segment)
            assert record is not None
            latest[segment] = _metadata(record)
        chosen = max(latest, key=lambda segment: int(latest[segment]["dagster/row_count"]))
        chosen_record = _latest_materialization(instance, chosen)
        assert chosen_record is not None
        failed_record = next(
            r
            for r in _check_history(instance, RUN_NOT_FAILED)
            if r.partition == deployment.failing_segment and r.status.value == "FAILED"
        )
        check_run = instance.get_run_by_id(failed_record.run_id)
        assert check_run is not None
        # The remote run the check judged. A run launched for one remote run carries its id as a tag;
        # a batch run (several segments) does not, so read it from the verdict itself.
        assert failed_record.evaluation is not None
        remote_run_id = str(failed_record.evaluation.metadata[RUN_ID].value)
        assert check_run.tags.get(RUN_ID_TAG, remote_run_id) == remote_run_id
        failed_partitions = sum(s == "FAILED" for s in _latest_check_status(instance, RUN_NOT_FAILED).values())
        # A batch-read segment: its run, the run's segments, and what the batch logged on its checks.
        batch = _batch_read(instance, deployment)
        assert batch is not None
        batch_run = instance.get_run_by_id(batch.run_id)
        assert batch_run is not None
        assert batch_run.tags.get(BATCH_TAG) == str(len(batch.partitions)), batch_run.tags
        batch_checks = [_check_on_partition(instance, name, batch.segment) for name in BATCH_CHECKS]
        for check in batch_checks:
            assert (check.status, check.run_id) == ("SUCCEEDED", batch.run_id), (
                f"the latest {check.name} on partition {batch.segment} is not the batch run's pass: {check}"
            )
            # The batch names the materialization each verdict judged, so the UI counts it as passed.
            assert (check.listed, check.target_run_id) == ("Passed", batch.run_id), check

        with open_ui(deployment.webserver_url, UI_ARTIFACTS) as ui:
            _show_asset_graph(ui, partitions, materialized)
            _show_partitions(ui, partitions, materialized, chosen, chosen_record.run_id)
            _show_columns_and_freshness(ui)
            _show_failed_check(ui, deployment.failing_segment, failed_record.run_id, remote_run_id, failed_partitions)
            _show_batch_run(ui, batch.run_id, batch.partitions)
            targets = _show_batch_partition(ui, batch, batch_checks)
            run_id = _launch_with_sort(ui, chosen, CHOSEN_SORT)
            launched_at = time.monotonic()

            def finished() -> bool:
                run = instance.get_run_by_id(run_id)
                return run is not None and run.is_finished

            deployment.wait_for(finished, timeout=RUN_TIMEOUT, what=f"the run {run_id} launched from the UI to finish")
            run = instance.get_run_by_id(run_id)
            assert run is not None
            assert run.status == dg.DagsterRunStatus.SUCCESS, (
                f"the run launched from the UI ended {run.status.value}; see {ui.base_url}/runs/{run_id}"
            )
            with ui.step("the run page shows the run succeeded"):
                expect(ui.page.get_by_text("Success", exact=True).first).to_be_visible()
                expect(ui.page.get_by_text(f"partition: {chosen}")).to_be_visible()
                ui.shot("06-run-succeeded")
            plot_at = time.monotonic()
            sizes_before = _plotted_sizes(instance, evolving)
            plotted = _show_size_plot(ui, evolving, sizes_before)
            sizes_after = _plotted_sizes(instance, evolving)
            screenshots = list(ui.screenshots)
        run_done_at = time.monotonic()

        # What the launchpad sent, and what the run made of it.
        assert run.tags.get("dagster/partition") == chosen
        ops: Any = run.run_config["ops"]
        assert ops["segment_matches"]["config"]["sort"] == CHOSEN_SORT
        record = _latest_materialization(instance, chosen)
        assert record is not None
        assert record.run_id == run_id
        metadata = _metadata(record)
        assert metadata["sort"] == CHOSEN_SORT
        members = deployment.stored_members(chosen)

    # Nothing else wrote the partition meanwhile (the automation was paused), so the store holds
    # this run's rows: the simulator's exact list for the chosen sort, in descending id order.
    assert len(members) == metadata["dagster/row_count"] > 1
    assert all(a > b for a, b in itertools.pairwise(members)), "rows are not in descending id order"
    assert members == deployment.simulator.truth(chosen, CHOSEN_SORT)

    # The plot showed the evolving segment's sizes as the instance records them (a step the
    # automation sensor finished meanwhile may be on the page), and they moved.
    assert plotted.items() <= sizes_after.items()
    assert len(plotted) >= PLOTTED_STEPS
    assert len(set(plotted.values())) > 1, f"segment {evolving}'s size did not change: {plotted}"

    print(
        f"\nUI in Chromium ({' '.join(CHROMIUM_ARGS)}; timeout {TIMEOUT_MS / 1000:.0f} s a step): "
        f"outcome after {outcome_at - started:.0f} s, automation paused and queue drained in "
        f"{paused_at - outcome_at:.0f} s, stale by its freshness policy {stale_at - paused_at:.0f} s later, "
        f"browser pages {launched_at - stale_at:.0f} s, launched run "
        f"{run_id} (partition {chosen}, sort {CHOSEN_SORT}, {len(members):,} rows) done in "
        f"{plot_at - launched_at:.0f} s, size plot ({len(plotted)} points of segment {evolving}) "
        f"{run_done_at - plot_at:.0f} s; total {time.monotonic() - started:.0f} s\n"
        f"batch run {batch.run_id} ({SMALL_READS_JOB}, partitions {', '.join(batch.partitions)}); partition "
        f"{batch.segment}'s checks, passed in that run, as the check's partition list shows them: "
        + ", ".join(f"{c.name} {c.listed} (target materialization: {targets[c.name]})" for c in batch_checks)
        + "\nscreenshots:\n"
        + "\n".join(f"  {path}" for path in screenshots)
    )
