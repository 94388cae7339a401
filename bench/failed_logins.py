"""What one wrong password costs the embedded broker's throttle (`FailedLogins`) once its tables are
full of active entries: a guessing crowd from 100,000 addresses within the minute an entry takes to
refill. Prints microseconds per failure.

    python bench/failed_logins.py [--entries 100000] [--failures 2000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.broker import FailedLogins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--failures", type=int, default=2000)
    args = parser.parse_args()
    throttle = FailedLogins(max_tracked=args.entries)
    now = 1_000_000
    start = time.perf_counter()
    for i in range(args.entries):  # every entry active: one failure each, all within a second
        throttle.failed(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", "bob", now + i // 100)
    filled = time.perf_counter() - start
    now += args.entries // 100
    start = time.perf_counter()
    for i in range(args.failures):  # new addresses: each must make room
        throttle.failed(f"11.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", "bob", now)
    took = time.perf_counter() - start
    print(
        f"{args.entries} active entries (filled in {filled:.2f} s): "
        f"{took / args.failures * 1e6:.1f} µs per further failure ({args.failures} failures)"
    )


if __name__ == "__main__":
    main()
