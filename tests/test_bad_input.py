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
