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

A fold marker past its deadline belongs to a writer that died, or stalled
far past its own time limits: its write may have landed, on a shard nobody
knows, or may still land. It becomes an unsure entry under the write's *fold
token* (core/tokens.py) for ``ANY_SHARD``. Its resolution is one transaction over
every shard: if the write's token is on one, the folded part is there; if not,
it adds the amount and fences the fold token on every shard. A writer that
wakes after that finds the fold token in the fence and writes only its own
delta; one that commits first makes the resolution find its token, or
conflicts with it. A writer whose outcome stayed unknown past its deadline
leaves both entries, its write's and its fold part's; one resolver takes
both, and each one's resolution accounts for the other's.

The value is ASCII: ``<pending>``, then ``;f<token>=<amount>@<deadline>``
per fold in flight (``!<set token>`` added while fenced),
``;u<token>=<amount>/<shard>`` per unsure write (``<amount>+<folded>`` when
part of it came from delayed_incr; ``~<transaction>`` when it was a transform
its writer could not fence, docs/protocol.md W6'; ``/<claim>@<deadline>`` added
while claimed) and ``;s<token>=<taken>@<deadline>`` while a set runs.
A plain integer, the format of earlier versions, reads as ``pending``.

Anything else at the key (see ``Stash.parse`` for how strictly it is read) is
*garbled*: it reads as an empty stash, is logged once with its bytes, and the
next change of the stash replaces it. What it held, if it was ever ours, is
lost as a flushed key's is (docs/protocol.md, S11); counting bytes we cannot
read would count garbage.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TypeVar

from . import parse
from .tokens import fold_token, folding_write

# The one side effect of core/: a garbled stash is a loss an operator must hear of,
# and decode() is the only place that sees every one of them, whichever layer read it.
log = logging.getLogger("sharded_counter")

#: The longest stash we read: thousands of unsure entries (about 40 bytes each) of a
#: long outage fit; memcached's own limit on a value is 1 MB.
MAX_STASH_BYTES = 512 * 1024
#: Shards an unsure entry may name: ``ANY_SHARD`` up to the most a counter may have.
_MAX_SHARD = 9_999

T = TypeVar("T")

#: The shard of an unsure entry that stands for the delayed_incr part of a fold.
ANY_SHARD = -1


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
        """``<token>=<amount>@<deadline>[!<set>]``, strictly; raises ``parse.Garbled``."""
        token, equals, rest = body.partition("=")
        amount, at, rest = rest.partition("@")
        deadline, bang, fence = rest.partition("!")
        if not (equals and at) or (bang and not fence):
            raise parse.Garbled(f"not a fold marker: {body[:80]!r}")
        return parse.token(token), cls(
            parse.integer(amount), parse.deadline(deadline), parse.token(fence) if bang else ""
        )


