"""A small app of the kind sharded-counter is for: likes on posts, seats on a
flight, a per-user rate limit and page views per minute.

Everything connects on its first call, to whatever the settings name (here,
the environment: ``SHARDED_COUNTER_CACHE_URL`` and ``SHARDED_COUNTER_DATASTORE_URL``,
or ``DATASTORE_EMULATOR_HOST`` and ``MEMCACHED_HOSTS``). The limiter and the time
series are made per call: they check at once that a cache is configured, and the
tests configure one after importing the app.
"""

from __future__ import annotations

import time

from sharded_counter import BoundedCounter, Counter, LimitReached, RateLimiter, TimeSeries


class Likes(Counter):
    shards = 20  # one hot post takes many writes a second


def likes_per_user() -> RateLimiter:
    return RateLimiter("5/minute")


def views() -> TimeSeries:
    return TimeSeries("views", resolutions=[(60, 3600)])


def like(post: str, user: str, request_id: str) -> bool:
    """``user`` likes ``post``; False when they have liked too often this minute. A
    retried request (the same ``request_id``) counts once."""
    if not likes_per_user().hit(f"user:{user}").allowed:
        return False
    Likes(f"post:{post}").increment(idempotency_key=request_id)
    return True


def likes(post: str, *, exact: bool = False) -> int:
    """The likes of ``post``: from the cache, or summed from Datastore when ``exact``."""
    return Likes(f"post:{post}").get_count(nocache=exact)


def book(flight: str, seats: int, capacity: int) -> bool:
    """Take ``seats`` on ``flight``; False when fewer are left."""
    try:
        BoundedCounter(f"flight:{flight}", minimum=0, maximum=capacity).increment(seats)
    except LimitReached:
        return False
    return True


def view(page: str, at: float | None = None) -> None:
    views().incr(page, at=at)


def views_last_hour(page: str) -> int:
    now = time.time()
    return views().sum(page, now - 3600, now)
