"""The Match-All API client: transport, endpoints, paging, models, errors, validation; no Dagster import."""