@dataclasses.dataclass(frozen=True)
class Unsure:
    """A write of ``amount`` to shard ``shard`` that may or may not have landed.

    ``folded`` of the amount came from delayed_incr. ``shard`` is ``ANY_SHARD`` for the
    delayed_incr part of a vanished writer's fold, named by its fold token: that
    write went to a shard nobody knows.
    """

    amount: int
    shard: int
    claim: str = ""  # who is resolving it, if anyone
    deadline: float = 0.0  # when that claim lapses
    folded: int = 0
    #: The transaction of a transform write that may still land, when its writer could
    #: not fence it: a resolver rolls it back before it looks for the token.
    transaction: bytes = b""

    def encode(self, token: str) -> str:
        amount = f"{self.amount}+{self.folded}" if self.folded else str(self.amount)
        text = f"u{token}={amount}/{self.shard}"
        if self.transaction:
            text += f"~{parse.base64url(self.transaction)}"
        return f"{text}/{self.claim}@{self.deadline:.3f}" if self.claim else text

    @classmethod
    def decode(cls, body: str) -> tuple[str, Unsure]:
        """``<token>=<amount>[+<folded>]/<shard>[~<transaction>][/<claim>@<deadline>]``,
        strictly; raises ``parse.Garbled``."""
        token, equals, rest = body.partition("=")
        amounts, slash, rest = rest.partition("/")
        amount, plus, folded = amounts.partition("+")
        where, claimed, claim_at = rest.partition("/")
        shard, tilde, transaction = where.partition("~")
        claim, at, deadline = claim_at.partition("@")
        if not (equals and slash) or (plus and not folded) or (claimed and not at):
            raise parse.Garbled(f"not an unsure entry: {body[:80]!r}")
        entry = cls(
            parse.integer(amount),
            parse.integer(shard, lo=ANY_SHARD, hi=_MAX_SHARD),
            parse.token(claim) if claimed else "",
            parse.deadline(deadline) if claimed else 0.0,
            parse.integer(folded) if plus else 0,
            parse.transaction(transaction) if tilde else b"",
        )
        return _unsure_token(token), entry

    def unclaimed(self) -> Unsure:
        return dataclasses.replace(self, claim="", deadline=0.0)

    def claimed_by(self, claim: str, deadline: float) -> Unsure:
        return dataclasses.replace(self, claim=claim, deadline=deadline)


_NO_FOLDS: Mapping[str, Fold] = MappingProxyType({})
_NO_UNSURE: Mapping[str, Unsure] = MappingProxyType({})


