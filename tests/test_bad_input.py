"""Bad input gets a clear error at once, naming the argument, never a hang or a dead greenlet."""

import math

import pytest
from helpers import pool_greenlets

from geventconnpool import ConnectionPool, retry


class ObjectPool(ConnectionPool):
    """A pool of plain objects: enough to check the constructor's arguments."""

    def _new_connection(self):
        return object()

    def _keepalive(self, c):
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
        ObjectPool(size)


@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5, -math.inf])
def test_keepalive_not_positive(value):
    """keepalive <= 0 is a ValueError naming 'keepalive'."""
    with pytest.raises(ValueError, match="keepalive"):
        ObjectPool(2, keepalive=value)


@pytest.mark.parametrize("value", ["30", b"30", True, math.nan, [30], object()])
def test_keepalive_not_a_number(value):
    """A keepalive that is not a number (bools and NaN included) is rejected, naming 'keepalive'."""
    with pytest.raises((TypeError, ValueError), match="keepalive"):
        ObjectPool(2, keepalive=value)


def test_keepalive_without_override():
    """keepalive set on a class that does not override _keepalive is a TypeError at construction."""

    class NoKeepalive(ConnectionPool):
        def _new_connection(self):
            return object()

    with pytest.raises(TypeError, match="_keepalive"):
        NoKeepalive(2, keepalive=5)


def test_no_new_connection_override():
    """A pool class that does not override _new_connection is a TypeError at construction."""

    class Nothing(ConnectionPool):
        pass

    with pytest.raises(TypeError, match="_new_connection"):
        Nothing(2)
    with pytest.raises(TypeError, match="_new_connection"):
        ConnectionPool(2)


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
        ObjectPool(2, exc_classes=exc_classes)


@pytest.mark.parametrize(
    "exc_classes",
    [(OSError, "ValueError"), (OSError, ValueError()), (OSError, int), 42, "OSError", None, OSError()],
)
def test_retry_exc_classes_not_exception_classes(exc_classes):
    """retry(exc_classes=...) holding anything but exception classes is a TypeError at decoration time."""
    with pytest.raises(TypeError, match="exc_classes"):
        retry(exc_classes=exc_classes)
    with pytest.raises(TypeError, match="exc_classes"):
        retry(lambda: None, exc_classes=exc_classes)


@pytest.mark.parametrize("value", [-1, -100])
def test_retry_negative_max_failures(value):
    """A negative max_failures is a ValueError naming it, raised when the decorator is made."""
    with pytest.raises(ValueError, match="max_failures"):
        retry(max_failures=value)
    with pytest.raises(ValueError, match="max_failures"):
        retry(lambda: None, max_failures=value)


@pytest.mark.parametrize("value", [1.5, "3", True])
def test_retry_max_failures_not_an_int(value):
    """A max_failures that is not an int or None is rejected at decoration time, naming it."""
    with pytest.raises((TypeError, ValueError), match="max_failures"):
        retry(max_failures=value)


@pytest.mark.parametrize("value", [-1, -0.001, -math.inf])
def test_retry_negative_interval(value):
    """A negative interval is a ValueError naming it, raised when the decorator is made."""
    with pytest.raises(ValueError, match="interval"):
        retry(interval=value)
    with pytest.raises(ValueError, match="interval"):
        retry(lambda: None, interval=value)


@pytest.mark.parametrize("value", ["2", None, math.nan, True])
def test_retry_interval_not_a_number(value):
    """An interval that is not a number is rejected at decoration time, naming it."""
    with pytest.raises((TypeError, ValueError), match="interval"):
        retry(interval=value)


def test_retry_errors_come_before_any_call():
    """A bad retry option raises when the decorator is applied, so the function never runs."""
    calls = []

    with pytest.raises(ValueError, match="max_failures"):

        @retry(max_failures=-1)
        def operation():
            calls.append(1)

    assert calls == []


def test_retry_exception_class_where_the_function_belongs():
    """retry(socket.error) or retry((A, B)) is a TypeError telling the user to pass exc_classes=."""
    import socket

    with pytest.raises(TypeError, match="exc_classes="):
        retry(socket.error)
    with pytest.raises(TypeError, match="exc_classes="):
        retry((OSError, ValueError))


def test_good_input_is_accepted():
    """The documented forms are accepted: an int size, a positive keepalive, one class or a tuple."""
    with ObjectPool(1, OSError, 0.5) as pool:
        assert pool.size == 1
    with ObjectPool(3, exc_classes=(OSError, ValueError), keepalive=2) as pool:
        assert pool.size == 3
    assert callable(retry(exc_classes=OSError, max_failures=0, interval=0))
    assert callable(retry(exc_classes=(OSError, ValueError), max_failures=None, interval=0.5))
