"""Transforms of this process that may still land (docs/protocol.md, W6' and W12).

A transform write is one commit with no read. When its reply is lost it may
have landed, or may land later: a commit queued behind another transaction's
lock is not dropped at its caller's deadline (measured on the Firestore
emulator, 25 s late), so no clock tells when it is over. Each transform is
therefore committed in a transaction of its own, and *fencing* it means rolling
that transaction back until the server answers: from then on, whatever of it
landed has landed, and nothing more will.

Nobody looks for a transform's token before it is fenced: its writer's retry,
a resolution of its unsure entry (which carries the transaction when the
writer could not fence it), or any other write of this process to its shard
(W12: a transform replaces this process's token slot with what it knew when
sent, and would drop the token of a write of ours that landed before it).
"""

from __future__ import annotations

from ..core.effects import Sleep, Steps, retrying
from ..store.retry import write_policy
from .context import CounterContext


def fence(ctx: CounterContext, transaction: bytes) -> Steps[None]:
    """Roll ``transaction`` back until the server answers that it is closed, under
    the write policy; raises the last error when the policy gives up."""
    yield from retrying(write_policy(ctx.settings), ctx.backend.store.close, transaction)


def after_own_transforms(ctx: CounterContext, index: int) -> Steps[None]:
    """Return once no transform of this process may still land on shard ``index``
    (W12): those whose writers wait on them are waited for, those left unfenced are
    fenced here. Raises a Datastore error when a fence fails: nothing was written,
    and the write that asked must not land there yet."""
    picker = ctx.picker
    # Asked again after a few milliseconds: most such transforms are merely in flight,
    # and answer long before their deadline. One that has not answered by then is
    # queued behind a lock or lost, and its writer then fences it, which may take
    # seconds: the looks grow further apart.
    poll = TRANSFORM_POLL
    while True:
        waited, left = picker.transforms_pending(index)
        for token, transaction in left:
            yield from fence(ctx, transaction)
            picker.transform_over(token)
        if not waited:
            return
        yield Sleep(poll)
        poll = min(poll * 2, TRANSFORM_POLL_MAX)


#: Seconds before the first look again at a transform of this process that may still
#: land; each look after waits twice as long as the last, up to ``TRANSFORM_POLL_MAX``.
TRANSFORM_POLL = 0.005
TRANSFORM_POLL_MAX = 0.1
