"""The contract both ways round: the simulator answers what the published documents say, and the
client's models read what they publish and nothing else.

- schemathesis drives every documented operation of both documents against the simulator, on a
  real segment and run and on random ids, in positive and negative modes, with every check on,
  against the strict form (`contract.strict_document`);
- the simulator's answers in the main scenarios are validated with jsonschema_rs (and every test
  that uses `serve_simulator` does the same at teardown, see conftest.py);
- the published examples and bodies built from each response schema are parsed by the models;
- `contract.RELIED_ON` and the models' required fields agree, and the models read only published
  properties;
- the simulator serves no API path the documents lack, and ships the documents byte for byte;
- drift tests show that each of these checks can fail.
"""

from __future__ import annotations

import json
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import replace
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import schemathesis
from pydantic import BaseModel
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from starlette.routing import Route

from matchall_dagster import InvalidResponseError, RunState, contract
from matchall_dagster.api import models
from matchall_dagster.simulator import DEFAULT_TOKEN, Faults, SimAccount, SimSegment, Simulator, SimulatorConfig
from matchall_dagster.simulator import SimulatorServer as Server
from matchall_dagster.simulator.app import Answer
from matchall_dagster_tests.conftest import UUID_SEGMENT, ServeSimulator, make_account
from matchall_dagster_tests.strict import StrictAnswers, validator, violations

AUTH = {"Api-Token": DEFAULT_TOKEN}
SHARED = Path(__file__).resolve().parents[3] / "shared" / "activecampaign"
INT32 = range(-(2**31), 2**31)

# -- 1. schemathesis over every operation of both documents ------------------------------------

CONFORMANCE_SEED = 11
# Schemathesis fixes path parameters when it collects the tests, before any fixture runs, so the
# run the fixture starts must have an id known in advance: a fresh `Simulator` draws its first run
# id from `random.Random(seed)`. The fixture asserts this prediction.
CONFORMANCE_RUN_ID = str(uuid.UUID(int=random.Random(CONFORMANCE_SEED).getrandbits(128), version=4))


def _read_as_the_simulator_does(url: str) -> dict[str, str]:
    """The query as the simulator reads it: Starlette keeps the last of repeated values."""
    return {name: values[-1] for name, values in parse_qs(urlsplit(url).query, keep_blank_values=True).items()}


def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Keep every check failure except one known, pinned divergence from the documents:

    - ST202 (schema-valid request rejected) when a `page`/`page_size` outside int32 got a 400: the
      documents give the match-all endpoints' integers no bounds but echo them in PageDO's int32
      fields, so no answer could conform; the simulator's 400 (on every endpoint, alike) is pinned
      by test_simulator.py's `test_integers_beyond_int32_are_refused`.
    """
    sent = _read_as_the_simulator_does(str(response.request.url))
    if failure.code == "ST202" and response.status_code == 400:
        return not any(
            re.fullmatch(r"-?[0-9]+", sent.get(name, "")) and int(sent[name]) not in INT32
            for name in ("page", "page_size")
        )
    return True


def _schema(document: str, **parameters: str) -> Any:
    # An explicit config: no schemathesis.toml found from the working directory may change the test.
    schema = schemathesis.openapi.from_dict(contract.strict_document(document), config=SchemathesisConfig())
    schema.config.update(headers=dict(AUTH), parameters=parameters or None)
    schema.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=150, deterministic=True, database="none"
    )
    schema.config.phases.update(phases=["examples", "coverage", "fuzzing"])
    # Every check stays on (4.32.5, 14 checks). The coverage phase's POST, PUT, TRACE, ... probes
    # get Starlette's 405 with an Allow header, which conforms; the companion's Api_Key scheme
    # makes ignored_auth send requests without the token, which get the 403 it expects.
    schema.hook(filter_failure)
    return schema


REAL = {"path.segmentId": UUID_SEGMENT, "path.runId": CONFORMANCE_RUN_ID}
# Generated calls on a real segment and the real, ready run of the fixture: 200 bodies are full pages
# and summaries. With generated ids every well-formed request is a 404, whose body must conform too.
seed_real, seed_random = _schema(contract.SEED, **REAL), _schema(contract.SEED)
companion_real, companion_random = _schema(contract.COMPANION, **REAL), _schema(contract.COMPANION)
_RAN: set[str] = set()


class Conformance:
    """The module's server, with every answer counted by operation and status and validated."""

    def __init__(self) -> None:
        self.strict = StrictAnswers()
        self.met: Counter[tuple[str, int]] = Counter()
        self.simulator = Simulator(
            make_account(),
            SimulatorConfig(requests_per_second=0, ready_after=0, seed=CONFORMANCE_SEED),
            on_answer=self._answered,
        )

    def _answered(self, answer: Answer) -> None:
        self.met[answer.path, answer.status] += 1
        self.strict(answer)


