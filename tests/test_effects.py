"""Steps and the loops that drive them (core/effects.py), and the asyncio group commit
(aio/combiner.py), without backends: the effects are answered by the test."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from tenacity import (
    RetryError,
    Retrying,
    TryAgain,
    retry_if_exception_type,
    retry_if_result,
    stop_after_attempt,
    wait_fixed,
    wait_incrementing,
)

from sharded_counter.aio.combiner import AsyncWriteCombiner
from sharded_counter.aio.shell import drive as drive_async
from sharded_counter.core.effects import Effect, Memcache, Sleep, Steps, done, drive, retrying
from sharded_counter.errors import CounterOverflowError, IncrementNotRecorded


def read_twice_and_add(key: str) -> Steps[int]:
    """Two reads of ``key``; a failed one counts as 0."""
    total = 0
    for _ in range(2):
        try:
            total += yield Memcache("get", (key,))
        except KeyError:
            total += 0
    return total


class Answers:
    """Answers effects from a script, and records them."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.seen: list[Effect] = []

    def __call__(self, effect: Effect) -> Any:
        self.seen.append(effect)
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def awaited(self, effect: Effect) -> Any:
        await asyncio.sleep(0)
        return self(effect)


def test_drive_sends_results_and_throws_errors_in() -> None:
    answers = Answers(5, KeyError("k"))
    assert drive(read_twice_and_add("k"), answers) == 5
    assert answers.seen == [Memcache("get", ("k",))] * 2


def test_both_drivers_give_the_same_answer_for_the_same_steps() -> None:
    sync, async_ = Answers(2, 3), Answers(2, 3)
    assert drive(read_twice_and_add("k"), sync) == 5
    assert asyncio.run(drive_async(read_twice_and_add("k"), async_.awaited)) == 5
    assert sync.seen == async_.seen


def test_an_error_the_steps_do_not_handle_comes_out() -> None:
    with pytest.raises(ValueError, match="boom"):
        drive(read_twice_and_add("k"), Answers(ValueError("boom")))


def test_done_needs_no_effect() -> None:
    assert drive(done(7), Answers()) == 7


def test_retrying_runs_the_policy_with_its_backoff_as_sleep_effects() -> None:
    attempts = 0

    def flaky() -> Steps[str]:
        nonlocal attempts
        attempts += 1
        value = yield Memcache("get", ("k",))
        if value is None:
            raise ValueError("not yet")
        return str(value)

    policy = Retrying(
        retry=retry_if_exception_type(ValueError),
        stop=stop_after_attempt(3),
        wait=wait_fixed(0.25),
        reraise=True,
    )
    answers = Answers(None, None, None, None, 9)  # a sleep is answered None too
    assert drive(retrying(policy, flaky), answers) == "9"
    assert attempts == 3
    assert answers.seen == [Memcache("get", ("k",)), Sleep(0.25)] * 2 + [Memcache("get", ("k",))]
    attempts = 0
    with pytest.raises(ValueError, match="not yet"):
        drive(retrying(policy, flaky), Answers(None, None, None, None, None))
    assert attempts == 3


class Retryable(Exception):
    pass


class Final(Exception):
    pass


#: What an attempt does: a value to return (None is retried on), or an error to raise.
SCRIPTS = {
    "at-once": [7],
    "second": [None, 7],
    "gives-up-on-results": [None, None, None],
    "third": [None, None, 7],
    "error-then-value": [Retryable("a"), 7],
    "gives-up-on-errors": [Retryable("a"), Retryable("b"), Retryable("c")],
    "error-not-retried": [None, Final("f")],
    "try-again": [TryAgain(), 7],
    "try-again-to-the-end": [None, TryAgain(), TryAgain()],
    "mixed": [Retryable("a"), None, Retryable("c")],
}

#: The policy shapes our paths use, and the ones they might: each way of giving up.
SHAPES = {
    "callback": {"retry_error_callback": lambda state: f"gave up after {state.attempt_number}"},
    "reraise": {"reraise": True},
    "retry-error": {},
}


#: What is retried: results and errors, or errors only (the write policies' shape,
#: whose answers ``retrying`` returns without making an outcome).
RETRIES = {
    "results-or-errors": lambda: (
        retry_if_result(lambda value: value is None) | retry_if_exception_type(Retryable)
    ),
    "errors-only": lambda: retry_if_exception_type((Retryable, TryAgain)),
}


