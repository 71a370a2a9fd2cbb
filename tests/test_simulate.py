"""The simulator (tools/simulate) and the in-memory models it runs on (memory/).

No backend runs here: the models stand in for Datastore and memcached, on
purpose, and these tests check that they mean what the real servers mean
(the behaviour suite checks the counter on the real ones). The simulator's
own checks are shown to bite: with a protocol rule broken, it finds a
violation within a few seeds.
"""

from __future__ import annotations

from typing import Any

import pytest
from google.api_core import exceptions as gexc
from pymemcache.exceptions import MemcacheClientError

from sharded_counter.core.effects import Memcache, Rpc, Sleep
from sharded_counter.memory.cache import MemcacheModel
from sharded_counter.memory.datastore import Blocked, DatastoreModel
from sharded_counter.store import entities
from sharded_counter.store.rpc import TransactionExpired, refine_error
from sharded_counter.tools.simulate.clock import VirtualClock, deterministic
from sharded_counter.tools.simulate.history import describe
from sharded_counter.tools.simulate.run import run_history
from sharded_counter.tools.simulate.world import Knobs, SimProcess, World, shared_store

# -- the memcached model ------------------------------------------------------------------


def test_the_cache_model_keeps_memcacheds_meaning_of_cas_add_and_incr() -> None:
    clock = VirtualClock()
    cache = MemcacheModel(clock.monotonic)
    assert cache.gets("k") == (None, None)
    assert cache.cas("k", b"1", 1) is None  # gone
    assert cache.add("k", b"1", 10) is True
    assert cache.add("k", b"2") is False
    value, token = cache.gets("k")
    assert value == b"1"
    assert cache.cas("k", b"3", token) is True
    assert cache.cas("k", b"4", token) is False  # changed since that gets
    assert cache.incr("k", 2**64 - 3) == 0  # unsigned: wraps past 2**64 - 1
    assert cache.decr("k", 5) == 0  # and stops at zero going down
    cache.set("n", b"x")
    with pytest.raises(MemcacheClientError):
        cache.incr("n", 1)
    cache.add("e", b"1", 10)
    clock.now = 11.0
    assert cache.get("e") is None  # expired with its 10 s
    assert cache.get("k") == b"0"  # its cas set no expiry (0: never)


# -- the Datastore model -------------------------------------------------------------------


def _commit_of(
    model: DatastoreModel, txn: bytes | None, count: int, *, transform: bool = False
) -> Any:
    store = shared_store(5.0)
    key = store.key("c", 0)
    if transform:
        mutation = entities.increment_mutation(key, "c", count)
    else:
        mutation = entities.upsert(entities.shard_entity(key, "c", count))
    request = store_request(store, "commit")
    request.mutations.append(mutation)
    if txn is not None:
        request.mode = 1  # TRANSACTIONAL
        request.transaction = txn
    else:
        request.mode = 2  # NON_TRANSACTIONAL
    return request


def store_request(store: Any, method: str) -> Any:
    from sharded_counter.store import rpc

    types = {"commit": rpc.CommitRequest, "lookup": rpc.LookupRequest}
    return types[method](project_id=store.client.project, database_id="")


def _lookup(txn: bytes) -> Any:
    store = shared_store(5.0)
    request = store_request(store, "lookup")
    request.keys.append(store.key("c", 0))
    request.read_options.transaction = txn
    return request


def _begin(model: DatastoreModel, now: float = 0.0) -> bytes:
    return bytes(model.call("begin_transaction", None, now).transaction)


def test_the_classic_model_aborts_a_transaction_whose_read_was_written_since() -> None:
    model = DatastoreModel("classic")
    txn = _begin(model)
    model.call("lookup", _lookup(txn), 0.0)
    model.call("commit", _commit_of(model, None, 5), 0.1)  # someone else wrote it
    with pytest.raises(gexc.Aborted):
        model.call("commit", _commit_of(model, txn, 1), 0.2)


def test_the_classic_model_ignores_transforms_and_the_firestore_one_applies_them() -> None:
    for engine, expected in (("classic", None), ("firestore", 7)):
        model = DatastoreModel(engine)
        model.call("commit", _commit_of(model, None, 5), 0.0)
        answer = model.call("commit", _commit_of(model, None, 2, transform=True), 0.1)
        results = [r.integer_value for r in answer.mutation_results[0].transform_results]
        assert results == ([] if expected is None else [expected])


def test_the_firestore_model_makes_a_second_reader_wait_then_gives_up_after_its_timeout() -> None:
    model = DatastoreModel("firestore", lock_timeout=2.0)
    first, second = _begin(model), _begin(model)
    model.call("lookup", _lookup(first), 0.0)
    with pytest.raises(Blocked):
        model.call("lookup", _lookup(second), 0.5)
    with pytest.raises(gexc.Aborted, match="lock timeout"):
        model.call("lookup", _lookup(second), 2.6)


def test_a_transaction_the_model_dropped_reads_as_transaction_expired() -> None:
    model = DatastoreModel("firestore", idle_timeout=60.0)
    txn = _begin(model)
    with pytest.raises(gexc.InvalidArgument) as caught:
        model.call("commit", _commit_of(model, txn, 1), 61.0)
    assert isinstance(refine_error(caught.value), TransactionExpired)


# -- the protocol rule the simulator found -------------------------------------------------


def test_a_transform_whose_outcome_is_unknown_is_waited_out_before_its_token_is_checked() -> None:
    """W6': a transform write is no transaction, so nothing orders it against a later
    token check but its deadline. The simulator found a late transform landing after
    its own retry had found no token and written again (seed 7, firestore)."""
    clock = VirtualClock()
    with deterministic(clock, 1) as draws:
        world = World(Knobs(engine="firestore"), clock, draws)
        process = SimProcess(world, 0, 1)
        world.enter(process)
        steps = process.paths.shards.write(5, "6b15f700aaaaaaaa")
        effect = steps.send(None)
        failed_at = None
        while True:
            if isinstance(effect, Memcache):
                effect = steps.send(process.tier.perform(effect))
            elif isinstance(effect, Rpc) and failed_at is None:
                assert effect.method == "commit" and effect.request.mutations[0].property_transforms
                clock.now = failed_at = 0.2
                effect = steps.throw(gexc.ServiceUnavailable("Connection reset by peer"))
            else:
                break
    assert isinstance(effect, Sleep), f"the retry went on at once: {effect!r}"
    assert effect.seconds == pytest.approx(world.settings.rpc_timeout - 0.2)


# -- the simulator ---------------------------------------------------------------------------


def test_a_seed_replays_the_same_history() -> None:
    first = run_history(3, Knobs(engine="firestore"))
    again = run_history(3, Knobs(engine="firestore"))
    assert first.events == again.events
    assert describe(first.history.ops) == describe(again.history.ops)
    assert len(first.faults) >= 5


def test_the_late_transform_that_was_counted_twice_is_counted_once_now() -> None:
    outcome = run_history(7, Knobs(engine="firestore"))
    assert "late_commits" in outcome.faults
    assert not [v for v in outcome.violations if "I5" in v], outcome.report()


def test_the_simulator_finds_a_retry_that_skips_its_token_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A mutation: every write forgets to look for its own token (store/shards.py)."""
    monkeypatch.setattr(
        "sharded_counter.store.shards.left_to_write", lambda token, amount, *_: amount
    )
    found = next(
        (seed for seed in range(20) if not run_history(seed, Knobs(engine="classic")).ok), None
    )
    assert found is not None, "20 histories with the token check gone, and no violation"
