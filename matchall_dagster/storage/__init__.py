"""Where memberships land: the DuckDB IO manager and the membership history."""
