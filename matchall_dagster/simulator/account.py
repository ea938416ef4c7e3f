"""The simulated account: seeded segments, their members, and the ground truth of every sort.

Everything derives from ids and a seed with vectorised hashing, so that a segment of millions of
contacts costs a fraction of a second to build and the expected order of any sort string is a
pure function that tests compare against.
"""

from __future__ import annotations

import enum
import hashlib
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

ContactIds = npt.NDArray[np.int64]

# How many distinct values each sort key takes: few for names (many ties, so later keys and the
# final id tie-break matter), many for e-mail addresses and phone numbers.
_CARDINALITY = {
    "email": 2**40,
    "phone": 10**10,
    "first_name": 300,
    "last_name": 1_000,
    "full_name": 100_000,
    "cdate": 10**8,
    "udate": 10**8,
    "account_name": 500,
    "score": 101,
    "field": 50,
}
_NUMBERED = re.compile(r"(?:score|field)[0-9]+")


class SortKey(NamedTuple):
    field: str
    descending: bool = False

    def __str__(self) -> str:
        return ("-" if self.descending else "") + self.field


def sort_keys(sort: str) -> tuple[SortKey, ...]:
    """The keys of a sort the app has checked against the documents' grammar, as they order.

    The documents do not forbid naming a key twice ("email,-email"); the first mention decides and
    a repeat adds nothing (a guess: nothing published says what the API does). Bare `score` and
    `field` (the seed document's spelling) are keys of their own.
    """
    keys: dict[str, SortKey] = {}
    for raw in sort.split(","):
        name = raw.removeprefix("-")
        if name != "id" and name not in _CARDINALITY and not _NUMBERED.fullmatch(name):
            raise ValueError(f"no sort key {name!r}")
        keys.setdefault(name, SortKey(name, raw.startswith("-")))
    return tuple(keys.values())


class Behavior(enum.Enum):
    OK = "ok"  # runs become ready
    FAIL = "fail"  # runs end without becoming ready (`run_id_end` set, `is_ready` false)
    EXPIRE = "expire"  # runs are forgotten (404) `expire_after` seconds after they start


@dataclass(frozen=True)
class SimSegment:
    id: str
    name: str
    size: int
    behavior: Behavior = Behavior.OK
    ready_after: float | None = None  # seconds; None takes the simulator's default
    expire_after: float = 90 * 86_400.0
    # Membership that evolves from one run to the next (run n of the segment sees generation n-1):
    # at each generation `churn` of the members leave and new contacts join, so that the size
    # changes by `growth` (shares of the previous generation's size).
    churn: float = 0.0
    growth: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.churn <= 1 or self.growth < -self.churn:
            raise ValueError("a segment's churn must be a share from 0 to 1, and growth at least -churn")

    @property
    def evolves(self) -> bool:
        return bool(self.churn or self.growth)


