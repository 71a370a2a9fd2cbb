"""Every exception the library raises on purpose derives from ``ShardedCounterError``.

Bad input is reported with the built-in ``TypeError`` / ``ValueError`` (or a
subclass of them), so callers can catch the usual suspects; failures of the
backends get exceptions of their own so they can be told apart from bugs.

They are defined here, but for three that are defined beside what they carry or
what they must also be: ``Locked`` (``patterns/lock.py``, with its ``Holder``),
``RateLimited`` (``patterns/ratelimit.py``, with its ``Decision``) and the
cluster's ``ServerUnavailable`` (``cache/memcached/ring.py``, a ``CacheUnavailable`` that
is pymemcache's ``MemcacheError`` too); and the Redis client's, which are also the
pymemcache or socket errors a memcached client raises (``cache/redis/client.py``).
"""

from __future__ import annotations

from typing import Protocol


class ShardedCounterError(Exception):
    """Base class of the errors that come from the backends, not from input: their
    failures, and their refusals (a lock held, a rate limit reached)."""


class ConfigurationError(ShardedCounterError, ValueError):
    """A setting is unknown, of the wrong type or out of range."""


class ConfigurationTypeError(ConfigurationError, TypeError):
    """A setting is of the wrong type: a ``ConfigurationError`` that is a ``TypeError`` too."""


class CounterOverflowError(ShardedCounterError, OverflowError):
    """No shard can take the delta without leaving the signed 64-bit range (or, for
    ``Counter.defer`` and ``SharedBuffer.increment``, the amount pending in memcache
    would leave it).

    Nothing was written when this is raised.
    """


class CacheUnavailable(ShardedCounterError):
    """memcached did not answer (down, stalled past the timeout, or refusing).

    ``maybe_applied`` is true when the failed call was a write that may still have
    been applied: sent, and then no answer (a timeout, a connection lost mid-call).
    """

    def __init__(self, message: str, *, maybe_applied: bool = False) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


class DatastoreUnavailable(ShardedCounterError):
    """Datastore failed a read, a ``count = v`` or a ``delete`` until the retry policy
    gave up (down, timing out, or refusing the request).

    Never raised by ``increment``, whose failures say whether the delta counted
    (``IncrementNotRecorded``, ``IncrementOutcomeUnknown``). A ``count = v`` that
    raises it may or may not have been applied: setting the same value again is
    safe. A ``delete`` that raises it may have deleted some shards: run it again.
    """


class IncrementNotRecorded(ShardedCounterError):
    """The increment was certainly *not* counted, and nothing of it is kept anywhere.

    The shard write failed in a way that shows it was not applied, and it could
    not be stashed in memcache either (memcache down or not configured, or the
    increment carried an idempotency key, which is never stashed). The caller
    still owns the increment: retrying it is always safe, with or without its key.
    ``delta`` is the amount that was not recorded.
    """

    def __init__(self, name: str, delta: int, cause: BaseException) -> None:
        super().__init__(
            f"increment of {delta} to counter {name!r} was not recorded: the shard write "
            f"failed and the increment could not be kept for a later write ({cause})"
        )
        self.name = name
        self.delta = delta
        self.__cause__ = cause


class IncrementOutcomeUnknown(ShardedCounterError):
    """The increment may or may not have been counted.

    A shard write may have landed (a reply was lost, and every retry failed), and
    it could not be kept in memcache as an unsure entry to resolve later (memcache
    down or not configured). Retrying it without an idempotency key may count it
    twice; dropping it may lose it. Retrying with the *same* idempotency key is
    always safe: the key is written atomically with the shard, so a retry finds
    it and counts nothing if the first attempt landed. ``delta`` is the amount
    in doubt.

    Deliberately not a subclass of ``IncrementNotRecorded``: ``except
    IncrementNotRecorded: retry`` must never retry an increment that may count.
    """

    def __init__(self, name: str, delta: int, cause: BaseException) -> None:
        super().__init__(
            f"increment of {delta} to counter {name!r} may or may not have been recorded: "
            f"the shard write's outcome is unknown and it could not be kept to resolve "
            f"later ({cause})"
        )
        self.name = name
        self.delta = delta
        self.__cause__ = cause


class CounterIsBounded(ShardedCounterError):
    """A plain ``Counter`` refused to write a counter that has bounds in Datastore (a
    ``BoundedCounter``'s): its writes do not spend the shards' shares of the bounds,
    so the bounds would stop holding. Nothing was written.

    Write it with a ``BoundedCounter`` (on the command line: ``sharded-counter
    bounded NAME``). ``minimum`` and ``maximum`` are the stored bounds.
    """

    def __init__(self, name: str, bounds: _HasBounds) -> None:
        super().__init__(
            f"counter {name!r} has bounds [{bounds.minimum}, {bounds.maximum}] in Datastore: "
            "write it with a BoundedCounter (sharded-counter bounded NAME), not a plain "
            "Counter, whose writes would break them; nothing was written"
        )
        self.name = name
        self.minimum: int | None = bounds.minimum
        self.maximum: int | None = bounds.maximum


class LimitReached(ShardedCounterError):
    """A ``BoundedCounter`` refused: the total would leave its bounds. Nothing was written.

    For an increment, ``delta`` is the amount refused: every shard's share of the
    room together, read in one consistent snapshot, lacked it (or it is larger
    than the bounds' whole range). For ``count = v`` and a layout, ``delta`` is the
    total that is outside the bounds. ``minimum`` and ``maximum`` are the bounds
    (None: none on that side). Retrying is safe, and succeeds once others have
    released room.
    """

    def __init__(self, name: str, delta: int, bounds: _HasBounds, *, setting: bool = False) -> None:
        low = "-inf" if bounds.minimum is None else bounds.minimum
        high = "+inf" if bounds.maximum is None else bounds.maximum
        what = f"a total of {delta}" if setting else f"an increment of {delta}"
        super().__init__(
            f"counter {name!r} refused {what}: its total must stay within [{low}, {high}]; "
            "nothing was written"
        )
        self.name = name
        self.delta = delta
        self.minimum: int | None = bounds.minimum
        self.maximum: int | None = bounds.maximum


class _HasBounds(Protocol):
    @property
    def minimum(self) -> int | None: ...

    @property
    def maximum(self) -> int | None: ...