@dataclasses.dataclass(frozen=True)
class Stash:
    """What one delayed_incr key holds, and every change the protocol makes to it.

    About 260 lines, on purpose: each method is one transition of the table in
    docs/protocol.md (4.2) on an immutable value, and they all keep the same
    fields consistent; apart, no piece could be checked against the others.
    """

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
        it lands), and every unsure write (a write's folded part once only, when its
        fold token has an entry of its own too)."""
        unsure = sum(u.amount for u in self.unsure.values())
        twice = sum(u.folded for t, u in self.unsure.items() if fold_token(t) in self.unsure)
        return self.pending + self.set_taken + unsure - twice

    @property
    def fence(self) -> list[str]:
        """The tokens a set that begins on this stash fences: every fold in flight and
        every unsure write (the set adds its own)."""
        return [*self.folds, *self.unsure]

    @classmethod
    def decode(cls, raw: bytes | None) -> Stash:
        """What ``raw`` holds. Anything garbled (see ``parse``) reads as empty, and is
        logged: whatever it held is lost, as if memcache had dropped the key."""
        if not raw:
            return cls()
        try:
            return cls.parse(raw)
        except parse.Garbled as exc:
            _report_garbled(parse.fingerprint(raw), parse.describe(raw), str(exc))
            return cls()

    @classmethod
    def parse(cls, raw: bytes) -> Stash:
        """The stash in ``raw``, strictly: exactly what ``encode`` writes (every amount
        within int64, every deadline a finite time, every token and shard well formed,
        no token twice, at most one set marker), or a plain pending integer as earlier
        versions wrote. Raises ``parse.Garbled`` for anything else.

        The last few values parsed are kept: a stash is immutable, and every writer of
        a busy counter reads the same bytes again and again (each write, each wait for
        a set, each merge)."""
        if cls is Stash and type(raw) is bytes:
            return _parsed(raw)
        return cls._parse(raw)

    @classmethod
    def _parse(cls, raw: bytes) -> Stash:
        head, *marks = parse.text(raw, limit=MAX_STASH_BYTES).split(";")
        folds: dict[str, Fold] = {}
        unsure: dict[str, Unsure] = {}
        setter: tuple[str, float] | None = None
        set_taken = 0
        for mark in marks:
            kind, body = mark[:1], mark[1:]
            if kind == "u":
                token, entry = Unsure.decode(body)
                _add_once(unsure, token, entry)
            elif kind == "f":
                token, fold = Fold.decode(body)
                _add_once(folds, token, fold)
            elif kind == "s" and setter is None:
                setter, set_taken = _set_marker(body)
            else:
                raise parse.Garbled(f"not a stash's mark: {mark[:80]!r}")
        return cls(
            parse.integer(head),
            MappingProxyType(folds),
            setter,
            MappingProxyType(unsure),
            set_taken,
        )

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
        ``set_ended``); lapsed claims are open again; and each fold past its deadline
        is an unsure entry instead: what it took, on ``ANY_SHARD``, under its fold token.

        A fold's deadline is past every time limit of its writer, so a writer still
        holding one died, or stalled far past them. Either way its write may have
        landed or not, on a shard nobody knows; the resolution looks on every shard
        and fences the fold token, so a stalled writer that wakes writes only its own
        delta (see core/tokens.py). Nothing is decided by the clock: it only says when to look.
        """
        now = time.time() if now is None else now
        stash = self
        if self.setter is not None and self.setter[1] <= now:
            stash = self.set_ended(self.setter[0], landed=False)
        expired = [t for t, f in stash.folds.items() if f.deadline <= now]
        lapsed = [t for t, u in stash.unsure.items() if u.claim and u.deadline <= now]
        if not (expired or lapsed):
            return stash
        folds = {t: f for t, f in stash.folds.items() if t not in expired}
        unsure = dict(stash.unsure)
        for token in lapsed:
            unsure[token] = unsure[token].unclaimed()
        for token in expired:
            unsure[fold_token(token)] = Unsure(stash.folds[token].amount, ANY_SHARD)
        return dataclasses.replace(
            stash, folds=MappingProxyType(folds), unsure=MappingProxyType(unsure)
        )

    def mentions(self, token: str) -> bool:
        """Is the write ``token`` still to be settled here: a fold in flight, an unsure
        write, or the unsure fold part of a writer that vanished?"""
        return token in self.folds or token in self.unsure or fold_token(token) in self.unsure

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
        shows that its set did not land. Repeating it changes nothing; so does a fold
        that expired meanwhile (its fold part is an unsure entry already)."""
        fold = self.folds.get(token)
        if fold is None:
            return self
        if fold.fence:
            return self.made_unsure(token, fold.amount, 0, folded=fold.amount)
        return self._without_fold(token).added(fold.amount)

    def _without_fold(self, token: str) -> Stash:
        if token not in self.folds:
            return self
        folds = {t: f for t, f in self.folds.items() if t != token}
        return dataclasses.replace(self, folds=MappingProxyType(folds))

    def made_unsure(
        self, token: str, amount: int, shard: int, *, folded: int = 0, transaction: bytes = b""
    ) -> Stash:
        """The write ``token`` of ``amount`` to ``shard`` (``folded`` of it from
        delayed_incr) gave up not knowing whether it landed; ``transaction`` is that of
        a transform of it that may still land. Its fold marker, if it still had one,
        goes: the folded part is in ``amount``."""
        entry = Unsure(amount, shard, folded=folded, transaction=transaction)
        unsure = {**self.unsure, token: entry}
        return dataclasses.replace(self._without_fold(token), unsure=MappingProxyType(unsure))

    def claimed(self, claim: str, deadline: float, tokens: Iterable[str]) -> Stash:
        """The unclaimed unsure writes among ``tokens`` are ``claim``'s to resolve."""
        unsure = dict(self.unsure)
        for token in tokens:
            entry = unsure.get(token)
            if entry is not None and not entry.claim:
                unsure[token] = entry.claimed_by(claim, deadline)
        return dataclasses.replace(self, unsure=MappingProxyType(unsure))

    def claimable(self) -> list[str]:
        """Unsure writes nobody is resolving; none while a set runs. A write and its fold
        part, when both have entries, go to one resolver together: each one's
        resolution depends on what the other's wrote. Fold parts come last: one
        over every shard is often left with nothing to do by then."""
        if self.setter is not None:
            return []
        open_ = [
            token
            for token, entry in self.unsure.items()
            if not entry.claim and not self._partner_claimed(token)
        ]
        return sorted(open_, key=lambda token: folding_write(token) is not None)

    def _partner_claimed(self, token: str) -> bool:
        partner = folding_write(token) or fold_token(token)
        entry = self.unsure.get(partner)
        return entry is not None and bool(entry.claim)

    def resolved(self, token: str, back: int = 0) -> Stash:
        """The unsure write ``token`` is in the shards now (or, with ``back``, that much
        waits as pending instead). Repeating it changes nothing.

        A write and its fold part settle each other: once the write is in the shards
        its fold part is there with it; once the fold part is, the write has only its
        own delta left. A write going back whole (``back`` is all of it: nobody had
        written its fold part when it looked) leaves that part to the fold part's
        own entry, if there is one, since that may be resolving now.
        """
        entry = self.unsure.get(token)
        if entry is None:
            return self
        unsure = {t: u for t, u in self.unsure.items() if t != token}
        if entry.folded and fold_token(token) in unsure:
            if not back:
                del unsure[fold_token(token)]
            elif back == entry.amount:
                back -= entry.folded
        writer = folding_write(token)
        partner = unsure.get(writer) if writer is not None else None
        if writer is not None and partner is not None and partner.folded:
            unsure[writer] = dataclasses.replace(
                partner, amount=partner.amount - partner.folded, folded=0
            )
        return dataclasses.replace(
            self, pending=self.pending + back, unsure=MappingProxyType(unsure)
        )

    def unclaimed(self, token: str, claim: str) -> Stash:
        """``claim`` could not resolve ``token``: it is open again."""
        entry = self.unsure.get(token)
        if entry is None or entry.claim != claim:
            return self
        unsure = {**self.unsure, token: entry.unclaimed()}
        return dataclasses.replace(self, unsure=MappingProxyType(unsure))

    def movable(self) -> Stash:
        """What may move to another server: pending, and unsure writes nobody is resolving."""
        unsure = {t: u for t, u in self.unsure.items() if not (u.claim or self._partner_claimed(t))}
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
        unsure = {t: u.claimed_by(token, deadline) for t, u in self.unsure.items()}
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
                unsure[t] = u.unclaimed()
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


