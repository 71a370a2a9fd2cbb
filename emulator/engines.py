"""The Datastore emulators we know how to run, and where the Cloud SDK keeps them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Engine = Literal["classic", "firestore"]

ENGINES: tuple[Engine, ...] = ("classic", "firestore")


@dataclass(frozen=True)
class Component:
    """A Cloud SDK component that ships one emulator."""

    name: str
    """The gcloud component id (``gcloud components install <name>``)."""
    apt_package: str
    """The Debian/Ubuntu package that ships the same component."""
    launcher: str
    """The launcher script, relative to the SDK root."""


COMPONENTS: dict[Engine, Component] = {
    "classic": Component(
        name="cloud-datastore-emulator",
        apt_package="google-cloud-cli-datastore-emulator",
        launcher="platform/cloud-datastore-emulator/cloud_datastore_emulator",
    ),
    "firestore": Component(
        name="cloud-firestore-emulator",
        apt_package="google-cloud-cli-firestore-emulator",
        launcher="platform/cloud-firestore-emulator/cloud_firestore_emulator",
    ),
}


def check_engine(engine: str) -> Engine:
    """Return ``engine`` as an :data:`Engine`, or raise ValueError naming the valid ones."""
    for known in ENGINES:
        if engine == known:
            return known
    raise ValueError(f"unknown Datastore engine {engine!r}: expected one of {', '.join(ENGINES)}")
