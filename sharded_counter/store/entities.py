"""The protobufs the store writes and reads: shard entities, mutations, token slots.

A shard is ``CounterShard`` with ``name`` (indexed: the sum queries it),
``count`` (unindexed), a token slot per process that wrote it lately
(``w_`` + this process's slot: one of 2**32, drawn at start and again after
``fork``) and the ``fence``. Which tokens a slot and the fence keep is
decided in ``core/tokens.py``; this module only reads and writes them.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Collection, Sequence
from typing import Any

from google.cloud.datastore_v1.types import datastore as ds_types
from google.cloud.datastore_v1.types import entity as entity_types

from ..core import tokens
from ..core.keys import shard_index
from ..process import forget_at_fork

EntityPb = entity_types.Entity.pb()
KeyPb = entity_types.Key.pb()
_MutationPb = ds_types.Mutation.pb()

SLOT_PREFIX = "w_"
LEGACY_TOKENS = "w"  # earlier versions kept the last 16 tokens of any process here
FENCE = "fence"


def _draw_slot() -> str:
    return secrets.token_hex(4)


#: This process's token slot (a test may pin it).
process_slot = _draw_slot()


@forget_at_fork
def _new_slot_after_fork() -> None:
    global process_slot
    process_slot = _draw_slot()


# -- entities --------------------------------------------------------------------------


def shard_entity(key: Any, name: str, count: int) -> Any:
    entity = EntityPb()
    entity.key.CopyFrom(key)
    entity.properties["name"].string_value = name
    count_value = entity.properties["count"]
    count_value.integer_value = count
    # Nobody queries by count; leaving it out of the index makes each write cheaper.
    count_value.exclude_from_indexes = True
    return entity


def count_of(entity: Any) -> int:
    value = entity.properties.get("count")
    if value is None or value.WhichOneof("value_type") != "integer_value":
        return 0
    return int(value.integer_value)


def shard_id(name: str, key_name: str) -> str:
    """``i<index>`` for our shards of ``name``; ``k<hash>`` for one written by anyone else."""
    index = shard_index(name, key_name)
    if index is not None:
        return f"i{index}"
    return "k" + hashlib.blake2b(key_name.encode("utf-8"), digest_size=6).hexdigest()


# -- mutations -------------------------------------------------------------------------


def mutation() -> Any:
    """An empty Mutation protobuf."""
    return _MutationPb()


def upsert(entity: Any) -> Any:
    written = _MutationPb()
    written.upsert.CopyFrom(entity)
    return written


def delete(key: Any) -> Any:
    deleted = _MutationPb()
    deleted.delete.CopyFrom(key)
    return deleted


def increment_mutation(key: Any, name: str, delta: int) -> Any:
    """An upsert that sets only ``name`` and has the server add ``delta`` to ``count``."""
    increment = _MutationPb()
    entity = increment.upsert
    entity.key.CopyFrom(key)
    entity.properties["name"].string_value = name
    increment.property_mask.paths.append("name")
    transform = increment.property_transforms.add()
    transform.property = "count"
    transform.increment.integer_value = delta
    return increment


def with_slot_token(increment: Any, token: str) -> Any:
    """Have a transform write put ``token`` in this process's slot (replacing it: a
    transform cannot read the slot to append)."""
    slot = SLOT_PREFIX + process_slot
    value = increment.upsert.properties[slot]
    value.string_value = token
    value.exclude_from_indexes = True
    increment.property_mask.paths.append(slot)
    return increment


# -- token slots and the fence -----------------------------------------------------------


def tokens_of(entity: Any) -> list[str]:
    """Every write token a shard remembers, in every process's slot and its fence."""
    if entity is None:
        return []
    found: list[str] = []
    for prop, value in entity.properties.items():
        if prop.startswith(SLOT_PREFIX) or prop in (LEGACY_TOKENS, FENCE):
            found += slot_tokens(value)
    return found


def fence_tokens(entity: Any) -> list[str]:
    return slot_tokens(entity.properties.get(FENCE)) if entity is not None else []


def slot_tokens(value: Any) -> list[str]:
    """The tokens in one slot (or the fence): a list, or one string (a transform)."""
    if value is None:
        return []
    kind = value.WhichOneof("value_type")
    if kind == "array_value":
        return [v.string_value for v in value.array_value.values]
    return [value.string_value] if kind == "string_value" else []


def carry_slots(
    entity: Any,
    written: Any,
    token: str,
    *,
    fence: Sequence[str] = (),
    pinned: Collection[str] = (),
) -> None:
    """Give ``written`` the token slots of ``entity`` (the shard as read): this
    process's own with ``token`` written into it, the others unless stale; and the
    fence of ``entity`` (or ``fence`` in its place). What is kept: core/tokens.py."""
    own = SLOT_PREFIX + process_slot
    now = time.time()
    mine: list[str] = []
    fenced = list(fence)
    if entity is not None:
        for prop, value in entity.properties.items():
            if prop == own:
                mine = slot_tokens(value)
            elif prop == FENCE:
                fenced = fenced or slot_tokens(value)
            elif prop.startswith(SLOT_PREFIX):
                if tokens.slot_is_stale(slot_tokens(value), now):
                    continue  # a process long gone; nobody can still be looking
                written.properties[prop].CopyFrom(value)
    _put_tokens(written, own, tokens.slot_after_write(mine, token, pinned))
    _put_tokens(written, FENCE, tokens.fence_after_write(fenced, now))


def _put_tokens(entity: Any, prop: str, kept: Sequence[str]) -> None:
    if not kept:
        return
    array = entity.properties[prop]  # an array is indexed per element, never as a whole
    for token in kept:
        item = array.array_value.values.add()
        item.string_value = token
        item.exclude_from_indexes = True
