"""The pool's arguments, and the timeouts of get() and wait(): bad values get a clear error at once,
naming the argument, and start nothing.
"""

from __future__ import annotations

import math

import pytest
from doubles import FakeConn
from helpers import pool_greenlets

from geventconnpool import ConnectionPool


class Minimal(ConnectionPool[FakeConn]):
    """The smallest valid pool: fake connections, a keepalive that always passes."""

    def _new_connection(self) -> FakeConn:
        return FakeConn(0)

    def _keepalive(self, c: FakeConn) -> None:
        pass


@pytest.fixture(autouse=True)
def no_dead_greenlets_left_behind():
    """A rejected constructor must not have started any background greenlet (no hang, no dead greenlet)."""
    before = pool_greenlets()
    yield
    assert pool_greenlets() <= before


@pytest.mark.parametrize(
    ("size", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (-100, ValueError),
        (True, TypeError),
        (False, TypeError),
        (1.0, TypeError),
        (2.5, TypeError),
        (math.nan, TypeError),
        ("3", TypeError),
        (None, TypeError),
        ([3], TypeError),
    ],
)
def test_bad_size(size, error):
    """A size that is not an int >= 1 (bools and floats included) raises at construction, naming 'size'."""
    with pytest.raises(error, match="size"):
        Minimal(size)


DURATIONS = ["keepalive", "timeout", "connect_timeout", "max_lifetime", "check_after", "leak_warning"]


@pytest.mark.parametrize("argument", DURATIONS)
@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5, -math.inf])
def test_zero_or_negative_durations_are_value_errors(argument, value, leak_check):
    """Zero or a negative number of seconds is a ValueError naming the argument, raised before any greenlet
    starts.
    """
    with pytest.raises(ValueError, match=argument):
        Minimal(1, **{argument: value})
    leak_check()


@pytest.mark.parametrize("argument", DURATIONS)
@pytest.mark.parametrize("value", ["1", b"1", [1], True, float("nan"), object()], ids=repr)
def test_non_numeric_durations_are_type_errors(argument, value):
    """A duration that is not a number (or is a bool or NaN) is a TypeError naming the argument."""
    with pytest.raises(TypeError, match=argument):
        Minimal(1, **{argument: value})


@pytest.mark.parametrize("argument", DURATIONS)
def test_none_turns_a_duration_off(argument, leak_check):
    """None is accepted for every duration."""
    with Minimal(1, **{argument: None}) as pool, pool.get(timeout=5) as c:
        assert isinstance(c, FakeConn)
    leak_check()


@pytest.mark.parametrize(
    ("argument", "value"), [("fail_fast", 1), ("fail_fast", "yes"), ("fail_fast", None), ("name", 3)]
)
def test_bad_fail_fast_and_name_are_type_errors(argument, value):
    """fail_fast must be a bool and name a str."""
    with pytest.raises(TypeError, match=argument):
        Minimal(1, **{argument: value})


@pytest.mark.parametrize(
    "exc_classes",
    [
        (OSError, "ValueError"),
        (OSError, ValueError()),
        (OSError, int),
        42,
        "OSError",
        None,
        OSError(),
        (OSError, (ValueError, 3)),
    ],
)
def test_pool_exc_classes_not_exception_classes(exc_classes):
    """exc_classes holding anything but exception classes is a TypeError naming 'exc_classes'."""
    with pytest.raises(TypeError, match="exc_classes"):
        Minimal(2, exc_classes=exc_classes)


def test_new_arguments_are_keyword_only():
    """Passing any new argument by position is a TypeError; the first three keep their 0.2.1 positions."""
    with pytest.raises(TypeError):
        Minimal(1, (OSError,), None, 5.0)  # type: ignore[misc]
    with Minimal(1, OSError, 0.5) as pool:
        assert (pool.size, pool.exc_classes, pool.keepalive) == (1, (OSError,), 0.5)


