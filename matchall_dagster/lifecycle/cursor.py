"""The readiness sensor's cursor: only what the event log cannot tell the next tick.

`after`: the pending-run records up to this event-log id have been taken (polled or passed over).
`waiting`: for each run polled at least once and still pending, by its record's id, (next poll
time in whole seconds, polls so far).

Format (version 3): JSON; the waiting runs as a JSON list of `[record id, due, polls]` triples,
zlib-compressed and base64-encoded, as the discovery cursor packs its list. Measured with 10,000
runs polled and still pending (the test in `matchall_dagster_tests/lifecycle/test_cursor.py`):
72 KB (7.2 bytes a run; plain JSON would be 211-244 KB, the version-2 columns took 44 KB). Dagster
1.13 sets no cursor limit of its own (dagster-io/dagster#18402); the hard bounds are gRPC's 100 MB
message and the storage's text column (1 GB on PostgreSQL). What size costs is storage: the
daemon copies the cursor into every tick it records, and successful ticks are kept, hence the
compression (a 3-hour backlog of 10,000 runs at a tick a 15 s: 52 MB instead of 175 MB).

Cursors of version 2 (numpy columns, written before this format) are still read, so that an
upgrade does not re-read the event log from the start; only version 3 is written.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import math
import struct
import zlib
from dataclasses import dataclass, field

CURSOR_VERSION = 3
_LEGACY_VERSION = 2  # compressed columns: id deltas (<i8), due - base (<u4), polls (u8)


@dataclass
class ReadinessCursor:
    after: int | None = None
    waiting: dict[int, tuple[float, int]] = field(default_factory=dict)

    def dump(self) -> str:
        data: dict[str, object] = {"v": CURSOR_VERSION, "after": self.after}
        if self.waiting:
            triples = [[i, math.ceil(due), polls] for i, (due, polls) in sorted(self.waiting.items())]
            packed = zlib.compress(json.dumps(triples, separators=(",", ":")).encode(), 6)
            data["waiting"] = base64.b64encode(packed).decode()
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def load(cls, raw: str | None, log: logging.Logger) -> ReadinessCursor:
        """The cursor in `raw`; a fresh one (logged) when it cannot be read."""
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("v") not in (CURSOR_VERSION, _LEGACY_VERSION):
                raise ValueError("another version")
            after = data.get("after")
            if after is not None and not isinstance(after, int):
                raise ValueError("bad `after`")
            waiting = _waiting(data) if data["v"] == CURSOR_VERSION else _legacy_waiting(data)
            return cls(after=after, waiting=waiting)
        except (ValueError, KeyError, TypeError, zlib.error, struct.error) as exc:
            log.error(
                f"The readiness sensor's cursor could not be read ({exc}); taking the pending-run records "
                "from the start of the event log (the newest run of each segment is polled; none is "
                "materialized twice)."
            )
            return cls()


def _waiting(data: dict[str, object]) -> dict[int, tuple[float, int]]:
    packed = data.get("waiting")
    if packed is None:
        return {}
    if not isinstance(packed, str):
        raise TypeError("bad `waiting`")
    triples = json.loads(zlib.decompress(base64.b64decode(packed, validate=True)))
    waiting: dict[int, tuple[float, int]] = {}
    for storage_id, due, polls in triples:
        if not all(isinstance(value, int) for value in (storage_id, due, polls)):
            raise ValueError("bad waiting run")
        waiting[storage_id] = (float(due), polls)
    return waiting


def _legacy_waiting(data: dict[str, object]) -> dict[int, tuple[float, int]]:
    """The waiting runs of a version-2 cursor."""
    count = int(str(data.get("n", 0)))
    if not count:
        return {}
    columns = zlib.decompress(base64.b64decode(str(data["waiting"]), validate=True))
    if len(columns) != count * 13:
        raise ValueError("bad length")
    ids = itertools.accumulate(struct.unpack_from(f"<{count}q", columns))
    base = int(str(data["base"]))
    due = struct.unpack_from(f"<{count}I", columns, count * 8)
    polls = columns[count * 12 :]
    return {i: (float(d + base), p) for i, d, p in zip(ids, due, polls, strict=True)}
