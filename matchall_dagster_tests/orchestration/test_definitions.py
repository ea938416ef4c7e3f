"""The entry point loads without a warning, in a process that turns every warning into an error
and has no filter of its own: the known Dagster warnings are silenced where they arise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOAD = """
import warnings
import matchall_dagster  # the package (no Dagster import); any filter it sets is dropped below
warnings.resetwarnings()
warnings.simplefilter("error")
from matchall_dagster.definitions import defs as load_defs
defs = load_defs()
for name in ("match_all_readiness_sensor", "segment_discovery_sensor", "membership_changes_automation"):
    defs.resolve_sensor_def(name)
defs.resolve_job_def("match_all_kickoff_job")
defs.resolve_implicit_global_asset_job_def()
print("loaded")
"""


def test_the_definitions_load_without_warnings(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "DAGSTER_HOME": str(tmp_path),
        "MATCHALL_STORE": f"duckdb://{tmp_path / 'm.duckdb'}",
    }
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", LOAD], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loaded"
    assert "Warning" not in result.stderr
