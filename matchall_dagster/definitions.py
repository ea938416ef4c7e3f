"""The Dagster definitions: `dagster dev` and workspace.yaml load `defs` from here."""

from __future__ import annotations

import dagster as dg

from matchall_dagster.resource import ActiveCampaignResource

defs = dg.Definitions(
    resources={
        # No fallback to the simulator: unset variables fail loudly when a run needs the API.
        "activecampaign": ActiveCampaignResource(
            api_url=dg.EnvVar("ACTIVECAMPAIGN_API_URL"),
            api_key=dg.EnvVar("ACTIVECAMPAIGN_API_KEY"),
        ),
    },
)
