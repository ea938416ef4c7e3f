"""The simulator's answers against the strict form of the published documents (jsonschema_rs).

`StrictAnswers` is an `on_answer` hook: `serve_simulator` (conftest.py) gives one to every
simulator it starts and fails the test at teardown if any API answer broke the contract.
"""

from __future__ import annotations

import functools
import json
import threading
from typing import Any

import jsonschema_rs

from matchall_dagster import contract
from matchall_dagster.simulator.app import Answer

__all__ = ["StrictAnswers", "validator", "violations"]

# Statuses the documents do not declare but API.md does: the account limit.
_UNDECLARED_BUT_DOCUMENTED = frozenset({429})


@functools.cache
def validator(document: str, schema: str) -> jsonschema_rs.Validator:
    """A validator of one schema of the strict form of `document`, formats (date-time) included."""
    strict = contract.strict_document(document)
    root = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": f"#/components/schemas/{schema}",
        "components": strict["components"],
    }
    return jsonschema_rs.validator_for(root, validate_formats=True)


def _body_schemas(answer: Answer) -> tuple[list[tuple[str, str]], bool]:
    """(document, schema) of each declaration of the answer's body, and whether any document
    declares its status at all."""
    schemas: list[tuple[str, str]] = []
    declared = False
    for op in contract.operation(answer.path, answer.method):
        response = op.spec.get("responses", {}).get(str(answer.status))
        if response is None:
            continue
        declared = True
        ref = response.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref")
        if ref:
            schemas.append((op.document, ref.rsplit("/", 1)[-1]))
    return schemas, declared


def violations(answer: Answer) -> list[str]:
    """How an answer breaks the strict form of every document that declares its operation.

    An answer whose status declares a body must be JSON of that body's schema; one whose status
    declares none (the companion's 401/403/404) or is the account limit's 429 may be empty, or
    else must be the documents' ErrorResponseRootDO: the simulator's errors keep one shape. An
    injected fault's answer breaks the contract on purpose and is not judged.
    """
    where = f"{answer.method} {answer.path} {answer.status}"
    if answer.fault is not None:
        return []
    if not contract.operation(answer.path, answer.method):
        return [f"{where}: no document declares this operation"]
    schemas, declared = _body_schemas(answer)
    if not declared and answer.status not in _UNDECLARED_BUT_DOCUMENTED:
        return [f"{where}: no document declares this status"]
    if not schemas:
        if not answer.body:
            return []
        schemas = [(op.document, "ErrorResponseRootDO") for op in contract.operation(answer.path, answer.method)]
    if not (answer.content_type or "").startswith("application/json"):
        return [f"{where}: content type {answer.content_type!r}, not application/json"]
    try:
        instance: Any = json.loads(answer.body)
    except ValueError as exc:
        return [f"{where}: not JSON ({exc})"]
    found = []
    for document, schema in schemas:
        for error in validator(document, schema).iter_errors(instance):
            pointer = "/" + "/".join(str(part) for part in error.instance_path)
            found.append(f"{where}: {document}#{schema} at {pointer}: {error.message[:200]}")
    return found


class StrictAnswers:
    """An `on_answer` hook that validates every answer and keeps what broke the contract.

    It runs on the simulator's thread and never raises there (an exception would become the
    answer); `check` raises, with the first few violations, in the test's thread.
    """

    def __init__(self, shown: int = 5) -> None:
        self.shown = shown
        self.answers = 0
        self.broken: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, answer: Answer) -> None:
        try:
            found = violations(answer)
        except Exception as exc:  # reported by `check`, never raised into the server
            found = [f"{answer.method} {answer.path} {answer.status}: the validator failed: {exc!r}"]
        with self._lock:
            self.answers += 1
            self.broken.extend(found)

    def report(self) -> str | None:
        with self._lock:
            if not self.broken:
                return None
            first = "\n  ".join(self.broken[: self.shown])
            more = len(self.broken) - self.shown
            return (
                f"{len(self.broken)} violation(s) of the documents' strict form in {self.answers} API answers:\n  "
                f"{first}" + (f"\n  ... and {more} more" if more > 0 else "")
            )

    def check(self) -> None:
        report = self.report()
        if report is not None:
            raise AssertionError(report)
