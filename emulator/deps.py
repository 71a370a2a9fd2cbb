"""Check for the programs the backends need, before anything is launched."""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from .engines import COMPONENTS, ENGINES
from .errors import MissingDependency
from .sdk import component_launcher, sdk_root


def require_java() -> str:
    """Return the java executable the emulator launchers will run, or raise MissingDependency."""
    # The launcher scripts run "${JAVA:=java}", so honour $JAVA the same way they do.
    java = shutil.which(os.environ.get("JAVA") or "java")
    if java is None:
        raise MissingDependency(
            "java", "java is not installed: run 'apt-get install -y openjdk-17-jre-headless'"
        )
    return java


def require_memcached() -> str:
    """Return the memcached executable, or raise MissingDependency."""
    memcached = shutil.which("memcached")
    if memcached is None:
        raise MissingDependency(
            "memcached", "memcached is not installed: run 'apt-get install -y memcached'"
        )
    return memcached


@dataclass(frozen=True)
class DependencyStatus:
    """The outcome of checking one dependency."""

    name: str
    ok: bool
    detail: str
    """Where it was found when ok; the one-line install hint otherwise."""


def dependency_report() -> list[DependencyStatus]:
    """Check every dependency of every backend, in the order a reader would fix them."""
    report: list[DependencyStatus] = []

    def record(name: str, find: Callable[[], object]) -> None:
        try:
            report.append(DependencyStatus(name, True, str(find())))
        except MissingDependency as missing:
            report.append(DependencyStatus(name, False, str(missing)))

    record("gcloud", sdk_root)
    record("java", require_java)
    for engine in ENGINES:
        record(COMPONENTS[engine].name, functools.partial(component_launcher, engine))
    record("memcached", require_memcached)
    return report
