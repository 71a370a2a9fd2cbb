"""Find the Google Cloud SDK and the emulator components installed in it."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

from .engines import COMPONENTS, Engine
from .errors import MissingDependency

_GCLOUD_INSTALL = (
    "the Google Cloud SDK (gcloud) is not installed: run 'apt-get install -y google-cloud-cli' "
    "(see https://cloud.google.com/sdk/docs/install)"
)


def sdk_root() -> Path:
    """Return the root directory of the Cloud SDK that ``gcloud`` on PATH belongs to.

    Raises MissingDependency when there is no ``gcloud`` on PATH.
    """
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        raise MissingDependency("gcloud", _GCLOUD_INSTALL)
    # Keyed on the gcloud found, so that a changed PATH is honoured while the slow
    # `gcloud info` call (about a second) runs once per installation.
    return _root_of(os.path.realpath(gcloud))


@functools.lru_cache(maxsize=8)
def _root_of(gcloud: str) -> Path:
    try:
        result = subprocess.run(
            [gcloud, "info", "--format=value(installation.sdk_root)"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            # Never let gcloud stop to ask a question: there is nobody to answer it.
            env={**os.environ, "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"},
        )
        root = result.stdout.strip()
        if root and Path(root, "platform").is_dir():
            return Path(root)
    except (OSError, subprocess.SubprocessError):
        pass
    # gcloud lives in <root>/bin, also when reached through a symlink such as /usr/bin/gcloud.
    return Path(gcloud).parent.parent


def component_launcher(engine: Engine) -> Path:
    """Return the launcher script of ``engine``'s emulator, or raise MissingDependency."""
    component = COMPONENTS[engine]
    launcher = sdk_root() / component.launcher
    if not launcher.is_file():
        raise MissingDependency(
            component.name,
            f"the Cloud SDK component {component.name} is missing: "
            f"run 'gcloud components install {component.name}' "
            f"(or 'apt-get install -y {component.apt_package}')",
        )
    return launcher