@pytest.fixture(scope="module")
def conformance() -> Iterator[tuple[Conformance, str]]:
    served = Conformance()
    segment = served.simulator.account.segment(UUID_SEGMENT)
    assert segment is not None
    run = served.simulator.start_run(segment, "id")
    assert run.run_id == CONFORMANCE_RUN_ID, "the simulator no longer draws its first run id from Random(seed)"
    with Server(served.simulator) as server:
        yield served, server.url


def _check_real(case: schemathesis.Case[Any], url: str) -> None:
    response = case.call_and_validate(base_url=url)
    if response.status_code != 200:
        return
    item = response.json()["data"]
    if case.operation.path.startswith("/api/3/audiences"):
        assert any(summary["attributes"]["segment_id"] == UUID_SEGMENT for summary in item) or case.query
        return
    attributes = item[0]["attributes"]
    assert attributes["segment_id"] == UUID_SEGMENT
    if case.operation.path != "/api/3/segmentMatchAll/{segmentId}":
        # A sort other than the run's re-kicks it; with ready_after=0 it is ready again at once.
        assert attributes["run_id"] == CONFORMANCE_RUN_ID
        assert attributes["is_ready"] is True
        assert attributes["page"]["total"] == 12_345


@seed_real.parametrize()  # type: ignore[untyped-decorator]
def test_a_real_runs_answers_conform_to_the_seed_document(
    case: schemathesis.Case[Any], conformance: tuple[Conformance, str]
) -> None:
    _check_real(case, conformance[1])
    _RAN.add("seed real")


@seed_random.parametrize()  # type: ignore[untyped-decorator]
def test_unknown_ids_answers_conform_to_the_seed_document(
    case: schemathesis.Case[Any], conformance: tuple[Conformance, str]
) -> None:
    assert case.call_and_validate(base_url=conformance[1]).status_code != 200
    _RAN.add("seed random")


@companion_real.parametrize()  # type: ignore[untyped-decorator]
def test_a_real_segments_answers_conform_to_the_companion_document(
    case: schemathesis.Case[Any], conformance: tuple[Conformance, str]
) -> None:
    _check_real(case, conformance[1])
    _RAN.add("companion real")


@companion_random.parametrize()  # type: ignore[untyped-decorator]
def test_unknown_ids_answers_conform_to_the_companion_document(
    case: schemathesis.Case[Any], conformance: tuple[Conformance, str]
) -> None:
    response = case.call_and_validate(base_url=conformance[1])
    # The list has no id, and the document's example id of a summary is the account's UUID segment.
    real = case.operation.path == "/api/3/audiences" or (case.path_parameters or {}).get("segmentId") == UUID_SEGMENT
    assert response.status_code != 200 or real
    _RAN.add("companion random")


def test_the_conformance_runs_met_every_operation_and_status_and_kept_the_strict_form(
    conformance: tuple[Conformance, str],
) -> None:
    if len(_RAN) != 4:
        pytest.skip("needs the four schemathesis tests above to have run first")
    served = conformance[0]
    met = served.met
    for op in contract.operations():
        # Every operation met a success, a refused query (if it has one) and an unknown id (if it has one).
        where = {param["in"] for param in op.spec["parameters"]}
        wanted = {200} | ({400} if "query" in where else set()) | ({404} if "path" in where else set())
        assert all(met[op.path, status] >= 5 for status in wanted), (op.path, sorted(met.items()))
    assert {status for _, status in met} <= {200, 400, 403, 404}, met
    served.strict.check()  # and jsonschema_rs agrees with schemathesis on every answer
    print(f"\nschemathesis: {sum(met.values())} answers, by operation and status: {sorted(met.items())}")


