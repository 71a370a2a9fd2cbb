"""Run one backend server in a process group of its own, and take it down completely.

The emulator launchers are shell scripts that run ``java`` as a child (not with
``exec``), so the server is a tree of processes. Each server therefore gets its own
process group (``start_new_session=True``) and every signal goes to the whole group.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .errors import BackendError, BackendTimeout

_POLL_INTERVAL = 0.05
_LOG_TAIL_BYTES = 8192
_LOG_TAIL_LINES = 30
# A leader that is gone but whose group is not: time for leftovers to finish on SIGTERM.
_LEFTOVER_GRACE = 5.0
# How long pause() waits for every thread of the group to have stopped.
_STOP_TIMEOUT = 10.0
# Thread states (field 3 of /proc/<pid>/task/<tid>/stat) that run no code: stopped,
# stopped by a tracer, zombie, dead.
_NOT_RUNNING = frozenset("TtZX")


# Servers still running when the interpreter exits (a forgotten stop(), an aborted test
# run) are stopped then: they live in process groups of their own, so nothing else
# would ever stop them. Registered on first start, so importing has no side effects.
# Strong references: a server whose object was dropped still has to be stopped.
_running: set[ManagedProcess] = set()
_atexit_lock = threading.Lock()
_atexit_registered = False


def _stop_leftovers() -> None:
    with _atexit_lock:
        leftovers = list(_running)
    for process in leftovers:
        process.stop(grace=5.0)


def _track(process: ManagedProcess) -> None:
    global _atexit_registered
    with _atexit_lock:
        if not _atexit_registered:
            atexit.register(_stop_leftovers)
            _atexit_registered = True
        _running.add(process)


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file, or a note that there is none."""
    try:
        with path.open("rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - _LOG_TAIL_BYTES))
            data = log.read()
    except OSError:
        return "(no log output)"
    tail = data.decode("utf-8", errors="replace").splitlines()[-lines:]
    return "\n".join(tail) if tail else "(no log output)"


def group_alive(pgid: int) -> bool:
    """Whether any process (zombies included) is still in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Someone else's group: it exists, but it is not ours to wait for.
        return True
    return True


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids in process group ``pgid``; empty where /proc cannot tell."""
    members: list[int] = []
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return members
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        # Field 2 (the command name) may hold spaces and parentheses: split after its ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _running_threads(pgid: int) -> list[int]:
    """Threads of process group ``pgid`` that are not stopped; empty where /proc cannot tell."""
    running: list[int] = []
    for pid in _group_members(pgid):
        try:
            tids = [entry.name for entry in Path(f"/proc/{pid}/task").iterdir()]
        except OSError:
            continue  # exited while we looked
        for tid in tids:
            try:
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            except OSError:
                continue
            if stat[stat.rfind(")") + 2 :][:1] not in _NOT_RUNNING:
                running.append(int(tid))
    return running


def _wait_group_stopped(pgid: int, timeout: float) -> list[int]:
    """Wait until no thread of group ``pgid`` runs; return those still running at ``timeout``."""
    deadline = time.monotonic() + timeout
    wait = 0.0005
    while running := _running_threads(pgid):
        if time.monotonic() >= deadline:
            return running
        time.sleep(wait)
        wait = min(wait * 2, _POLL_INTERVAL)
    return []


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while group_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL)
    return True


