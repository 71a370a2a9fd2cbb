"""Every exception the library raises on purpose, in one place.

Bad input is reported with the built-in ``TypeError`` / ``ValueError`` (or a
subclass of them), so callers can catch the usual suspects; failures of the
backends get exceptions of their own so they can be told apart from bugs.
"""

from __future__ import annotations


class ShardedCounterError(Exception):
    """Base class of the errors that come from the backends, not from input."""


class ConfigurationError(ShardedCounterError, ValueError):
    """A setting is unknown, of the wrong type or out of range."""


class CounterOverflowError(ShardedCounterError, OverflowError):
    """No shard can take the delta without leaving the signed 64-bit range.

    Nothing was written when this is raised.
    """


class CacheUnavailable(ShardedCounterError):
    """memcached did not answer (down, stalled past the timeout, or refusing)."""


class DatastoreUnavailable(ShardedCounterError):
    """The shard write kept failing until the retry policy gave up."""


class IncrementNotRecorded(ShardedCounterError):
    """The shard write failed and the delta could not be stashed in memcache either.

    The increment was *not* acknowledged: the caller still owns it and may retry.
    ``delta`` is the amount that was not recorded. (Any ``delayed_incr``
    amount this call had taken to fold in went back to the stash.)
    """

    def __init__(self, name: str, delta: int, cause: BaseException) -> None:
        super().__init__(
            f"increment of {delta} to counter {name!r} was not recorded: the shard write "
            f"failed and memcache could not hold it as delayed_incr ({cause})"
        )
        self.name = name
        self.delta = delta
        self.__cause__ = cause


class IncrementOutcomeUnknown(IncrementNotRecorded):
    """The shard write may have landed (its reply was lost, and every retry failed),
    and memcache could not hold it as an unsure entry to resolve later.

    The caller cannot know whether the increment counts: retrying it may count
    it twice, dropping it may lose it.
    """

    def __init__(self, name: str, delta: int, cause: BaseException) -> None:
        super().__init__(name, delta, cause)
        self.args = (
            f"increment of {delta} to counter {name!r} may or may not have been recorded: "
            f"the shard write's outcome is unknown and memcache could not keep it to "
            f"resolve later ({cause})",
        )