def seed_of(*parts: object) -> int:
    """A stable 64-bit number of `parts`: every seeded choice of the simulator derives from one."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _mix(values: npt.NDArray[np.uint64], salt: int) -> npt.NDArray[np.uint64]:
    """splitmix64: a fast, well-spread hash of each value, vectorised."""
    with np.errstate(over="ignore"):
        z = values + np.uint64((salt * 0x9E3779B97F4A7C15) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@dataclass
class SimAccount:
    """An account's saved segments; members and orders are computed lazily and cached."""

    segments: list[SimSegment]
    seed: int = 0
    _members: dict[tuple[str, int], ContactIds] = field(default_factory=dict, repr=False)
    _orders: OrderedDict[tuple[str, str, int], ContactIds] = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        ids = [segment.id for segment in self.segments]
        if len(set(ids)) != len(ids):
            raise ValueError("segment ids of a simulated account must be unique")

    def segment(self, segment_id: str) -> SimSegment | None:
        return next((segment for segment in self.segments if segment.id == segment_id), None)

    def segment_timestamp(self, segment: SimSegment) -> datetime:
        base = datetime(2026, 1, 1, tzinfo=UTC)
        return base + timedelta(seconds=seed_of(self.seed, segment.id, "ts") % (200 * 86_400))

    def members(self, segment_id: str, generation: int = 0) -> ContactIds:
        """The segment's contact ids at a generation, in ascending order (distinct, positive)."""
        segment = self.segment(segment_id)
        if segment is None:
            raise KeyError(segment_id)
        generation = generation if segment.evolves else 0
        with self._lock:
            known = max((g for (sid, g) in self._members if sid == segment_id and g <= generation), default=-1)
            ids = self._members.get((segment_id, known))
        if ids is None:
            rng = np.random.default_rng(seed_of(self.seed, segment.id))
            gaps = rng.integers(1, 16, size=segment.size, dtype=np.int64)
            ids, known = np.cumsum(gaps) + int(rng.integers(0, 1_000)), 0
        for step in range(known + 1, generation + 1):  # each generation from the one before
            ids = self._evolve(segment, ids, step)
        with self._lock:
            return self._members.setdefault((segment_id, generation), ids)

    def _evolve(self, segment: SimSegment, previous: ContactIds, generation: int) -> ContactIds:
        """Generation n from n-1: a seeded `churn` share leaves, and new, higher ids join."""
        hashed = _mix(previous.astype(np.uint64), seed_of(self.seed, segment.id, generation))
        leaving = hashed % np.uint64(1 << 20) < np.uint64(round(segment.churn * (1 << 20)))
        staying = previous[~leaving]
        joining = max(0, round(previous.size * (1 + segment.growth)) - staying.size)
        rng = np.random.default_rng(seed_of(self.seed, segment.id, generation, "join"))
        start = int(previous[-1]) if previous.size else 0
        joined = start + np.cumsum(rng.integers(1, 16, size=joining, dtype=np.int64))
        return np.concatenate([staying, joined])

    def key_values(self, contact_ids: ContactIds, key: str) -> npt.NDArray[np.int64]:
        """The value each contact has for a sort key, as comparable integers."""
        if key == "id":
            return contact_ids
        base = key.rstrip("0123456789")
        hashed = _mix(contact_ids.astype(np.uint64), seed_of(self.seed, key))
        return (hashed % np.uint64(_CARDINALITY[base])).astype(np.int64)

    def ordered(self, segment_id: str, sort: str = "id", generation: int = 0) -> ContactIds:
        """The ground truth: the segment's members in the order the API returns for `sort`."""
        keys = sort_keys(sort)
        canonical = ",".join(map(str, keys))
        if generation:  # only runs of evolving segments have one; the lookup stays off the page path
            segment = self.segment(segment_id)
            generation = generation if segment is not None and segment.evolves else 0
        with self._lock:
            cached = self._orders.get((segment_id, canonical, generation))
            if cached is not None:
                self._orders.move_to_end((segment_id, canonical, generation))
                return cached
        ids = self.members(segment_id, generation)
        order = _order(ids, keys, self.key_values)
        result = ids[order]
        result.setflags(write=False)
        with self._lock:
            self._orders[(segment_id, canonical, generation)] = result
            while len(self._orders) > 16:
                self._orders.popitem(last=False)
        return result


def _order(ids: ContactIds, keys: tuple[SortKey, ...], values_of: object) -> npt.NDArray[np.intp]:
    assert callable(values_of)
    columns: list[npt.NDArray[np.int64]] = [ids]  # the final tie-break: id ascending
    for key in reversed(keys):
        values = values_of(ids, key.field)
        columns.append(-values if key.descending else values)
    return np.lexsort(columns)


def demo_account(seed: int = 0) -> SimAccount:
    """The account `matchall simulator` serves by default: every paging edge and run fate."""
    return SimAccount(
        seed=seed,
        segments=[
            SimSegment("1", "Newsletter subscribers", 25_001, churn=0.02, growth=0.01),
            SimSegment("2", "Unsubscribed last week (empty)", 0),
            SimSegment("3", "Single VIP", 1),
            SimSegment("4", "Recent signups", 9_999, churn=0.1, growth=-0.03),
            SimSegment("5", "Exactly one page", 10_000),
            SimSegment("6", "One page and one", 10_001),
            SimSegment("1ab85f0e-3b5c-4a35-bc07-242c68a7d195132", "Engaged (UUID id)", 250_000),
            SimSegment("8", "All customers", 1_000_000),
            SimSegment("9", "Broken definition (runs fail)", 5_000, behavior=Behavior.FAIL),
            SimSegment("10", "Short-lived runs (expire)", 2_000, behavior=Behavior.EXPIRE, expire_after=20.0),
        ],
    )
