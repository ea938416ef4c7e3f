"""The one settings object: defaults, parsing, errors that name the variable, read once."""

from __future__ import annotations

from pathlib import Path

import pytest

from matchall_dagster.settings import ConfigurationError, Settings, settings, settings_table, store_url
from matchall_dagster.storage.store import StoreUrl
from matchall_dagster_tests.conftest import set_setting

SECRET = "pg-sekrit-0123456789-ZQX"


def test_the_defaults_hold_without_any_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(f"MATCHALL_{name.upper()}", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    settings.cache_clear()
    current = settings()
    assert (current.segments, current.kickoff_cron, current.max_run_attempts, current.max_change_share) == (
        None,
        "0 6 * * *",
        3,
        0.5,
    )
    assert current.store_url() == StoreUrl("duckdb", str(tmp_path / "matchall.duckdb"))
    assert store_url() == current.store_url()


def test_without_dagster_home_the_store_is_a_file_in_the_working_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MATCHALL_STORE", raising=False)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    settings.cache_clear()
    assert store_url() == StoreUrl("duckdb", str(tmp_path / "matchall.duckdb"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("duckdb:///data/m.duckdb", StoreUrl("duckdb", "/data/m.duckdb")),
        ("/data/m.duckdb", StoreUrl("duckdb", "/data/m.duckdb")),
        ("  /data/m.duckdb  ", StoreUrl("duckdb", "/data/m.duckdb")),
        (
            "postgresql://matchall@db.internal:5433/warehouse",
            StoreUrl("postgresql", "postgresql://matchall@db.internal:5433/warehouse", "matchall"),
        ),
        (
            "postgres://matchall@db.internal/warehouse?schema=members",
            StoreUrl("postgresql", "postgresql://matchall@db.internal/warehouse", "members"),
        ),
        (
            "postgresql://matchall@db.internal/warehouse?sslmode=require&schema=members",
            StoreUrl("postgresql", "postgresql://matchall@db.internal/warehouse?sslmode=require", "members"),
        ),
    ],
    ids=["duckdb url", "bare path", "padded path", "postgresql", "postgresql with schema", "postgresql with options"],
)
def test_the_store_is_a_url_of_either_engine(monkeypatch: pytest.MonkeyPatch, value: str, expected: StoreUrl) -> None:
    set_setting(monkeypatch, "MATCHALL_STORE", value)
    assert store_url() == expected
    # What the settings keep is the canonical form, which parses to the same store.
    assert StoreUrl.parse(str(settings().store)) == expected


def test_a_relative_store_path_is_made_absolute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for value in ("duckdb://data/m.duckdb", "data/m.duckdb"):
        set_setting(monkeypatch, "MATCHALL_STORE", value)
        assert store_url() == StoreUrl("duckdb", str(tmp_path / "data" / "m.duckdb")), value


@pytest.mark.parametrize(
    ("value", "fragments"),
    [
        ("mysql://matchall@db/warehouse", ("is not one this project keeps", "duckdb:///", "postgresql://")),
        ("sqlite:///m.sqlite", ("is not one this project keeps",)),
        ("postgresql://matchall@db.internal", ("names no host or database", "postgresql://USER@HOST:PORT/DATABASE")),
        ("postgresql://matchall@db/warehouse?schema=a-b", ("is not a plain name",)),
        (f"postgresql://matchall:{SECRET}@db.internal:5432/warehouse", ("carries a password", "PGPASSWORD")),
        (f"postgresql://:{SECRET}@db.internal/warehouse", ("carries a password", "PGPASSWORD")),
        (f"postgresql://matchall@db.internal/warehouse?password={SECRET}", ("password", "PGPASSWORD")),
        (f"postgresql://matchall@db.internal/warehouse?sslpassword={SECRET}", ("password",)),
        # Refused for what it lacks, it must not show the password it carries either.
        (f"postgresql:///warehouse?password={SECRET}", ()),
    ],
    ids=[
        "unknown scheme",
        "sqlite",
        "no database",
        "bad schema",
        "password",
        "password without user",
        "password as an option",
        "key password as an option",
        "password as an option, no host",
    ],
)
def test_a_bad_store_is_refused_with_what_to_write_and_never_its_password(
    monkeypatch: pytest.MonkeyPatch, value: str, fragments: tuple[str, ...]
) -> None:
    set_setting(monkeypatch, "MATCHALL_STORE", value)
    with pytest.raises(ConfigurationError) as raised:
        settings()
    message = str(raised.value)
    assert "MATCHALL_STORE: " in message
    for fragment in fragments:
        assert fragment in message
    assert SECRET not in message
    assert SECRET not in repr(raised.value)
    # Nor in what a traceback would chain (the pydantic error holds the input).
    assert raised.value.__cause__ is None
    assert raised.value.__suppress_context__


def test_the_old_duckdb_variable_is_refused_with_its_replacement(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MATCHALL_STORE", raising=False)
    set_setting(monkeypatch, "MATCHALL_DUCKDB_PATH", str(tmp_path / "old.duckdb"))
    with pytest.raises(ConfigurationError) as raised:
        settings()
    message = str(raised.value)
    assert "MATCHALL_DUCKDB_PATH" in message
    assert "MATCHALL_STORE=duckdb:///" in message
    assert "unset MATCHALL_DUCKDB_PATH" in message
    # Refused even beside the new variable: the old one would silently name another file.
    set_setting(monkeypatch, "MATCHALL_STORE", str(tmp_path / "new.duckdb"))
    with pytest.raises(ConfigurationError, match="MATCHALL_DUCKDB_PATH"):
        settings()
    # An empty old variable is as good as unset.
    set_setting(monkeypatch, "MATCHALL_DUCKDB_PATH", "")
    assert store_url() == StoreUrl("duckdb", str(tmp_path / "new.duckdb"))


def test_segment_ids_are_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    set_setting(monkeypatch, "MATCHALL_SEGMENTS", " 1, 42 ,,1ab85f0e-3b5c ")
    assert settings().segments == frozenset({"1", "42", "1ab85f0e-3b5c"})
    set_setting(monkeypatch, "MATCHALL_SEGMENTS", " , ")
    assert settings().segments is None


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("MATCHALL_SEGMENTS", "1,a/b", "'a/b' is not a segment id"),
        ("MATCHALL_SEGMENTS", "1,..", "'..' is not a segment id"),
        ("MATCHALL_KICKOFF_CRON", "every day", "not a cron expression of five fields"),
        ("MATCHALL_MAX_RUN_ATTEMPTS", "0", "greater than or equal to 1"),
        ("MATCHALL_MAX_RUN_ATTEMPTS", "many", "valid integer"),
        ("MATCHALL_MAX_CHANGE_SHARE", "1.5", "less than or equal to 1"),
    ],
)
def test_a_bad_value_names_its_variable_and_what_to_do(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, fragment: str
) -> None:
    set_setting(monkeypatch, name, value)
    with pytest.raises(ConfigurationError) as raised:
        settings()
    message = str(raised.value)
    assert f"{name}: " in message
    assert fragment in message
    assert "Fix or unset the variable" in message


def test_the_environment_is_read_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    set_setting(monkeypatch, "MATCHALL_MAX_RUN_ATTEMPTS", "2")
    first = settings()
    monkeypatch.setenv("MATCHALL_MAX_RUN_ATTEMPTS", "5")
    assert settings() is first
    assert settings().max_run_attempts == 2


def test_the_table_lists_every_setting_with_its_default() -> None:
    table = settings_table()
    for name, field in Settings.model_fields.items():
        assert f"`MATCHALL_{name.upper()}`" in table
        assert field.description
        assert field.description in table
    assert "| `MATCHALL_KICKOFF_CRON` | `0 6 * * *` |" in table