def _unsure_token(token: str) -> str:
    """An unsure entry's name: a write token, or a fold token (``<token>+``)."""
    writer = folding_write(token)
    parse.token(token if writer is None else writer)
    return token


def _set_marker(body: str) -> tuple[tuple[str, float], int]:
    """``<token>=<taken>@<deadline>`` (``<token>@<deadline>`` as earlier versions wrote):
    the set's token and deadline, and what it took."""
    named, at, deadline = body.partition("@")
    token, equals, taken = named.partition("=")
    if not at:
        raise parse.Garbled(f"not a set marker: {body[:80]!r}")
    setter = (parse.token(token), parse.deadline(deadline))
    return setter, parse.integer(taken) if equals else 0


@functools.lru_cache(maxsize=128)
def _parsed(raw: bytes) -> Stash:
    return Stash._parse(raw)


def _add_once(marks: dict[str, T], token: str, mark: T) -> None:
    if token in marks:
        raise parse.Garbled(f"token {token!r} marked twice")
    marks[token] = mark


@functools.lru_cache(maxsize=256)
def _report_garbled(fingerprint: str, shown: str, why: str) -> None:
    """Log a garbled stash once per distinct value (``fingerprint``; while among the last
    256): every read of the counter sees it again until a change replaces it."""
    log.error(
        "a delayed_incr stash in memcache is garbled (%s): %s; it reads as empty and the "
        "next change replaces it, so whatever it held is lost, as if memcache had dropped "
        "the key (docs/security.md)",
        why,
        shown,
    )
