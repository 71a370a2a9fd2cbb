"""What an increment does after its shard write: the protocol's decisions, as tables.

A shard write is retried under one policy (``store/retry.py``) and then *ends*
one of five ways. Each ending leads to one next *step*, for a plain increment
and for a keyed one; a step that needs memcache (keeping the amount for a
later write) has a fallback when memcache fails too. These tables are the
rows W4-W11 and K2-K6 of ``docs/protocol.md``; ``tests/test_outcomes.py``
holds the two against each other. The shells (``paths/``, and an async shell
later) look the step up and carry it out; none of them decides it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType


class Ending(enum.Enum):
    """How a shard write's attempts ended."""

    LANDED = "landed"  # an attempt committed (or found its token: it had)
    REFUSED = "refused"  # every attempt was refused, and Datastore may take it later
    REJECTED = "rejected"  # refused for a reason no retry cures (permission, bad request)
    DOUBTFUL = "doubtful"  # some attempt may have been applied: its reply was lost
    OVERFLOW = "overflow"  # no shard can take the amount; nothing was written


class Step(enum.Enum):
    """What the increment does next."""

    ACKNOWLEDGE = "acknowledge"  # return: counted once
    STASH = "stash"  # keep the amount in delayed_incr for a later write; return
    KEEP_UNSURE = "keep unsure"  # keep it as an unsure entry, resolved by its token; return
    NOT_RECORDED = "not recorded"  # raise IncrementNotRecorded: certainly not counted
    OUTCOME_UNKNOWN = "outcome unknown"  # raise IncrementOutcomeUnknown: maybe counted
    OVERFLOW = "overflow"  # raise CounterOverflowError: nothing written


class Fold(enum.Enum):
    """What becomes of the delayed_incr amount a plain write folded in."""

    SETTLED = "settled"  # it is in the shard: its marker goes
    PUT_BACK = "put back"  # it certainly is not: back to pending
    IN_ENTRY = "in the unsure entry"  # it may be: the entry carries it, resolved by the token


#: A plain increment, after its write.
PLAIN: Mapping[Ending, Step] = MappingProxyType(
    {
        Ending.LANDED: Step.ACKNOWLEDGE,
        Ending.REFUSED: Step.STASH,
        Ending.REJECTED: Step.NOT_RECORDED,  # stashing would acknowledge what cannot land
        Ending.DOUBTFUL: Step.KEEP_UNSURE,  # stashing could count it twice
        Ending.OVERFLOW: Step.OVERFLOW,
    }
)

#: A keyed increment, after its write: never kept in memcache, since its key record
#: must be written with it; a retry with the same key settles any doubt.
KEYED: Mapping[Ending, Step] = MappingProxyType(
    {
        Ending.LANDED: Step.ACKNOWLEDGE,
        Ending.REFUSED: Step.NOT_RECORDED,
        Ending.REJECTED: Step.NOT_RECORDED,
        Ending.DOUBTFUL: Step.OUTCOME_UNKNOWN,
        Ending.OVERFLOW: Step.OVERFLOW,
    }
)

#: A bounded increment (paths/bounded.py), after its write: never kept in memcache
#: either, since a stash is spent without a look at the shards' shares of the bounds.
#: (A refusal for want of room, LimitReached, is decided before any ending.)
BOUNDED: Mapping[Ending, Step] = KEYED

#: The folded delayed_incr amount of a plain write, after its write.
FOLD: Mapping[Ending, Fold] = MappingProxyType(
    {
        Ending.LANDED: Fold.SETTLED,
        Ending.REFUSED: Fold.PUT_BACK,
        Ending.REJECTED: Fold.PUT_BACK,
        Ending.DOUBTFUL: Fold.IN_ENTRY,
        Ending.OVERFLOW: Fold.PUT_BACK,
    }
)


def when_memcache_fails(step: Step, *, maybe_applied: bool) -> Step:
    """The step instead of ``step`` when memcache could not carry it out.

    ``maybe_applied``: the failed memcache write may still have been applied (it
    was sent, and no answer came back), so the amount may be kept after all.
    """
    if step is Step.STASH:
        return Step.OUTCOME_UNKNOWN if maybe_applied else Step.NOT_RECORDED
    if step is Step.KEEP_UNSURE:
        return Step.OUTCOME_UNKNOWN  # the write itself may have landed
    return step


def fold_deadline(now: float, *, retry_deadline: float, rpc_timeout: float) -> float:
    """When a fold begun at ``now`` is over for sure: its write gave up or landed by then
    (with FOLD_MARGIN of slack). Past it, its marker is a vanished writer's (stash.py)."""
    return now + retry_deadline + rpc_timeout + FOLD_MARGIN


#: Slack on top of a fold's own time limits before its marker in delayed_incr expires.
FOLD_MARGIN = 2.0
