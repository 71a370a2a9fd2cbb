"""Local backends for sharded-counter: Datastore emulators and memcached servers.

Everything here runs real server processes on loopback ports, for tests, benchmarks
and a developer's shell (``python -m sharded_counter_emulator start``). Importing this
package starts nothing.
"""

from __future__ import annotations

from .clients import datastore_client
from .datastore import DatastoreEmulator
from .engines import ENGINES, Engine
from .errors import BackendError, BackendTimeout, MissingDependency
from .memcached import Memcached
from .ports import free_port
from .redis_cluster import RedisCluster
from .redis_server import RedisServer
from .sdk import sdk_root
from .stack import BackendStack

__all__ = [
    "ENGINES",
    "BackendError",
    "BackendStack",
    "BackendTimeout",
    "DatastoreEmulator",
    "Engine",
    "Memcached",
    "MissingDependency",
    "RedisCluster",
    "RedisServer",
    "datastore_client",
    "free_port",
    "sdk_root",
]
