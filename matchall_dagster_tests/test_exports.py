"""The public API: `__all__` complete and importable, and an import that changes nothing process-wide."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import matchall_dagster
import matchall_dagster.api

PACKAGE = Path(matchall_dagster.__file__).parent


def _public_names(module: ModuleType) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, ModuleType) and name != "TYPE_CHECKING"
    }


@pytest.mark.parametrize("module", [matchall_dagster, matchall_dagster.api], ids=lambda module: module.__name__)
def test_all_lists_every_public_name_and_each_resolves(module: ModuleType) -> None:
    # Loaded on first use (they import Dagster).
    lazy = {"ActiveCampaignResource", "MatchAllComponent"} if module is matchall_dagster else set()
    assert _public_names(module) | lazy == set(module.__all__)
    assert all(getattr(module, name) is not None for name in module.__all__)


def test_the_package_exports_the_clients_public_names() -> None:
    assert set(matchall_dagster.api.__all__) <= set(matchall_dagster.__all__)


def test_importing_the_package_adds_no_warning_filter_and_loads_no_dagster() -> None:
    code = (
        # Its libraries first: numpy adds filters of its own on import.
        "import sys, warnings, httpx, msgspec, numpy, pydantic, pyrate_limiter, tenacity; "
        "before = list(warnings.filters); import matchall_dagster; "
        "assert warnings.filters == before, warnings.filters[: len(warnings.filters) - len(before)]; "
        "assert 'dagster' not in sys.modules, 'dagster imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)


def test_no_module_of_the_client_imports_dagster() -> None:
    for path in (PACKAGE / "api").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
            assert not [name for name in names if name.split(".")[0].startswith("dagster")], path.name
