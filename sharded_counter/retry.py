"""The retry policy shared by every Datastore write path, as tenacity objects."""

from __future__ import annotations

from google.api_core import exceptions as gexc
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from .config import Settings

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

#: Refused before the request was processed: nothing can have been written.
_REFUSED: tuple[type[Exception], ...] = (
    *CONTENTION,
    gexc.TooManyRequests,
    gexc.ResourceExhausted,
)
# gRPC says UNAVAILABLE both when it never reached the server and when a connection
# broke mid-call; only its message tells the first apart.
_NEVER_SENT = ("failed to connect to all addresses", "Connection refused")


def outcome_unknown(exc: BaseException) -> bool:
    """May the failed commit behind ``exc`` still have been applied by the server?"""
    if isinstance(exc, _REFUSED):
        return False
    if isinstance(exc, gexc.ServiceUnavailable):
        return not any(hint in str(exc) for hint in _NEVER_SENT)
    return True


def write_retrying(settings: Settings, *, until_deadline: bool = False) -> Retrying:
    """Exponential backoff with full jitter, bounded by attempts and by a deadline.

    ``until_deadline`` drops the attempt bound: for a write that every concurrent
    increment can abort (a set reads and rewrites every shard), which on an
    optimistic engine under load may lose many rounds before it wins one.
    """
    deadline = stop_after_delay(settings.retry_deadline)
    return Retrying(
        retry=retry_if_exception_type(RETRYABLE),
        stop=deadline if until_deadline else stop_after_attempt(settings.retry_attempts) | deadline,
        wait=wait_random_exponential(
            multiplier=settings.retry_initial_wait, max=settings.retry_max_wait
        ),
        reraise=True,
    )
