"""The invariants of docs/protocol.md that can be checked after every event.

* **I5**, a write token lands at most once: every commit is watched, and a
  token that appears anew in a shard's token slots must never have appeared
  in an earlier commit. (A retry that failed to find its own token, or a
  resolution that wrote what had landed, shows here at once.)
* **I7**, a complete cached record never runs ahead of the shards: each shard
  state it holds must be one the shard really had at that version.
* The stash always parses (core/stash.py), whatever the interleaving.
* Once the history settles (faults over, every deadline past, a repair run),
  nothing is left owed in the stash, and the total read is the shards' sum.
"""

from __future__ import annotations

from typing import Any

from ...core.keys import SHARD_KIND, cache_keys, shard_key_name
from ...core.record import Record
from ...core.stash import Stash
from ...memory.datastore import KeyId, Stored
from ...store import entities
from .history import History
from .world import COUNTER, World


class Watch:
    """Checks a world's invariants as it runs; collects what it finds."""

    def __init__(self, world: World, history: History) -> None:
        self.world = world
        self.history = history
        self.violations: list[str] = []
        self.landed: set[str] = set()
        self.shard_values: dict[str, dict[int, int]] = {}  # key name -> version -> count
        self._slot_tokens: dict[KeyId, tuple[Stored, set[str]]] = {}  # the last seen
        self._cas_seen = -1
        self._record_key, self._stash_key = cache_keys(
            world.settings.key_prefix, world.store.scope, COUNTER
        )
        self._stash_raw: bytes | None = None
        self._record_raw: bytes | None = None
        # (since, what folds in flight carry, what the stash owes readers, what its
        # unsure entries hold and a running set took)
        self._stash: list[tuple[float, int, int, int]] = [(0.0, 0, 0, 0)]
        world.datastore.on_commit.append(self._commit)
        world.checks.append(self._cache_changed)

    def violation(self, what: str) -> None:
        if len(self.violations) < 50:
            self.violations.append(f"t={self.world.clock.now:.4f} {what}")

    # -- I5 ------------------------------------------------------------------------------

    def _commit(
        self, before: dict[KeyId, Stored | None], after: dict[KeyId, Stored | None]
    ) -> None:
        new: set[str] = set()
        for k, stored in after.items():
            if stored is None or k[3][-1][0] != SHARD_KIND:
                continue
            self.shard_values.setdefault(k[3][-1][1], {})[stored.version] = entities.count_of(
                stored.entity
            )
            old = before.get(k)
            had = self._tokens_of(k, old) if old is not None else set()
            new |= self._tokens_of(k, stored) - had
        twice = new & self.landed
        if twice:
            self.violation(f"I5: write token(s) {sorted(twice)} landed a second time")
        self.landed |= new

    def _tokens_of(self, key: KeyId, stored: Stored) -> set[str]:
        """The slot tokens of ``stored``: what a commit wrote is what the next one to
        the same entity found, so each version is read once."""
        known = self._slot_tokens.get(key)
        if known is not None and known[0] is stored:
            return known[1]
        found = _slot_tokens(stored.entity)
        self._slot_tokens[key] = (stored, found)
        return found

    # -- I7 and the stash -------------------------------------------------------------------

    def _cache_changed(self) -> None:
        model = self.world.memcache
        if model.writes == self._cas_seen:
            return
        self._cas_seen = model.writes
        raw = model.peek(self._stash_key)
        if raw != self._stash_raw:
            self._stash_raw = raw
            self._stash_seen(raw)
        record = model.peek(self._record_key)
        if record is not None and record != self._record_raw:
            self._record_raw = record
            self._check_record(record)

    def _stash_seen(self, raw: bytes | None) -> None:
        stash = Stash()
        if raw is not None:
            try:
                stash = Stash.parse(raw)
            except Exception as exc:
                self.violation(f"the stash does not parse ({exc}): {raw[:120]!r}")
                return
        seen = (
            sum(f.amount for f in stash.folds.values()),
            stash.owed,
            sum(u.amount for u in stash.unsure.values()) + stash.set_taken,
        )
        if seen != self._stash[-1][1:]:
            self._stash.append((self.world.clock.now, *seen))

    def read_slack(self, t0: float, t1: float, *, cache_failed: bool) -> tuple[int, int]:
        """How far an uncached read from ``t0`` to ``t1`` may stray, below and above
        (docs/protocol.md, section 5). Below: what folds in flight carried (the shards
        lack it until the fold lands), and, if a cache call of the read failed, what
        the stash owed too (the read then sums the shards alone). Above: what unsure
        entries held and a set's marker took (a read adds them until they are resolved
        or the marker ends, also when the write or the set had landed)."""
        below = above = 0
        for i, (since, carried, owed, unsure) in enumerate(self._stash):
            until = self._stash[i + 1][0] if i + 1 < len(self._stash) else float("inf")
            if since <= t1 and until >= t0:
                below = max(below, carried + (owed if cache_failed else 0))
                above = max(above, unsure)
        return below, above

    def _check_record(self, raw: bytes) -> None:
        record = Record.decode(raw)
        if record is None or not record.complete:
            return
        for shard_id, (version, value) in record.shards.items():
            if not shard_id.startswith("i"):
                continue
            had = self.shard_values.get(shard_key_name(COUNTER, int(shard_id[1:])), {})
            if version == 0 and value == 0:
                continue  # read while the shard did not exist (a lookup's "missing")
            if had.get(version) != value:
                self.violation(
                    f"I7: the complete cached record holds shard {shard_id} = {value} at "
                    f"version {version}; the shard had {had.get(version)} then"
                )

    # -- after settling ------------------------------------------------------------------

    def settled(self, final: int) -> None:
        world = self.world
        stash_key = self._stash_key
        raw = world.memcache.peek(stash_key)
        if raw is not None:
            stash = Stash.parse(raw)
            if stash.owed or stash.folds or stash.unsure:
                self.violation(f"after settling, the stash still holds {raw[:200]!r}")
        shards = sum(
            entities.count_of(s.entity)
            for k, s in world.datastore.entities.items()
            if k[3][-1][0] == SHARD_KIND
        )
        owed = Stash.parse(raw).owed if raw is not None else 0
        if final != shards + owed:
            self.violation(f"after settling, a read said {final}; the shards hold {shards}")


def _slot_tokens(entity: Any) -> set[str]:
    found: set[str] = set()
    for prop, value in entity.properties.items():
        if prop.startswith(entities.SLOT_PREFIX):
            found.update(entities.slot_tokens(value))
    return found
