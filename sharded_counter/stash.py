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
that died or stalled far past its own time limits; it is ignored.

The value is ASCII: ``<pending>``, then ``;f<token>=<amount>@<deadline>``
per fold in flight and ``;s<token>@<deadline>`` while a set runs. A plain
integer, the format of earlier versions, reads as ``pending``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from types import MappingProxyType

_EMPTY: Mapping[str, tuple[int, float]] = MappingProxyType({})


@dataclasses.dataclass(frozen=True)
class Stash:
    pending: int = 0
    # token -> (amount, deadline); read-only, so a Stash can be shared
    folds: Mapping[str, tuple[int, float]] = dataclasses.field(default_factory=lambda: _EMPTY)
    setter: tuple[str, float] | None = None  # (token, deadline) of a set in progress

    @classmethod
    def decode(cls, raw: bytes | None) -> Stash:
        """What ``raw`` holds; anything unreadable counts as empty."""
        if not raw:
            return cls()
        try:
            head, *marks = raw.decode("ascii").split(";")
            folds: dict[str, tuple[int, float]] = {}
            setter = None
            for mark in marks:
                body, _, deadline = mark[1:].partition("@")
                if mark.startswith("f"):
                    token, _, amount = body.partition("=")
                    folds[token] = (int(amount), float(deadline))
                elif mark.startswith("s"):
                    setter = (body, float(deadline))
            return cls(int(head), MappingProxyType(folds), setter)
        except ValueError:
            return cls()

    def encode(self) -> bytes:
        parts = [str(self.pending)]
        parts += [f"f{token}={amount}@{at:.3f}" for token, (amount, at) in self.folds.items()]
        if self.setter is not None:
            parts.append(f"s{self.setter[0]}@{self.setter[1]:.3f}")
        return ";".join(parts).encode("ascii")

    def live(self, now: float | None = None) -> Stash:
        """Without the markers whose deadline has passed."""
        now = time.time() if now is None else now
        folds = {t: f for t, f in self.folds.items() if f[1] > now}
        setter = self.setter if self.setter is not None and self.setter[1] > now else None
        if len(folds) == len(self.folds) and setter == self.setter:
            return self
        return Stash(self.pending, MappingProxyType(folds), setter)

    # -- the changes, each a new Stash ------------------------------------------

    def added(self, delta: int) -> Stash:
        """``delta`` more waiting to be written."""
        return Stash(self.pending + delta, self.folds, self.setter)

    def taken(self, token: str, deadline: float) -> Stash:
        """``pending`` handed to the fold ``token``, marked until ``deadline``."""
        folds = {**self.folds, token: (self.pending, deadline)}
        return Stash(0, MappingProxyType(folds), self.setter)

    def settled(self, token: str, back: int) -> Stash:
        """The fold ``token`` is over; ``back`` (what it could not write) waits again."""
        folds = {t: f for t, f in self.folds.items() if t != token}
        return Stash(self.pending + back, MappingProxyType(folds), self.setter)

    def released(self, token: str) -> Stash:
        """The fold ``token`` never wrote: whatever it took waits again."""
        amount = self.folds.get(token, (0, 0.0))[0]
        return self.settled(token, amount)

    def set_begun(self, token: str, deadline: float) -> Stash:
        return Stash(self.pending, self.folds, (token, deadline))

    def set_ended(self, back: int) -> Stash:
        return Stash(self.pending + back, self.folds, None)
