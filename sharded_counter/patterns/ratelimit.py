"""Rate limits kept in memcache: at most N hits per window, per key.

Two strategies:

* ``fixed``: one memcache counter per key and window (``now // window``). It
  allows exactly N per window, but a burst straddling a window edge can get
  up to 2N within one window's length.
* ``sliding``: the previous window's count, weighted by how much of it the
  sliding window still overlaps, plus the current window's count. It smooths
  the edges at the cost of one more read, and assumes hits were spread evenly
  over the previous window.

A hit is counted before it is judged: ``incr`` returns the new total, so
concurrent hitters (threads, processes, machines) never both take the last
unit. A refused hit gives its cost back with ``decr``, so a refused hit never
uses up the allowance. Meanwhile it can make another hitter's check
see a total that is too high for a moment, so it can wrongly refuse that
hitter. It can never wrongly allow one: every allowed hit saw a total that
included every allowed hit before it.

When memcache cannot be reached the limiter *fails open* by default
(``on_outage="open"``): every hit is allowed, and one warning is logged when the
outage starts and one when it ends. A cache outage should not take the
application down with it. ``"closed"`` refuses every hit instead (for limits
that guard something costly), and ``"raise"`` raises ``CacheUnavailable``
(for tools that must not guess).

A value at a window's key that is not a count we could have made (garbled, or
forged: not ASCII digits, above any count hits could reach, or a count that
wrapped past memcached's unsigned 64 bits) reads as the whole limit spent,
under every ``on_outage``: the hit is refused, a warning is logged, and the key
is raised to the limit so that the rest of the window is refused too. It is
never read as room to allow a hit (docs/security.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import re
import time
from collections.abc import Callable
from typing import Literal, ParamSpec, TypeVar

from pymemcache.exceptions import MemcacheClientError

from ..cache.cas import Contended, Outcome, changing, on
from ..cache.client import (
    CLIENT_ERRORS,
    ClientSource,
    CommandClient,
    OutageLog,
    incr_or_add,
    key_digest,
)
from ..core import parse
from ..core.effects import Memcache, Steps, drive
from ..core.validation import check_choice
from ..errors import CacheUnavailable, ShardedCounterError

log = logging.getLogger("sharded_counter")

P = ParamSpec("P")
R = TypeVar("R")

Strategy = Literal["fixed", "sliding"]
STRATEGIES: tuple[Strategy, ...] = ("fixed", "sliding")
OnOutage = Literal["open", "closed", "raise"]
ON_OUTAGE: tuple[OnOutage, ...] = ("open", "closed", "raise")

#: The longest window: a sliding window's key must outlive two windows, and
#: memcached reads a relative expiry above 30 days as a timestamp.
MAX_WINDOW = 7 * 24 * 3600
#: memcached's counters are unsigned 64-bit; leave room for refunds and bursts.
MAX_AMOUNT = 2**62
#: The most a window's count can reach: the limit plus the cost of every hit in
#: flight at once, each at most MAX_AMOUNT. A count above it was not made by hits.
MAX_COUNT = 2**63 - 1
# memcached's answer when ``incr`` finds a value that is not a number (pymemcache's
# error for it; emcache fails to read the answer as an int: a ValueError). Either
# way the server answered, so it is not an outage.
_NOT_A_COUNT: tuple[type[BaseException], ...] = (MemcacheClientError, ValueError)
# Raising a garbled count to the limit failed (either shell's errors, or lost races).
_REPAIR_FAILED: tuple[type[BaseException], ...] = (Contended, CacheUnavailable, *CLIENT_ERRORS)

_UNITS = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600),
    **dict.fromkeys(("d", "day", "days"), 86400),
}
# ASCII digits only ("\d" would take any script's digits), and at most 19 of them.
_LIMIT = re.compile(
    r"\s*(?P<amount>[0-9]{1,19})\s*(?:/|\s+per\s+)\s*(?P<count>[0-9]{1,19})?\s*(?P<unit>[a-z]+)\s*",
    re.IGNORECASE | re.ASCII,
)
_FORMS = "'20/minute', '5/second', '100/hour' or '10 per 30 seconds'"


@dataclasses.dataclass(frozen=True)
class Limit:
    """``amount`` hits per ``window`` seconds."""

    amount: int
    window: int

    def __post_init__(self) -> None:
        for name in ("amount", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Limit.{name} must be an int, not {type(value).__name__}")
        if not 1 <= self.amount <= MAX_AMOUNT:
            raise ValueError(f"a rate limit allows 1 to 2**62 hits, not {self.amount}")
        if not 1 <= self.window <= MAX_WINDOW:
            raise ValueError(
                f"a rate limit window is 1 second to 7 days ({MAX_WINDOW} s), not {self.window} s"
            )

    @classmethod
    def parse(cls, text: str) -> Limit:
        """``"20/minute"``, ``"5/2 seconds"``, ``"10 per 30 seconds"``, ``"100/h"``..."""
        if not isinstance(text, str):
            raise TypeError(f"a rate limit is a str like {_FORMS}, not {type(text).__name__}")
        match = _LIMIT.fullmatch(text)
        if match is None:
            raise ValueError(f"a rate limit looks like {_FORMS}, not {text!r}")
        unit = match["unit"].lower()
        if unit not in _UNITS:
            raise ValueError(
                f"unknown unit {match['unit']!r} in rate limit {text!r}: "
                "use second(s), minute(s), hour(s) or day(s)"
            )
        count = int(match["count"]) if match["count"] is not None else 1
        if count < 1:
            raise ValueError(f"a rate limit window must be at least 1 {unit}, not {text!r}")
        return cls(int(match["amount"]), count * _UNITS[unit])

    def __str__(self) -> str:
        return f"{self.amount} per {self.window} second{'' if self.window == 1 else 's'}"


@dataclasses.dataclass(frozen=True)
class Decision:
    """The verdict on one hit.

    ``remaining``: hits of cost 1 still allowed in the current window (after
    this one, if it was allowed and spent). ``reset_at``: the unix time by which
    the whole limit is free again if no more hits come (the end of the window
    for ``fixed``, the end of the next one for ``sliding``).
    """

    allowed: bool
    remaining: int
    reset_at: float


class RateLimited(ShardedCounterError):
    """A call decorated with ``RateLimiter.limit`` is over its limit, so it did not run.

    Nothing of its cost was spent. ``key`` is the key it hit, ``decision`` the
    verdict (``decision.reset_at`` says when the limit is free again).
    """

    def __init__(self, key: str, decision: Decision) -> None:
        super().__init__(f"rate limit exceeded for {key!r}; free again at {decision.reset_at:.0f}")
        self.key = key
        self.decision = decision


class LimiterRules:
    """What a rate limiter decides, and the memcache calls it makes to decide, as steps
    (core/effects.py): ``RateLimiter`` carries them out in this thread, and
    ``sharded_counter.aio.AsyncRateLimiter`` in an event loop, on the same keys."""

    def __init__(
        self,
        limit: Limit | str,
        *,
        strategy: Strategy = "fixed",
        memcache_client: CommandClient | None = None,
        memcached_hosts: str | list[str] | tuple[str, ...] | None = None,
        cache_url: str | None = None,
        key_prefix: str | None = None,
        on_outage: OnOutage = "open",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rate = limit if isinstance(limit, Limit) else Limit.parse(limit)
        check_choice(strategy, "strategy", STRATEGIES)
        self.strategy: Strategy = strategy
        check_choice(on_outage, "on_outage", ON_OUTAGE)
        self.on_outage: OnOutage = on_outage
        self._clock = clock
        self._client = ClientSource(
            memcache_client,
            memcached_hosts=memcached_hosts,
            cache_url=cache_url,
            key_prefix=key_prefix,
            what=type(self).__name__,
        )
        self._outage = OutageLog(f"rate limit {self.rate}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.rate)!r}, strategy={self.strategy!r})"

    def _window(self) -> _Window:
        return _Window.at(self._clock(), self.rate.window)

    def _tested(self, current: int, previous: int, window: _Window, cost: int) -> Decision:
        used = self._used(current, previous, window)
        return self._decide(used + cost <= self.rate.amount, used, current, window)

    # -- the counting, as steps -----------------------------------------------------------

    def _hit(self, digest: str, cost: int, window: _Window) -> Steps[Decision]:
        current_key = self._key(digest, window.index)
        # A sliding window reads this key again as "previous" during the next window.
        expire = window.seconds_left(windows=2 if self.strategy == "sliding" else 1)
        try:
            current = yield from incr_or_add(current_key, cost, expire)
        except _NOT_A_COUNT:
            current = None
        if current is None or not cost <= current <= MAX_COUNT:
            # Not a count hits made: below our own cost it wrapped past 2**64.
            return (yield from self._garbled(current_key, expire, window))
        previous = 0
        if self.strategy == "sliding":
            previous_key = self._key(digest, window.index - 1)
            previous = self._count(previous_key, (yield Memcache("get", (previous_key,))))
        used = self._used(current, previous, window)
        if used <= self.rate.amount:
            return self._decide(True, used, current, window)
        # Over: give the cost back, so a refused hit never uses up the allowance.
        try:
            yield Memcache("decr", (current_key, cost, False))
        except _NOT_A_COUNT:  # garbage written since our incr: refused all the same
            return (yield from self._garbled(current_key, expire, window))
        return self._decide(False, used - cost, current - cost, window)

    def _garbled(self, key: str, expire: int, window: _Window) -> Steps[Decision]:
        """The window's count at ``key`` is not one hits made: refuse, and raise it to
        the limit so that the rest of the window is refused too (a ``cas``, which
        leaves a count at or above the limit alone)."""
        _report_garbled(str(self.rate), key, "it cannot be counted on")

        def at_least_the_limit(raw: bytes | None) -> Outcome[None]:
            count = _parsed(raw)
            if count is not None and self.rate.amount <= count <= MAX_COUNT:
                return None, None
            return None, str(self.rate.amount).encode()

        with contextlib.suppress(*_REPAIR_FAILED):  # refused all the same; the next hit retries
            yield from changing(key, at_least_the_limit, expire=expire, attempts=4)
        return self._decide(False, self.rate.amount, self.rate.amount, window)

    def _read(self, digest: str, window: _Window) -> Steps[tuple[int, int]]:
        keys = [self._key(digest, window.index)]
        if self.strategy == "sliding":
            keys.append(self._key(digest, window.index - 1))
        found = yield Memcache("get_many", (keys,))
        counts = [self._count(key, found.get(key)) for key in keys]
        return counts[0], counts[1] if len(counts) == 2 else 0

    def _count(self, key: str, raw: bytes | None) -> int:
        """The count of a window as read (0 when missing); one that is not a count hits
        made reads as the whole limit spent."""
        count = _parsed(raw)
        if count is None or count > MAX_COUNT:
            _report_garbled(str(self.rate), key, parse.describe(raw))
            return self.rate.amount
        return count

    def _used(self, current: int, previous: int, window: _Window) -> float:
        if self.strategy == "fixed":
            return current
        # The part of the previous window the sliding window still covers.
        return previous * (1 - window.elapsed_fraction) + current

    def _decide(self, allowed: bool, used: float, current: int, window: _Window) -> Decision:
        remaining = max(0, math.floor(self.rate.amount - used + 1e-9))
        if self.strategy == "fixed" or current == 0:
            reset_at = window.end
        else:
            reset_at = window.end + self.rate.window  # this window's hits fade out by then
        return Decision(allowed, remaining, float(reset_at))

    def _unavailable(self, exc: BaseException, window: _Window, cost: int) -> Decision:
        if self.on_outage == "raise":
            raise CacheUnavailable(f"rate limit {self.rate}: {exc}") from exc
        allow = self.on_outage == "open"
        consequence = "allowing every hit" if allow else "refusing every hit"
        self._outage.failed(exc, f"{consequence} until it answers")
        # Nothing is known about the window: report it as if this were its first hit.
        remaining = max(0, self.rate.amount - cost) if allow else 0
        return Decision(allow, remaining, float(window.end))

    def _key(self, digest: str, index: int) -> str:
        # The window length is part of the key: changing a limit starts afresh
        # rather than reading counts made under another window.
        return f"{self._client.key_prefix}:rl:{self.rate.window}:{digest}:{index}"


class RateLimiter(LimiterRules):
    """At most ``limit`` hits per window for each key, counted in memcache.

    ``limit`` is a ``Limit`` or a string such as ``"20/minute"``. Without
    ``memcache_client`` the cache comes from the settings: ``cache_url`` or
    ``memcached_hosts`` here, else ``SHARDED_COUNTER_CACHE_URL``, ``MEMCACHED_HOSTS``
    or the config (see ``sharded_counter.settings``).
    Keys may be any str: memcache only ever sees a hash of them.
    """

    # -- the verdicts -----------------------------------------------------------------

    def hit(self, key: str, cost: int = 1) -> Decision:
        """Spend ``cost`` on ``key`` if the limit allows it; say whether it did."""
        digest, cost = check_key(key), check_cost(cost)
        window = self._window()
        sent = time.monotonic()
        try:
            decision = drive(self._hit(digest, cost, window), on(self._client()))
        except CLIENT_ERRORS as exc:
            return self._unavailable(exc, window, cost)
        self._outage.answered(sent)
        return decision

    def test(self, key: str, cost: int = 1) -> Decision:
        """Would ``hit(key, cost)`` be allowed now? Spends nothing."""
        digest, cost = check_key(key), check_cost(cost)
        window = self._window()
        sent = time.monotonic()
        try:
            current, previous = drive(self._read(digest, window), on(self._client()))
        except CLIENT_ERRORS as exc:
            return self._unavailable(exc, window, cost)
        self._outage.answered(sent)
        return self._tested(current, previous, window, cost)

    def limit(
        self, key_func: Callable[P, str], *, cost: int = 1
    ) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Decorate a function so each call hits ``key_func(*args, **kwargs)``.

        A call over the limit raises ``RateLimited`` (with the decision) and the
        function does not run.
        """
        check_cost(cost)

        def decorate(func: Callable[P, R]) -> Callable[P, R]:
            @functools.wraps(func)
            def limited(*args: P.args, **kwargs: P.kwargs) -> R:
                key = key_func(*args, **kwargs)
                decision = self.hit(key, cost)
                if not decision.allowed:
                    raise RateLimited(key, decision)
                return func(*args, **kwargs)

            return limited

        return decorate


