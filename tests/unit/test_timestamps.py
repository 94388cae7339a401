"""The protocol's timestamps: milliseconds since the epoch as ISO 8601 in UTC with milliseconds."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from bridge.protocol import iso_ms, ms_of


def test_iso_ms_formats_every_millisecond_like_datetime() -> None:
    rng = random.Random(3)
    samples = [0, 1, 999, 1000, -1, -1000, -1001, 1_700_000_000_000, 1_700_000_000_999, 253_402_300_799_999]
    samples += [rng.randrange(-(10**11), 10**13) for _ in range(5000)]
    samples += [1_700_000_000_000 + i for i in range(0, 3000, 7)]  # many within the same seconds
    for ms in samples:
        moment = datetime.fromtimestamp(ms // 1000, tz=UTC).replace(microsecond=(ms % 1000) * 1000)
        assert iso_ms(ms) == moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"), ms
    for ms in range(1_700_000_000_000, 1_700_000_100_000, 13):
        assert ms_of(datetime.fromisoformat(iso_ms(ms))) == ms