@pytest.mark.parametrize(("value", "error"), [(-1, ValueError), (-0.01, ValueError), ("1", TypeError)])
def test_bad_get_and_wait_timeouts(value, error, leak_check):
    """get(timeout) and wait(timeout) reject negative and non-numeric values."""
    with Minimal(1) as pool:
        with pytest.raises(error, match="timeout"):
            pool.get(timeout=value)
        with pytest.raises(error, match="timeout"):
            pool.wait(timeout=value)
    leak_check()


def test_no_new_connection_override():
    """A pool class that does not override _new_connection is a TypeError at construction."""

    class Nothing(ConnectionPool):
        pass

    with pytest.raises(TypeError, match="_new_connection"):
        Nothing(2)
    with pytest.raises(TypeError, match="_new_connection"):
        ConnectionPool(2)


def test_defect6_keepalive_without_override_fails_at_construction():
    """keepalive= on a pool that does not override _keepalive raises TypeError at once, starting nothing.

    0.2.1: the constructor succeeded and its keepalive greenlet died of NotImplementedError, silently.
    """

    class NoPingPool(ConnectionPool):
        def _new_connection(self):
            return object()

    before = pool_greenlets()
    with pytest.raises(TypeError, match="_keepalive"):
        NoPingPool(2, keepalive=30)
    assert pool_greenlets() <= before


def test_check_after_needs_keepalive_hook():
    """check_after on a pool that does not override _keepalive is a TypeError naming check_after."""

    class NoKeepalive(ConnectionPool[FakeConn]):
        def _new_connection(self) -> FakeConn:
            return FakeConn(0)

    with pytest.raises(TypeError, match="check_after"):
        NoKeepalive(1, check_after=1.0)


@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (-1, ValueError), (True, TypeError), (1.0, TypeError), ("3", TypeError)],
    ids=repr,
)
def test_bad_max_waiting(value, error, leak_check):
    """max_waiting must be an int >= 1 or None: anything else raises at construction, naming it."""
    with pytest.raises(error, match="max_waiting"):
        Minimal(1, max_waiting=value)
    leak_check()


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, ValueError),
        (3, ValueError),
        (-1, ValueError),
        (True, TypeError),
        (1.0, TypeError),
        ("1", TypeError),
    ],
    ids=repr,
)
def test_bad_wait_min_open(value, error, leak_check):
    """wait(min_open=...) takes an int from 1 to size: anything else raises at once, naming min_open."""
    with Minimal(2) as pool, pytest.raises(error, match="min_open"):
        pool.wait(timeout=5, min_open=value)
    leak_check()


@pytest.mark.parametrize(
    ("min_size", "error"),
    [
        (0, ValueError),
        (4, ValueError),
        (-1, ValueError),
        (True, TypeError),
        (2.0, TypeError),
        ("2", TypeError),
    ],
)
def test_bad_min_size(min_size, error, leak_check):
    """min_size must be an int from 1 to size: anything else raises at construction, naming 'min_size'."""
    with pytest.raises(error, match="min_size"):
        Minimal(3, min_size=min_size)
    leak_check()


@pytest.mark.parametrize(
    ("value", "error"), [(0, ValueError), (-1, ValueError), ("1", TypeError), (True, TypeError)]
)
def test_bad_max_idle(value, error, leak_check):
    """max_idle is checked like the other durations, naming 'max_idle'."""
    with pytest.raises(error, match="max_idle"):
        Minimal(3, min_size=1, max_idle=value)
    leak_check()


@pytest.mark.parametrize("min_size", [None, 3])
def test_max_idle_without_a_smaller_min_size_is_a_value_error(min_size, leak_check):
    """max_idle only closes connections above min_size: with none below size it could do nothing, so it
    raises a ValueError naming both arguments."""
    with pytest.raises(ValueError, match=r"max_idle.*min_size"):
        Minimal(3, min_size=min_size, max_idle=10)
    leak_check()
