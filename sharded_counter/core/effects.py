"""Steps: the protocol's sequencing as generators that ask for I/O instead of doing it.

A counter's paths (a write with its fold of ``delayed_incr``, the resolution of
unsure writes, a read that refills the cached record, a set) are written once,
as generator functions that *yield* an effect whenever they need the outside
world and are sent back its result (or have its error thrown in). They never
touch a socket, a thread or the clock's sleep. A *shell* carries the effects
out: ``paths/shell.py``'s blocking ``SyncShell`` for ``Counter`` (through
``drive`` below), ``aio/shell.py``'s ``AsyncShell`` for ``AsyncCounter``. So
the order of every call, and what the protocol does with each answer, is one
piece of code however it is driven, as h11 keeps HTTP's state machine apart
from sockets.

A step function is annotated ``-> Steps[T]``, calls another with ``yield from``,
and returns its answer. The effects are few:

* ``Memcache``: one call of the cache tier's guarded client (``gets``, ``cas``,
  ``add``, ...): its failures arrive as ``CacheUnavailable``;
* ``Rpc``: one Datastore call, a request protobuf in, the response protobuf
  out: its failures arrive as ``google.api_core`` exceptions;
* ``Sleep``: a pause (a retry's backoff, a wait for a set);
* ``Together``: several steps at once (queries side by side), their answers
  in order;
* ``Batched``: items to merge into one key together with the other writers of
  this process (``cache/batches.py``): threads in one shell, tasks in the other.

``retrying`` runs an attempt under a tenacity policy, with the backoff as a
``Sleep``: the same strategy objects as ``Retrying``, without its ``time.sleep``.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Generator, Sequence
from typing import Any, TypeVar

from tenacity import (
    BaseRetrying,
    RetryAction,
    RetryCallState,
    TryAgain,
    retry_if_exception_type,
)

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class Memcache:
    """Call ``method`` of the guarded memcache client (cache/guarded.py) with ``args``."""

    method: str
    args: tuple[Any, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Rpc:
    """Send ``request`` (a protobuf) to Datastore's ``method`` (store/rpc.py's names)."""

    method: str
    request: Any


@dataclasses.dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


@dataclasses.dataclass(frozen=True, slots=True)
class Together:
    """Run ``steps`` concurrently; the answer is their results, in order (the first
    error is raised once all are over)."""

    steps: Sequence[Generator[Any, Any, Any]]


@dataclasses.dataclass(frozen=True, slots=True)
class Batched:
    """Merge ``items`` into ``key`` with this process's other writers of it: whoever
    leads runs ``merge(everything waiting)``; the answer comes once ours is merged."""

    key: str
    items: Sequence[Any]
    merge: Callable[[list[Any]], Generator[Any, Any, None]]


Effect = Memcache | Rpc | Sleep | Together | Batched

#: A step function's return type: it yields effects, is sent their results, returns T.
Steps = Generator[Effect, Any, T]


def drive(steps: Steps[T], perform: Callable[[Effect], Any]) -> T:
    """Run ``steps`` to their end in this thread: each effect goes to ``perform``, whose
    result is sent back, or whose error is thrown in for the steps to handle."""
    try:
        effect = next(steps)
        while True:
            try:
                result = perform(effect)
            except BaseException as exc:
                effect = steps.throw(exc)
            else:
                effect = steps.send(result)
    except StopIteration as stop:
        answer: T = stop.value
        return answer


def done(value: T) -> Steps[T]:
    """Steps that need no I/O: the answer at once (for a path with nothing to do)."""
    return value
    yield  # pragma: no cover - makes this a generator


def retrying(
    policy: BaseRetrying, attempt: Callable[..., Steps[T]], *args: Any, **kwargs: Any
) -> Steps[T]:
    """Run ``attempt(*args, **kwargs)`` under ``policy`` (a tenacity ``Retrying``), as its
    ``__call__`` would: retried, stopped and logged by its strategies, each backoff a
    ``Sleep``. Raises what the policy raises when it gives up.

    The policy's strategies are called here in the order tenacity's ``Retrying.iter``
    calls them (``before``; the attempt; ``retry``, skipped for ``TryAgain``; ``after``,
    ``wait``, ``stop``; then ``retry_error_callback`` or ``retry_error_cls``, or else
    ``before_sleep`` and the sleep), and ``test_effects.py`` holds the two to the same
    decisions. ``iter`` itself builds a list of closures for every decision, and every
    step of every path pays for that. The policy's ``statistics`` are not kept: nothing
    here reads them, and they are per thread, not per run of steps."""
    state = RetryCallState(retry_object=policy, fn=None, args=args, kwargs=kwargs)
    while True:
        if policy.before is not None:
            policy.before(state)
        error: BaseException | None = None
        try:
            result = yield from attempt(*args, **kwargs)
        except BaseException as exc:
            error = exc
            state.set_exception(sys.exc_info())  # type: ignore[arg-type]
        else:
            if type(policy.retry) is retry_if_exception_type:
                return result  # it retries errors only (the write policies): no outcome
            state.set_result(result)
        if isinstance(error, TryAgain) or policy.retry(state):
            pass  # retried, unless ``stop`` says otherwise
        elif error is not None:
            raise error
        else:
            return result
        if policy.after is not None:
            policy.after(state)
        sleep = policy.wait(state)
        state.upcoming_sleep = sleep
        if policy.stop(state):
            if policy.retry_error_callback is not None:
                answer: T = policy.retry_error_callback(state)
                return answer
            assert state.outcome is not None
            gave_up = policy.retry_error_cls(state.outcome)
            if policy.reraise:
                gave_up.reraise()
            raise gave_up from error
        state.next_action = RetryAction(sleep)
        state.idle_for += sleep
        if policy.before_sleep is not None:
            policy.before_sleep(state)
        state.prepare_for_next_attempt()
        yield Sleep(float(sleep))
