"""The names every account shares: the checks (scoped by their asset's key) and the batch tag.

The names that differ per account (asset keys, partitions, jobs, sensors, the schedule, the pool,
resource keys) are derived in `account.Account`.
"""

from __future__ import annotations

RUN_NOT_FAILED = "run_not_failed"
RUN_NOT_EXPIRED = "run_not_expired"
MATCHES_COMPLETE = "matches_complete"
PLAUSIBLE = "membership_change_plausible"

BATCH_TAG = "matchall/batch"  # on the runs of read_small_segments: how many segments the batch holds
