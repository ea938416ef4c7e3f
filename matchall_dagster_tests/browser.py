"""Debian's Chromium driven by Playwright, for tests of the Dagster UI, and the one thing the
stack harness lacks for them: holding the automation still while the browser looks.

Never a downloaded browser: Playwright only drives /usr/bin/chromium, with the flags that let it
run as root and keep it off the network (this machine has none; without the background
networking flags Chromium's own connections are refused and slow it down).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
import pytest
from dagster._core.scheduler.instigation import TickStatus  # not exported at the top level
from playwright._impl._sync_base import EventContextManager  # what Page.expect_response returns
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Locator, Page, Response, expect, sync_playwright

from matchall_dagster.orchestration.account import DEFAULT_ACCOUNT
from matchall_dagster_tests.deployment import Deployment

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",  # as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
VIEWPORT = {"width": 1920, "height": 1080}
TIMEOUT_MS = 90_000  # one locator or navigation; the machine is slow and shared
CHROMIUM_INSTALL_HINT = "apt-get install -y chromium"

# workspace.yaml's location; a `Definitions` object is served as Dagster's singleton repository.
LOCATION = "matchall_dagster"
REPOSITORY = "__repository__"
ACTIVE_RUN_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def require_chromium() -> None:
    """Skip without Debian's chromium, except under CI=true, where it is a failure."""
    if CHROMIUM.exists():
        return
    reason = f"{CHROMIUM} is missing (Debian's chromium package: {CHROMIUM_INSTALL_HINT})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}. CI=true: the browser test must run; .ci/run installs it when missing.")
    pytest.skip(f"{reason}; skipping the browser test (under CI=true it fails instead).")


@dataclass
class UI:
    """One Chromium page on the webserver; screenshots land in `artifacts`."""

    page: Page
    base_url: str
    artifacts: Path
    screenshots: list[Path] = field(default_factory=list)

    def goto(self, path: str) -> None:
        self.page.goto(f"{self.base_url}{path}", wait_until="domcontentloaded")

    def shot(self, name: str) -> Path:
        path = self.artifacts / f"{name}.png"
        self.page.screenshot(path=str(path))
        self.screenshots.append(path)
        return path

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        """A failure inside names the step and the page, with a screenshot of what was shown."""
        try:
            yield
        except (AssertionError, PlaywrightError) as exc:
            slug = "".join(c if c.isalnum() else "-" for c in what.lower()).strip("-")[:60]
            path = self.artifacts / f"FAILED-{slug}.png"
            with contextlib.suppress(PlaywrightError):
                self.page.screenshot(path=str(path), full_page=True)
            raise AssertionError(
                f"UI step failed: {what}\n  page: {self.page.url}\n  screenshot: {path}\n  cause: {exc}"
            ) from exc


@contextlib.contextmanager
def open_ui(base_url: str, artifacts: Path) -> Iterator[UI]:
    """Chromium on a new, empty profile, its page sized for readable screenshots."""
    artifacts.mkdir(parents=True, exist_ok=True)
    for old in artifacts.glob("*.png"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="matchall-chromium-") as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=list(CHROMIUM_ARGS),
            viewport={"width": VIEWPORT["width"], "height": VIEWPORT["height"]},
            timeout=TIMEOUT_MS,
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.set_default_navigation_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)
            # A new instance greets with "Join the Dagster community" over the UI, whenever it
            # likes: Playwright dismisses it before any action or assertion that it would block.
            skip = page.get_by_role("button", name="Skip")
            page.add_locator_handler(page.get_by_text("Join the Dagster community"), lambda: skip.click())
            yield UI(page, base_url, artifacts)
        finally:
            context.close()


def graphql_response(page: Page, operation: str) -> EventContextManager[Response]:
    """The webserver's answer to the page's next GraphQL query named `operation`: what the UI
    was given to draw, for a chart whose points live in a canvas rather than in the DOM."""

    def is_operation(response: Response) -> bool:
        if not urlsplit(response.url).path.endswith("/graphql") or response.request.method != "POST":
            return False
        with contextlib.suppress(ValueError, PlaywrightError):
            body = response.request.post_data_json
            return isinstance(body, dict) and body.get("operationName") == operation
        return False

    return page.expect_response(is_operation)


