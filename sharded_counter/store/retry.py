"""The retry policy shared by every Datastore write path, as tenacity objects."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from google.api_core import exceptions as gexc
from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from ..errors import DatastoreUnavailable
from ..settings import Settings

_P = ParamSpec("_P")
_R = TypeVar("_R")
log = logging.getLogger("sharded_counter")

#: Contention: another writer got there first (optimistic) or held the lock too long
#: (pessimistic, Firestore in Datastore mode says "Transaction lock timeout").
CONTENTION: tuple[type[Exception], ...] = (gexc.Aborted,)

#: The backend was briefly unable to answer; the same request may well succeed.
TRANSIENT: tuple[type[Exception], ...] = (
    gexc.ServiceUnavailable,
    gexc.DeadlineExceeded,
    gexc.InternalServerError,
    gexc.TooManyRequests,
    gexc.ResourceExhausted,
    gexc.Unknown,
)

RETRYABLE = CONTENTION + TRANSIENT

#: The server answered with a verdict: it did not apply the request. Contention and
#: overload, and the refusals no retry cures (a bad request, missing permission or
#: database): the request was judged, not lost.
_REFUSED: tuple[type[Exception], ...] = (
    *CONTENTION,
    gexc.TooManyRequests,
    gexc.ResourceExhausted,
    gexc.InvalidArgument,
    gexc.PermissionDenied,
    gexc.Unauthenticated,
    gexc.NotFound,
    gexc.AlreadyExists,
    gexc.FailedPrecondition,
    gexc.OutOfRange,
    gexc.MethodNotImplemented,
)
# gRPC says UNAVAILABLE both when it never reached the server and when a connection
# broke mid-call; only its message tells the first apart.
_NEVER_SENT = ("failed to connect to all addresses", "Connection refused")


def outcome_unknown(exc: BaseException) -> bool:
    """May the failed commit behind ``exc`` still have been applied by the server?

    Only a verdict of the server (``_REFUSED``) or a connection that was never
    made says no. Everything else (timeouts, broken connections, cancelled calls,
    internal errors, anything we do not recognise) may have landed.
    """
    if isinstance(exc, _REFUSED):
        return False
    if isinstance(exc, gexc.ServiceUnavailable):
        return not any(hint in str(exc) for hint in _NEVER_SENT)
    return True


def write_retrying(settings: Settings, *, until_deadline: bool = False) -> Retrying:
    """Exponential backoff with full jitter, bounded by attempts and by a deadline.

    Call it with the attempt: ``write_retrying(settings)(attempt, *args)`` runs
    ``attempt`` until it returns, raises what is not worth a retry, or the policy
    gives up, and then raises the last error. Each retry is logged (debug).

    ``until_deadline`` drops the attempt bound: for a write that every concurrent
    increment can abort (a set reads and rewrites every shard), which on an
    optimistic engine under load may lose many rounds before it wins one.

    A new object each call, as tenacity's ``__call__`` keeps its run's state on it;
    steps take the shared ``write_policy`` instead.
    """
    deadline = stop_after_delay(settings.retry_deadline)
    return Retrying(
        retry=retry_if_exception_type(RETRYABLE),
        stop=deadline if until_deadline else stop_after_attempt(settings.retry_attempts) | deadline,
        wait=wait_random_exponential(
            multiplier=settings.retry_initial_wait, max=settings.retry_max_wait
        ),
        before_sleep=before_sleep_log(log, logging.DEBUG),
        reraise=True,
    )


@functools.lru_cache(maxsize=64)
def write_policy(settings: Settings, *, until_deadline: bool = False) -> Retrying:
    """``write_retrying``'s policy, made once per settings, for steps to run with
    ``core.effects.retrying``: that reads the policy's strategies and keeps each run's
    state on its own ``RetryCallState``, so one object serves every write at once.
    (Making a ``Retrying`` and its strategies for each call cost a tenth of the
    simulator's time.)"""
    return write_retrying(settings, until_deadline=until_deadline)


def datastore_failures_as_ours(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """Let a public read, set or delete raise ``DatastoreUnavailable``, never a raw
    ``google.api_core`` error, once the retry policy has given up."""

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(*args, **kwargs)
        except gexc.GoogleAPICallError as exc:
            raise DatastoreUnavailable(
                f"{method.__name__} failed at Datastore ({type(exc).__name__}): {exc}"
            ) from exc

    return wrapper