class ManagedProcess:
    """A server process (and its children) started in a new process group.

    Output goes to ``log_path`` (appended, so a restart keeps the earlier run's lines)
    rather than to a pipe that nobody reads and that would eventually block the server.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The pid of the group leader (also the process group id), while started."""
        return self._proc.pid if self._proc is not None else None

    @property
    def pgid(self) -> int | None:
        """The process group id; equal to the leader's pid, since it leads a new session."""
        return self.pid

    @property
    def alive(self) -> bool:
        """Whether the leader process is running (a paused one counts as running)."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, ready: Callable[[], bool], timeout: float) -> None:
        """Launch the command and return once ``ready()`` is true.

        Raises BackendError (with the log tail) if the process exits first, and
        BackendTimeout if it is not ready within ``timeout`` seconds; either way
        nothing of it is left running.
        """
        if self.alive:
            raise BackendError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # The child gets its own copy of the descriptor, so ours can close right away.
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self._env,
                cwd=self._cwd,
            )
        _track(self)
        started = time.monotonic()
        deadline = started + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                self.stop()
                raise BackendError(
                    f"{self.name} exited with status {code} before it was ready "
                    f"(log {self.log_path}):\n{log_tail(self.log_path)}"
                )
            if ready():
                return
            if time.monotonic() >= deadline:
                self.stop()
                raise BackendTimeout(
                    f"{self.name} was not ready after {timeout:.0f}s "
                    f"(log {self.log_path}):\n{log_tail(self.log_path)}"
                )
            time.sleep(_POLL_INTERVAL)

    def stop(self, grace: float = 10.0) -> bool:
        """Stop the whole group: SIGTERM, then SIGKILL after ``grace`` seconds.

        Returns whether it stopped by itself (False: it had to be killed).
        """
        return self._shutdown(signal.SIGTERM, grace)

    def kill(self) -> None:
        """Stop the whole group with SIGKILL at once, as a crash would."""
        self._shutdown(signal.SIGKILL, 0.0)

    def pause(self, timeout: float = _STOP_TIMEOUT) -> None:
        """Freeze every process of the group (SIGSTOP): it keeps its sockets but answers nothing.

        Returns once every thread of the group has stopped. ``kill`` returning does
        not mean that: the kernel wakes one thread of each process to act on SIGSTOP,
        and the others go on running until that thread gets a CPU and stops them
        all. A multi-threaded server (memcached's workers, a JVM) keeps answering
        meanwhile, for as long as the woken thread waits for a CPU on a busy machine,
        so a test that expects silence right after ``pause()`` would get replies.
        Raises BackendTimeout if some thread has not stopped after ``timeout`` seconds.
        """
        self._send_to_group(signal.SIGSTOP)
        assert self._proc is not None  # _send_to_group checked
        running = _wait_group_stopped(self._proc.pid, timeout)
        if running:
            raise BackendTimeout(
                f"{self.name} was sent SIGSTOP but threads {running} still run after {timeout:.0f}s"
            )

    def resume(self) -> None:
        """Undo :meth:`pause` (SIGCONT).

        Unlike SIGSTOP, SIGCONT takes effect within ``kill`` itself: the kernel wakes
        every stopped thread of the group before the call returns.
        """
        self._send_to_group(signal.SIGCONT)

    def _send_to_group(self, sig: signal.Signals) -> None:
        if self._proc is None or not self.alive:
            raise BackendError(f"{self.name} is not running")
        _signal_group(self._proc.pid, sig)

    def _shutdown(self, sig: signal.Signals, grace: float) -> bool:
        proc = self._proc
        if proc is None:
            return True
        pgid = proc.pid
        clean = True
        try:
            if proc.poll() is None:
                # Signal the leader's children before the leader: a launcher script killed
                # first would orphan the JVM to init, which here reaps orphans only lazily,
                # so the group (and, for on-disk data, the JVM's final write) would outlive
                # stop(). The script exits by itself once its java child has.
                children = [pid for pid in _group_members(pgid) if pid != pgid]
                for pid in children or [pgid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                # A paused (SIGSTOPped) process acts on SIGTERM only once continued.
                _signal_group(pgid, signal.SIGCONT)
                try:
                    proc.wait(timeout=grace if sig != signal.SIGKILL else _LEFTOVER_GRACE)
                except subprocess.TimeoutExpired:
                    _signal_group(pgid, signal.SIGKILL)
                    clean = False
            proc.wait()
            # Anything left over (the leader died first, or ignored SIGTERM) goes too.
            if not _wait_group_gone(pgid, 0.5):
                _signal_group(pgid, sig)
                _signal_group(pgid, signal.SIGCONT)
                if not _wait_group_gone(pgid, _LEFTOVER_GRACE):
                    _signal_group(pgid, signal.SIGKILL)
                    clean = False
                    # Bounded: a zombie orphaned to a lazy init is not ours to reap.
                    _wait_group_gone(pgid, _LEFTOVER_GRACE)
        finally:
            self._proc = None
            with _atexit_lock:
                _running.discard(self)
        return clean or sig == signal.SIGKILL
