"""Proof that the simulator can fail: the protocol with one rule broken at a time.

Each ``Mutation`` patches one decision of the real code for as long as it is
applied, the way a careless change would break it; ``hunt`` runs histories,
seed after seed and engine after engine, until one of them reports a
violation. A rule the simulator could not find broken is a rule it does not
check. ``python -m sharded_counter.tools.simulate --mutations`` runs them all
and prints how long each took to find (docs/protocol.md, section 6).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from types import MappingProxyType
from typing import Any

from ...core import outcomes, tokens
from ...core.outcomes import Ending, Step
from ...core.stash import Stash
from ...paths import shard_writes, transforms, unsure
from ...paths.picker import ShardPicker
from ...paths.unsure import UnsureResolver
from .run import Outcome, run_history
from .world import Knobs

Patch = Callable[[contextlib.ExitStack], None]


def _set(stack: contextlib.ExitStack, owner: Any, name: str, value: Any) -> None:
    old = getattr(owner, name)
    setattr(owner, name, value)
    stack.callback(setattr, owner, name, old)


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    rule: str  # the rule it breaks, in docs/protocol.md's words
    patch: Patch

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            self.patch(stack)
            yield


def _skip_token_check(stack: contextlib.ExitStack) -> None:
    from ...store import shards

    _set(stack, shards, "left_to_write", lambda token, amount, *_: amount)


def _forget_pinned(stack: contextlib.ExitStack) -> None:
    original = tokens.slot_after_write
    _set(stack, tokens, "slot_after_write", lambda mine, token, _pinned: original(mine, token, ()))


def _ignore_own_transforms(stack: contextlib.ExitStack) -> None:
    _set(stack, ShardPicker, "transforms_pending", lambda _self, _index: (False, []))


def _fold_twice(stack: contextlib.ExitStack) -> None:
    _set(stack, Stash, "landed", Stash.released)


def _set_ignores_folds(stack: contextlib.ExitStack) -> None:
    original = Stash.set_begun

    def set_begun(self: Stash, token: str, deadline: float) -> Stash:
        begun = original(self, token, deadline)
        return dataclasses.replace(begun, folds=self.folds)  # the folds left unfenced

    _set(stack, Stash, "set_begun", set_begun)


def _doubtful_as_stash(stack: contextlib.ExitStack) -> None:
    stashed = MappingProxyType({**outcomes.PLAIN, Ending.DOUBTFUL: Step.STASH})
    _set(stack, outcomes, "PLAIN", stashed)


def _lost_reply_as_not_recorded(stack: contextlib.ExitStack) -> None:
    original = outcomes.when_memcache_fails

    def when_memcache_fails(step: Step, *, maybe_applied: bool) -> Step:
        return original(step, maybe_applied=False)

    _set(stack, outcomes, "when_memcache_fails", when_memcache_fails)


def _no_transform_fence(stack: contextlib.ExitStack) -> None:
    def fenced(_ctx: Any, _transaction: bytes) -> Any:
        return  # "it is over", with no rollback answered
        yield  # pragma: no cover

    for module in (shard_writes, transforms, unsure):
        _set(stack, module, "fence", fenced)


def _resolve_without_look(stack: contextlib.ExitStack) -> None:
    def resolve_one(self: UnsureResolver, token: str, entry: Any) -> Any:
        return []  # "it landed", without a transaction looking for its token
        yield  # pragma: no cover

    _set(stack, UnsureResolver, "_resolve_one", resolve_one)


def _short_fold_deadline(stack: contextlib.ExitStack) -> None:
    _set(
        stack,
        outcomes,
        "fold_deadline",
        lambda now, *, retry_deadline, rpc_timeout: now + 0.001,
    )


def _keys_unrecorded(stack: contextlib.ExitStack) -> None:
    from ...store.keyed import KeyedShardStore

    def inserts(self: KeyedShardStore, name: str, keys: Any, ttl: float) -> list[Any]:
        return []  # the shard is written, the key's record is not

    def applied(self: KeyedShardStore, name: str, keys: Any) -> Any:
        return set()
        yield  # pragma: no cover

    _set(stack, KeyedShardStore, "inserts", inserts)
    _set(stack, KeyedShardStore, "applied", applied)


def _stash_dropped(stack: contextlib.ExitStack) -> None:
    from ...cache.stashes import PendingStashes

    def stash(
        self: PendingStashes, stash_key: str, delta: int, *, within_int64: bool = False
    ) -> Any:
        return 0  # "kept", and nothing kept
        yield  # pragma: no cover

    _set(stack, PendingStashes, "stash", stash)


def _unsure_dropped(stack: contextlib.ExitStack) -> None:
    from ...cache.unsure import UnsureWrites

    def make_unsure(self: UnsureWrites, *args: Any, **kwargs: Any) -> Any:
        return None  # "kept as unsure", and nothing kept
        yield  # pragma: no cover

    _set(stack, UnsureWrites, "make_unsure", make_unsure)


MUTATIONS = [
    Mutation("skip-token-check", "I5/W6: a retry looks for its own token first", _skip_token_check),
    Mutation("forget-pinned", "I5: a pinned token stays in its slot", _forget_pinned),
    Mutation("fold-twice", "S: a fold that landed drops its marker, no more", _fold_twice),
    Mutation(
        "ignore-own-transforms",
        "W12: no write lands where a transform of its process may still land",
        _ignore_own_transforms,
    ),
    Mutation("set-ignores-folds", "I6: a set fences every fold in flight", _set_ignores_folds),
    Mutation(
        "doubtful-as-stash", "W9: a write that may have landed is kept unsure", _doubtful_as_stash
    ),
    Mutation(
        "lost-reply-as-not-recorded",
        "W8': a stash whose reply was lost is outcome unknown",
        _lost_reply_as_not_recorded,
    ),
    Mutation(
        "no-transform-fence",
        "W6': a transform's token is looked for only once its transaction is fenced",
        _no_transform_fence,
    ),
    Mutation(
        "resolve-without-look",
        "I5: an unsure write is settled by a transaction that looked for its token",
        _resolve_without_look,
    ),
    Mutation(
        "keys-unrecorded",
        "I4: a keyed write inserts its key's record in the same commit",
        _keys_unrecorded,
    ),
    Mutation("stash-dropped", "W7: a write refused for sure is kept in pending", _stash_dropped),
    Mutation("unsure-dropped", "W9: a write in doubt is kept as an unsure entry", _unsure_dropped),
    Mutation(
        "short-fold-deadline",
        "S: a fold marker outlives its write (retry_deadline + rpc_timeout + margin)",
        _short_fold_deadline,
    ),
]


@dataclasses.dataclass
class Hunt:
    mutation: Mutation
    seconds: float
    histories: int
    found: Outcome | None


def hunt(
    mutation: Mutation,
    *,
    budget: float = 60.0,
    first_seed: int = 0,
    max_histories: int | None = None,
) -> Hunt:
    """Run histories with ``mutation`` applied until one fails that passes without it,
    or ``budget`` seconds go by (or ``max_histories`` have run)."""
    started = time.perf_counter()
    histories = 0
    seed = first_seed
    while time.perf_counter() - started < budget:
        if max_histories is not None and histories >= max_histories:
            break
        for engine in ("firestore", "classic"):
            with mutation.applied():
                outcome = run_history(seed, Knobs(engine=engine))
            histories += 1
            # Found only if the same history keeps its promises without the mutation:
            # else it is the protocol's own failure, not the broken rule's.
            if not outcome.ok and run_history(seed, Knobs(engine=engine)).ok:
                return Hunt(mutation, time.perf_counter() - started, histories, outcome)
        seed += 1
    return Hunt(mutation, time.perf_counter() - started, histories, None)
