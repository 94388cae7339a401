"""The bridge's bounds: sizes and caps that keep every event publishable, and per-user rate limiting
(a token bucket per sender, checked before any parsing or database work)."""

from __future__ import annotations

import math
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
