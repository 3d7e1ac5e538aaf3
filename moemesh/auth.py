"""API keys for the gateway's client-facing APIs: the key file, verification, per-key limits.

Pure (no grpc, no clock: callers pass `now`), so the gRPC front (gateway/api_keys.py) and the HTTP
API share it. A client sends `authorization: Bearer <key>` (gRPC metadata or HTTP header).

The key file (`--api-keys-file`) holds one key per line, never the key itself:

    # sha256 hex of the key        optional limits
    5f0c...e1a9  rpm=60  max_tokens=512  name=team-a
    9b1d...03c4

- the first field is the SHA-256 of the key's UTF-8 bytes, 64 hex digits (`moemesh api-key` prints
  a new key and its line);
- `rpm=N`: at most N requests per minute (a token bucket of N, refilled N/60 per second; a batch
  counts one request per prompt); over it: RESOURCE_EXHAUSTED (HTTP 429) with `retry-after`;
- `max_tokens=N`: at most N new tokens per request (max_new_tokens, or the gateway's default when
  unset); over it: RESOURCE_EXHAUSTED;
- `name=LABEL`: for logs (default: the hash's first 8 digits);
- `#` starts a comment; blank lines are skipped. Anything else is a ConfigError naming the line.

A presented key is hashed and compared with every entry's hash by `hmac.compare_digest` (constant
time, every entry, no early exit).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from moemesh.errors import CapacityError, ConfigError, RateLimitedError, UnauthenticatedError, read_text

KEY_PREFIX = "mm-"  # new keys start with it (easy to spot in a leaked log)
_LIMITS = ("rpm", "max_tokens")


@dataclass(frozen=True)
class KeyEntry:
    """One line of the key file."""

    digest: bytes  # SHA-256 of the key, 32 bytes
    name: str
    requests_per_minute: int | None = None
    max_tokens: int | None = None


@dataclass(frozen=True)
class ApiKeys:
    """Every accepted key (by hash)."""

    entries: tuple[KeyEntry, ...]

    def verify(self, key: str) -> KeyEntry | None:
        """The entry whose hash is `key`'s, compared in constant time with every entry; None if none."""
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        found = None
        for entry in self.entries:
            if hmac.compare_digest(digest, entry.digest) and found is None:
                found = entry
        return found


def key_digest(key: str) -> str:
    """SHA-256 hex of a key: what the key file stores."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key(requests_per_minute: int | None = None, max_tokens: int | None = None, name: str = "") -> tuple[str, str]:
    """(a new random key, its key-file line)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    fields = [key_digest(key)]
    fields += [f"rpm={requests_per_minute}"] if requests_per_minute is not None else []
    fields += [f"max_tokens={max_tokens}"] if max_tokens is not None else []
    fields += [f"name={name}"] if name else []
    return key, "  ".join(fields)


def parse_key_file(text: str, source: str = "the API key file") -> ApiKeys:
    """ApiKeys from the file's text (module docstring); ConfigError naming `source` and the line."""
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line:
            try:
                entries.append(_entry(line))
            except ValueError as exc:
                raise ConfigError(f"{source}, line {number}: {exc}") from None
    digests = [e.digest for e in entries]
    if len(set(digests)) != len(digests):
        raise ConfigError(f"{source}: the same key hash is listed twice")
    return ApiKeys(tuple(entries))


def load_key_file(path: Path) -> ApiKeys:
    """`parse_key_file` of the file at `path` (ConfigError if it cannot be read)."""
    return parse_key_file(read_text(path, "API key file", ConfigError), str(path))


def _entry(line: str) -> KeyEntry:
    first, *rest = line.split()
    if len(first) != 64 or any(c not in "0123456789abcdefABCDEF" for c in first):
        raise ValueError(f"expected the key's SHA-256 as 64 hex digits first, got {first[:16]!r}"
                         + ("..." if len(first) > 16 else ""))
    options: dict[str, str] = {}
    for item in rest:
        name, sep, value = item.partition("=")
        if not sep or name not in (*_LIMITS, "name") or name in options:
            raise ValueError(f"unknown or repeated option {item!r} (rpm=N, max_tokens=N, name=LABEL)")
        options[name] = value
    limits = {}
    for name in _LIMITS:
        if name in options:
            if not options[name].isdigit() or int(options[name]) < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {options[name]!r}")
            limits[name] = int(options[name])
    return KeyEntry(bytes.fromhex(first), options.get("name") or first[:8].lower(), limits.get("rpm"),
                    limits.get("max_tokens"))


def bearer_key(authorization: str | None) -> str | None:
    """The key of an `authorization: Bearer <key>` value (scheme case-insensitive); None otherwise."""
    if not authorization:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class RateLimiter:
    """Token buckets by key name: a key limited to N per minute holds up to N, refilled N/60 per
    second from the time of its first request. `now` is any monotonic clock in seconds."""

    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def take(self, key: str, per_minute: int, now: float, cost: int = 1) -> float:
        """Spend `cost` of `key`'s bucket: 0.0 when allowed, else the seconds until it would be
        (nothing is spent then; math.inf when `cost` exceeds the bucket itself)."""
        bucket = self._buckets.setdefault(key, _Bucket(float(per_minute), now))
        rate = per_minute / 60.0
        bucket.tokens = min(float(per_minute), bucket.tokens + max(0.0, now - bucket.at) * rate)
        bucket.at = max(bucket.at, now)
        if cost > per_minute:
            return math.inf
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return 0.0
        return (cost - bucket.tokens) / rate


class KeyGuard:
    """Admission by API key: authenticate, then the key's limits (module docstring)."""

    def __init__(self, keys: ApiKeys):
        self.keys = keys
        self.limiter = RateLimiter()

    def authenticate(self, authorization: str | None) -> KeyEntry:
        """The caller's entry (no limit is charged); UnauthenticatedError without a valid key."""
        key = bearer_key(authorization)
        if key is None:
            raise UnauthenticatedError("an API key is required: send the metadata / header "
                                       "'authorization: Bearer <key>'")
        entry = self.keys.verify(key)
        if entry is None:
            raise UnauthenticatedError("the API key is not valid")
        return entry

    def admit(self, authorization: str | None, now: float, requests: int = 1, max_tokens: int = 0) -> KeyEntry:
        """The caller's entry, once its request passes its limits: `requests` prompts asking for up to
        `max_tokens` new tokens each. UnauthenticatedError without a valid key; CapacityError over
        max_tokens; RateLimitedError (with retry_after_s) over the per-minute rate."""
        entry = self.authenticate(authorization)
        if entry.max_tokens is not None and max_tokens > entry.max_tokens:
            raise CapacityError(f"this API key allows at most {entry.max_tokens} new tokens per request, "
                                f"asked for {max_tokens}; ask for fewer")
        if entry.requests_per_minute is not None:
            wait = self.limiter.take(entry.digest.hex(), entry.requests_per_minute, now, cost=requests)
            if math.isinf(wait):
                raise CapacityError(f"a batch of {requests} prompts is over this API key's limit of "
                                    f"{entry.requests_per_minute} requests per minute; split it")
            if wait > 0:
                raise RateLimitedError(f"over this API key's limit of {entry.requests_per_minute} requests "
                                       f"per minute; retry in {math.ceil(wait)} s", wait)
        return entry
