"""What a fresh install holds: every third-party module the package imports is declared, the
simulator's web stack is an extra the core never needs, and Dagster's internals have one door."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "matchall_dagster"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SIMULATOR_EXTRA = {"starlette", "uvicorn"}


def top_level_imports(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m != "matchall_dagster"}


def imported_top_level_modules(*, simulator: bool) -> set[str]:
    """The third-party modules of the package's files, outside simulator/ or inside it."""
    return {
        module
        for path in PACKAGE.rglob("*.py")
        if (path.parent.name == "simulator") == simulator
        for module in top_level_imports(path)
    }


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[;\s]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def distributions_of(modules: set[str]) -> set[str]:
    distributions = packages_distributions()
    return {d.lower().replace("_", "-") for module in modules for d in distributions[module]}


def test_every_imported_distribution_is_declared() -> None:
    core = names(PROJECT["dependencies"])
    assert distributions_of(imported_top_level_modules(simulator=False)) - core == set()
    simulator = core | names(PROJECT["optional-dependencies"]["simulator"])
    assert distributions_of(imported_top_level_modules(simulator=True)) - simulator == set()


def test_the_simulators_web_stack_is_an_extra_that_dev_installs() -> None:
    extras = PROJECT["optional-dependencies"]
    assert names(extras["simulator"]) == SIMULATOR_EXTRA
    assert not names(PROJECT["dependencies"]) & SIMULATOR_EXTRA
    assert "matchall-dagster[simulator]" in extras["dev"]
    setup = (ROOT / "scripts" / "_setup.sh").read_text()
    assert re.search(r'pip install --quiet -e "\.\[dev,simulator\]"', setup)


def test_only_the_simulators_app_and_server_import_its_extra() -> None:
    """The account and the configuration stay importable without it: the CLI builds its options from them."""
    importers = {
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if top_level_imports(path) & SIMULATOR_EXTRA
    }
    assert importers == {"simulator/answers.py", "simulator/app.py", "simulator/faults.py", "simulator/server.py"}


def test_dagsters_internals_are_imported_in_one_module() -> None:
    """Where Dagster has no public name for what we use, `storage/dagster_private.py` holds the
    import and `storage/test_dagster_private.py` pins it."""
    private = re.compile(r"^\s*(from|import)\s+dagster\._", re.MULTILINE)
    importers = {
        path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py") if private.search(path.read_text())
    }
    assert importers == {"storage/dagster_private.py"}


# Run in a fresh interpreter where starlette and uvicorn cannot be imported, as in an install
# without the extra; prints what it saw as JSON.
WITHOUT_THE_EXTRA = """
import importlib.abc, json, sys

class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"starlette", "uvicorn"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Missing())
import matchall_dagster, matchall_dagster.definitions
matchall_dagster.definitions.defs()  # the project's definitions (its defs/ folder) load too
from click.testing import CliRunner
from matchall_dagster.cli import main

seen = {"loaded": sorted(m for m in sys.modules if m.partition(".")[0] in {"starlette", "uvicorn"})}
for args in (["--help"], ["fetch", "--help"], ["changes", "--help"], ["simulator", "--help"], ["simulator"]):
    result = CliRunner().invoke(main, args)
    seen[" ".join(args)] = {"code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr}
try:
    from matchall_dagster.simulator import Simulator
except ModuleNotFoundError as exc:
    seen["import Simulator"] = str(exc)
print(json.dumps(seen))
"""


def test_core_and_cli_work_without_the_simulator_extra() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MATCHALL_", "DAGSTER_HOME"))}
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_THE_EXTRA], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen.pop("loaded") == []
    for args in ("--help", "fetch --help", "changes --help", "simulator --help"):
        assert seen[args]["code"] == 0, (args, seen[args])
    assert "simulator  Serve a simulated account" in seen["--help"]["stdout"]
    assert "--duplicate-rate" in seen["simulator --help"]["stdout"]
    refused = seen["simulator"]
    assert refused["code"] == 1
    assert refused["stderr"] == (
        "Error: `matchall simulator` needs the simulator extra (starlette is not installed): "
        "pip install 'matchall-dagster[simulator]'\n"
    )
    assert "pip install 'matchall-dagster[simulator]'" in seen["import Simulator"]