@dataclasses.dataclass(frozen=True)
class _Window:
    now: float
    length: int
    index: int

    @classmethod
    def at(cls, now: float, length: int) -> _Window:
        return cls(now, length, math.floor(now / length))

    @property
    def end(self) -> int:
        return (self.index + 1) * self.length

    @property
    def elapsed_fraction(self) -> float:
        return min(1.0, max(0.0, (self.now - self.index * self.length) / self.length))

    def seconds_left(self, *, windows: int) -> int:
        # +1: memcached's clock ticks in whole seconds, so never cut a window short.
        return max(1, math.ceil(self.end + (windows - 1) * self.length - self.now) + 1)


def check_key(key: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"a rate limit key is a str, not {type(key).__name__}")
    return key_digest(key)


def check_cost(cost: int) -> int:
    if isinstance(cost, bool) or not isinstance(cost, int):
        raise TypeError(f"cost must be an int, not {type(cost).__name__}")
    if not 1 <= cost <= MAX_AMOUNT:
        raise ValueError(f"cost must be 1 to 2**62, not {cost} (use test() to spend nothing)")
    return cost


@functools.lru_cache(maxsize=256)
def _report_garbled(rate: str, key: str, what: str) -> None:
    """Log a garbled window once per key (while among the last 256): a hostile value
    may sit at a key for a whole window, under every hit."""
    log.warning(
        "rate limit %s: the count at %s in memcache is not one hits made (%s); read as "
        "the whole limit spent until the window ends (docs/security.md)",
        rate,
        key,
        what,
    )


def _parsed(raw: bytes | None) -> int | None:
    """A window's count as memcached keeps it (ASCII digits, padded with spaces after
    some decrs); 0 when missing, None when it is not a count at all."""
    if raw is None:
        return 0
    try:
        return parse.counter(raw)
    except parse.Garbled:
        return None
