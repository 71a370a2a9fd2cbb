"""``count = v`` in ``delayed_incr``: a set's marker, and the writers that wait for it
(see ``core/stash.py``).
"""

from __future__ import annotations

import threading
import time

from tenacity import RetryCallState, retry_if_result, wait_exponential

from ..core.effects import Memcache, Steps, retrying
from ..core.stash import Stash
from ..errors import CacheUnavailable
from .cas import as_seen, changing_stash
from .retrying import elapsed, memcache_retrying
from .sightings import StashSightings

#: Sets whose waits this process remembers; older ones' deadlines have passed long ago.
_WAITS_KEPT = 64


class SetCoordination:
    """Beginning and ending sets, and holding writes back while one runs (as steps)."""

    def __init__(self, sightings: StashSightings) -> None:
        self._sightings = sightings
        # How long this process's writers have already waited for each set, by the
        # set's token. Many writers update it at once: every update takes the lock
        # (the trim below would otherwise race another thread's trim).
        self._lock = threading.Lock()
        self._waited: dict[str, float] = {}

    def wait_out_set(self, stash_key: str, cap: float) -> Steps[None]:
        """Hold a write while a set of the counter runs, if this process saw one lately.

        On an optimistic engine every shard commit aborts a running set's
        transaction, so writers that saw its marker (each write's merge reads the
        stash key) let it finish first: their increments land after it. A set
        that died leaves its marker until the marker's deadline, so this process
        waits at most ``cap`` seconds in all for any one set. Never raises.
        """
        seen = self._sightings.setter_seen(stash_key)
        if seen is None:
            return
        token, deadline = seen
        waited = self._waited.get(token, 0.0)
        if waited >= cap or time.time() >= deadline:
            return  # waited out already, or its marker has expired: no round trip

        def still_running(stash: Stash) -> bool:
            return stash.setter is not None and stash.setter[0] == token

        def over(state: RetryCallState) -> bool:
            return waited + elapsed(state) >= cap or time.time() >= deadline

        waiting = memcache_retrying(
            f"a write to {stash_key} waits for the set {token}",
            stop=over,
            retry=retry_if_result(still_running),
            wait=wait_exponential(multiplier=0.002, max=0.05),
            give_up=lambda _state: None,  # the write goes ahead: the cap is spent
        )
        started = time.monotonic()
        try:
            yield from retrying(waiting, self._look, stash_key)
        except CacheUnavailable:
            self._sightings.forget_setter(stash_key)
        finally:
            self._note_wait(token, waited + time.monotonic() - started)

    def begin_set(self, stash_key: str, token: str, deadline: float) -> Steps[Stash]:
        """Stop new folds and resolutions, take what is pending, claim the unsure writes
        and fence the folds in flight, all in one ``cas`` (see core/stash.py).

        Returns the stash as it was; its ``fence`` names the tokens the set's
        transaction writes onto the shards. ``end_set`` should follow (the marker's
        deadline ends it otherwise). Raises CacheUnavailable.

        While another set runs this one waits, with backoff, for it to end or for
        its marker to expire, until ``deadline`` at the latest: the caller derives
        both sets' deadlines from its settings (``retry_deadline`` and
        ``rpc_timeout``), so a marker set under the same settings has expired by
        then. Past it (a setter with longer settings, or a clock ahead of ours)
        this set's own marker would be stale on arrival, so it raises
        CacheUnavailable, and the set goes ahead as it does when memcache is down.
        """

        def another_set_runs(before: Stash) -> bool:
            return before.setter is not None

        def give_up(state: RetryCallState) -> Stash:
            raise CacheUnavailable(
                f"another set of {stash_key} still ran at this set's deadline: "
                f"not coordinating this one through delayed_incr"
            )

        waiting = memcache_retrying(
            f"the set {token} of {stash_key} waits for another set",
            stop=lambda _state: time.time() >= deadline,
            retry=retry_if_result(another_set_runs),
            wait=wait_exponential(multiplier=0.005, max=0.1),
            give_up=give_up,
        )
        before: Stash = yield from retrying(
            waiting,
            changing_stash,
            stash_key,
            lambda s: s.set_begun(token, deadline) if s.setter is None else None,
        )
        self._sightings.expect_unsure(stash_key, False)
        return before

    def end_set(self, stash_key: str, token: str, *, landed: bool) -> Steps[None]:
        """The set ``token`` is over, and ``landed`` or not (see ``Stash.set_ended``)."""
        yield from changing_stash(stash_key, lambda s: s.set_ended(token, landed=landed))

    def _look(self, stash_key: str) -> Steps[Stash]:
        raw, _ = as_seen((yield Memcache("gets", (stash_key,))))
        return self._sightings.note(stash_key, raw)

    def _note_wait(self, token: str, seconds: float) -> None:
        with self._lock:
            # The most any writer has waited: one that started before another's wait
            # was noted never lowers it.
            self._waited[token] = max(seconds, self._waited.get(token, 0.0))
            while len(self._waited) > _WAITS_KEPT:
                del self._waited[next(iter(self._waited))]
