"""core/outcomes.py against docs/protocol.md: the decision tables say the same thing."""

from __future__ import annotations

from pathlib import Path

import pytest

from sharded_counter.core import outcomes
from sharded_counter.core.outcomes import Ending, Fold, Step, when_memcache_fails

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def documented() -> list[tuple[str, str, str]]:
    """(table, ending or step, then) for each row of the doc's decision table."""
    section = DOC.read_text(encoding="utf-8").split("### 4.0", 1)[1].split("\n### ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in ("PLAIN", "KEYED", "BOUNDED", "FOLD", "MEMCACHE_FAILS"):
            rows.append((cells[0], cells[1], cells[2]))
    return rows


def in_code() -> list[tuple[str, str, str]]:
    rows = []
    for table, mapping in (
        ("PLAIN", outcomes.PLAIN),
        ("KEYED", outcomes.KEYED),
        ("BOUNDED", outcomes.BOUNDED),
    ):
        rows += [(table, ending.name, step.name) for ending, step in mapping.items()]
    rows += [("FOLD", ending.name, fold.name) for ending, fold in outcomes.FOLD.items()]
    for step in (Step.STASH, Step.KEEP_UNSURE):
        for maybe, label in ((False, "refused"), (True, "maybe applied")):
            then = when_memcache_fails(step, maybe_applied=maybe)
            rows.append(("MEMCACHE_FAILS", f"{step.name}, {label}", then.name))
    return rows


def test_the_doc_and_the_code_hold_the_same_decisions() -> None:
    assert sorted(documented()) == sorted(in_code())


@pytest.mark.parametrize("table", [outcomes.PLAIN, outcomes.KEYED, outcomes.BOUNDED, outcomes.FOLD])
def test_every_ending_has_a_decision(table: object) -> None:
    assert set(table) == set(Ending)  # type: ignore[call-overload]


def test_the_decisions_keep_the_contract() -> None:
    # I2: nothing that may have landed is ever reported as not recorded...
    for table in (outcomes.PLAIN, outcomes.KEYED):
        assert table[Ending.DOUBTFUL] is not Step.NOT_RECORDED
    for keeping in (Step.STASH, Step.KEEP_UNSURE):
        assert when_memcache_fails(keeping, maybe_applied=True) is not Step.NOT_RECORDED
    # ...a keyed or bounded increment is never kept in memcache (its record goes with
    # it; a stash is spent without a look at the bounds' shares)...
    for never_kept in (outcomes.KEYED, outcomes.BOUNDED):
        assert not {Step.STASH, Step.KEEP_UNSURE} & set(never_kept.values())
    # ...and a fold's amount goes back to pending only when its write certainly failed.
    assert {e for e, f in outcomes.FOLD.items() if f is Fold.PUT_BACK} == {
        Ending.REFUSED,
        Ending.REJECTED,
        Ending.OVERFLOW,
    }


def test_a_fold_deadline_covers_the_write_and_a_margin() -> None:
    assert outcomes.fold_deadline(100.0, retry_deadline=10.0, rpc_timeout=5.0) == (
        115.0 + outcomes.FOLD_MARGIN
    )
