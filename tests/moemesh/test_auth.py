"""moemesh.auth: the API key file, constant-time verification, the per-key token bucket and the guard
that combines them (pure: every clock reading is an argument)."""

from __future__ import annotations

import math

import pytest

from moemesh.auth import KeyGuard, RateLimiter, bearer_key, key_digest, load_key_file, new_key, parse_key_file
from moemesh.errors import CapacityError, ConfigError, RateLimitedError, UnauthenticatedError

KEY = "mm-secret-one"
OTHER = "mm-secret-two"


def _file(*lines: str) -> str:
    return "\n".join(lines) + "\n"


def test_the_file_holds_hashes_with_optional_limits_comments_and_blank_lines():
    keys = parse_key_file(_file("# the team keys", "", f"{key_digest(KEY)}  rpm=60 max_tokens=512 name=team-a",
                                f"  {key_digest(OTHER).upper()}   # no limits"))
    first, second = keys.entries
    assert (first.name, first.requests_per_minute, first.max_tokens) == ("team-a", 60, 512)
    assert (second.name, second.requests_per_minute, second.max_tokens) == (key_digest(OTHER)[:8], None, None)
    assert keys.verify(KEY) is first and keys.verify(OTHER) is second
    assert keys.verify("mm-secret-three") is None and keys.verify("") is None
    assert KEY not in _file(f"{key_digest(KEY)}")  # the file never holds the key itself


@pytest.mark.parametrize("line, says", [
    ("abc", "64 hex digits"),
    ("z" * 64, "64 hex digits"),
    (f"{key_digest(KEY)} rpm=0", "rpm must be a whole number >= 1"),
    (f"{key_digest(KEY)} rpm=ten", "rpm must be"),
    (f"{key_digest(KEY)} max_tokens=-3", "max_tokens must be"),
    (f"{key_digest(KEY)} burst=3", "unknown or repeated option"),
    (f"{key_digest(KEY)} rpm=1 rpm=2", "unknown or repeated option"),
    (f"{key_digest(KEY)} rpm", "unknown or repeated option"),
])
def test_a_bad_line_is_a_config_error_naming_its_line(line: str, says: str):
    with pytest.raises(ConfigError, match=rf"keys.txt, line 2: .*{says}"):
        parse_key_file(_file("# header", line), "keys.txt")


def test_a_hash_listed_twice_and_an_unreadable_file_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="listed twice"):
        parse_key_file(_file(key_digest(KEY), key_digest(KEY) + " rpm=3"))
    with pytest.raises(ConfigError, match="cannot read API key file"):
        load_key_file(tmp_path / "missing.txt")


def test_a_new_key_and_its_line_round_trip_through_the_file(tmp_path):
    key, line = new_key(requests_per_minute=5, max_tokens=64, name="ci")
    assert key.startswith("mm-") and key_digest(key) in line and key not in line
    path = tmp_path / "keys.txt"
    path.write_text(line + "\n")
    entry = load_key_file(path).verify(key)
    assert entry is not None and (entry.name, entry.requests_per_minute, entry.max_tokens) == ("ci", 5, 64)
    assert new_key()[0] != new_key()[0]


@pytest.mark.parametrize("header, key", [
    ("Bearer abc", "abc"), ("bearer   abc ", "abc"), ("BEARER abc", "abc"),
    (None, None), ("", None), ("Bearer", None), ("Bearer  ", None), ("Basic abc", None), ("abc", None),
])
def test_only_a_bearer_authorization_carries_a_key(header, key):
    assert bearer_key(header) == key


def test_the_bucket_holds_a_minutes_worth_and_refills_at_its_rate():
    limiter = RateLimiter()
    assert [limiter.take("k", 3, now=100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("k", 3, now=100.0) == pytest.approx(20.0)  # one token per 20 s at 3 per minute
    assert limiter.take("k", 3, now=110.0) == pytest.approx(10.0)  # a refused take spends nothing
    assert limiter.take("k", 3, now=120.0) == 0.0
    assert limiter.take("other", 3, now=120.0) == 0.0  # buckets are per key
    assert limiter.take("k", 3, now=10_000.0, cost=3) == 0.0  # refilled to the cap, never past it
    assert limiter.take("k", 3, now=10_000.0) > 0
    assert math.isinf(limiter.take("k", 3, now=20_000.0, cost=4))  # more than the bucket can ever hold


def test_the_guard_authenticates_then_applies_the_keys_limits():
    guard = KeyGuard(parse_key_file(_file(f"{key_digest(KEY)} rpm=2 max_tokens=8", key_digest(OTHER))))
    for header in (None, "", f"Bearer {KEY}x", f"Basic {KEY}"):
        with pytest.raises(UnauthenticatedError):
            guard.admit(header, now=0.0)
    with pytest.raises(CapacityError, match="at most 8 new tokens") as too_long:
        guard.admit(f"Bearer {KEY}", now=0.0, max_tokens=9)
    assert not isinstance(too_long.value, RateLimitedError)
    assert guard.admit(f"Bearer {KEY}", now=0.0, max_tokens=8).max_tokens == 8
    guard.admit(f"Bearer {KEY}", now=1.0)
    with pytest.raises(RateLimitedError) as limited:
        guard.admit(f"Bearer {KEY}", now=2.0)
    assert limited.value.retry_after_s == pytest.approx(28.0)  # 2 per minute: one every 30 s, 2 s refilled
    with pytest.raises(CapacityError, match="a batch of 3 prompts"):
        guard.admit(f"Bearer {KEY}", now=1000.0, requests=3)
    assert guard.admit(f"Bearer {OTHER}", now=2.0, requests=50, max_tokens=10_000).requests_per_minute is None
