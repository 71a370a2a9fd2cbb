"""What a fresh virtualenv gets from ``pip install .``: the library, lean.

Builds and installs this project into a new virtualenv (from a copy of the
source, so no stale ``build/`` directory leaks into the wheel) and runs it there.
Needs the network or a pip cache for the dependencies, as any install does.
"""

from __future__ import annotations

import shutil
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".nox", ".dev-tools", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
)


@pytest.fixture(scope="module")
def lean_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv with ``pip install <this project>`` and no extra."""
    base = tmp_path_factory.mktemp("lean")
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    env_dir = base / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(source)],
        check=True,
        timeout=600,
    )
    return env_dir


def _run(env_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=env_dir)


def test_a_plain_install_has_no_command_line_or_chart_dependencies(lean_venv: Path) -> None:
    python = str(lean_venv / "bin" / "python")
    listed = _run(lean_venv, python, "-m", "pip", "list", "--format=freeze").stdout.lower()
    installed = {line.split("==")[0] for line in listed.splitlines()}
    assert {"sharded-counter", "google-cloud-datastore", "pymemcache", "tenacity"} <= installed
    assert not installed & {"click", "rich", "matplotlib", "opentelemetry-sdk"}, installed


def test_the_library_and_its_test_harness_import_without_them(lean_venv: Path) -> None:
    python = str(lean_venv / "bin" / "python")
    code = (
        "import importlib.metadata, sharded_counter, sharded_counter_emulator\n"
        "from sharded_counter import Counter, SharedBuffer, RateLimiter\n"
        "assert importlib.metadata.version('sharded-counter') == sharded_counter.__version__\n"
        "print(sharded_counter.__version__)\n"
    )
    done = _run(lean_venv, python, "-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().count(".") == 2


def test_without_the_opentelemetry_api_telemetry_does_nothing(lean_venv: Path) -> None:
    # google-api-core brings opentelemetry-api today; an older one, or an app that
    # removes it, must still work: every telemetry call is then a no-op.
    python = str(lean_venv / "bin" / "python")
    removed = _run(lean_venv, python, "-m", "pip", "uninstall", "-y", "-q", "opentelemetry-api")
    assert removed.returncode == 0, removed.stderr
    code = (
        "import importlib.util\n"
        "assert importlib.util.find_spec('opentelemetry') is None\n"
        "from sharded_counter import Counter, telemetry\n"
        "recorder = telemetry.telemetry()\n"
        "assert not recorder.enabled\n"
        "recorder.increment_done('written', 0.1)\n"
        "recorder.events({'writes': 1})\n"
        "with recorder.datastore_call('Commit'):\n"
        "    pass\n"
        "print('no-op')\n"
    )
    done = _run(lean_venv, python, "-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no-op"


def test_the_console_script_names_the_extra_to_install(lean_venv: Path) -> None:
    for command in (
        [str(lean_venv / "bin" / "sharded-counter"), "--help"],
        [str(lean_venv / "bin" / "python"), "-m", "sharded_counter", "count", "x"],
    ):
        done = _run(lean_venv, *command)
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert "pip install 'sharded-counter[cli]'" in done.stderr
        assert "Traceback" not in done.stderr


def test_every_package_folder_is_listed_for_the_wheel() -> None:
    # pyproject.toml names its packages one by one (emulator/ ships under another
    # name), so a new sub-package left off the list is missing from every install
    # while an editable checkout still imports it.
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "sharded_counter").rglob("__init__.py")
    }
    found |= {
        "sharded_counter_emulator"
        + "".join("." + p for p in init.parent.relative_to(ROOT / "emulator").parts)
        for init in (ROOT / "emulator").rglob("__init__.py")
    }
    assert found <= listed, sorted(found - listed)
