"""delayed_incr: what the stash key holds.

Increments whose shard write kept failing wait here (``pending``) until a
later write takes them and adds them to its own delta: a *fold*. A fold in
flight is not just a number that left the key. It leaves a marker (its write
token, the amount and a deadline) until its write has landed or the amount
is back in ``pending``. That is what ``count = v`` needs: a set first puts
its own marker on the key, which stops new folds, then waits until no fold
marker is left, and only then takes ``pending`` and rewrites the shards. So
every stashed increment is either already in a shard when the set reads
them, or in ``pending`` when the set takes it: replaced either way, never
written after the set. A marker whose deadline passed belongs to a process
that died or stalled far past its own time limits: a set no longer waits for
it, but it stays on the key for a day, so a writer that was only stalled can
still settle it (and put back what it took) instead of losing it.

A write whose retries ran out while its outcome was unknown (the commit may
have landed; only its reply was lost) is kept as an *unsure* entry: its write
token, the amount and the shard it went to. Readers count it, like
``pending``. Whoever resolves it first *claims* it (a claim lapses at its
deadline), runs one transaction on that shard that adds the amount unless
the shard already holds the token, and then drops the entry. So an unsure
write is counted once whether or not it had landed, instead of being stashed
as pending and written a second time.

The value is ASCII: ``<pending>``, then ``;f<token>=<amount>@<deadline>``
per fold in flight, ``;u<token>=<amount>/<shard>`` per unsure write
(``/<claim>@<deadline>`` added while claimed) and ``;s<token>@<deadline>``
while a set runs. A plain integer, the format of earlier versions, reads as
``pending``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from types import MappingProxyType

_EMPTY: Mapping[str, tuple[int, float]] = MappingProxyType({})
# How long a fold marker stays on the key after its deadline (see Stash.live).
_FOLD_FORGOTTEN_AFTER = 86400.0


@dataclasses.dataclass(frozen=True)
class Unsure:
    """A write of ``amount`` to shard ``shard`` that may or may not have landed."""

    amount: int
    shard: int
    claim: str = ""  # who is resolving it, if anyone
    deadline: float = 0.0  # when that claim lapses

    def encode(self, token: str) -> str:
        text = f"u{token}={self.amount}/{self.shard}"
        return f"{text}/{self.claim}@{self.deadline:.3f}" if self.claim else text

    @classmethod
    def decode(cls, body: str) -> tuple[str, Unsure]:
        token, _, rest = body.partition("=")
        amount, _, rest = rest.partition("/")
        shard, _, claimed = rest.partition("/")
        claim, _, deadline = claimed.partition("@")
        if claim and not deadline:
            raise ValueError(body)
        return token, cls(int(amount), int(shard), claim, float(deadline) if claim else 0.0)


_NO_UNSURE: Mapping[str, Unsure] = MappingProxyType({})


@dataclasses.dataclass(frozen=True)
class Stash:
    pending: int = 0
    # token -> (amount, deadline); read-only, so a Stash can be shared
    folds: Mapping[str, tuple[int, float]] = dataclasses.field(default_factory=lambda: _EMPTY)
    setter: tuple[str, float] | None = None  # (token, deadline) of a set in progress
    # write token -> the unsure write it names
    unsure: Mapping[str, Unsure] = dataclasses.field(default_factory=lambda: _NO_UNSURE)

    @property
    def owed(self) -> int:
        """What readers add to the shards: pending, and every unsure write."""
        return self.pending + sum(u.amount for u in self.unsure.values())

    @classmethod
    def decode(cls, raw: bytes | None) -> Stash:
        """What ``raw`` holds; anything unreadable counts as empty."""
        if not raw:
            return cls()
        try:
            head, *marks = raw.decode("ascii").split(";")
            folds: dict[str, tuple[int, float]] = {}
            unsure: dict[str, Unsure] = {}
            setter = None
            for mark in marks:
                if mark.startswith("u"):
                    token, entry = Unsure.decode(mark[1:])
                    unsure[token] = entry
                    continue
                body, _, deadline = mark[1:].partition("@")
                if mark.startswith("f"):
                    token, _, amount = body.partition("=")
                    folds[token] = (int(amount), float(deadline))
                elif mark.startswith("s"):
                    setter = (body, float(deadline))
            return cls(int(head), MappingProxyType(folds), setter, MappingProxyType(unsure))
        except ValueError:
            return cls()

    def encode(self) -> bytes:
        parts = [str(self.pending)]
        parts += [f"f{token}={amount}@{at:.3f}" for token, (amount, at) in self.folds.items()]
        parts += [entry.encode(token) for token, entry in self.unsure.items()]
        if self.setter is not None:
            parts.append(f"s{self.setter[0]}@{self.setter[1]:.3f}")
        return ";".join(parts).encode("ascii")

    def live(self, now: float | None = None) -> Stash:
        """Without a set whose deadline has passed; lapsed claims are open again.

        A fold marker past its deadline stops holding a set back (``busy``) but
        stays a day longer: if its writer was only stalled, it still finds
        its marker when it settles, and puts back what it took.
        """
        now = time.time() if now is None else now
        folds = {t: f for t, f in self.folds.items() if f[1] + _FOLD_FORGOTTEN_AFTER > now}
        setter = self.setter if self.setter is not None and self.setter[1] > now else None
        lapsed = [t for t, u in self.unsure.items() if u.claim and u.deadline <= now]
        if len(folds) == len(self.folds) and setter == self.setter and not lapsed:
            return self
        unsure = dict(self.unsure)
        for token in lapsed:
            unsure[token] = Unsure(unsure[token].amount, unsure[token].shard)
        return Stash(self.pending, MappingProxyType(folds), setter, MappingProxyType(unsure))

    # -- the changes, each a new Stash ------------------------------------------

    def added(self, delta: int) -> Stash:
        """``delta`` more waiting to be written."""
        return dataclasses.replace(self, pending=self.pending + delta)

    def taken(self, token: str, deadline: float) -> Stash:
        """``pending`` handed to the fold ``token``, marked until ``deadline``."""
        folds = {**self.folds, token: (self.pending, deadline)}
        return dataclasses.replace(self, pending=0, folds=MappingProxyType(folds))

    def settled(self, token: str, back: int) -> Stash:
        """The fold ``token`` is over; ``back`` (what it could not write) waits again."""
        folds = {t: f for t, f in self.folds.items() if t != token}
        return dataclasses.replace(self, pending=self.pending + back, folds=MappingProxyType(folds))

    def released(self, token: str) -> Stash:
        """The fold ``token`` never wrote: whatever it took waits again."""
        amount = self.folds.get(token, (0, 0.0))[0]
        return self.settled(token, amount)

    def made_unsure(self, token: str, amount: int, shard: int) -> Stash:
        """The write ``token`` of ``amount`` to ``shard`` gave up not knowing whether it
        landed. Its fold marker, if it had one, goes: the amount is in ``amount``."""
        folds = {t: f for t, f in self.folds.items() if t != token}
        unsure = {**self.unsure, token: Unsure(amount, shard)}
        return dataclasses.replace(
            self, folds=MappingProxyType(folds), unsure=MappingProxyType(unsure)
        )

    def claimed(self, claim: str, deadline: float, tokens: Iterable[str]) -> Stash:
        """The unclaimed unsure writes among ``tokens`` are ``claim``'s to resolve."""
        unsure = dict(self.unsure)
        for token in tokens:
            entry = unsure.get(token)
            if entry is not None and not entry.claim:
                unsure[token] = Unsure(entry.amount, entry.shard, claim, deadline)
        return dataclasses.replace(self, unsure=MappingProxyType(unsure))

    def claimable(self) -> list[str]:
        """Unsure writes nobody is resolving; none while a set runs."""
        if self.setter is not None:
            return []
        return [token for token, entry in self.unsure.items() if not entry.claim]

    def resolved(self, token: str, back: int = 0) -> Stash:
        """The unsure write ``token`` is in its shard now (or, with ``back``, that much
        waits as pending instead). Repeating it changes nothing."""
        if token not in self.unsure:
            return self
        unsure = {t: u for t, u in self.unsure.items() if t != token}
        return dataclasses.replace(
            self, pending=self.pending + back, unsure=MappingProxyType(unsure)
        )

    def unclaimed(self, token: str, claim: str) -> Stash:
        """``claim`` could not resolve ``token``: it is open again."""
        entry = self.unsure.get(token)
        if entry is None or entry.claim != claim:
            return self
        unsure = {**self.unsure, token: Unsure(entry.amount, entry.shard)}
        return dataclasses.replace(self, unsure=MappingProxyType(unsure))

    def movable(self) -> Stash:
        """What may move to another server: pending, and unsure writes nobody is resolving."""
        unsure = {t: u for t, u in self.unsure.items() if not u.claim}
        return Stash(self.pending, unsure=MappingProxyType(unsure))

    def without(self, moved: Stash) -> Stash:
        """This stash once ``moved`` (from ``movable``) has left it."""
        unsure = {t: u for t, u in self.unsure.items() if t not in moved.unsure}
        return dataclasses.replace(
            self, pending=self.pending - moved.pending, unsure=MappingProxyType(unsure)
        )

    def absorbed(self, moved: Stash) -> Stash:
        """This stash with ``moved`` (from ``movable``, on another server) added."""
        unsure = {**self.unsure, **moved.unsure}
        return dataclasses.replace(
            self, pending=self.pending + moved.pending, unsure=MappingProxyType(unsure)
        )

    def set_begun(self, token: str, deadline: float) -> Stash:
        return dataclasses.replace(self, setter=(token, deadline))

    def busy(self, now: float | None = None) -> bool:
        """Is a fold or a resolution of an unsure write in flight, within its deadline?"""
        now = time.time() if now is None else now
        return any(deadline > now for _, deadline in self.folds.values()) or any(
            u.claim and u.deadline > now for u in self.unsure.values()
        )

    def cleared(self) -> Stash:
        """Nothing pending and no unsure write: what a set takes."""
        return dataclasses.replace(self, pending=0, unsure=_NO_UNSURE)

    def set_ended(self, back: Stash | None = None) -> Stash:
        """The set is over; ``back`` (what it took, if it failed) is owed again."""
        if back is None:
            return dataclasses.replace(self, setter=None)
        unsure = {**self.unsure, **{t: Unsure(u.amount, u.shard) for t, u in back.unsure.items()}}
        return dataclasses.replace(
            self, pending=self.pending + back.pending, setter=None, unsure=MappingProxyType(unsure)
        )
