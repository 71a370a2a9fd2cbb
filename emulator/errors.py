"""Exceptions raised while managing the local backends."""

from __future__ import annotations


class BackendError(RuntimeError):
    """A backend could not be started, reached or stopped."""


class MissingDependency(BackendError):
    """Something a backend needs is not installed on this machine.

    The message is a single line naming what is missing and the command that installs
    it, so that a test failure or the ``check`` command can show it verbatim.
    """

    def __init__(self, name: str, message: str) -> None:
        # One line only: it is shown as-is in pytest's short summary and in `check`.
        super().__init__(" ".join(message.split()))
        self.name = name


class BackendTimeout(BackendError):
    """A backend process did not become ready in time."""
