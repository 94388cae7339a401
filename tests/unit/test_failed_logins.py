"""The embedded broker's password-guessing throttle (`FailedLogins`), driven as the broker drives it:
a CONNECT is checked only when `allowed`, and a wrong password is then `failed`."""

from __future__ import annotations

import time

from bridge.broker import FailedLogins, address_key


def guess(throttle: FailedLogins, address: str, user: str, now: int) -> bool:
    """One wrong password for `user` from `address`: whether it was checked at all."""
    if not throttle.allowed(address, user, now):
        return False
    throttle.failed(address, user, now)
    return True


def test_a_failure_costs_the_same_whatever_the_tables_hold() -> None:
    """With its tables full of active entries (a crowd guessing within the minute they take to
    refill), each further wrong password used to rebuild them: at 100,000 entries half a second of
    the broker's event loop each on the development machine (bench/failed_logins.py)."""
    throttle = FailedLogins(max_tracked=20_000)
    now = 1_000_000
    for i in range(20_000):
        throttle.failed(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", "bob", now)
    start = time.perf_counter()
    for i in range(200):
        throttle.failed(f"11.0.{i >> 8 & 255}.{i & 255}", "bob", now)
    took = time.perf_counter() - start
    assert took < 1.0, f"{took / 200 * 1e6:.0f} µs per failure"
    assert len(throttle._left) == len(throttle._pairs) == 20_000


def test_the_tables_stay_within_their_bound() -> None:
    throttle = FailedLogins(max_tracked=1000)
    for i in range(5000):
        throttle.failed(f"10.0.{i >> 8 & 255}.{i & 255}", f"u{i}", 1_000)
        throttle.succeeded(f"10.1.{i >> 8 & 255}.{i & 255}", "alice")
    assert len(throttle._left) == len(throttle._pairs) == len(throttle._known) == 1000


def test_an_entry_is_pushed_out_only_by_a_full_table_of_newer_failures() -> None:
    """mallory exhausted her guesses at bob; failures of other keys after hers push her entry out
    only after `max_tracked` of them, and those are held back per address."""
    throttle = FailedLogins(max_tracked=1000)
    now = 1_000_000
    while guess(throttle, "198.51.100.9", "bob", now):
        pass
    # from her own address, guesses over other names stop at the address's budget (100) ...
    names = sum(guess(throttle, "198.51.100.9", f"name{i}", now) for i in range(2000))
    assert names == 100 - 10
    assert not throttle.allowed("198.51.100.9", "bob", now)
    # ... and 999 newer entries from other addresses do not free her either
    for i in range(999):
        guess(throttle, f"203.0.113.{i % 200}", f"x{i}", now)
    assert not throttle.allowed("198.51.100.9", "bob", now)
    # while bob, from his own address, is never held back by her
    assert throttle.allowed("192.0.2.1", "bob", now)


def test_a_victim_elsewhere_is_not_locked_out() -> None:
    throttle = FailedLogins()
    now = 1_000_000
    for i in range(1000):
        guess(throttle, "198.51.100.9", "bob", now + i)
        guess(throttle, "198.51.100.9", f"n{i}", now + i)
    assert not throttle.allowed("198.51.100.9", "bob", now + 1000)
    assert throttle.allowed("192.0.2.1", "bob", now + 1000)
    assert throttle.allowed("192.0.2.1", "carol", now + 1000)


def test_one_ipv6_subscriber_counts_as_one_address() -> None:
    """Each address of a /64 used to have its own budget: one IPv6 host guessed without end by
    changing its address."""
    throttle = FailedLogins()
    now = 1_000_000
    checked = sum(guess(throttle, f"2001:db8:5:6::{i:x}", "bob", now) for i in range(1, 500))
    assert checked == 10
    checked = sum(guess(throttle, f"2001:db8:5:6:{i:x}::1", f"n{i}", now) for i in range(1, 500))
    assert checked == 100 - 10
    assert throttle.allowed("2001:db8:5:7::1", "bob", now)  # the next /64 is another subscriber
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert address_key("192.0.2.1") == "192.0.2.1"


def test_logins_from_many_ipv6_addresses_do_not_push_out_a_known_user() -> None:
    """mallory, with her own password, logging in from thousands of addresses of her /64 used to push
    alice's entry out of the known users at a shared address: then mallory's guesses over many names
    there locked alice out."""
    throttle = FailedLogins(max_tracked=1000)
    now = 1_000_000
    throttle.succeeded("198.51.100.1", "alice")
    for i in range(1, 5000):
        throttle.succeeded(f"2001:db8:9:9::{i:x}", "mallory")
    for i in range(200):
        guess(throttle, "198.51.100.1", f"n{i}", now)
    assert not throttle.allowed("198.51.100.1", "carol", now)
    assert throttle.allowed("198.51.100.1", "alice", now)


def test_a_long_name_is_not_kept_whole() -> None:
    throttle = FailedLogins()
    throttle.failed("198.51.100.9", "x" * 100_000, 1_000)
    throttle.failed("198.51.100.9", "x" * 99_999 + "y", 1_000)
    assert [len(user) for _address, user in throttle._pairs] == [65]


def test_the_budget_refills() -> None:
    throttle = FailedLogins()
    now = 1_000_000
    while guess(throttle, "198.51.100.9", "bob", now):
        pass
    assert not throttle.allowed("198.51.100.9", "bob", now + 5_999)
    assert guess(throttle, "198.51.100.9", "bob", now + 6_000)
    assert not throttle.allowed("198.51.100.9", "bob", now + 6_000)
    assert throttle.allowed("198.51.100.9", "bob", now + 60_000)