def drawn_pixels(canvas: Locator) -> int:
    """How many pixels of a canvas are not transparent: a chart that drew nothing has none."""
    count: int = canvas.evaluate(
        """canvas => {
            const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
            let drawn = 0;
            for (let alpha = 3; alpha < data.length; alpha += 4) if (data[alpha]) drawn++;
            return drawn;
        }"""
    )
    return count


# -- holding the automation still -------------------------------------------------------------


# kind -> (query field, selector type, state field) of the webserver's GraphQL schema
_INSTIGATOR_FIELDS = {
    "schedule": ("scheduleOrError", "ScheduleSelector", "scheduleState"),
    "sensor": ("sensorOrError", "SensorSelector", "sensorState"),
}


def _instigator_state_id(deployment: Deployment, kind: str, name: str) -> str:
    field_name, selector_type, state = _INSTIGATOR_FIELDS[kind]
    selector = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, f"{kind}Name": name}
    data = deployment.graphql(
        f"query($s: {selector_type}!) {{ {field_name}({kind}Selector: $s) {{ __typename "
        f"... on {kind.capitalize()} {{ {state} {{ id }} }} ... on PythonError {{ message }} }} }}",
        {"s": selector},
    )
    answer: dict[str, Any] = data[field_name]
    if kind.capitalize() != answer["__typename"]:
        raise AssertionError(f"the webserver does not know the {kind} {name}: {answer}")
    state_id: str = answer[state]["id"]
    return state_id


def _mutate(deployment: Deployment, mutation: str, variables: dict[str, Any], result: str) -> None:
    data = deployment.graphql(mutation, variables)
    answer: dict[str, Any] = data[result]
    if answer["__typename"] in ("PythonError", "UnauthorizedError", "ScheduleNotFoundError"):
        raise AssertionError(f"{result} failed: {answer}")


def _idle(instance: dg.DagsterInstance, origins: list[tuple[str, str]]) -> bool:
    """No tick of these instigators in progress, and no run queued or running."""
    for origin_id, selector_id in origins:
        ticks = instance.get_ticks(origin_id, selector_id, limit=1)
        if ticks and ticks[0].status == TickStatus.STARTED:
            return False
    return instance.get_runs_count(dg.RunsFilter(statuses=ACTIVE_RUN_STATUSES)) == 0


@contextlib.contextmanager
def automation_paused(deployment: Deployment, timeout: float = 420.0) -> Iterator[None]:
    """Stop the kick-off schedule and the readiness sensor, wait until nothing is running, and
    reset both to their status in code on exit.

    The deployment re-materializes every ready segment every minute (its kick-off cron is
    `* * * * *`); a browser test that reads a partition's rows after launching it by hand, or
    compares the UI with the instance, needs those runs to stop meanwhile. The harness has no
    such switch, so this does what an operator would: the schedule's and sensor's toggles, here
    through the webserver's GraphQL (the mutations the UI's toggles send)."""
    schedule = DEFAULT_ACCOUNT.name("match_all_kickoff_schedule")
    sensor = DEFAULT_ACCOUNT.name("match_all_readiness_sensor")
    schedule_id = _instigator_state_id(deployment, "schedule", schedule)
    sensor_id = _instigator_state_id(deployment, "sensor", sensor)
    stopped: list[str] = []
    try:
        _mutate(
            deployment,
            "mutation($id: String!) { stopRunningSchedule(id: $id) { __typename ... on PythonError { message } } }",
            {"id": schedule_id},
            "stopRunningSchedule",
        )
        stopped.append(schedule)
        _mutate(
            deployment,
            "mutation($id: String!) { stopSensor(id: $id) { __typename ... on PythonError { message } } }",
            {"id": sensor_id},
            "stopSensor",
        )
        stopped.append(sensor)
        with deployment.instance() as instance:
            origins = [
                (state.instigator_origin_id, state.selector_id)
                for state in instance.all_instigator_state()
                if state.instigator_name in (schedule, sensor)
            ]
            deployment.wait_for(
                lambda: _idle(instance, origins),
                timeout=timeout,
                what="the queue to drain after stopping the kick-off schedule and the readiness sensor",
            )
        yield
    finally:
        for name in stopped:
            kind = "schedule" if name == schedule else "sensor"
            _mutate(
                deployment,
                f"mutation($s: {kind.capitalize()}Selector!) {{ reset{kind.capitalize()}({kind}Selector: $s) "
                f"{{ __typename ... on PythonError {{ message }} }} }}",
                {"s": {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, f"{kind}Name": name}},
                f"reset{kind.capitalize()}",
            )
