"""`MATCHALL_STORE`: the URL that chooses the engine and where, its errors, and a prefixed account's own store."""

from __future__ import annotations

from pathlib import Path

import pytest

from matchall_dagster.storage.store import StoreUrl, open_store

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    ("text", "kind", "location", "schema"),
    [
        ("duckdb:///data/matchall.duckdb", "duckdb", "/data/matchall.duckdb", "main"),
        ("/data/matchall.duckdb", "duckdb", "/data/matchall.duckdb", "main"),
        ("  DuckDB:///data/m.duckdb ", "duckdb", "/data/m.duckdb", "main"),
        ("postgresql://dagster@db:5432/matchall", "postgresql", "postgresql://dagster@db:5432/matchall", "matchall"),
        ("postgres://dagster@db/matchall?schema=eu", "postgresql", "postgresql://dagster@db/matchall", "eu"),
        (
            "postgresql://dagster@db/matchall?sslmode=require&schema=_x1",
            "postgresql",
            "postgresql://dagster@db/matchall?sslmode=require",
            "_x1",
        ),
    ],
)
def test_a_store_url_names_the_engine_and_where(text: str, kind: str, location: str, schema: str) -> None:
    url = StoreUrl.parse(text)
    assert (url.kind, url.location, url.schema) == (kind, location, schema)
    assert StoreUrl.parse(str(url)) == url  # what logs and metadata show reads back as the same store
    assert open_store(text).kind == kind


def test_a_relative_duckdb_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for text in ("duckdb://data/m.duckdb", "data/m.duckdb"):
        url = StoreUrl.parse(text)
        assert url.location == str(tmp_path / "data" / "m.duckdb")
        assert StoreUrl.parse(str(url)) == url


def test_table_names_are_database_schema_table() -> None:
    assert StoreUrl.parse("/data/matchall.duckdb").table_name("segment_matches") == "matchall.main.segment_matches"
    pg = StoreUrl.parse("postgresql://dagster@db:5432/members?schema=eu")
    assert pg.table_name("segment_matches") == "members.eu.segment_matches"


def test_a_prefixed_account_gets_its_own_file_or_schema() -> None:
    duck = StoreUrl.parse("duckdb:///data/matchall.duckdb")
    assert duck.for_account(()) == duck
    assert duck.for_account(("eu",)).location == "/data/matchall_eu.duckdb"
    assert duck.for_account(("eu", "b2b")).location == "/data/matchall_eu_b2b.duckdb"
    pg = StoreUrl.parse("postgresql://dagster@db/matchall?schema=members")
    assert pg.for_account(()) == pg
    eu = pg.for_account(("EU",))
    assert (eu.kind, eu.location, eu.schema) == ("postgresql", pg.location, "members_eu")
    assert StoreUrl.parse(str(eu)) == eu
    assert StoreUrl.parse(str(duck.for_account(("eu",)))) == duck.for_account(("eu",))


@pytest.mark.parametrize(
    "text",
    [
        f"postgresql://dagster:{SECRET}@db:5432/matchall",
        f"postgres://dagster:{SECRET}@db/matchall?schema=eu",
        f"postgresql://dagster@db/matchall?password={SECRET}",
    ],
)
def test_a_password_in_the_url_is_refused_without_showing_it(text: str) -> None:
    with pytest.raises(ValueError, match="PGPASSWORD") as refused:
        StoreUrl.parse(text)
    assert SECRET not in str(refused.value)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("duckdb://", "names no DuckDB file"),
        ("mysql://root@db/matchall", "not one this project keeps"),
        ("sqlite:///m.db", "not one this project keeps"),
        ("postgresql://db", "names no host or database"),
        ("postgresql:///matchall", "names no host or database"),
        ("postgresql://dagster@db/matchall?schema=eu-west", "not a plain name"),
        ("postgresql://dagster@db/matchall?schema=1eu", "not a plain name"),
        ("postgresql://dagster@db/matchall?schema=x;drop%20schema%20public", "not a plain name"),
        (f"postgresql://dagster@db/matchall?schema={'a' * 64}", "not a plain name"),
    ],
)
def test_a_store_that_cannot_be_used_is_refused_with_what_to_write(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        StoreUrl.parse(text)
