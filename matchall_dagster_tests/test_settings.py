"""The one settings object: defaults, parsing, errors that name the variable, read once."""

from __future__ import annotations

from pathlib import Path

import pytest

from matchall_dagster.settings import ConfigurationError, Settings, settings, settings_table
from matchall_dagster_tests.conftest import set_setting


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
    assert current.database() == str(tmp_path / "matchall.duckdb")


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
