"""Dagster preview features the project uses on purpose, with their warnings kept where they arise.

Partitioned asset checks are a preview of Dagster 1.13 (see DAGSTER_NOTES); each definition
warns once at import. Known and accepted, so silenced around those definitions only, never for
the process: another preview feature used by mistake still warns.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg


@contextmanager
def partitioned_checks() -> Iterator[None]:
    """Around the definition of an asset check (or spec) with `partitions_def=`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Specifying a partitions_def on an ", category=dg.PreviewWarning)
        yield


@contextmanager
def resolving_definitions() -> Iterator[None]:
    """Around the resolution of the project's `Definitions`.

    Binding the top-level resources, Dagster re-creates the sensors that target a job (discovery
    targets the kick-off job) and passes their `owners=` itself, which warns that `owners` is a
    beta parameter; and merging the definitions of a defs folder, it re-creates the asset checks
    with their `execution_type`, which warns the same way. Dagster's warnings about its own calls,
    not about anything the project chose.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Parameter `owners` of initializer `SensorDefinition.__init__`", category=dg.BetaWarning
        )
        warnings.filterwarnings(
            "ignore",
            message="Parameter `execution_type` of function `AssetsDefinition.__init__`",
            category=dg.BetaWarning,
        )
        yield
