"""Unsure writes in ``delayed_incr``: writes whose outcome is unknown, kept until someone
finds out whether they landed (see ``core/stash.py``).
"""

from __future__ import annotations

from ..core.effects import Steps
from ..core.stash import Stash, Unsure
from .backlog import Backlog
from .cas import changing_stash
from .sightings import StashSightings


class UnsureWrites:
    """Keeping, claiming and resolving the unsure writes of each counter's stash (as steps)."""

    def __init__(self, backlog: Backlog, sightings: StashSightings) -> None:
        self._backlog = backlog
        self._sightings = sightings

    def make_unsure(
        self,
        stash_key: str,
        token: str,
        amount: int,
        shard: int,
        *,
        folded: int = 0,
        transaction: bytes = b"",
    ) -> Steps[None]:
        """Keep the write ``token`` of ``amount`` to ``shard`` (``folded`` of it taken from
        the stash), whose outcome is unknown, as an unsure entry (dropping its fold
        marker); ``transaction`` is a transform's that was not fenced. Raises
        CacheUnavailable."""
        self._sightings.expect_unsure(stash_key)
        yield from changing_stash(
            stash_key,
            lambda s: s.made_unsure(token, amount, shard, folded=folded, transaction=transaction),
        )

    def claim_unsure(
        self, stash_key: str, claim: str, deadline: float
    ) -> Steps[tuple[Stash, dict[str, Unsure]]]:
        """Claim every unsure write nobody is resolving, until ``deadline``.

        Returns the stash as it was and the entries claimed. Raises CacheUnavailable.
        """
        before = yield from changing_stash(
            stash_key,
            lambda s: s.claimed(claim, deadline, s.claimable()) if s.claimable() else None,
        )
        self._sightings.expect_unsure(stash_key, False)
        return before, {t: before.unsure[t] for t in before.claimable()}

    def finish_unsure(
        self, stash_key: str, token: str, claim: str, *, written: bool
    ) -> Steps[bool]:
        """End ``claim``'s resolution of ``token``: with ``written`` the entry goes (its
        shard holds it now), else it is open again. Returns whether the stash is done
        with ``token``: False while it still names it (a set claimed the entry
        meanwhile, or memcache did not answer and the backlog ends it later), when
        others may still look for the token. Never raises."""
        if written:
            after = yield from self._backlog.settle(stash_key, lambda s: s.resolved(token))
        else:
            after = yield from self._backlog.settle(stash_key, lambda s: s.unclaimed(token, claim))
        return after is not None and not after.mentions(token)

    def unsure_to_pending(self, stash_key: str, token: str, claim: str, amount: int) -> Steps[None]:
        """The unsure write ``token`` did not land and its shard cannot take the ``amount``
        it still had to add: that waits as pending, for any shard, unless ``claim`` lost
        the entry meanwhile (to a set, or by lapsing; its new owner decides then).
        Never raises."""

        def to_pending(stash: Stash) -> Stash:
            entry = stash.unsure.get(token)
            if entry is None or entry.claim != claim:
                return stash
            return stash.resolved(token, back=amount)

        yield from self._backlog.settle(stash_key, to_pending)
