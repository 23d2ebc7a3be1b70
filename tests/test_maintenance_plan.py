"""What the maintenance greenlet decides at a given time: a pure function, tested with made-up times."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from types import FrameType
from typing import Optional

import pytest

from geventconnpool._maintenance import plan

FRAME: FrameType = sys._getframe()  # any frame stands for "lent from somewhere"


@dataclass(eq=False)
class E:
    """An entry as the plan sees it: its times, and whether it is lent."""

    idle_since: float = 0.0
    expires_at: float = float("inf")
    lent_at: float = 0.0
    lent_from: Optional[FrameType] = None
    name: str = ""

    def __repr__(self) -> str:
        return self.name


def names(entries):
    return [e.name for e in entries]


def options(**chosen):
    return {"keepalive": None, "max_lifetime": None, "check_after": None, "leak_warning": None, **chosen}


def test_keepalive_pings_the_connections_idle_that_long_and_wakes_for_the_next():
    """keepalive=10 at t=100: connections idle since 85 and 90 are pinged; one idle since 95 is due at 105."""
    idle = [E(85, name="a"), E(90, name="b"), E(95, name="c")]
    due = plan(100.0, idle, idle, **options(keepalive=10.0))
    assert names(due.ping) == ["a", "b"]
    assert due.wake_at == 105.0
    assert due.recycle == due.stale == due.leaked == []


def test_an_empty_pool_wakes_one_period_later():
    """With nothing open, the next wake-up is the shortest period away: what opens meanwhile is due no
    sooner."""
    assert plan(100.0, [], [], **options(keepalive=30.0, check_after=5.0)).wake_at == 105.0
    assert plan(100.0, [], [], **options(max_lifetime=100.0)).wake_at == 190.0  # 90% of the lifetime


@pytest.mark.parametrize(
    ("now", "recycled", "wake_at"),
    [
        (99.0, [], 100.0),  # nothing expired yet: wake when the first one does
        (100.0, ["a"], 150.0),  # a expires exactly now; the held one is next
        (200.0, ["a", "c"], 289.1),  # all expired, the held one too: one period (90% of 99 s) on
    ],
)
def test_max_lifetime_recycles_expired_idle_connections_and_wakes_for_the_next(now, recycled, wake_at):
    """An idle connection past its lifetime is recycled; a held one is not (it is recycled when it comes
    back), but its lifetime still sets the wake-up while it is ahead.
    """
    a, c = E(0, expires_at=100.0, name="a"), E(0, expires_at=170.0, name="c")
    held = E(0, expires_at=150.0, lent_from=FRAME, lent_at=0, name="held")
    due = plan(now, [a, c], [a, c, held], **options(max_lifetime=99.0))
    assert names(due.recycle) == recycled
    assert due.wake_at == pytest.approx(wake_at)


def test_check_after_marks_the_long_idle_ones_stale():
    """check_after=5 at t=100: those idle since 90 and 95 are stale (get() checks them); one since 97 is
    due at 102."""
    idle = [E(90, name="a"), E(95, name="b"), E(97, name="c")]
    due = plan(100.0, idle, idle, **options(check_after=5.0))
    assert names(due.stale) == ["a", "b"]
    assert due.wake_at == 102.0


def test_an_expired_connection_is_recycled_not_pinged_nor_marked():
    """A connection both expired and idle past keepalive and check_after is recycled only."""
    old = E(0, expires_at=50.0, name="old")
    due = plan(100.0, [old], [old], **options(keepalive=10.0, max_lifetime=60.0, check_after=5.0))
    assert names(due.recycle) == ["old"] and due.ping == [] and due.stale == []


def test_a_pinged_connection_is_not_also_marked_stale():
    """A connection idle past keepalive is taken out to be pinged; check_after marks only those left idle."""
    idle = [E(80, name="a"), E(97, name="b")]
    due = plan(100.0, idle, idle, **options(keepalive=10.0, check_after=2.0))
    assert names(due.ping) == ["a"] and names(due.stale) == ["b"]


def test_leak_warning_names_loans_held_too_long_and_wakes_for_the_next():
    """leak_warning=60 at t=100: a loan from t=30 is warned about, one from t=70 is due at 130, and an
    entry already warned about (no frame kept) is not warned again."""
    held = [
        E(lent_at=30, lent_from=FRAME, name="leak"),
        E(lent_at=70, lent_from=FRAME, name="young"),
        E(lent_at=10, lent_from=None, name="warned"),
    ]
    due = plan(100.0, [], held, **options(leak_warning=60.0))
    assert names(due.leaked) == ["leak"]
    assert due.wake_at == 130.0
