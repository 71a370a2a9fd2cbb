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
    ShardedCounterError,
)

__all__ = [
    "CacheUnavailable",
    "ConfigurationError",
    "Counter",
    "CounterBuffer",
    "CounterOverflowError",
    "DatastoreUnavailable",
    "IncrementNotRecorded",
    "Settings",
    "ShardedCounterError",
    "config",
]
__version__ = "0.1.0"
