"""A Redis or Valkey cluster's rules that both cluster clients follow, with no I/O.

``cluster.RedisClusterClient`` (threads) and ``aio/redis_cluster.py`` (asyncio) send
the same ``commands.Call``s; what this module says they agree on:

- which hash slot a key is in, and how a multi-key read splits into one read per
  slot (a cluster refuses an ``MGET`` across slots);
- the answers that mean "not here, not now" (``MOVED``, ``ASK``, ``TRYAGAIN``,
  ``CLUSTERDOWN``): the node ran nothing, so following a redirect resends nothing
  that ran; how a ``MOVED``/``ASK`` answer reads (``Redirect``), and how many of
  them one call follows (``MAX_REDIRECTS``);
- ``ClusterRefused``, what a call that the cluster would not run raises;
- which keys a promoted primary's clean-up deletes (``RECORD_MATCH`` then
  ``is_record``): a counter's cached record, rebuilt from the shards when missing;
- a ``CLUSTER SLOTS`` answer read as a map of slot ranges to primaries
  (``SlotMap``, which the asyncio client keeps; the blocking one keeps redis-py's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, MovedError, TryAgainError

from ..memcached.ring import RECORD_KEY
from .commands import CacheNotReached, check_key

#: How many hash slots a cluster has.
SLOT_COUNT = 16384

#: How many ``MOVED``/``ASK`` redirects one call follows before it gives up.
MAX_REDIRECTS = 5

#: The least time between two readings of the topology that failures asked for, so
#: that a hundred callers failing at once during a failover read it once.
MIN_REFRESH_INTERVAL = 0.1

#: How many keys one ``SCAN`` step of a promoted primary's clean-up asks for.
SCAN_COUNT = 1000

#: The ``SCAN ... MATCH`` pattern of the clean-up; ``is_record`` says which of the
#: keys it finds are a counter's record (``<prefix>:t:<40 hex>``).
RECORD_MATCH = "*:t:*"

#: The cluster's answers that mean "not here, not now": the node ran nothing. Each is
#: a redis-py ``ResponseError``, so a client reads these before ``commands.failure``.
RAN_NOTHING: tuple[type[Exception], ...] = (MovedError, AskError, TryAgainError, ClusterDownError)

K = TypeVar("K", bound="str | bytes")
N = TypeVar("N")  # how a client names a node: an address, or redis-py's node name

Address = tuple[str, int]


class ClusterRefused(CacheNotReached):
    """The cluster ran nothing: ``CLUSTERDOWN`` (a slot with no live primary, as
    during a failover), ``TRYAGAIN`` (keys of a slot being moved), or ``MOVED``/``ASK``
    redirects that did not settle. ``maybe_applied`` is False: try again later."""


def slot_of(key: str | bytes) -> int:
    """The hash slot of ``key`` (checked as memcached would take it)."""
    return key_slot(check_key(key))


def by_slot(keys: Iterable[K]) -> dict[int, list[K]]:
    """``keys`` grouped by hash slot, each group in the order given."""
    groups: dict[int, list[K]] = {}
    for key in keys:
        groups.setdefault(slot_of(key), []).append(key)
    return groups


def is_record(key: bytes) -> bool:
    """Whether ``key`` (found by ``SCAN MATCH RECORD_MATCH``) is a counter's record."""
    return RECORD_KEY.fullmatch(key.decode("ascii", "replace")) is not None


@dataclasses.dataclass(frozen=True)
class Redirect:
    """A ``MOVED`` (the slot lives at ``address`` now) or ``ASK`` (this once, ask
    ``address``, after ``ASKING``) answer."""

    slot: int
    address: Address
    moved: bool


def redirect(answer: BaseException) -> Redirect | None:
    """``answer`` read as a redirect, or None when it is none."""
    if not isinstance(answer, AskError):  # MovedError is an AskError
        return None
    return Redirect(
        int(answer.slot_id), (str(answer.host), int(answer.port)), isinstance(answer, MovedError)
    )


def refusal(answer: BaseException) -> bool:
    """Whether ``answer`` is ``TRYAGAIN`` or ``CLUSTERDOWN``: ``ClusterRefused``."""
    return isinstance(answer, (TryAgainError, ClusterDownError))


class SlotMap:
    """Which primary serves each hash slot, from a ``CLUSTER SLOTS`` answer (redirects
    then point single slots elsewhere)."""

    def __init__(self, owners: Sequence[Address | None] | None = None) -> None:
        self._owners: list[Address | None] = list(owners or [None] * SLOT_COUNT)

    @classmethod
    def read(cls, answer: Any, asked: Address) -> SlotMap:
        """The map a ``CLUSTER SLOTS`` ``answer`` from the node at ``asked`` gives:
        ``[[first, last, [host, port, id, ...], replicas...], ...]``. An empty host is
        the node asked (Redis says so for itself when it knows no address of its own)."""
        owners: list[Address | None] = [None] * SLOT_COUNT
        for entry in answer:
            first, last, primary = int(entry[0]), int(entry[1]), entry[2]
            host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
            address = (host or asked[0], int(primary[1]))
            owners[first : last + 1] = [address] * (last - first + 1)
        return cls(owners)

    def primary(self, slot: int) -> Address | None:
        """The primary of ``slot``, or None when no node serves it."""
        return self._owners[slot]

    def serving(self) -> set[Address]:
        """The primaries that serve some slot."""
        return {owner for owner in self._owners if owner is not None}

    def move(self, slot: int, address: Address) -> None:
        """Point ``slot`` at ``address`` (a ``MOVED`` answer)."""
        self._owners[slot] = address


def newly_serving(before: set[N], after: set[N]) -> set[N]:
    """The primaries in ``after`` that did not serve before: promoted replicas (or new
    nodes), to be cleaned of counter records before they get a call."""
    return after - before
