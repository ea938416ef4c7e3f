"""What leaves the simulator: the `Answer` an `on_answer` hook sees, and the API's error body."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse


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


def error(
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
    body: dict[str, Any] = {"status": label or str(status), "code": code, "detail": detail}
    if pointer:
        body["source"] = {"pointer": pointer}
    return JSONResponse({"errors": [body]}, status_code=status, headers=headers)
