"""CPU time spent by the bench itself and by the backends it talks to.

On a 2-core machine the client, the emulator's JVM and memcached share the
same cores, so "where did the time go" is mostly "who used the CPU". Each
backend runs in a process group of its own; the CPU of a group is read from
``/proc``. Elsewhere than Linux the backends' share is simply not reported.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def group_cpu_seconds(pgid: int) -> float | None:
    """User + system CPU seconds of the live processes in process group ``pgid``."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    ticks = 0
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it exited while we looked
        # The command name (field 2) may hold spaces; the fields after it do not.
        fields = stat[stat.rindex(")") + 2 :].split()
        # After the name: state, ppid, pgrp, ..., utime (14th overall), stime (15th).
        if int(fields[2]) == pgid:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / _TICKS


@dataclasses.dataclass(frozen=True)
class CpuMark:
    """CPU clocks at one moment: this process, and each watched process group."""

    wall: float
    client: float
    groups: dict[str, float | None]

    @classmethod
    def now(cls, groups: Mapping[str, int | None]) -> CpuMark:
        return cls(
            wall=time.monotonic(),
            client=time.process_time(),
            groups={
                label: group_cpu_seconds(pgid) if pgid is not None else None
                for label, pgid in groups.items()
            },
        )

    def since(self, start: CpuMark) -> dict[str, float | None]:
        """CPU seconds used between ``start`` and this mark, by who used them."""
        used: dict[str, float | None] = {"client": self.client - start.client}
        for label, value in self.groups.items():
            before = start.groups.get(label)
            used[label] = None if value is None or before is None else value - before
        return used
