"""The bridge's bounds: sizes and caps that keep every event publishable, and per-user rate limiting
(a token bucket per sender, checked before any parsing or database work)."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

# The largest event payload the bridge publishes, in bytes (`--max-event-size`). Brokers refuse larger
# packets (the shipped Mosquitto config: max_packet_size 128 KiB, which counts what the bridge
# publishes too), so the default leaves room for the topic and headers.
DEFAULT_MAX_EVENT = 96 * 1024
# The smallest allowed: a conversation object of a full group (MAX_GROUP_PARTICIPANTS user ids of up
# to 64 characters) fits in one event with room to spare.
MIN_MAX_EVENT = 72 * 1024
# Bytes of an event that are not the items of its list (envelope, ids, flags): pages are cut by
# bytes so that the items fit in `max_event - ENVELOPE_RESERVE`.
ENVELOPE_RESERVE = 2048
# Most items a page of a list (conversations, participants, active users) holds, whatever their size.
MAX_PAGE = 1000
# A group has at most this many participants.
MAX_GROUP_PARTICIPANTS = 1000
# Others may not add a user to more conversations than this (direct and group; threads follow their
# parent): nobody can bury someone's conversation list.
MAX_CONVERSATIONS_PER_USER = 1000


@dataclass
class _Bucket:
    tokens: float
    at_ms: int


class RateLimiter:
    """`rate` commands per second on average, bursts of up to `burst`; time comes from the caller."""

    def __init__(self, rate: float, burst: int, max_tracked: int = 100_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = float(burst)
        self.max_tracked = max_tracked
        self._buckets: dict[str, _Bucket] = {}

    def take(self, user_id: str, now_ms: int) -> float:
        """Takes one token; returns 0 when allowed, else the seconds until one is available."""
        return self._take(self._buckets, user_id, now_ms)

    def _take(self, buckets: dict[str, _Bucket], user_id: str, now_ms: int) -> float:
        bucket = buckets.get(user_id)
        if bucket is None:
            if len(buckets) >= self.max_tracked:
                self._forget_idle(now_ms)
            bucket = buckets[user_id] = _Bucket(self.burst, now_ms)
        bucket.tokens = min(self.burst, bucket.tokens + (now_ms - bucket.at_ms) / 1000 * self.rate)
        bucket.at_ms = now_ms
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return math.ceil((1 - bucket.tokens) / self.rate * 1000) / 1000

    def _forget_idle(self, now_ms: int) -> None:
        """Drops buckets that have refilled completely: they hold no information."""
        full_after = self.burst / self.rate * 1000
        for user in [u for u, b in self._buckets.items() if now_ms - b.at_ms >= full_after]:
            del self._buckets[user]


class CostBudget:
    """What a user's commands cost: the events they cause (a message to 100 people costs 100), at
    `rate` per second on average in bursts of `burst`, charged after each command ran. A user in debt
    is refused until it is paid. All users together share a bridge-wide `total` per second: while
    that is spent, only light users (whose commands caused under a tenth of `rate` over about the
    last second, their last command's cost included: a person chatting) are served, and heavy ones
    share what the total allows, so that however many heavy accounts there are, the bridge is not
    swamped and people come first. Time comes from the caller; safe to use from two threads."""

    LIGHT = 0.1  # of `rate`: under it, a user is served even while the bridge-wide budget is spent
    WINDOW_MS = 1000  # the time constant of each user's recent spending

    def __init__(self, rate: float, burst: int, total: float, max_tracked: int = 100_000) -> None:
        if rate <= 0 or burst < 1 or total <= 0:
            raise ValueError("rate and total must be positive and burst at least 1")
        self.rate, self.burst, self.total = rate, float(burst), total
        self.max_tracked = max_tracked
        self._users: dict[str, _Bucket] = {}
        self._spent: dict[str, _Bucket] = {}  # recent spending, decaying with WINDOW_MS
        self._last: dict[str, int] = {}  # the cost of each user's last command: what the next may cost
        self._all = _Bucket(total, 0)
        self._lock = threading.Lock()

    def _refill(self, bucket: _Bucket, rate: float, cap: float, now_ms: int) -> None:
        if now_ms > bucket.at_ms:
            bucket.tokens = min(cap, bucket.tokens + (now_ms - bucket.at_ms) / 1000 * rate)
            bucket.at_ms = now_ms
        elif bucket.tokens > cap:  # the same millisecond (a command's wait and charge): nothing to add
            bucket.tokens = cap

    def _user(self, user_id: str, now_ms: int) -> tuple[_Bucket, _Bucket]:
        bucket = self._users.get(user_id)
        if bucket is None:
            if len(self._users) >= self.max_tracked:
                full_after = max(self.burst / self.rate * 1000, 10 * self.WINDOW_MS)
                for user in [u for u, b in self._users.items() if now_ms - b.at_ms >= full_after]:
                    del self._users[user]
                    self._spent.pop(user, None)
                    self._last.pop(user, None)
            bucket = self._users[user_id] = _Bucket(self.burst, now_ms)
            self._spent[user_id] = _Bucket(0.0, now_ms)
        self._refill(bucket, self.rate, self.burst, now_ms)
        spent = self._spent[user_id]
        if now_ms > spent.at_ms:
            spent.tokens *= math.exp((spent.at_ms - now_ms) / self.WINDOW_MS)
            spent.at_ms = now_ms
        return bucket, spent

    def wait(self, user_id: str, now_ms: int) -> float:
        """0 when the user may run a command now; else the seconds until it may."""
        with self._lock:
            mine, spent = self._user(user_id, now_ms)
            self._refill(self._all, self.total, self.total, now_ms)
            if mine.tokens < 0:
                return math.ceil(-mine.tokens / self.rate * 1000) / 1000
            light = spent.tokens + self._last.get(user_id, 0) < self.LIGHT * self.rate * self.WINDOW_MS / 1000
            if self._all.tokens < 0 and not light:
                return math.ceil(-self._all.tokens / self.total * 1000) / 1000 or 0.001
            return 0.0

    def charge(self, user_id: str, cost: int, now_ms: int) -> None:
        with self._lock:
            mine, spent = self._user(user_id, now_ms)
            mine.tokens -= cost
            if cost > 0:
                self._last[user_id] = cost
            spent.tokens = max(0.0, spent.tokens + cost)
            self._refill(self._all, self.total, self.total, now_ms)
            self._all.tokens = max(-self.total, self._all.tokens - cost)


class OncePer:
    """Whether something about a key is due again: at most once per `interval_ms` per key (a warning
    per flooding user, not one per dropped command). Forgets everything past `max_tracked` keys."""

    def __init__(self, interval_ms: int, max_tracked: int = 10_000) -> None:
        self.interval_ms = interval_ms
        self.max_tracked = max_tracked
        self._last: dict[str, int] = {}

    def due(self, key: str, now_ms: int) -> bool:
        if now_ms - self._last.get(key, now_ms - self.interval_ms) < self.interval_ms:
            return False
        if len(self._last) >= self.max_tracked:
            self._last.clear()
        self._last[key] = now_ms
        return True
