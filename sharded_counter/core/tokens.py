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
