"""Write tokens: how a write names itself, so its shards can tell whether it landed.

A token is 8 hex digits of Unix seconds (so old ones can be pruned) and 32
random bits. A write that folds in part of delayed_incr has a second name for
that part, its *fold token*: the write token with ``+`` appended. When a
writer vanishes mid-fold, whoever resolves the part it took writes that part
in its place and fences the fold token (see core/stash.py); the writer, if it
wakes, then finds it and writes only its own delta.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Collection, Sequence

_FOLD_SUFFIX = "+"


def new_token() -> str:
    """A fresh write token."""
    return f"{int(time.time()):08x}{secrets.token_hex(4)}"


def fold_token(write_token: str) -> str:
    """The name of the delayed_incr part of the write ``write_token``."""
    return write_token + _FOLD_SUFFIX


def folding_write(token: str) -> str | None:
    """The write token whose fold ``token`` names, or None if it is not a fold token."""
    return token[: -len(_FOLD_SUFFIX)] if token.endswith(_FOLD_SUFFIX) else None


def token_time(token: str) -> int | None:
    """When ``token`` was made (Unix seconds); None for tokens of earlier versions."""
    base = folding_write(token) or token
    if len(base) != 16:
        return None
    try:
        return int(base[:8], 16)
    except ValueError:
        return None


# -- what a shard keeps of them ---------------------------------------------------------
# Each process keeps its tokens in a slot of its own on the shard (store/entities.py);
# a transaction write appends to its slot, keeping the last SLOT_TOKENS_KEPT and every
# pinned one (paths/picker.py). A slot whose newest token is over SLOT_TTL old belongs
# to a process long gone, and is dropped. The fence keeps the newest FENCE_KEPT tokens
# that are under SLOT_TTL old.
SLOT_TOKENS_KEPT = 8
SLOT_TTL = 86400
FENCE_KEPT = 256


def left_to_write(
    token: str, amount: int, folded: int, tokens: Collection[str], fence: Collection[str]
) -> int | None:
    """What the write ``token`` of ``amount`` (``folded`` of it taken from delayed_incr)
    still adds, given the tokens of the shards it read and their fence; None for nothing.

    Its token in a slot: it landed. In the fence: a set replaced it. Its fold token in
    the fence: a resolution wrote the folded part in its place (see core/stash.py), so
    only the rest is left.
    """
    if token in tokens:
        return None
    if folded and fold_token(token) in fence:
        return (amount - folded) or None
    return amount


def slot_after_write(mine: Sequence[str], token: str, pinned: Collection[str]) -> list[str]:
    """This process's slot once the write ``token`` lands: its last few tokens, and every
    pinned one however old."""
    if not token:
        return list(mine)
    tokens = [*mine, token]
    last = len(tokens) - SLOT_TOKENS_KEPT
    return [t for i, t in enumerate(tokens) if i >= last or t in pinned]


def slot_is_stale(tokens: Sequence[str], now: float) -> bool:
    """Do these tokens (another process's slot) all date from over SLOT_TTL ago?"""
    times = [token_time(t) for t in tokens]
    return bool(times) and all(t is not None and t < now - SLOT_TTL for t in times)


def fence_after_write(tokens: Collection[str], now: float) -> list[str]:
    """The fence a write carries over: the newest FENCE_KEPT tokens under SLOT_TTL old
    (tokens of earlier versions, which carry no time, are kept)."""
    stale_before = now - SLOT_TTL
    fresh = {t for t in tokens if (token_time(t) or stale_before) >= stale_before}
    # Tokens start with their time, so sorting them keeps the newest last.
    return sorted(fresh)[-FENCE_KEPT:]
