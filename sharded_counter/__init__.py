"""Sharded counters on Google Cloud Datastore with memcache in front."""

from .buffer import CounterBuffer
from .config import Settings, config
from .counter import Counter
from .errors import (
    CacheUnavailable,
    ConfigurationError,
    CounterOverflowError,
    DatastoreUnavailable,
    IncrementNotRecorded,
    IncrementOutcomeUnknown,
    ShardedCounterError,
)
from .lock import Holder, Locked, lock, who_holds
from .maintenance import purge_expired_keys
from .ratelimit import Decision, Limit, RateLimited, RateLimiter
from .timeseries import TimeSeries

__all__ = [
    "CacheUnavailable",
    "ConfigurationError",
    "Counter",
    "CounterBuffer",
    "CounterOverflowError",
    "DatastoreUnavailable",
    "Decision",
    "Holder",
    "IncrementNotRecorded",
    "IncrementOutcomeUnknown",
    "Limit",
    "Locked",
    "RateLimited",
    "RateLimiter",
    "Settings",
    "ShardedCounterError",
    "TimeSeries",
    "config",
    "lock",
    "purge_expired_keys",
    "who_holds",
]
__version__ = "0.1.0"
