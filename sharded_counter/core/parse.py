"""Strict parsing of what we read back from memcache.

Anyone who can write to memcache can put any bytes at any of our keys. Python's
own ``int()`` and ``float()`` are lenient in ways that matter here: they take
``" 1"``, ``"+1"``, ``"1_000"``, digits of any script (``"\\u0661"``), and ``float()``
takes ``"inf"`` and ``"nan"``. So every decoder of a memcache value parses with
these functions instead, which accept exactly what we write (and what memcached
writes for its own counters) and raise ``Garbled`` for anything else: ASCII
digits only, in canonical form, within the range a field can hold, finite
non-negative deadlines, and bounded lengths. What a caller does with a garbled
value is its own documented outcome (docs/security.md).

Pure: no I/O. Callers log what they drop, using ``describe`` for the bytes.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT64_MAX = 2**64 - 1
#: The latest deadline we accept: the end of year 9999, in unix seconds.
MAX_DEADLINE = 253_402_300_799.0

# Canonical integers, as str(int) writes them: no sign but '-', no leading zeros,
# no spaces or underscores, ASCII digits only; at most 20 digits (uint64's width).
_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]{0,19})", re.ASCII)
# memcached's counters: canonical digits, padded with spaces after a decr that
# shortened them (older servers do that).
_COUNTER = re.compile(rb"(0|[1-9][0-9]{0,19}) *", re.ASCII)
# Deadlines as we write them (``%.3f``): whole seconds and up to 6 decimals.
_DEADLINE = re.compile(r"(?:0|[1-9][0-9]{0,11})(?:\.[0-9]{1,6})?", re.ASCII)
# Tokens (write tokens, claims, set tokens): a few ASCII letters, digits and '-'/'_'.
_TOKEN = re.compile(r"[0-9A-Za-z_-]{1,64}", re.ASCII)
# Datastore transaction ids, as we write them: unpadded base64url, at most 384 bytes.
_TRANSACTION = re.compile(r"[0-9A-Za-z_-]{2,512}", re.ASCII)

_DESCRIBED = 80  # bytes of a garbled value shown in a log line


class Garbled(ValueError):
    """A value read from memcache is not one we could have written."""


def text(raw: bytes, *, limit: int) -> str:
    """``raw`` as ASCII text of at most ``limit`` bytes."""
    if len(raw) > limit:
        raise Garbled(f"{len(raw)} bytes, more than the {limit} this value may hold")
    try:
        return bytes(raw).decode("ascii")
    except UnicodeDecodeError as exc:
        raise Garbled(f"not ASCII: {describe(raw)}") from exc


def integer(value: str, *, lo: int = INT64_MIN, hi: int = INT64_MAX) -> int:
    """The canonical decimal integer ``value``, which must lie in ``[lo, hi]``."""
    if not _INTEGER.fullmatch(value) or value == "-0":
        raise Garbled(f"not a canonical integer: {value[:_DESCRIBED]!r}")
    number = int(value)
    if not lo <= number <= hi:
        raise Garbled(f"{number} is outside [{lo}, {hi}]")
    return number


def counter(raw: bytes, *, hi: int = UINT64_MAX) -> int:
    """A memcached counter's value (digits, maybe space-padded) of at most ``hi``."""
    match = _COUNTER.fullmatch(bytes(raw))
    if match is None:
        raise Garbled(f"not a memcached counter: {describe(raw)}")
    number = int(match[1])
    if number > hi:
        raise Garbled(f"counter {number} is above {hi}")
    return number


def deadline(value: str) -> float:
    """A unix time as we write it: finite, non-negative, before year 10000."""
    if not _DEADLINE.fullmatch(value):
        raise Garbled(f"not a deadline: {value[:_DESCRIBED]!r}")
    seconds = float(value)
    if not (math.isfinite(seconds) and 0.0 <= seconds <= MAX_DEADLINE):
        raise Garbled(f"deadline {value!r} is out of range")
    return seconds


def token(value: str) -> str:
    """A token as we make them: 1 to 64 ASCII letters, digits, '-' or '_'."""
    if not _TOKEN.fullmatch(value):
        raise Garbled(f"not a token: {value[:_DESCRIBED]!r}")
    return value


def transaction(value: str) -> bytes:
    """A transaction id as ``base64url`` writes it: 2 to 512 characters, unpadded
    (Firestore's ids are far shorter)."""
    if not _TRANSACTION.fullmatch(value) or len(value) % 4 == 1:
        raise Garbled(f"not a transaction: {value[:_DESCRIBED]!r}")
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def base64url(raw: bytes) -> str:
    """``raw`` in unpadded base64url: letters, digits, '-' and '_' only, so it never
    meets a separator of the values it goes in."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def describe(raw: bytes | None) -> str:
    """A short, printable, single-line form of ``raw`` for a log line: a garbled value
    may be long, or hold newlines meant to forge log lines."""
    if raw is None:
        return "nothing"
    head = bytes(raw[:_DESCRIBED])
    more = f"... ({len(raw)} bytes)" if len(raw) > _DESCRIBED else ""
    return f"{head!r}{more}"


def fingerprint(raw: bytes) -> str:
    """A short digest of ``raw``: what a log-once memo keeps of a garbled value, which
    may be up to a megabyte, instead of the value itself."""
    return hashlib.blake2b(bytes(raw), digest_size=16).hexdigest()
