"""``./dev`` on a machine whose Google Cloud SDK lacks the emulator components.

A stand-in ``gcloud`` (a two-line script first on PATH) reports an SDK root with
no components: the real SDK cannot be made to lack them for one test.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("session", ["test", "demo", "bench"])
def test_dev_names_the_missing_emulators_and_how_to_install_them(
    tmp_path: Path, session: str
) -> None:
    sdk = tmp_path / "sdk"
    (sdk / "platform" / "cloud-firestore-emulator").mkdir(parents=True)
    launcher = sdk / "platform" / "cloud-firestore-emulator" / "cloud_firestore_emulator"
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f"#!/bin/sh\necho {sdk}\n")
    gcloud.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run(
        [str(ROOT / "dev"), session], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 1, done.stderr
    assert "lacks: cloud-datastore-emulator\n" in done.stderr  # the firestore one is there
    assert "install with: " in done.stderr
    assert "datastore-emulator" in done.stderr.splitlines()[-1]
    assert "nox" not in done.stdout  # stopped before any session ran
