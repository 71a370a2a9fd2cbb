"""One measurement: open a contender on a fresh name, race it, count its calls, check it."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from ..warning_tally import tally_warnings
from .contenders import Contender
from .cpu import CpuMark
from .load import drive
from .results import Point
from .rpc_count import CallCounter, counting


def fresh_name(contender: str, engine: str, writers: int) -> str:
    return f"bench-{contender}-{engine}-{writers}-{uuid.uuid4().hex[:8]}"


def measure(
    contender: Contender,
    engine: str,
    threads: int,
    seconds: float,
    watch: Mapping[str, int | None],
) -> Point:
    """Race ``contender`` with ``threads`` writer threads in this process for ``seconds``.

    ``watch`` names the process groups (emulator, memcached) whose CPU is charged to it.
    """
    target = contender.open(fresh_name(contender.key, engine, threads), seconds)
    rpcs, memcache = CallCounter(), CallCounter()
    with (
        tally_warnings() as warnings,
        counting(target.rpc_slots, rpcs),
        counting(target.cache_slots, memcache),
    ):
        before = CpuMark.now(watch)
        load = drive(
            target.increment, threads, seconds, batch=contender.batch, settle=target.settle
        )
        cpu = CpuMark.now(watch).since(before)
    aborts = target.aborts() if target.aborts is not None else None
    return Point(
        engine=engine,
        contender=contender.key,
        label=contender.label,
        write_mode=target.write_mode,
        threads=threads,
        processes=1,
        seconds=seconds,
        load=load,
        check=target.check(load.expected),
        aborts=aborts,
        rpcs=rpcs.snapshot(),
        memcache=memcache.snapshot(),
        cpu=cpu,
        warnings=dict(warnings.counts),
        entities=rpcs.written(),
    )
