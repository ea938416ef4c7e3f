"""The API contract: ActiveCampaign's published OpenAPI documents, shipped with the package.

`segment-match-all.openapi.json` is the project's seed document (the result-set endpoint) and
`segments-companion.openapi.json` the other endpoints the project calls, trimmed from the
published Segments reference; both are byte copies of `shared/activecampaign/` (a test keeps
them so). They are the single source of the simulator's parameter rules and of the contract
tests, which validate against `strict_document`.

The published schemas are loose: no `required` lists (but one) and objects open to any
property, so almost any JSON passes them. `strict_document` closes every object and requires
the fields the client relies on (`RELIED_ON`, which a test ties to the client's models), and
turns the sort parameter's enum (with placeholders such as `score<score-id>`) into the grammar
the documents describe in words.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

__all__ = [
    "DOCUMENTS",
    "RELIED_ON",
    "Operation",
    "document",
    "operation",
    "operations",
    "parameter",
    "sort_grammar",
    "sort_is_a_list",
    "strict_document",
]

SEED = "segment-match-all.openapi.json"
COMPANION = "segments-companion.openapi.json"
DOCUMENTS = (SEED, COMPANION)

# What the client's models require, per published schema; nothing else is required of an answer.
# `matchall_dagster_tests/contract/test_contract.py` checks this table against the models both ways.
RELIED_ON: Mapping[str, tuple[str, ...]] = {
    "MatchAllResponseRootDO": ("data",),
    "MatchAllDataDO": ("attributes",),
    "MatchAllAttributeDO": ("is_ready", "run_id", "run_id_start", "segment_id"),
    "PageDO": ("current_page", "last_page", "per_page", "total"),
    "SegmentSummarySuccessRootDO": ("data",),
    "SegmentSummaryDataDO": ("attributes",),
    "SegmentSummaryDO": ("segment_id",),
}

_PLACEHOLDER = re.compile(r"<[^>]+>")
_INTEGER_FORMATS = {"int32": 32, "int64": 64}


@functools.cache
def document(name: str) -> Mapping[str, Any]:
    """One published document, as shipped (read once; do not change what it returns)."""
    if name not in DOCUMENTS:
        raise ValueError(f"no API document {name!r}; the documents are {', '.join(DOCUMENTS)}")
    loaded: dict[str, Any] = json.loads(resources.files(__name__).joinpath(name).read_text(encoding="utf-8"))
    return loaded


@dataclass(frozen=True)
class Operation:
    """One documented operation: where it is and the document that declares it."""

    document: str
    path: str
    method: str
    spec: Mapping[str, Any]

    @property
    def operation_id(self) -> str:
        return str(self.spec.get("operationId", f"{self.method} {self.path}"))


def operations() -> Iterator[Operation]:
    """Every operation of both documents (the result-set endpoint is declared by both)."""
    for name in DOCUMENTS:
        for path, item in document(name)["paths"].items():
            for method, spec in item.items():
                yield Operation(name, path, method.upper(), spec)


def operation(path: str, method: str = "GET") -> list[Operation]:
    """The declarations of one path's operation (one or two documents); empty if undocumented."""
    return [op for op in operations() if op.path == path and op.method == method.upper()]


def parameter(path: str, name: str, method: str = "GET") -> Mapping[str, Any] | None:
    """A query or path parameter's published schema, from the first document that declares it."""
    for op in operation(path, method):
        for param in op.spec.get("parameters", ()):
            if param["name"] == name:
                schema: Mapping[str, Any] = param.get("schema", {})
                return schema
    return None


def sort_is_a_list(path: str) -> bool:
    """Whether `sort` on `path` is a comma-separated list of keys, as the seed document says in words
    of the match-all endpoints, rather than one value of its enum (the audiences' list)."""
    return path.startswith("/api/3/segmentMatch")


@functools.cache
def sort_grammar(path: str) -> str:
    """A regular expression of the `sort` values the documents allow on `path`.

    The documents give an enum of single keys, some with a placeholder (`score<score-id>`,
    `field<custom-field-id>`; the seed document prints them as bare `score` and `field`), and
    say in words that a sort is a comma-separated list of such keys ("last_name,-first_name").
    The union of every document's enum for the path is allowed, a placeholder as digits.
    """
    keys: set[str] = set()
    for op in operation(path):
        for param in op.spec.get("parameters", ()):
            if param["name"] == "sort":
                keys.update(value.lstrip("-") for value in param["schema"].get("enum", ()))
    if not keys:
        raise ValueError(f"the documents give {path} no sort parameter")
    alternatives = sorted(
        (re.escape(_PLACEHOLDER.split(key)[0]) + "[0-9]+" if _PLACEHOLDER.search(key) else re.escape(key))
        for key in keys
    )
    one = f"-?(?:{'|'.join(alternatives)})"
    return f"^{one}(?:,{one})*$"


@functools.cache
def _strict(name: str) -> str:
    strict = copy.deepcopy(dict(document(name)))
    for schema_name, schema in strict["components"]["schemas"].items():
        if schema.get("type") == "object":
            schema["additionalProperties"] = False
            required = set(schema.get("required", ())) | set(RELIED_ON.get(schema_name, ()))
            if required:
                schema["required"] = sorted(required)
            # OpenAPI's integer formats are ranges that JSON Schema validators do not know.
            for prop in schema.get("properties", {}).values():
                bits = _INTEGER_FORMATS.get(prop.get("format", "")) if prop.get("type") == "integer" else None
                if bits:
                    prop.setdefault("minimum", -(2 ** (bits - 1)))
                    prop.setdefault("maximum", 2 ** (bits - 1) - 1)
    for path, item in strict["paths"].items():
        for spec in item.values():
            for param in spec.get("parameters", ()):
                schema = param.get("schema", {})
                # The documents write integer defaults as strings ("1", "20").
                if schema.get("type") == "integer" and isinstance(schema.get("default"), str):
                    schema["default"] = int(schema["default"])
                if param["name"] == "sort" and "enum" in schema and sort_is_a_list(path):
                    del schema["enum"]
                    schema["pattern"] = sort_grammar(path)
    return json.dumps(strict)


def strict_document(name: str) -> dict[str, Any]:
    """The document with every object closed and the fields the client relies on required.

    Also: integer defaults written as strings become integers, `int32`/`int64` formats become
    bounds, and the match-all sort enum becomes its grammar (`sort_grammar`).

    Derived here from the published text, so that it follows the documents; a fresh copy each call.
    """
    loaded: dict[str, Any] = json.loads(_strict(name))
    return loaded
