"""The names of the Dagster definitions: asset keys, checks, jobs, sensors, the schedule, the pool.

One place, so that a module refers to an asset, a check or a job without importing the module
that defines it (and its checks, resources and imports).
"""

from __future__ import annotations

import dagster as dg

MATCHES_KEY = dg.AssetKey("segment_matches")
ASSET_KEY = MATCHES_KEY  # the project's main asset; the older name of MATCHES_KEY
CATALOG_KEY = dg.AssetKey("activecampaign_segments")
CHANGES_KEY = dg.AssetKey("segment_membership_changes")  # also its table's name (storage.history.CHANGES_TABLE)

RUN_NOT_FAILED = "run_not_failed"
RUN_NOT_EXPIRED = "run_not_expired"
MATCHES_COMPLETE = "matches_complete"
PLAUSIBLE = "membership_change_plausible"

SEGMENTS_PARTITIONS = "segments"
DELETED_PARTITIONS = "deleted_segments"  # a set of segment ids, not the partitions of an asset

KICKOFF_JOB = "match_all_kickoff_job"
MATCHES_JOB = "segment_matches_job"  # one partition of segment_matches and its checks (the readiness sensor's)
SMALL_READS_JOB = "read_small_segments"  # a batch of small segments read in one run (see small_reads)
BATCH_TAG = "matchall/batch"  # on the runs of SMALL_READS_JOB: how many segments the batch holds
CATALOG_JOB = "activecampaign_segments_job"
KICKOFF_SCHEDULE = "match_all_kickoff_schedule"
READINESS_SENSOR = "match_all_readiness_sensor"
DISCOVERY_SENSOR = "segment_discovery_sensor"
CHANGES_SENSOR = "membership_changes_automation"

API_POOL = "activecampaign"  # every step that may call the API; its limit is in dagster.yaml
