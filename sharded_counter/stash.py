"""delayed_incr: what the stash key holds.

Increments whose shard write kept failing wait here (``pending``) until a
later write takes them and adds them to its own delta: a *fold*. A fold in
flight is not just a number that left the key. It leaves a marker (its write
token, the amount and a deadline) until its write has landed or the amount
is back in ``pending``.

A write whose retries ran out while its outcome was unknown (the commit may
have landed; only its reply was lost) is kept as an *unsure* entry: its write
token, the amount and the shard it went to. Readers count it, like
``pending``. Whoever resolves it first *claims* it (a claim lapses at its
deadline), runs one transaction on that shard that adds the amount unless
the shard already holds the token, and then drops the entry. So an unsure
write is counted once whether or not it had landed, instead of being stashed
as pending and written a second time.

``count = v`` must replace everything stashed before it, including what
folds in flight took. In one ``cas`` a set puts its marker on the key (which
stops new folds and claims), moves ``pending`` onto its marker, claims every
unsure write and *fences* every fold in flight. Its transaction writes a
fence onto every shard: its own token and the tokens of those folds and
unsure writes. A fold's write is a transaction that looks for its token
first, so once the set has landed a late fold writes nothing. Then:

- the set landed: its marker, the unsure writes it claimed and its fenced
  folds' markers go; all of it was replaced.
- the set failed, or its marker expired (the setter died or stalled), or
  its own outcome is unknown: nothing is decided by a clock. What it took
  becomes an unsure entry named by its token on shard 0, the unsure writes
  it claimed are open again, and its folds stay fenced. A resolution adds
  each amount unless the fence shows the set landed, and transaction
  isolation orders that against a late commit of the set.
- a fenced fold whose write fails becomes an unsure entry on shard 0 under
  its own token, settled the same way.

A fold marker past its deadline belongs to a process that died or stalled
far past its own time limits. It stays on the key for a day, so a writer
that was only stalled can still settle it (and put back what it took)
instead of losing it.

The value is ASCII: ``<pending>``, then ``;f<token>=<amount>@<deadline>``
per fold in flight (``!<set token>`` added while fenced),
``;u<token>=<amount>/<shard>`` per unsure write (``/<claim>@<deadline>``
added while claimed) and ``;s<token>=<taken>@<deadline>`` while a set runs.
A plain integer, the format of earlier versions, reads as ``pending``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from types import MappingProxyType

# How long a fold marker stays on the key after its deadline (see Stash.live).
_FOLD_FORGOTTEN_AFTER = 86400.0


@dataclasses.dataclass(frozen=True)
class Fold:
    """A fold in flight: ``amount`` taken from pending, marked until ``deadline``."""

    amount: int
    deadline: float
    fence: str = ""  # the set that fenced it, if one did

    def encode(self, token: str) -> str:
        text = f"f{token}={self.amount}@{self.deadline:.3f}"
        return f"{text}!{self.fence}" if self.fence else text

    @classmethod
    def decode(cls, body: str) -> tuple[str, Fold]:
        token, _, rest = body.partition("=")
        amount, _, rest = rest.partition("@")
        deadline, bang, fence = rest.partition("!")
        if bang and not fence:
            raise ValueError(body)
        return token, cls(int(amount), float(deadline), fence)


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


_NO_FOLDS: Mapping[str, Fold] = MappingProxyType({})
_NO_UNSURE: Mapping[str, Unsure] = MappingProxyType({})


@dataclasses.dataclass(frozen=True)
class Stash:
    pending: int = 0
    # fold token -> its fold; read-only, so a Stash can be shared
    folds: Mapping[str, Fold] = dataclasses.field(default_factory=lambda: _NO_FOLDS)
    setter: tuple[str, float] | None = None  # (token, deadline) of a set in progress
    # write token -> the unsure write it names
    unsure: Mapping[str, Unsure] = dataclasses.field(default_factory=lambda: _NO_UNSURE)
    set_taken: int = 0  # the pending amount the running set took

    @property
    def owed(self) -> int:
        """What readers add to the shards: pending (with what a running set took, until
        it lands), and every unsure write."""
        return self.pending + self.set_taken + sum(u.amount for u in self.unsure.values())

    @property
    def fence(self) -> list[str]:
        """The tokens a set that begins on this stash fences: every fold in flight and
        every unsure write (the set adds its own)."""
        return [*self.folds, *self.unsure]

    @classmethod
    def decode(cls, raw: bytes | None) -> Stash:
        """What ``raw`` holds; anything unreadable counts as empty."""
        if not raw:
            return cls()
        try:
            head, *marks = raw.decode("ascii").split(";")
            folds: dict[str, Fold] = {}
            unsure: dict[str, Unsure] = {}
            setter, set_taken = None, 0
            for mark in marks:
                if mark.startswith("u"):
                    token, entry = Unsure.decode(mark[1:])
                    unsure[token] = entry
                elif mark.startswith("f"):
                    token, fold = Fold.decode(mark[1:])
                    folds[token] = fold
                elif mark.startswith("s"):
                    body, _, deadline = mark[1:].partition("@")
                    token, equals, taken = body.partition("=")
                    setter, set_taken = (token, float(deadline)), int(taken) if equals else 0
            return cls(
                int(head), MappingProxyType(folds), setter, MappingProxyType(unsure), set_taken
            )
        except ValueError:
            return cls()

    def encode(self) -> bytes:
        parts = [str(self.pending)]
        parts += [fold.encode(token) for token, fold in self.folds.items()]
        parts += [entry.encode(token) for token, entry in self.unsure.items()]
        if self.setter is not None:
            token, deadline = self.setter
            parts.append(f"s{token}={self.set_taken}@{deadline:.3f}")
        return ";".join(parts).encode("ascii")

    def live(self, now: float | None = None) -> Stash:
        """Without a set whose deadline has passed (it counts as not landed, see
        ``set_ended``); lapsed claims are open again.

        A fold marker past its deadline stays a day longer: if its writer was
        only stalled, it still finds its marker when it settles, and puts back
        what it took.
        """
        now = time.time() if now is None else now
        stash = self
        if self.setter is not None and self.setter[1] <= now:
            stash = self.set_ended(self.setter[0], landed=False)
        forgotten = [t for t, f in stash.folds.items() if f.deadline + _FOLD_FORGOTTEN_AFTER <= now]
        lapsed = [t for t, u in stash.unsure.items() if u.claim and u.deadline <= now]
        if not (forgotten or lapsed):
            return stash
        folds = {t: f for t, f in stash.folds.items() if t not in forgotten}
        unsure = dict(stash.unsure)
        for token in lapsed:
            unsure[token] = Unsure(unsure[token].amount, unsure[token].shard)
        return dataclasses.replace(
            stash, folds=MappingProxyType(folds), unsure=MappingProxyType(unsure)
        )

    # -- the changes, each a new Stash ------------------------------------------

    def added(self, delta: int) -> Stash:
        """``delta`` more waiting to be written."""
        return dataclasses.replace(self, pending=self.pending + delta)

    def taken(self, token: str, deadline: float) -> Stash:
        """``pending`` handed to the fold ``token``, marked until ``deadline``."""
        folds = {**self.folds, token: Fold(self.pending, deadline)}
        return dataclasses.replace(self, pending=0, folds=MappingProxyType(folds))

    def landed(self, token: str) -> Stash:
        """The fold ``token`` wrote (or found itself fenced): its marker goes."""
        return self._without_fold(token)

    def released(self, token: str) -> Stash:
        """The fold ``token`` failed to write: what it took waits again. A fenced fold's
        amount waits as an unsure entry on shard 0 instead, added only if the fence
        shows that its set did not land. Repeating it changes nothing."""
        fold = self.folds.get(token)
        if fold is None:
            return self
        if fold.fence:
            return self.made_unsure(token, fold.amount, 0)
        return self._without_fold(token).added(fold.amount)

    def _without_fold(self, token: str) -> Stash:
        if token not in self.folds:
            return self
        folds = {t: f for t, f in self.folds.items() if t != token}
        return dataclasses.replace(self, folds=MappingProxyType(folds))

    def made_unsure(self, token: str, amount: int, shard: int) -> Stash:
        """The write ``token`` of ``amount`` to ``shard`` gave up not knowing whether it
        landed. Its fold marker, if it had one, goes: the amount is in ``amount``."""
        unsure = {**self.unsure, token: Unsure(amount, shard)}
        return dataclasses.replace(self._without_fold(token), unsure=MappingProxyType(unsure))

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

    # -- count = v -------------------------------------------------------------

    def set_begun(self, token: str, deadline: float) -> Stash:
        """The set ``token`` runs until ``deadline``: it takes ``pending``, claims every
        unsure write (over any resolver: both look for the same token) and fences
        every fold in flight."""
        folds = {t: Fold(f.amount, f.deadline, token) for t, f in self.folds.items()}
        unsure = {t: Unsure(u.amount, u.shard, token, deadline) for t, u in self.unsure.items()}
        return dataclasses.replace(
            self,
            pending=0,
            folds=MappingProxyType(folds),
            setter=(token, deadline),
            unsure=MappingProxyType(unsure),
            set_taken=self.pending,
        )

    def set_ended(self, token: str, *, landed: bool) -> Stash:
        """The set ``token`` is over. If it ``landed``, what it took, claimed and fenced
        was replaced by it, and goes. Otherwise (it failed, or its outcome is unknown)
        what it took waits as an unsure entry named by its token on shard 0, its claims
        are open again, and its folds stay fenced: the shards' fence decides."""
        if self.setter is None or self.setter[0] != token:
            return self  # its marker expired: that ended it as not landed already
        unsure = {}
        for t, u in self.unsure.items():
            if u.claim != token:
                unsure[t] = u
            elif not landed:
                unsure[t] = Unsure(u.amount, u.shard)
        folds = dict(self.folds)
        if landed:
            folds = {t: f for t, f in folds.items() if f.fence != token}
        elif self.set_taken:
            unsure[token] = Unsure(self.set_taken, 0)
        return dataclasses.replace(
            self,
            folds=MappingProxyType(folds),
            setter=None,
            unsure=MappingProxyType(unsure),
            set_taken=0,
        )
