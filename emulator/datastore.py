"""A local Datastore emulator: the classic one, or Firestore in Datastore mode."""

from __future__ import annotations

import shlex
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .backend import ProcessBackend
from .deps import require_java
from .engines import Engine, check_engine
from .errors import BackendError
from .ports import free_port, port_is_free
from .probes import http_ok, http_request
from .process import ManagedProcess
from .sdk import component_launcher

if TYPE_CHECKING:
    from typing_extensions import Self

DEFAULT_PROJECT = "sharded-counter-test"


class DatastoreEmulator(ProcessBackend):
    """One emulator process, started straight from the Cloud SDK's launcher script.

    ``engine="classic"`` runs cloud-datastore-emulator (in memory, consistency 1.0,
    unless ``on_disk``); ``engine="firestore"`` runs cloud-firestore-emulator in
    Datastore mode (always in memory). The port is chosen on the first start and kept
    across :meth:`restart`. On-disk data goes in the scratch directory, which
    :meth:`stop` deletes, unless ``data_dir`` names a directory of your own.
    """

    # The JVM keeps answering requests for a while after SIGTERM, and an on-disk
    # emulator writes its file only once it has stopped. On a busy 2-core machine its
    # shutdown took 11-12 s now and then; killed at 10 s, it came back without the
    # writes it had acknowledged meanwhile (6 and 8 of them, in 2 of 8 tries).
    stop_grace = 60.0

    def __init__(
        self,
        engine: Engine,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        project: str = DEFAULT_PROJECT,
        data_dir: str | None = None,
        on_disk: bool = False,
    ) -> None:
        self.engine: Engine = check_engine(engine)
        if on_disk and self.engine != "classic":
            raise ValueError(
                "on_disk needs engine='classic': the Firestore emulator keeps data in memory only"
            )
        super().__init__(host=host, port=port)
        self.label = f"the {self.engine} emulator"
        self.project = project
        self.on_disk = on_disk
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self._timeout = 90.0

    def _describe(self) -> str:
        return f"DatastoreEmulator {self.engine}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def data_dir(self) -> Path | None:
        """The classic emulator's project directory (where on-disk data lives), once known."""
        if self._data_dir is not None:
            return self._data_dir
        return self._workdir / "project" if self._workdir is not None else None

    def env(self) -> dict[str, str]:
        """The variables ``gcloud beta emulators datastore env-init`` would print."""
        return {
            "DATASTORE_DATASET": self.project,
            "DATASTORE_EMULATOR_HOST": self.address,
            "DATASTORE_EMULATOR_HOST_PATH": f"{self.address}/datastore",
            "DATASTORE_HOST": self.url,
            "DATASTORE_PROJECT_ID": self.project,
        }

    def export_lines(self) -> str:
        """:meth:`env` as ``export K=V`` lines for a POSIX shell."""
        return "\n".join(f"export {key}={shlex.quote(value)}" for key, value in self.env().items())

    def start(self, timeout: float = 90.0) -> Self:
        """Start the emulator unless it runs already; return once ``GET /`` answers Ok.

        Raises MissingDependency before launching anything if gcloud, the emulator's
        SDK component or java is missing.
        """
        if self.alive:
            return self
        launcher = component_launcher(self.engine)
        require_java()
        if self._port is None:
            self._port = free_port(self.host)
        elif not port_is_free(self.host, self._port):
            raise BackendError(f"cannot start the {self.engine} emulator: {self.address} is in use")
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"sc-{self.engine}-emulator-"))
        self._timeout = timeout
        self._process = ManagedProcess(
            f"the {self.engine} Datastore emulator on {self.host}:{self._port}",
            [str(launcher), *self._arguments()],
            log_path=self._workdir / "emulator.log",
        )
        self._process.start(lambda: http_ok(f"{self.url}/", timeout=2.0), timeout)
        return self

    def _arguments(self) -> list[str]:
        common = ["start", f"--host={self.host}", f"--port={self._port}"]
        if self.engine == "firestore":
            return [*common, "--database-mode=datastore-mode"]
        project_dir = self.data_dir
        assert project_dir is not None  # set by start() before we get here
        if self.on_disk:
            # No `create` step is needed: start makes the directory and its backing file.
            # The data is written when the JVM shuts down cleanly (SIGTERM), not after a
            # SIGKILL.
            return [*common, "--consistency=1.0", "--store_on_disk=true", str(project_dir)]
        return [*common, "--testing", str(project_dir)]

    def kill(self) -> None:
        """SIGKILL the emulator, as a crash would.

        On-disk data written since the last clean stop is lost: the classic emulator
        saves its file only when it shuts down.
        """
        super().kill()

    def reset(self) -> None:
        """Delete every entity (``POST /reset``)."""
        self._running()
        status, body = http_request(f"{self.url}/reset", method="POST", timeout=30.0)
        if status != 200:
            raise BackendError(f"the {self.engine} emulator answered {status} to /reset: {body!r}")
