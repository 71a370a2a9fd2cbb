"""The cache tier: cached totals, their safe refill, and the delayed_incr stash.

Protocol (see ``core/record.py`` for the record itself):

* Writers, after a shard write commits, merge the shard's new
  ``(version, value)`` into the record if there is one. No record: nothing
  to do.
* A reader that finds no complete record first makes sure a record exists
  and notes its epoch, *then* reads every shard, then merges that snapshot
  in with ``cas`` and marks it complete. A write that committed after the
  snapshot merged its state after the record existed, so the reader's ``cas``
  either sees it or fails and re-reads it; if the record vanished or changed
  epoch meanwhile the reader returns its snapshot without caching it.
* A merge that memcache does not answer leaves a record that may miss a
  write. The key is remembered and deleted on this process's next cache
  call, so the next reader rebuilds it; until then it is bounded by the TTL.

memcache trouble never fails a Datastore write and never blocks longer than
the configured timeouts; it is logged once when it starts and once when it ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ..core.record import Record, ShardState
from ..core.stash import Stash, Unsure
from ..errors import CacheUnavailable
from .client import MemcacheClient
from .cluster import ServerUnavailable

log = logging.getLogger("sharded_counter")

_CAS_ATTEMPTS = 64
# The calls that change what memcached holds: one that fails after it was sent may
# have been applied.
_WRITES = frozenset({"add", "cas", "set", "set_many", "incr", "decr", "delete", "delete_many"})


def _never_sent(exc: BaseException) -> bool:
    """Did the call fail before memcached could see it (refused, or its server is out)?"""
    return isinstance(exc, (ConnectionRefusedError, ServerUnavailable))


class CacheTier:
    def __init__(self, client: MemcacheClient | None, *, ttl: int) -> None:
        self._client = client
        self._ttl = ttl
        self._lock = threading.Lock()
        self._healthy = True
        self._suspect: set[str] = set()  # record keys to delete once memcache answers
        # Stash keys last seen holding something: only these cost a round trip to take.
        self._stash_seen: set[str] = set()
        # Stash keys last seen holding unsure writes nobody was resolving.
        self._unsure_seen: set[str] = set()
        # Stash keys last seen under a set: (the set's token, its deadline).
        self._setters_seen: dict[str, tuple[str, float]] = {}
        # How long this process's writers have already waited for each set (bounded).
        self._set_waits: dict[str, float] = {}
        self._batches: dict[str, _MergeBatch] = {}  # record key -> writers merging into it
        # Ends of folds and resolutions memcache did not hear: (stash key, the change).
        # Made once memcache answers; each change is safe to repeat.
        self._unsettled: list[tuple[str, Callable[[Stash], Stash]]] = []

    @property
    def enabled(self) -> bool:
        return self._client is not None

    # -- plumbing ---------------------------------------------------------

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._client is None:
            raise CacheUnavailable("no memcached servers are configured (set MEMCACHED_HOSTS)")
        try:
            result = getattr(self._client, method)(*args, **kwargs)
        except Exception as exc:  # pymemcache raises socket errors and its own
            self._set_health(False, exc)
            raise CacheUnavailable(
                f"memcache {method} failed: {exc}",
                maybe_applied=method in _WRITES and not _never_sent(exc),
            ) from exc
        self._set_health(True, None)
        return result

    def _set_health(self, healthy: bool, exc: BaseException | None) -> None:
        if healthy == self._healthy:
            return
        with self._lock:
            if healthy == self._healthy:
                return
            self._healthy = healthy
        if healthy:
            log.warning("memcache answers again; cached totals will rebuild from Datastore")
        else:
            log.warning(
                "memcache is unavailable (%s); reading totals from Datastore until it returns", exc
            )

    def _gets(self, key: str) -> tuple[bytes | None, Any]:
        result = self._call("gets", key)
        # HashClient answers a plain None for a server it is skipping.
        return result if isinstance(result, tuple) else (None, None)

    def _forget_suspects(self) -> None:
        """Catch up on what failed calls left behind (suspect records, unsure takes)."""
        self._settle_late()
        if not self._suspect:
            return
        with self._lock:
            pending = list(self._suspect)
        for key in pending:
            self._call("delete", key, noreply=False)
            with self._lock:
                self._suspect.discard(key)

    def _suspect_key(self, key: str) -> None:
        with self._lock:
            self._suspect.add(key)

    def _note_stash(self, stash_key: str, raw: bytes | None) -> Stash:
        stash = Stash.decode(raw).live()
        if stash.pending:
            self._stash_seen.add(stash_key)
        else:
            self._stash_seen.discard(stash_key)
        if stash.claimable():
            self._unsure_seen.add(stash_key)
        else:
            self._unsure_seen.discard(stash_key)
        if stash.setter is not None:
            self._setters_seen[stash_key] = stash.setter
        else:
            self._setters_seen.pop(stash_key, None)
        return stash

    def unsure_seen(self, stash_key: str) -> bool:
        """Did the last look at this stash find unsure writes nobody was resolving?"""
        return stash_key in self._unsure_seen

    # -- cached totals ----------------------------------------------------------

    def read(self, record_key: str, stash_key: str) -> tuple[Record | None, int]:
        """The complete record (or None) and the pending stash. Raises CacheUnavailable."""
        return self.read_many([(record_key, stash_key)])[0]

    def read_many(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[Record | None, int]]:
        """``read`` for many counters in one ``get_many``."""
        self._forget_suspects()
        found = self._call("get_many", [key for pair in pairs for key in pair])
        results: list[tuple[Record | None, int]] = []
        for record_key, stash_key in pairs:
            raw = found.get(record_key)
            record = Record.decode(raw) if raw is not None else None
            stash = self._note_stash(stash_key, found.get(stash_key)).owed
            results.append((record if record is not None and record.complete else None, stash))
        return results

    def merge(self, record_key: str, stash_key: str, states: Iterable[ShardState]) -> None:
        """A writer's post-commit step. Never raises: memcache trouble marks the key suspect.

        Writers of one counter in this process merge together: whoever comes
        first merges the states of every writer waiting behind it in one
        ``gets_many`` + ``cas``, and each writer returns once a merge holding
        its state is done (so a read after ``increment`` sees the write).
        Sixteen threads each running their own ``cas`` loop mostly lose races.
        """
        if self._client is None:
            return
        batch = self._batch_for(record_key)
        with batch.changed:
            batch.pending.extend(states)
            batch.joined += 1
            ticket = batch.joined
            while batch.merged < ticket:
                if not batch.leading:
                    batch.leading = True
                    taken, upto, batch.pending = batch.pending, batch.joined, []
                    break
                batch.changed.wait()
            else:
                self._leave_batch(record_key, batch)
                return
        try:
            self._merge_now(record_key, stash_key, taken)
        finally:
            with batch.changed:
                batch.merged = max(batch.merged, upto)
                batch.leading = False
                batch.changed.notify_all()
                self._leave_batch(record_key, batch)

    def _batch_for(self, record_key: str) -> _MergeBatch:
        with self._lock:
            batch = self._batches.get(record_key)
            if batch is None:
                batch = self._batches[record_key] = _MergeBatch()
            batch.users += 1
            return batch

    def _leave_batch(self, record_key: str, batch: _MergeBatch) -> None:
        with self._lock:
            batch.users -= 1
            if batch.users == 0 and self._batches.get(record_key) is batch:
                del self._batches[record_key]

    def _merge_now(self, record_key: str, stash_key: str, states: list[ShardState]) -> None:
        """One merge of ``states`` into the record: gets_many, then cas until it sticks."""
        try:
            self._forget_suspects()
            for _ in range(_CAS_ATTEMPTS):
                found = self._call("gets_many", [record_key, stash_key])
                self._note_stash(stash_key, found.get(stash_key, (None, None))[0])
                raw, token = found.get(record_key, (None, None))
                if raw is None:
                    return  # nothing cached; the next reader reads the shards
                record = Record.decode(raw)
                if record is None:
                    self._call("delete", record_key, noreply=False)
                    return
                merged = record.merged(states)
                if merged == record:
                    return
                if self._call("cas", record_key, merged.encode(), token, self._ttl) is not False:
                    return  # stored, or deleted meanwhile: either way nothing stale remains
            # Lost every race: drop the record rather than leave it without our write.
            self._call("delete", record_key, noreply=False)
        except CacheUnavailable:
            self._suspect_key(record_key)

    def fill(self, record_key: str, snapshot: Callable[[], Iterable[ShardState]]) -> int:
        """Read the shards through ``snapshot`` and cache their total when that is safe.

        Returns the total of the shards (from the cache record when it already
        holds newer writes). Raises CacheUnavailable only if memcache fails
        before the snapshot was taken; after that it returns the snapshot.
        """
        return self.fill_many([record_key], lambda _keys: {record_key: snapshot()})[record_key]

    def fill_many(
        self,
        record_keys: Sequence[str],
        snapshot: Callable[[list[str]], Mapping[str, Iterable[ShardState]]],
    ) -> dict[str, int]:
        """``fill`` for many counters: ``snapshot`` reads the shards of all that need it at once."""
        self._forget_suspects()
        totals: dict[str, int] = {}
        opened: dict[str, tuple[Record | None, Any]] = {}
        for key in record_keys:
            record, token = self._open_record(key)
            if record is not None and record.complete:
                totals[key] = record.total  # filled by someone else meanwhile
            else:
                opened[key] = (record, token)
        if opened:
            states = snapshot(list(opened))
            for key, (record, token) in opened.items():
                totals[key] = self._complete(key, record, token, list(states[key]))
        return totals

    def _complete(
        self, record_key: str, record: Record | None, token: Any, states: list[ShardState]
    ) -> int:
        """Merge a snapshot into the record opened before it was taken, and mark it complete."""
        if record is None:
            return sum(s.value for s in states)
        epoch = record.epoch
        try:
            for _ in range(_CAS_ATTEMPTS):
                merged = record.merged(states, complete=True)
                if self._call("cas", record_key, merged.encode(), token, self._ttl) is True:
                    return merged.total
                raw, token = self._gets(record_key)
                record = Record.decode(raw) if raw is not None else None
                if record is None or record.epoch != epoch:
                    break  # evicted while we read the shards: our snapshot may be stale
        except CacheUnavailable:
            pass
        return sum(s.value for s in states)

    def _open_record(self, record_key: str) -> tuple[Record | None, Any]:
        """Make sure a record exists before the snapshot is taken; return it and its cas token."""
        raw, token = self._gets(record_key)
        record = Record.decode(raw) if raw is not None else None
        if record is None:
            fresh = Record.new().encode()
            if raw is None:
                self._call("add", record_key, fresh, self._ttl, noreply=False)
            else:  # something we cannot read sits there: replace it
                self._call("cas", record_key, fresh, token, self._ttl)
            raw, token = self._gets(record_key)
            record = Record.decode(raw) if raw is not None else None
        return record, token

    def peek(self, record_key: str) -> Record | None:
        """The record as it is (complete or not), without touching it."""
        raw, _ = self._gets(record_key)
        return Record.decode(raw) if raw is not None else None

    def invalidate(self, record_key: str) -> None:
        """Drop a record that may be stale. Never raises: failing, it is dropped later."""
        if self._client is None:
            return
        try:
            self._call("delete", record_key, noreply=False)
        except CacheUnavailable:
            self._suspect_key(record_key)

    def forget(self, *keys: str) -> None:
        for key in keys:
            self._call("delete", key, noreply=False)

    # -- delayed_incr (see core/stash.py) ------------------------------------------------

    def _change_stash(self, stash_key: str, change: Callable[[Stash], Stash | None]) -> Stash:
        """Apply ``change`` to the stash with a ``cas`` loop; returns the stash it changed.

        ``change`` returning None leaves the key alone. Raises CacheUnavailable.
        """
        for _ in range(_CAS_ATTEMPTS):
            raw, token = self._gets(stash_key)
            current = Stash.decode(raw).live()
            new = change(current)
            if new is None or new == current:
                return current
            if raw is None:
                # No expiry: a stash is an acknowledged increment.
                if self._call("add", stash_key, new.encode(), 0, noreply=False) is True:
                    return current
            elif self._call("cas", stash_key, new.encode(), token, 0) is True:
                return current
        raise CacheUnavailable(f"could not update {stash_key} after {_CAS_ATTEMPTS} attempts")

    def stash(self, stash_key: str, delta: int) -> None:
        """Add ``delta`` to the pending stash. Raises CacheUnavailable if it cannot."""
        self._stash_seen.add(stash_key)
        self._change_stash(stash_key, lambda s: s.added(delta))

    def take_stash(self, stash_key: str, token: str, deadline: float, *, look: bool = False) -> int:
        """Take the whole pending stash for the fold ``token`` (0 when there is none).

        The key keeps a marker of the fold until ``settle_fold``. Nothing is
        taken while a set is running. Without ``look`` it asks memcache only
        when a stash was seen lately (every read and every write's merge
        looks), saving a round trip per write. A take whose reply is lost is
        put back on this process's next cache call. Raises CacheUnavailable.
        """
        if not look and stash_key not in self._stash_seen:
            return 0
        try:
            before = self._change_stash(
                stash_key,
                lambda s: s.taken(token, deadline) if s.pending and s.setter is None else None,
            )
        except CacheUnavailable:
            self._settle_later(stash_key, _fold_over(token, put_back=True))
            raise
        if not before.pending:
            self._stash_seen.discard(stash_key)
        return before.pending if before.setter is None else 0

    def settle_fold(self, stash_key: str, token: str, *, put_back: bool) -> bool:
        """The fold ``token`` is over: drop its marker, and with ``put_back`` return what it
        took to the stash. Never raises: if memcache does not answer it is done later.

        Returns whether the stash is done with the write's token. It is not when
        memcache did not answer, or when the fold outlived its deadline and its fold
        part is an unsure entry now (core/stash.py): the resolutions look for the token,
        so the writer keeps it pinned in its slot (paths/picker.py) until they are over.
        """
        change = _fold_over(token, put_back)
        try:
            before = self._change_stash(stash_key, change)
        except CacheUnavailable:
            self._settle_later(stash_key, change)
            return False
        return not change(before).mentions(token)

    def _settle(self, stash_key: str, change: Callable[[Stash], Stash]) -> None:
        """Make ``change`` now, or once memcache answers again. Never raises."""
        try:
            self._change_stash(stash_key, change)
        except CacheUnavailable:
            self._settle_later(stash_key, change)

    def _settle_later(self, stash_key: str, change: Callable[[Stash], Stash]) -> None:
        with self._lock:
            self._unsettled.append((stash_key, change))

    def _settle_late(self) -> None:
        if not self._unsettled:
            return
        with self._lock:
            unsettled, self._unsettled = self._unsettled, []
        for index, (stash_key, change) in enumerate(unsettled):
            try:
                self._change_stash(stash_key, change)
            except CacheUnavailable:
                with self._lock:
                    self._unsettled.extend(unsettled[index:])
                raise

    # -- unsure writes (see core/stash.py) ------------------------------------------------

    def make_unsure(
        self, stash_key: str, token: str, amount: int, shard: int, *, folded: int = 0
    ) -> None:
        """Keep the write ``token`` of ``amount`` to ``shard`` (``folded`` of it taken from
        the stash), whose outcome is unknown, as an unsure entry (dropping its fold
        marker). Raises CacheUnavailable."""
        self._unsure_seen.add(stash_key)
        self._change_stash(stash_key, lambda s: s.made_unsure(token, amount, shard, folded=folded))

    def claim_unsure(
        self, stash_key: str, claim: str, deadline: float
    ) -> tuple[Stash, dict[str, Unsure]]:
        """Claim every unsure write nobody is resolving, until ``deadline``.

        Returns the stash as it was and the entries claimed. Raises CacheUnavailable.
        """
        before = self._change_stash(
            stash_key,
            lambda s: s.claimed(claim, deadline, s.claimable()) if s.claimable() else None,
        )
        self._unsure_seen.discard(stash_key)
        return before, {t: before.unsure[t] for t in before.claimable()}

    def finish_unsure(self, stash_key: str, token: str, claim: str, *, written: bool) -> None:
        """End ``claim``'s resolution of ``token``: with ``written`` the entry goes (its
        shard holds it now), else it is open again. Never raises."""
        if written:
            self._settle(stash_key, lambda s: s.resolved(token))
        else:
            self._settle(stash_key, lambda s: s.unclaimed(token, claim))

    def unsure_to_pending(self, stash_key: str, token: str, claim: str, amount: int) -> None:
        """The unsure write ``token`` did not land and its shard cannot take the ``amount``
        it still had to add: that waits as pending, for any shard, unless ``claim`` lost
        the entry meanwhile (to a set, or by lapsing; its new owner decides then).
        Never raises."""

        def to_pending(stash: Stash) -> Stash:
            entry = stash.unsure.get(token)
            if entry is None or entry.claim != claim:
                return stash
            return stash.resolved(token, back=amount)

        self._settle(stash_key, to_pending)

    # -- count = v (see core/stash.py) --------------------------------------------------

    def wait_out_set(self, stash_key: str, cap: float) -> None:
        """Hold a write while a set of the counter runs, if this process saw one lately.

        On an optimistic engine every shard commit aborts a running set's
        transaction, so writers that saw its marker (each write's merge reads the
        stash key) let it finish first: their increments land after it. A set
        that died leaves its marker until the marker's deadline, so this process
        waits at most ``cap`` seconds in all for any one set. Never raises.
        """
        seen = self._setters_seen.get(stash_key)
        if seen is None:
            return
        token, deadline = seen
        waited = self._set_waits.get(token, 0.0)
        started = time.monotonic()
        pause = 0.002
        try:
            while waited + (time.monotonic() - started) < cap and time.time() < deadline:
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
                stash = self._note_stash(stash_key, self._gets(stash_key)[0])
                if stash.setter is None or stash.setter[0] != token:
                    return
        except CacheUnavailable:
            self._setters_seen.pop(stash_key, None)
            return
        finally:
            with self._lock:
                self._set_waits[token] = waited + time.monotonic() - started
                while len(self._set_waits) > 64:
                    del self._set_waits[next(iter(self._set_waits))]

    def begin_set(self, stash_key: str, token: str, deadline: float) -> Stash:
        """Stop new folds and resolutions, take what is pending, claim the unsure writes
        and fence the folds in flight, all in one ``cas`` (see core/stash.py).

        Returns the stash as it was; its ``fence`` names the tokens the set's
        transaction writes onto the shards. ``end_set`` should follow (the marker's
        deadline ends it otherwise). Raises CacheUnavailable.
        """
        pause = 0.005
        while True:
            before = self._change_stash(
                stash_key, lambda s: s.set_begun(token, deadline) if s.setter is None else None
            )
            if before.setter is None:
                break
            time.sleep(pause)  # another set is running: it ends, or its marker expires
            pause = min(pause * 2, 0.1)
        self._unsure_seen.discard(stash_key)
        return before

    def _live_stash(self, stash_key: str) -> Stash:
        return Stash.decode(self._gets(stash_key)[0]).live()

    def end_set(self, stash_key: str, token: str, *, landed: bool) -> None:
        """The set ``token`` is over, and ``landed`` or not (see ``Stash.set_ended``)."""
        self._change_stash(stash_key, lambda s: s.set_ended(token, landed=landed))

    def peek_stashes(self, stash_keys: Sequence[str]) -> dict[str, int]:
        """What each stash adds to its counter's shards (see ``Stash.owed``)."""
        found = self._call("get_many", list(stash_keys))
        return {key: Stash.decode(found.get(key)).live().owed for key in stash_keys}

    def peek_stash(self, stash_key: str) -> int:
        return self._live_stash(stash_key).owed


class _MergeBatch:
    """The writers of one record in this process, merging together (see ``merge``)."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.pending: list[ShardState] = []
        self.joined = 0  # tickets handed out
        self.merged = 0  # every ticket up to this one is merged
        self.leading = False
        self.users = 0  # threads inside merge(); the batch is dropped at 0


def _fold_over(token: str, put_back: bool) -> Callable[[Stash], Stash]:
    """The end of the fold ``token``: its marker goes, and with ``put_back`` what it took
    waits again. Repeating it changes nothing, since the marker is gone."""
    return (lambda s: s.released(token)) if put_back else (lambda s: s.landed(token))
