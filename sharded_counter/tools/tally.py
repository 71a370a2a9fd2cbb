"""What one writer thread saw while racing, kept apart so the hot loop takes no lock."""

from __future__ import annotations

import collections
import dataclasses


@dataclasses.dataclass
class WriterTally:
    acked: int = 0  # increments acknowledged (increment() returned)
    not_recorded: int = 0  # increments refused with IncrementNotRecorded
    # Earlier acknowledged amounts that an IncrementNotRecorded handed back to its caller.
    returned: int = 0
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
