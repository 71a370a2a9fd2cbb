"""How a total is spread over shards, and the range a shard keeps to."""

from __future__ import annotations

from .validation import INT64_MAX


def within(value: int, limit: int) -> bool:
    """Is ``value`` in ``[-limit - 1, limit]`` (the signed range of a shard)?"""
    return -limit - 1 <= value <= limit


def spread(value: int, slots: int, limit: int = INT64_MAX) -> list[int]:
    """Split ``value`` evenly over ``slots`` shards, so each keeps the most headroom.

    Raises ValueError when a shard would leave ``[-limit - 1, limit]``.
    """
    base, extra = divmod(value, slots)
    amounts = [base + 1 if i < extra else base for i in range(slots)]
    if not all(within(a, limit) for a in amounts):
        raise ValueError(f"{value} does not fit in {slots} shards of at most {limit} each")
    return amounts
