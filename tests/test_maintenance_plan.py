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
    checked_at: float = float("-inf")
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
    """leak_warning=60 at t=100: a loan first seen at t=30 is warned about, one seen at t=90 is due at 150,
    and an entry already warned about (no frame kept) is not warned again.  get() reads no clock: a loan
    not seen yet (lent_at 0) began at most a look ago, and maintenance looks every quarter of leak_warning,
    so it wakes at 115."""
    held = [
        E(lent_at=30, lent_from=FRAME, name="leak"),
        E(lent_at=90, lent_from=FRAME, name="young"),
        E(lent_at=0, lent_from=FRAME, name="new"),
        E(lent_at=10, lent_from=None, name="warned"),
    ]
    due = plan(100.0, [], held, **options(leak_warning=60.0))
    assert names(due.leaked) == ["leak"]
    assert due.wake_at == 115.0


def test_a_ping_restarts_keepalive_and_check_after_but_is_no_use():
    """A connection last used at 50 and pinged at 95 is due for keepalive at 105 and for check_after at 103:
    both count from the ping (max_idle counts from the use: see the next tests)."""
    pinged = E(50, checked_at=95.0, name="pinged")
    due = plan(100.0, [pinged], [pinged], **options(keepalive=10.0, check_after=8.0))
    assert due.ping == [] and due.stale == []
    assert due.wake_at == 103.0


A = E(50, checked_at=99.0, name="a")  # pinged at 99, unused since 50: the one unused the longest
B = E(60, name="b")
FRESH = E(99, name="fresh")


@pytest.mark.parametrize(
    ("now", "idle", "surplus", "shrunk_at", "shrunk", "wake_at"),
    [
        (100.0, [B, A], 2, float("-inf"), ["a"], 102.5),  # a; then b, no sooner than 10 s / 4 later
        (100.0, [B, A], 1, float("-inf"), ["a"], 110.0),  # one above min_size: nothing more to plan
        (100.0, [B, A], 0, float("-inf"), [], 110.0),  # at min_size: none is closed, however idle
        (100.0, [B, A], 2, 99.0, [], 101.5),  # one closed at 99: the next no sooner than 101.5
        (55.0, [B, A], 2, float("-inf"), [], 60.0),  # a reaches max_idle at 60
        (102.5, [B, FRESH], 2, 100.0, ["b"], 109.0),  # b as the pace allows; fresh reaches max_idle at 109
    ],
)
def test_max_idle_closes_one_unused_connection_at_a_time_above_min_size(
    now, idle, surplus, shrunk_at, shrunk, wake_at
):
    """max_idle=10: of the connections unused for 10 s, pinged or not, the one unused the longest is closed
    while the pool has more than min_size (``surplus``), one per 10 / 4 s at most; the wake-up is when
    the next one is due.
    """
    due = plan(now, idle, idle, **options(), max_idle=10.0, surplus=surplus, shrunk_at=shrunk_at)
    assert names(due.shrink) == shrunk
    assert due.wake_at == pytest.approx(wake_at)


def test_a_connection_closed_for_max_idle_is_not_pinged():
    """A connection due both for max_idle and for keepalive is closed only; the next one is pinged."""
    idle = [E(0, name="old"), E(5, name="next")]
    due = plan(100.0, idle, idle, **options(keepalive=30.0), max_idle=60.0, surplus=1)
    assert names(due.shrink) == ["old"] and names(due.ping) == ["next"]
