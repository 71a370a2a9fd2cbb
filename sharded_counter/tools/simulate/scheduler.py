"""The third shell: steps driven in virtual time, many logical processes interleaved.

A ``Task`` runs one generator of steps (core/effects.py), with the steps it
entered through ``Batched`` stacked on top. The ``Scheduler`` keeps a queue of
events ordered by virtual time (ties by the order they were queued). An event
carries out one effect for one task at its time, sends the answer (or throws
the error) into the task's steps, and queues the next effect the steps ask for.
Which task's effect lands first is decided by the latencies the world draws
from the seed, so one seed is one interleaving, replayed exactly.

* ``Memcache`` and ``Rpc``: the world (``world.py``) answers them at the event's
  time, after a latency it draws; a call that must wait for a lock parks the
  task until the lock is freed or its wait times out.
* ``Sleep``: the task's next event is that much later.
* ``Together``: each step becomes a child task; the parent resumes when all
  are over, with their answers in order or the first error.
* ``Batched``: the merge runs on the task itself: one logical process has one
  writer at a time, so it merges only its own items.

A killed task (its process died) takes no more events; its steps are closed
without carrying out anything they still ask for.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
from collections.abc import Callable, Generator
from typing import Any

from ...core.effects import Batched, Memcache, Rpc, Sleep, Together

#: What an event does before it resumes its task: returns the answer to send (or raises
#: the error to throw); ``PARKED`` leaves the task waiting for a later event.
Action = Callable[[], Any]
PARKED = object()


class Task:
    """One running generator of steps (and the merges it entered), in one process."""

    def __init__(
        self, owner: Any, steps: Generator[Any, Any, Any], on_done: Callable[[Task], None]
    ) -> None:
        self.owner = owner  # the logical process; its globals are swapped in to run it
        self.stack = [steps]
        self.on_done = on_done
        self.alive = True
        self.wake = 0  # the number of the one event that may resume it
        self.value: Any = None
        self.error: BaseException | None = None
        self.children: list[Task] = []
        self.result: Any = None
        self.failure: BaseException | None = None

    def kill(self) -> None:
        """Stop at once: no further event resumes it; its steps are closed unrun."""
        self.alive = False
        for child in self.children:
            child.kill()
        for steps in reversed(self.stack):
            # A ``finally`` that asks for an effect raises here: a dead process does nothing.
            with contextlib.suppress(RuntimeError):
                steps.close()
        self.stack = []


class Scheduler:
    """The event queue in virtual time (see the module docstring)."""

    def __init__(self, world: Any) -> None:
        self.world = world
        self.clock = world.clock
        self._queue: list[tuple[float, int, Task, int, Action | None]] = []
        self._seq = itertools.count()
        self.events = 0

    # -- queueing ------------------------------------------------------------------------------

    def at(self, when: float, task: Task, action: Action | None = None) -> None:
        """Resume ``task`` at ``when`` (after ``action``), and at no earlier event."""
        task.wake += 1
        heapq.heappush(self._queue, (when, next(self._seq), task, task.wake, action))

    def start(
        self,
        owner: Any,
        steps: Generator[Any, Any, Any],
        on_done: Callable[[Task], None],
        delay: float = 0.0,
    ) -> Task:
        task = Task(owner, steps, on_done)
        self.at(self.clock.now + delay, task)
        return task

    def later(self, when: float, do: Callable[[], None]) -> None:
        """Call ``do`` at ``when``, as an event of its own (a late commit, a kill)."""
        carrier = Task(None, _nothing(), lambda _task: None)

        def action() -> Any:
            carrier.alive = False
            do()
            return PARKED

        self.at(when, carrier, action)

    # -- running -------------------------------------------------------------------------------

    def run(self, until: Callable[[], bool], max_events: int) -> None:
        """Carry out events until ``until()`` says stop, or the queue runs dry."""
        while self._queue and not until():
            when, _, task, wake, action = heapq.heappop(self._queue)
            if not task.alive or wake != task.wake:
                continue
            self.events += 1
            if self.events > max_events:
                raise RuntimeError(f"the history ran past {max_events} events")
            self.clock.now = max(self.clock.now, when)
            self.world.enter(task.owner)
            if action is not None:
                try:
                    answer = action()
                except Exception as exc:  # the effect's failure goes to the steps
                    task.error = exc
                else:
                    if answer is PARKED:
                        continue
                    task.value = answer
            self._advance(task)
            self.world.after_event()

    def _advance(self, task: Task) -> None:
        """Feed the task its answer until its steps ask for the next effect, or end."""
        while task.stack:
            steps = task.stack[-1]
            try:
                if task.error is not None:
                    error, task.error = task.error, None
                    effect = steps.throw(error)
                else:
                    value, task.value = task.value, None
                    effect = steps.send(value)
            except StopIteration as stop:
                task.stack.pop()
                task.value = stop.value
                if not task.stack:
                    task.result = stop.value
            except Exception as exc:
                task.stack.pop()
                task.error = exc
                if not task.stack:
                    task.error = None
                    task.failure = exc
            else:
                self._effect(task, effect)
                return
        task.alive = False
        task.on_done(task)

    def _effect(self, task: Task, effect: Any) -> None:
        now = self.clock.now
        if isinstance(effect, (Memcache, Rpc)):
            self.world.call(self, task, effect)
        elif isinstance(effect, Sleep):
            self.at(now + max(0.0, effect.seconds), task)
        elif isinstance(effect, Batched):
            task.stack.append(effect.merge(list(effect.items)))
            self.at(now, task)
        elif isinstance(effect, Together):
            self._together(task, list(effect.steps))
        else:
            task.error = TypeError(f"not an effect: {effect!r}")
            self.at(now, task)

    def _together(self, parent: Task, steps: list[Generator[Any, Any, Any]]) -> None:
        left = len(steps)
        if not left:
            parent.value = []
            self.at(self.clock.now, parent)
            return

        def child_done(_child: Task) -> None:
            nonlocal left
            left -= 1
            if left or not parent.alive:
                return
            failed = [c.failure for c in parent.children if c.failure is not None]
            if failed:
                parent.error = failed[0]
            else:
                parent.value = [c.result for c in parent.children]
            parent.children = []
            self.at(self.clock.now, parent)

        parent.children = [self.start(parent.owner, s, child_done) for s in steps]


def _nothing() -> Generator[Any, Any, None]:
    return
    yield  # pragma: no cover - a generator with nothing to do
