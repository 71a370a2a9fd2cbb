"""How memcache loops wait and retry: tenacity ``Retrying``, as ``store/retry.py`` does
for Datastore, each with an explicit stop and each retry logged.

A loop that waits for someone else (a lock's holder, a running set, a busy key
crawler) retries on a *result*, and says what giving up means with ``give_up``;
one that moves a failed call to another server retries on an *exception*.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tenacity import RetryCallState, Retrying, wait_none

if TYPE_CHECKING:  # annotations only: older tenacity releases do not name these types
    from tenacity.retry import RetryBaseT
    from tenacity.stop import StopBaseT
    from tenacity.wait import WaitBaseT

log = logging.getLogger("sharded_counter")


def memcache_retrying(
    what: str,
    *,
    stop: StopBaseT,
    retry: RetryBaseT,
    wait: WaitBaseT | None = None,
    give_up: Callable[[RetryCallState], Any] | None = None,
    level: int = logging.DEBUG,
    sleep: Callable[[float], None] = time.sleep,
) -> Retrying:
    """A ``Retrying`` for one memcache loop; ``what`` names it in the log.

    ``give_up`` is called with the last attempt once ``stop`` says so (it raises or
    returns the loop's answer); without it the last attempt's exception is raised.
    Each retry logs one line at ``level``: debug where waiting is the normal course
    (a held lock), warning where it means trouble.
    """
    return Retrying(
        stop=stop,
        retry=retry,
        wait=wait_none() if wait is None else wait,
        before_sleep=_log_retry(what, level),
        retry_error_callback=give_up,
        reraise=True,
        sleep=sleep,
    )


def elapsed(state: RetryCallState) -> float:
    """Seconds since the loop's first attempt began, up to the end of its last one."""
    return state.seconds_since_start or 0.0  # None only before any attempt ended


def _log_retry(what: str, level: int) -> Callable[[RetryCallState], None]:
    def log_it(state: RetryCallState) -> None:
        pause = state.next_action.sleep if state.next_action is not None else 0.0
        outcome = state.outcome
        if outcome is not None and outcome.failed:
            error = outcome.exception()
            log.log(
                level,
                "%s: attempt %d failed (%s: %s); trying again in %.3f s",
                what,
                state.attempt_number,
                type(error).__name__,
                error,
                pause,
            )
        else:  # a result to wait out: ``what`` says what it is
            log.log(
                level, "%s (attempt %d); trying again in %.3f s", what, state.attempt_number, pause
            )

    return log_it
