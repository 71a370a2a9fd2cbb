"""Sharded counters on Google Cloud Datastore with memcache in front."""

from ._version import __version__ as __version__
from .bounded import BoundedCounter
from .counter import Counter, Verification
from .errors import (
    CacheUnavailable,
    ConfigurationError,
    ConfigurationTypeError,
    CounterIsBounded,
    CounterOverflowError,
    DatastoreUnavailable,
    IncrementNotRecorded,
    IncrementOutcomeUnknown,
    LimitReached,
    ShardedCounterError,
)
from .paths.maintenance import purge_expired_keys
from .patterns.buffer import CounterBuffer
from .patterns.lock import Holder, Lease, Locked, lock, who_holds
from .patterns.ratelimit import Decision, Limit, RateLimited, RateLimiter
from .patterns.shared_buffer import SharedBuffer
from .patterns.timeseries import TimeSeries
from .process import reconnect
from .settings import Settings, config

__all__ = [
    "BoundedCounter",
    "CacheUnavailable",
    "ConfigurationError",
    "ConfigurationTypeError",
    "Counter",
    "CounterBuffer",
    "CounterIsBounded",
    "CounterOverflowError",
    "DatastoreUnavailable",
    "Decision",
    "Holder",
    "IncrementNotRecorded",
    "IncrementOutcomeUnknown",
    "Lease",
    "Limit",
    "LimitReached",
    "Locked",
    "RateLimited",
    "RateLimiter",
    "Settings",
    "ShardedCounterError",
    "SharedBuffer",
    "TimeSeries",
    "Verification",
    "config",
    "lock",
    "purge_expired_keys",
    "reconnect",
    "who_holds",
]