# -- 2. the simulator's answers in the main scenarios, validated ------------------------------------


def _get(server: Server, path: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{server.url}{path}", params=params, headers=AUTH, timeout=10)


def test_every_answer_shape_of_the_main_scenarios_keeps_the_strict_form(serve_simulator: ServeSimulator) -> None:
    """The shapes generation rarely meets: running, failed, empty, past the last page, a re-kick,
    summaries before and after runs, errors; each answer validated as it is given."""
    many = SimAccount([*make_account().segments, *(SimSegment(f"s{i}", f"Seg {i}", i * 7) for i in range(60))], seed=3)
    server = serve_simulator(many, ready_after=30.0, requests_per_second=1_000)
    strict, conftests = StrictAnswers(), server.simulator.on_answer
    assert conftests is not None

    def both(answer: Answer) -> None:
        strict(answer)
        conftests(answer)

    server.simulator.on_answer = both

    def attributes(path: str, **params: Any) -> dict[str, Any]:
        response = _get(server, path, **params)
        assert response.status_code == 200, response.text
        found: dict[str, Any] = response.json()["data"][0]["attributes"]
        return found

    running, failing, empty = (
        attributes(f"/api/3/segmentMatchAll/{s}", instant="")["run_id"] for s in ("1", "77", "100")
    )
    assert "run_id_end" not in attributes(f"/api/3/segmentMatchAll/1/{running}")
    server.simulator.advance_clock(31)
    assert "run_id_end" in attributes(f"/api/3/segmentMatchAll/77/{failing}")
    assert attributes(f"/api/3/segmentMatchAll/100/{empty}")["page"]["total"] == 0
    assert attributes(f"/api/3/segmentMatchAll/1/{running}", page=2, page_size=10_000)["matches"] == []
    assert attributes(f"/api/3/segmentMatchAll/1/{running}", sort="-score2")["is_ready"] is False
    assert attributes(f"/api/3/segmentMatchSome/1/{running}")["is_ready"] is False
    for page in (1, 2, 3, 4):
        assert _get(server, "/api/3/audiences", page=page, page_size=25).status_code == 200
    for sort in ("name", "-recent", "last_total", "-last_active_total", "updated_date"):
        assert _get(server, "/api/3/audiences", sort=sort, search="seg").status_code == 200
    assert _get(server, "/api/3/audiences/1").status_code == 200
    refused: list[tuple[str, dict[str, Any], int]] = [
        ("/api/3/segmentMatchAll/1", {"instant": "yes"}, 400),
        ("/api/3/segmentMatchAll/1", {"sort": "name"}, 400),
        (f"/api/3/segmentMatchAll/1/{running}", {"page_size": 10_001}, 400),
        (f"/api/3/segmentMatchAll/1/{uuid.uuid4()}", {}, 404),
        (f"/api/3/segmentMatchSome/1/{uuid.uuid4()}", {}, 404),
        ("/api/3/audiences", {"sort": "-id"}, 400),
        ("/api/3/audiences", {"page": 0}, 400),
        ("/api/3/audiences", {"search": "no such name"}, 404),
        ("/api/3/audiences/404", {}, 404),
    ]
    for path, params, status in refused:
        assert _get(server, path, **params).status_code == status, (path, params)
    assert httpx.get(f"{server.url}/api/3/audiences", timeout=10).status_code == 403
    server.simulator.set_faults(Faults(burst_429_rate=1.0, burst_429_length=1))
    assert _get(server, "/api/3/audiences").status_code == 429
    assert strict.answers == 30
    strict.check()


def test_summaries_vary_on_what_the_documents_leave_open(serve_simulator: ServeSimulator) -> None:
    """Every reading the client must take: integer or float counts, counts absent, alone or with
    last_active_total, a last_total of the latest run; the item id is never the segment id."""
    account = SimAccount([SimSegment(str(i), f"Segment {i}", 100 + i) for i in range(1, 61)], seed=4)
    server = serve_simulator(account)
    ran = [str(i) for i in range(1, 21)]
    runs = {segment_id: _get(server, f"/api/3/segmentMatchAll/{segment_id}").json() for segment_id in ran}
    response = _get(server, "/api/3/audiences", page_size=100, sort="name")
    items = response.json()["data"]
    assert len(items) == 60
    shapes: Counter[str] = Counter()
    for item in items:
        attributes = item["attributes"]
        assert item["id"] != attributes["segment_id"]
        assert attributes["created_date"] <= attributes["updated_date"]
        counts = attributes.get("counts")
        if attributes["segment_id"] in ran:
            run = runs[attributes["segment_id"]]["data"][0]["attributes"]
            last = counts["last_total"]
            assert (last["run_id"], last["run_id_start"], last["run_id_end"]) == (
                run["run_id"],
                run["run_id_start"],
                run["run_id_end"],
            )
            assert last["count"] == run["page"]["total"]
            shapes["ran, active too" if "last_active_total" in counts else "ran"] += 1
        else:
            shapes["no counts" if counts is None else "+".join(sorted(counts))] += 1
            assert counts is None or set(counts["last_total"]) == {"count", "last_total_updated"}
        for count in (counts or {}).values():
            shapes[type(count["count"]).__name__] += 1
    assert set(shapes) == {
        "ran",
        "ran, active too",
        "no counts",
        "last_total",
        "last_active_total+last_total",
        "int",
        "float",
    }
    types = {Simulator(SimAccount([], seed=seed))._summary(SimSegment("1", "x", 1))["type"] for seed in range(12)}
    assert len(types) > 1  # the item type is not published: accounts differ


def test_a_10000_id_page_is_judged_whole_and_one_more_id_breaks_it(capsys: pytest.CaptureFixture[str]) -> None:
    """The strict form holds matches' maxItems; the page's validation cost is printed (what every
    `serve_simulator` test pays on each page it reads)."""
    simulator = Simulator(make_account(), SimulatorConfig(requests_per_second=0, ready_after=0))
    segment = simulator.account.segment("1000000")
    assert segment is not None
    run = simulator.start_run(segment, "-email")
    body = json.dumps(simulator._run_body(run, 37, 10_000), separators=(",", ":")).encode()
    answer = Answer("/api/3/segmentMatchAll/{segmentId}/{runId}", "GET", 200, body, "application/json")
    timer = time.perf_counter
    began = timer()
    for _ in range(20):
        assert violations(answer) == []
    cost_ms = (timer() - began) / 20 * 1_000
    with capsys.disabled():
        print(f"\nvalidating a 10,000-id page ({len(body):,} bytes) against both documents: {cost_ms:.2f} ms")
    more = body.replace(b'"matches":[', b'"matches":[1,', 1)
    (too_many,) = {found.split(" at ")[1] for found in violations(replace(answer, body=more))}
    assert too_many.startswith("/data/0/attributes/matches: ")


# -- 3. published examples and bodies built from the schemas, parsed by the models --------------------


def _examples() -> list[Any]:
    found = []
    for op in contract.operations():
        for status, response in op.spec.get("responses", {}).items():
            for media in response.get("content", {}).values():
                schema = media["schema"]["$ref"].rsplit("/", 1)[-1]
                for name, example in media.get("examples", {}).items():
                    found.append(
                        pytest.param(op.document, schema, example["value"], id=f"{op.operation_id}-{status}-{name}")
                    )
                if "example" in media:
                    found.append(pytest.param(op.document, schema, media["example"], id=f"{op.operation_id}-{status}"))
    return found


EXAMPLES = _examples()


def test_every_published_example_is_collected() -> None:
    """Both documents give the result-set's two examples; the companion gives match-some the same two."""
    bodies = [json.dumps(param.values[2], sort_keys=True) for param in EXAMPLES]
    assert len(bodies) == 6
    assert len(set(bodies)) == 2


def _when(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _assert_run_reads(attributes: Mapping[str, Any], run: models.MatchAllRun) -> None:
    """A parsed run holds every published attribute of the body it was parsed from."""
    for name, value in attributes.items():
        parsed = getattr(run, name)
        if name in ("run_id_start", "run_id_end", "segment_timestamp"):
            assert parsed == _when(value), name
        elif name == "page":
            assert parsed is not None
            assert parsed.model_dump() == value
        else:
            assert parsed == value, name


def _assert_segment_reads(attributes: Mapping[str, Any], segment: models.Segment) -> None:
    assert segment.id == attributes["segment_id"]
    assert segment.name == attributes.get("name", "")
    for name in ("created_date", "updated_date", "last_used_date"):
        assert getattr(segment, name) == (_when(attributes[name]) if name in attributes else None)
    last = attributes.get("counts", {}).get("last_total")
    if last is None:
        assert segment.last_total is None
        assert segment.last_run is None
        return
    assert segment.last_total == last.get("count")
    assert segment.last_run is not None
    for name, value in last.items():
        parsed = getattr(segment.last_run, name)
        assert parsed == (_when(value) if name != "count" and name != "run_id" else value), name


def _assert_reads(schema: str, body: Any) -> None:
    """The models read a body of `schema` and give back its values."""
    raw = json.dumps(body).encode()
    if schema == "MatchAllResponseRootDO":
        attributes = body["data"][0]["attributes"]
        run = models.parse_run(raw)
        _assert_run_reads(attributes, run)
        expected = (
            RunState.READY
            if attributes["is_ready"]
            else (RunState.FAILED if "run_id_end" in attributes else RunState.RUNNING)
        )
        assert run.state is expected
        record, ids = models.parse_page(raw)
        assert record == run.model_copy(update={"matches": None})
        assert (None if ids is None else ids.tolist()) == attributes.get("matches")
    elif schema == "SegmentSummarySuccessRootDO":
        segments = models.parse_segments(raw)
        assert len(segments) == len(body["data"])
        for item, segment in zip(body["data"], segments, strict=True):
            _assert_segment_reads(item["attributes"], segment)
    else:
        assert schema in ("ErrorResponseRootDO", "SegmentSummaryErrorRootDO")
        details = models.parse_error_details(raw)
        assert [detail.model_dump(exclude_none=True) for detail in details] == [
            {name: value for name, value in error.items() if name != "source"} for error in body.get("errors", [])
        ]


@pytest.mark.parametrize(("document", "schema", "example"), EXAMPLES)
def test_every_published_example_keeps_the_strict_form_and_reads_back(document: str, schema: str, example: Any) -> None:
    assert validator(document, schema).is_valid(example)  # the strict form refuses nothing published
    _assert_reads(schema, example)


_DATE = "2024-01-30T14:56:02.952Z"


def build(document: str, schema: Mapping[str, Any], *, full: bool) -> Any:
    """A body of `schema` from the published document: every property (`full`) or only the
    strict form's required ones; the property's published example where there is one."""
    components = contract.strict_document(document)["components"]["schemas"]
    if "$ref" in schema:
        return build(document, components[schema["$ref"].rsplit("/", 1)[-1]], full=full)
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties", {})
        names = list(properties) if full else schema.get("required", [])
        return {name: build(document, properties[name], full=full) for name in names}
    if kind == "array":
        return [build(document, schema["items"], full=full)]
    if "enum" in schema:
        return schema["enum"][0]
    if "example" in schema:
        return schema["example"]
    if kind == "string":
        return _DATE if schema.get("format") == "date-time" else "text-1"
    return {"integer": 7, "number": 1500.0, "boolean": True}[str(kind)]


def _response_schemas() -> list[Any]:
    seen = set()
    for op in contract.operations():
        for response in op.spec.get("responses", {}).values():
            for media in response.get("content", {}).values():
                seen.add((op.document, media["schema"]["$ref"].rsplit("/", 1)[-1]))
    return [pytest.param(document, schema, id=f"{schema}-{document}") for document, schema in sorted(seen)]


@pytest.mark.parametrize("full", [False, True], ids=["required only", "every property"])
@pytest.mark.parametrize(("document", "schema"), _response_schemas())
def test_a_body_built_from_each_response_schema_keeps_the_strict_form_and_reads_back(
    document: str, schema: str, full: bool
) -> None:
    body = build(document, {"$ref": f"#/components/schemas/{schema}"}, full=full)
    errors = [error.message for error in validator(document, schema).iter_errors(body)]
    assert not errors, body
    _assert_reads(schema, body)


def test_the_minimal_bodies_hold_exactly_what_the_client_relies_on() -> None:
    run = build(contract.SEED, {"$ref": "#/components/schemas/MatchAllResponseRootDO"}, full=False)
    assert set(run["data"][0]["attributes"]) == {"is_ready", "run_id", "run_id_start", "segment_id"}
    summary = build(contract.COMPANION, {"$ref": "#/components/schemas/SegmentSummarySuccessRootDO"}, full=False)
    assert summary == {"data": [{"attributes": {"segment_id": "d2c5a14a-771d-4cc0-a126-3513a5201940"}}]}
    full = build(contract.COMPANION, {"$ref": "#/components/schemas/SegmentSummarySuccessRootDO"}, full=True)
    (segment,) = models.parse_segments(json.dumps(full).encode())
    assert segment.last_total == 1500
    assert segment.last_run is not None
    assert segment.last_run.run_id == "744390a5-208e-4c3d-b709-b3c3ea6e5948"


# -- 4. RELIED_ON against the models, both ways ---------------------------------------------------

PAIRS: dict[str, type[BaseModel]] = {
    "MatchAllResponseRootDO": models._MatchAllEnvelope,
    "MatchAllDataDO": models._MatchAllData,
    "MatchAllAttributeDO": models.MatchAllRun,
    "PageDO": models.PageInfo,
    "SegmentSummarySuccessRootDO": models._SegmentsEnvelope,
    "SegmentSummaryDataDO": models._SegmentItem,
    "SegmentSummaryDO": models._SegmentAttributes,
    "SegmentSummaryCountsDO": models._SegmentCounts,
    "SegmentSummaryCountDO": models.SegmentCount,
}


def _declaring(schema: str) -> list[str]:
    return [name for name in contract.DOCUMENTS if schema in contract.document(name)["components"]["schemas"]]


@pytest.mark.parametrize(("schema", "model"), PAIRS.items(), ids=list(PAIRS))
def test_a_models_required_fields_are_the_strict_forms_and_it_reads_only_published_properties(
    schema: str, model: type[BaseModel]
) -> None:
    required = {name for name, field in model.model_fields.items() if field.is_required()}
    assert _declaring(schema)
    for document in _declaring(schema):
        published = contract.document(document)["components"]["schemas"][schema]
        strict = contract.strict_document(document)["components"]["schemas"][schema]
        assert set(strict.get("required", ())) == required, document
        assert set(model.model_fields) <= set(published["properties"]), f"{model.__name__} reads unpublished fields"


def test_every_schema_the_client_relies_on_has_its_model() -> None:
    assert set(contract.RELIED_ON) <= set(PAIRS)


# -- 5. the simulator serves the documents' paths, and ships the documents ---------------------------


def served_api_routes(simulator: Simulator) -> set[tuple[str, str]]:
    """(path, method) of every API route of the app; HEAD comes with GET in Starlette."""
    return {
        (route.path, method)
        for route in simulator.app.routes
        if isinstance(route, Route) and route.path.startswith("/api/")
        for method in (route.methods or set()) - {"HEAD"}
    }


def undocumented(simulator: Simulator) -> set[tuple[str, str]]:
    return served_api_routes(simulator) - {(op.path, op.method) for op in contract.operations()}


def test_the_simulator_serves_every_documented_operation_and_no_other_api_path() -> None:
    simulator = Simulator(make_account())
    assert undocumented(simulator) == set()
    assert served_api_routes(simulator) == {(op.path, op.method) for op in contract.operations()}
    assert all(not isinstance(r, Route) or r.path.startswith(("/api/3/", "/_simulator/")) for r in simulator.app.routes)


@pytest.mark.parametrize("name", contract.DOCUMENTS)
def test_the_packaged_documents_are_the_shared_ones(name: str) -> None:
    if not SHARED.is_dir():
        pytest.skip(f"no {SHARED} next to the repository")
    packaged = resources.files("matchall_dagster.contract").joinpath(name).read_bytes()
    assert packaged == (SHARED / name).read_bytes(), f"matchall_dagster/contract/{name} drifted from {SHARED}"


def test_the_simulator_serves_both_documents_under_its_own_prefix(serve_simulator: ServeSimulator) -> None:
    server = serve_simulator()
    index = httpx.get(f"{server.url}/_simulator/openapi", timeout=10).json()
    assert index == {"documents": [f"/_simulator/openapi/{name}" for name in contract.DOCUMENTS]}
    for name in contract.DOCUMENTS:
        response = httpx.get(f"{server.url}/_simulator/openapi/{name}", timeout=10)
        assert response.status_code == 200
        assert response.content == resources.files("matchall_dagster.contract").joinpath(name).read_bytes()
    assert httpx.get(f"{server.url}/_simulator/openapi/nope.json", timeout=10).status_code == 404
    assert httpx.get(f"{server.url}/openapi.json", timeout=10).status_code == 404  # moved off the API's paths


# -- 6. drift: each check above can fail ---------------------------------------------------------

READY_PAGE: dict[str, Any] = {
    "data": [
        {
            "id": "r-1",
            "type": "matchAll",
            "attributes": {
                "run_id": "r",
                "run_id_start": _DATE,
                "is_ready": True,
                "segment_id": "1",
                "matches": [3, 1],
                "page": {"current_page": 1, "last_page": 1, "per_page": 20, "total": 2},
            },
        }
    ]
}
SUMMARY: dict[str, Any] = {"data": [{"id": "9", "type": "audience", "attributes": {"segment_id": "1", "name": "A"}}]}


def _with(body: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    changed: dict[str, Any] = json.loads(json.dumps(body))
    target: Any = changed
    for part in path[:-1]:
        target = target[part]
    if value is None:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return changed


@pytest.mark.parametrize(
    ("document", "schema", "body"),
    [
        (
            contract.COMPANION,
            "SegmentSummarySuccessRootDO",
            {"audiences": [{"id": "1", "name": "A", "last_total": 3}], "meta": {"total": "1"}},
        ),
        (
            contract.COMPANION,
            "SegmentSummarySuccessRootDO",
            _with(SUMMARY, ("data", 0, "attributes", "segment_id"), None),
        ),
        (contract.COMPANION, "SegmentSummarySuccessRootDO", _with(SUMMARY, ("data", 0, "attributes", "size"), 3)),
        (
            contract.COMPANION,
            "SegmentSummarySuccessRootDO",
            _with(SUMMARY, ("data", 0, "attributes", "category"), "list"),
        ),
        (
            contract.COMPANION,
            "SegmentSummarySuccessRootDO",
            _with(SUMMARY, ("data", 0, "attributes", "updated_date"), "today"),
        ),
        (contract.SEED, "MatchAllResponseRootDO", _with(READY_PAGE, ("data", 0, "attributes", "extra"), 1)),
        (contract.SEED, "MatchAllResponseRootDO", _with(READY_PAGE, ("data", 0, "attributes", "page", "total"), 2**31)),
        (
            contract.SEED,
            "MatchAllResponseRootDO",
            _with(READY_PAGE, ("data", 0, "attributes", "page", "per_page"), None),
        ),
        (contract.SEED, "MatchAllResponseRootDO", _with(READY_PAGE, ("data", 0, "type"), "matchSome")),
        (contract.COMPANION, "ErrorResponseRootDO", {"errors": [{"status": "404", "title": "Not Found"}]}),
    ],
    ids=[
        "the old invented list",
        "a summary without segment_id",
        "a summary with an extra property",
        "a category off the enum",
        "a date that is no date-time",
        "a page with an extra property",
        "a total beyond int32",
        "a page without per_page",
        "a data item of another type",
        "a companion error with a title",
    ],
)
def test_the_strict_form_refuses_what_the_documents_do_not_publish(document: str, schema: str, body: Any) -> None:
    assert not validator(document, schema).is_valid(body)


def test_the_published_form_alone_would_take_the_old_invented_list() -> None:
    """Why the strict form exists: as published, the schemas take almost any object."""
    import jsonschema_rs

    published = contract.document(contract.COMPANION)
    root = {"$ref": "#/components/schemas/SegmentSummarySuccessRootDO", "components": published["components"]}
    old = {"audiences": [{"id": "1", "name": "A", "last_total": 3}], "meta": {"total": "1"}}
    assert jsonschema_rs.validator_for(root).is_valid(old)
    assert not validator(contract.COMPANION, "SegmentSummarySuccessRootDO").is_valid(old)
    assert validator(contract.SEED, "ErrorResponseRootDO").is_valid({"errors": [{"title": "Not Found"}]})


def test_the_models_refuse_a_summary_without_segment_id_naming_the_field() -> None:
    with pytest.raises(InvalidResponseError, match=r"data\.0\.attributes\.segment_id"):
        models.parse_segments(json.dumps(_with(SUMMARY, ("data", 0, "attributes", "segment_id"), None)).encode())


class _InventedList(Simulator):
    """A simulator whose summaries hold what this project once invented: the segment id as the
    item's id, `last_total` beside the attributes."""

    def _summary(self, segment: SimSegment) -> dict[str, Any]:
        summary = super()._summary(segment)
        del summary["attributes"]["segment_id"]
        return {**summary, "id": segment.id, "last_total": segment.size}


def test_the_answer_hook_catches_a_simulator_that_breaks_the_contract() -> None:
    strict = StrictAnswers(shown=1)
    simulator = _InventedList(make_account(), SimulatorConfig(requests_per_second=0), on_answer=strict)
    with Server(simulator) as server:
        assert _get(server, "/api/3/audiences").status_code == 200
        assert _get(server, "/api/3/segmentMatchAll/404").status_code == 404  # conforms
        simulator.set_faults(Faults(truncate_rate=1.0))
        assert _get(server, "/api/3/audiences").status_code == 200  # spoiled on purpose: not judged
    report = strict.report()
    assert report is not None
    # 12 summaries, each without segment_id and with an unpublished property: the first one shown.
    assert report.startswith("24 violation(s) of the documents' strict form in 3 API answers:")
    assert (
        "GET /api/3/audiences 200: segments-companion.openapi.json#SegmentSummarySuccessRootDO "
        'at /data/0/attributes: "segment_id" is a required property'
    ) in report
    assert report.endswith("... and 23 more")
    with pytest.raises(AssertionError, match="violation"):
        strict.check()


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        (Answer("/api/3/contacts", "GET", 200, b"{}", "application/json"), "no document declares this operation"),
        (Answer("/api/3/audiences", "GET", 500, b"", None), "no document declares this status"),
        (Answer("/api/3/audiences", "GET", 200, b"<html>", "text/html"), "content type 'text/html'"),
        (Answer("/api/3/audiences", "GET", 200, b'{"data": [', "application/json"), "not JSON"),
        (Answer("/api/3/audiences", "GET", 404, b'{"errors": {}}', "application/json"), "ErrorResponseRootDO"),
    ],
    ids=["undocumented path", "undeclared status", "not JSON by type", "not JSON", "an error of another shape"],
)
def test_the_answer_check_names_each_kind_of_breach(answer: Answer, problem: str) -> None:
    (found,) = violations(answer)
    assert problem in found


def test_an_extra_api_route_is_caught() -> None:
    simulator = Simulator(make_account())
    simulator.app.router.routes.append(Route("/api/3/contacts", lambda request: None, methods=["GET"]))
    assert undocumented(simulator) == {("/api/3/contacts", "GET")}
