"""The Dagster side: the resource, partitions, kick-off, sensors, assets and checks, as thin wrappers."""
