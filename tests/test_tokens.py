"""Write tokens on the shard (store/shards.py): what a retry or a resolution looks for.

Each process keeps its tokens in a slot property of its own, so other processes'
writes never push them out; old slots are pruned. A set writes the tokens of the
writes it replaced in flight (its fence) onto every shard. Run on both engines.
"""

from __future__ import annotations

import time

import pytest
from google.cloud import datastore

from sharded_counter.core.keys import SHARD_KIND, shard_key_name
from sharded_counter.core.tokens import fold_token, new_token
from sharded_counter.store import entities as entities_module
from sharded_counter.store.shards import ShardStore
from sharded_counter_emulator import datastore_client

pytestmark = pytest.mark.backends

DAY = 86400


def token_made(seconds_ago: float) -> str:
    return f"{int(time.time() - seconds_ago):08x}" + "abcd1234"


def read_shard(name: str, index: int) -> datastore.Entity:
    client = datastore_client()
    entity = client.get(client.key(SHARD_KIND, shard_key_name(name, index)))
    assert entity is not None
    return entity


def test_a_transaction_write_keeps_other_processes_tokens_and_prunes_old_slots(
    sharded_counter_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "tokens"
    client = datastore_client()
    shard = datastore.Entity(
        client.key(SHARD_KIND, shard_key_name(name, 0)),
        exclude_from_indexes=("count", "w_0aaa", "w_0bbb", "w_0ccc", "w"),
    )
    alive, gone = token_made(60), token_made(DAY + 60)
    shard.update(
        {
            "name": name,
            "count": 5,
            "w_0aaa": alive,  # a transform of a process still running
            "w_0bbb": [gone],  # a process that stopped writing over a day ago
            "w_0ccc": [gone, alive],  # its newest token is recent: kept whole
            "w": ["0123456789ab"],  # the list of an earlier version: dropped
        }
    )
    client.put(shard)
    monkeypatch.setattr(entities_module, "process_slot", "0ddd")
    store = ShardStore(client, rpc_timeout=5.0)
    mine = [new_token() for _ in range(10)]
    for token in mine:
        store.run(store.add_in_transaction(name, 0, 1, lazy_begin=False, token=token))

    written = read_shard(name, 0)
    assert written["count"] == 15
    assert written["w_0aaa"] == alive
    assert written["w_0ccc"] == [gone, alive]
    assert written["w_0ddd"] == mine[-8:]  # this process's last eight
    assert "w_0bbb" not in written and "w" not in written


def test_a_retry_finds_its_token_in_any_slot_and_writes_nothing(
    sharded_counter_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "token-found"
    client = datastore_client()
    store = ShardStore(client, rpc_timeout=5.0)
    monkeypatch.setattr(entities_module, "process_slot", "1111")
    token = new_token()
    if store.run(store.probe_transforms()):
        begun = store.run(store.begin())
        first = store.run(store.add_with_transform(name, 0, 7, token=token, transaction=begun))
    else:
        first = store.run(store.add_in_transaction(name, 0, 7, lazy_begin=False, token=token))
    # Another process writes the shard twenty times: its own slot, not ours.
    monkeypatch.setattr(entities_module, "process_slot", "2222")
    for _ in range(20):
        store.run(store.add_in_transaction(name, 0, 1, lazy_begin=False, token=new_token()))
    monkeypatch.setattr(entities_module, "process_slot", "1111")
    again = store.run(store.add_in_transaction(name, 0, 7, lazy_begin=False, token=token))
    assert first.value == 7
    assert again.value == 7 + 20  # found: the +7 is not added twice
    assert read_shard(name, 0)["count"] == 27


def test_a_pinned_token_stays_in_the_slot_however_many_writes_follow(
    sharded_counter_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "token-pinned"
    store = ShardStore(datastore_client(), rpc_timeout=5.0)
    monkeypatch.setattr(entities_module, "process_slot", "3333")
    pinned, pushed = new_token(), new_token()
    store.run(store.add_in_transaction(name, 0, 7, lazy_begin=False, token=pinned))
    store.run(store.add_in_transaction(name, 0, 5, lazy_begin=False, token=pushed))
    for _ in range(20):  # this process's other writes, while the +7 is unsure
        store.run(
            store.add_in_transaction(
                name, 0, 1, lazy_begin=False, token=new_token(), pinned={pinned}
            )
        )
    slot = read_shard(name, 0)["w_3333"]
    assert pinned in slot and pushed not in slot and len(slot) == 1 + 8
    assert (
        store.run(store.add_in_transaction(name, 0, 7, lazy_begin=False, token=pinned)).value == 32
    )


def test_tokens_carry_the_time_they_were_made() -> None:
    before = int(time.time())
    token = new_token()
    assert len(token) == 16 and before <= int(token[:8], 16) <= time.time()
    assert len({new_token() for _ in range(1000)}) == 1000


def test_a_fenced_write_writes_nothing_on_any_shard_and_the_fence_is_carried(
    sharded_counter_env: dict[str, str],
) -> None:
    name = "fenced"
    store = ShardStore(datastore_client(), rpc_timeout=5.0)
    store.run(store.add_in_transaction(name, 0, 5, lazy_begin=False, token=new_token()))
    folding, unsure = new_token(), new_token()
    store.run(store.rewrite(name, 3, lambda _total: 30, lazy_begin=False, fence=[folding]))
    # A later set keeps the fence of the earlier one, and adds its own.
    store.run(store.rewrite(name, 3, lambda _total: 30, lazy_begin=False, fence=[unsure]))
    for index in range(3):
        again = store.run(
            store.add_in_transaction(name, index, 1000, lazy_begin=False, token=folding)
        )
        assert again.value == 10  # found in the fence: nothing added
    store.run(
        store.add_in_transaction(name, 1, 1, lazy_begin=False, token=new_token())
    )  # carries it
    assert (
        store.run(store.add_in_transaction(name, 1, 1000, lazy_begin=False, token=unsure)).value
        == 11
    )
    # A shard the set did not know of (its process had fewer shards) looks at shard 0.
    assert (
        store.run(store.add_in_transaction(name, 7, 1000, lazy_begin=False, token=folding)).value
        == 0
    )
    # So does a write that no shard has room for, spread over all of them.
    states = store.run(
        store.rewrite(name, 3, lambda total: total + 1000, lazy_begin=False, token=folding)
    )
    assert sum(s.value for s in states) == 31
    assert store.run(store.snapshot(name)).total == 31
    assert sorted(read_shard(name, 2)["fence"]) == sorted([folding, unsure])


def test_fence_tokens_over_a_day_old_are_pruned(sharded_counter_env: dict[str, str]) -> None:
    name = "fence-pruned"
    store = ShardStore(datastore_client(), rpc_timeout=5.0)
    old, recent = token_made(DAY + 60), token_made(60)
    store.run(store.rewrite(name, 2, lambda _total: 4, lazy_begin=False, fence=[old, recent]))
    assert read_shard(name, 0)["fence"] == [recent]
    assert store.run(store.add_in_transaction(name, 0, 1, lazy_begin=False, token=old)).value == 3


def test_a_fold_part_resolved_in_a_vanished_writers_place_is_written_once(
    sharded_counter_env: dict[str, str],
) -> None:
    """The resolution of a fold part (core/stash.py) and the write it stands in for: whichever
    commits first, the folded 1,000 is counted once and the writer's own 5 is kept."""
    name = "fold-part"
    store = ShardStore(datastore_client(), rpc_timeout=5.0)
    landed, vanished = new_token(), new_token()
    store.run(store.add_in_transaction(name, 1, 1005, lazy_begin=False, token=landed, folded=1000))

    def resolve(writer: str) -> int:
        states = store.run(
            store.rewrite(
                name,
                3,
                lazy_begin=False,
                adding=1000,
                token=writer,
                folded=1000,
                fence=[fold_token(writer)],
            )
        )
        return sum(s.value for s in states)

    assert resolve(landed) == 1005  # its token is on shard 1: the 1,000 is there
    assert resolve(vanished) == 2005  # on no shard: added, and its fold part fenced
    assert resolve(vanished) == 2005  # a second resolution finds the fence

    # The writer wakes: only its own 5 is left, on any shard, one that does not exist
    # yet included (it looks at shard 0's fence).
    def wake(writer: str, index: int, amount: int) -> int:
        state = store.run(
            store.add_in_transaction(
                name, index, amount, lazy_begin=False, token=writer, folded=1000
            )
        )
        return state.value

    assert wake(vanished, 7, 1005) == 5
    assert store.run(store.snapshot(name)).total == 2010
    assert wake(vanished, 7, 1005) == 5  # its retry finds its token
    assert fold_token(vanished) in read_shard(name, 0)["fence"]
    # A write whose own delta is zero has nothing left once its fold part is fenced.
    zero = new_token()
    assert resolve(zero) == 3010
    wake(zero, 2, 1000)
    assert store.run(store.snapshot(name)).total == 3010
