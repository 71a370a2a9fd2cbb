"""Housekeeping that is not about one counter: removing expired idempotency keys."""

from __future__ import annotations

from typing import Any

from google.cloud import datastore

from ..settings import resolve
from ..store.retry import datastore_failures_as_ours, write_retrying
from .backend import backend_for


@datastore_failures_as_ours
def purge_expired_keys(
    *, now: float | None = None, datastore_client: datastore.Client | None = None, **options: Any
) -> int:
    """Delete the idempotency key records whose ``expire_at`` has passed; returns how many.

    In production a Firestore TTL policy on ``CounterIdempotencyKey.expire_at``
    does this by itself. Run this where no TTL policy runs: the emulators, or a
    database before its policy is set up (``sharded-counter purge-keys``, from
    cron). It covers every counter in the project, database and namespace the
    options name. ``now`` (Unix seconds) defaults to the current time. Raises
    ``DatastoreUnavailable`` when Datastore fails past the retry policy; what
    was deleted by then stays deleted, and running it again finishes the job.
    """
    settings = resolve(options)
    keyed = backend_for(settings, datastore_client).keyed
    removed: int = write_retrying(settings)(keyed.purge_expired, now=now)
    return removed
