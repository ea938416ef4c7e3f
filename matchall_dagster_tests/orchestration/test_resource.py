"""The Dagster resource: configuration with EnvVar secrets, a working client, no leaked key."""

from __future__ import annotations

import dagster as dg
import pydantic
import pytest

from matchall_dagster import ActiveCampaignResource, InvalidInputError
from matchall_dagster.simulator import DEFAULT_TOKEN, SimulatorServer


def test_resource_from_env_vars_fetches_inside_an_asset(
    server: SimulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACTIVECAMPAIGN_API_URL", server.url)
    monkeypatch.setenv("ACTIVECAMPAIGN_API_KEY", DEFAULT_TOKEN)
    seen: dict[str, object] = {}

    @dg.asset
    def members(activecampaign: ActiveCampaignResource) -> dg.MaterializeResult[None]:
        with activecampaign.get_client() as client:
            run = client.start_run("10001", sort="-email")
            first = client.wait_until_ready("10001", run.run_id, sort="-email")
            matches = client.fetch_matches("10001", run.run_id, sort="-email", first_page=first)
        seen["ids"] = matches.contact_ids.tolist()
        seen["repr"] = repr(activecampaign)
        return dg.MaterializeResult(metadata={"dagster/row_count": matches.total})

    resource = ActiveCampaignResource(
        api_url=dg.EnvVar("ACTIVECAMPAIGN_API_URL"), api_key=dg.EnvVar("ACTIVECAMPAIGN_API_KEY")
    )
    result = dg.materialize([members], resources={"activecampaign": resource})
    assert result.success
    assert seen["ids"] == server.simulator.truth("10001", "-email")
    assert DEFAULT_TOKEN not in str(seen["repr"])


def test_resource_repr_hides_the_key() -> None:
    resource = ActiveCampaignResource(api_url="https://acct.api-us1.com", api_key="k3y-s3cret")
    assert "k3y-s3cret" not in repr(resource)
    assert "k3y-s3cret" not in str(resource)


def test_bad_configuration_is_refused_with_what_to_do() -> None:
    with pytest.raises(InvalidInputError, match="plain http"):
        ActiveCampaignResource(api_url="http://acct.api-us1.com", api_key="k").build_client()
    with pytest.raises(pydantic.ValidationError, match="page_size"):
        ActiveCampaignResource(api_url="https://acct.api-us1.com", api_key="k", page_size=20_000)
