"""Times on the command line: read from what a user types, shown as UTC."""

from __future__ import annotations

import datetime as dt
import re

_RELATIVE = re.compile(r"(?:now)?\s*([+-])\s*([0-9]{1,9})\s*([smhd])", re.ASCII | re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_LAST_SECOND = 253402300799.0  # 9999-12-31T23:59:59Z


def parse_when(text: str, now: float) -> float:
    """A time on the command line as unix seconds.

    ``now``; relative to now (``-15m``, ``+2h``, ``now-1d``); unix seconds
    (``1700000000.5``); or ISO 8601 (``2024-05-01T12:00:00``, taken as UTC
    unless it carries an offset). Anything else raises ``ValueError``.
    """
    when = _parse_when(text.strip(), now)
    if not 0 <= when <= _LAST_SECOND:
        raise ValueError(f"{text!r} is outside 1970-01-01 to 9999-12-31")
    return when


def _parse_when(spec: str, now: float) -> float:
    if spec.lower() == "now":
        return now
    relative = _RELATIVE.fullmatch(spec)
    if relative is not None:
        sign, amount, unit = relative.groups()
        offset = int(amount) * _UNIT_SECONDS[unit.lower()]
        return now + offset if sign == "+" else now - offset
    if re.fullmatch(r"[0-9]{1,12}(?:\.[0-9]{1,9})?", spec, re.ASCII):
        return float(spec)
    # Python 3.10's fromisoformat does not read the "Z" suffix yet.
    iso = spec[:-1] + "+00:00" if spec[-1:] in ("Z", "z") else spec
    try:
        parsed = dt.datetime.fromisoformat(iso)
    except ValueError:
        raise ValueError(
            f"{spec!r} is not a time: use unix seconds, ISO 8601, 'now', or e.g. -15m"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    try:
        return parsed.timestamp()
    except (OverflowError, ValueError):
        raise ValueError(f"{spec!r} is outside 1970-01-01 to 9999-12-31") from None


def utc(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