@pytest.mark.parametrize("script", list(SCRIPTS.values()), ids=list(SCRIPTS))
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("retries", list(RETRIES), ids=list(RETRIES))
def test_retrying_decides_as_tenacity_itself_would(
    script: list[Any], shape: str, retries: str
) -> None:
    """``retrying`` calls the policy's strategies itself, not through ``Retrying.iter``
    (effects.py): each outcome, callback, backoff and error must be what tenacity's
    own ``__call__`` makes of the same answers."""

    def policy(calls: list[str]) -> Retrying:
        return Retrying(
            retry=RETRIES[retries](),
            stop=stop_after_attempt(3),
            wait=wait_incrementing(start=0.25, increment=0.5),
            before=lambda state: calls.append(f"before {state.attempt_number}"),
            after=lambda state: calls.append(f"after {state.attempt_number}"),
            before_sleep=lambda state: calls.append(
                f"before_sleep {state.attempt_number} {state.upcoming_sleep}"
                f" {state.next_action} idle {state.idle_for}"
            ),
            sleep=lambda seconds: calls.append(f"sleep {seconds}"),
            **SHAPES[shape],
        )

    def act(answer: Any) -> Any:
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def outcome(run: Any) -> tuple[str, Any]:
        try:
            return "returned", run()
        except RetryError as exc:
            last = exc.last_attempt
            inner = last.exception() if last.failed else last.result()
            return "RetryError", (last.attempt_number, repr(inner))
        except Exception as exc:
            return "raised", repr(exc)

    theirs: list[str] = []
    answers = iter(script)
    expected = outcome(lambda: policy(theirs)(lambda: act(next(answers))))

    ours: list[str] = []
    steps_answers = iter(script)

    def attempt() -> Steps[Any]:
        yield Memcache("get", ("k",))
        return act(next(steps_answers))

    def perform(effect: Effect) -> None:
        if isinstance(effect, Sleep):
            ours.append(f"sleep {effect.seconds}")

    got = outcome(lambda: drive(retrying(policy(ours), attempt), perform))
    assert (got, ours) == (expected, theirs)


class GatedWrites:
    """An async write that records each amount and waits for the test to let it go."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.amounts: list[int] = []
        self.gate = asyncio.Event()
        self.fail = fail

    async def __call__(self, amount: int) -> int:
        self.amounts.append(amount)
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return amount


def test_tasks_queued_behind_a_running_write_go_out_as_one() -> None:
    async def main() -> tuple[list[int], list[Any]]:
        combiner, writes = AsyncWriteCombiner(), GatedWrites()
        calls = [
            asyncio.ensure_future(combiner.run(d, writes, limit=1, max_total=100))
            for d in (1, 2, 3, 4)
        ]
        await asyncio.sleep(0.01)
        writes.gate.set()
        return writes.amounts, list(await asyncio.gather(*calls))

    amounts, results = asyncio.run(main())
    assert amounts == [1, 9]  # the first alone, the other three as one write of their sum
    assert results == [1, 9, 9, 9]


def test_tasks_that_come_straight_back_make_full_groups() -> None:
    # 8 tasks each looping over increments: once a write ends, all 8 are back before
    # the next begins. Without waiting for them (slots.Returns) the first one back took
    # the free slot alone, and the groups went 1, 7, 1, 7, ...
    async def main() -> list[int]:
        combiner, sizes = AsyncWriteCombiner(), []

        async def write(amount: int) -> None:
            sizes.append(amount)
            await asyncio.sleep(0.02)

        async def loop() -> None:
            for _ in range(20):
                await combiner.run(1, write, limit=1, max_total=100)

        await asyncio.gather(*(loop() for _ in range(8)))
        return sizes

    sizes = asyncio.run(main())
    assert sum(sizes) == 160
    later = sizes[len(sizes) // 2 :]
    assert sum(later) / len(later) > 7.0, sizes


def test_each_member_of_a_failed_group_is_told_of_its_own_delta() -> None:
    async def main() -> list[Any]:
        combiner = AsyncWriteCombiner()
        refused = IncrementNotRecorded("c", 5, RuntimeError("down"))
        writes = GatedWrites(fail=refused)
        calls = [
            asyncio.ensure_future(combiner.run(d, writes, limit=1, max_total=100))
            for d in (5, 2, 3)
        ]
        await asyncio.sleep(0.01)
        writes.gate.set()
        return list(await asyncio.gather(*calls, return_exceptions=True))

    errors = asyncio.run(main())
    assert [type(e) for e in errors] == [IncrementNotRecorded] * 3
    assert [e.delta for e in errors] == [5, 2, 3]


def test_a_sum_refused_whole_is_written_again_member_by_member() -> None:
    async def main() -> tuple[list[int], list[Any]]:
        combiner = AsyncWriteCombiner()
        amounts: list[int] = []
        gate = asyncio.Event()

        async def write(amount: int) -> int:
            amounts.append(amount)
            await gate.wait()
            if amount > 5:
                raise CounterOverflowError(f"{amount} does not fit")
            return amount

        calls = [
            asyncio.ensure_future(combiner.run(d, write, limit=1, max_total=100)) for d in (1, 4, 3)
        ]
        await asyncio.sleep(0.01)
        gate.set()
        return amounts, list(await asyncio.gather(*calls, return_exceptions=True))

    amounts, results = asyncio.run(main())
    assert amounts[:2] == [1, 7] and sorted(amounts[2:]) == [3, 4]
    assert results == [1, 4, 3]


def test_exclusive_holds_new_writes_until_it_is_left() -> None:
    async def main() -> list[str]:
        combiner, order = AsyncWriteCombiner(), []

        async def write(amount: int) -> None:
            order.append(f"write {amount}")

        async with combiner.exclusive():
            call = asyncio.ensure_future(combiner.run(1, write, limit=2, max_total=100))
            await asyncio.sleep(0.01)
            order.append("set")
        await call
        return order

    assert asyncio.run(main()) == ["set", "write 1"]
