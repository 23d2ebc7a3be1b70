"""The pool's options as attributes: each either takes effect when changed or is read-only."""

from __future__ import annotations

import time

import pytest
from helpers import LinePool

from geventconnpool import PoolTimeout

READ_ONLY = {
    "size": 3,
    "name": "opts",
    "exc_classes": (OSError,),
    "keepalive": 60.0,
    "max_lifetime": 600.0,
    "check_after": 30.0,
    "leak_warning": 120.0,
    "max_waiting": 5,
    "min_size": 3,  # a fixed pool's is its size (tests/test_elastic.py pins an elastic pool's)
    "max_idle": None,
}


@pytest.fixture
def pool(line_server, leak_check):
    with LinePool(
        line_server,
        3,
        keepalive=60,
        max_lifetime=600,
        check_after=30,
        leak_warning=120,
        name="opts",
        max_waiting=5,
    ) as pool:
        yield pool
    line_server.stop()
    leak_check()


@pytest.mark.parametrize("attribute", sorted(READ_ONLY))
def test_read_only_options_refuse_a_new_value(pool, attribute):
    """An option that cannot change on a running pool reads as given and refuses assignment with an
    AttributeError (1.0 silently ignored ``pool.check_after = 1``).
    """
    assert getattr(pool, attribute) == READ_ONLY[attribute]
    with pytest.raises(AttributeError):
        setattr(pool, attribute, getattr(pool, attribute))
    assert getattr(pool, attribute) == READ_ONLY[attribute]


def test_a_new_timeout_applies_to_the_next_get(pool):
    """``pool.timeout = x`` makes the next get() of a busy pool wait x seconds, not the old 30."""
    pool.wait(timeout=5)
    pool.timeout = 0.05
    with pool.get(), pool.get(), pool.get():
        started = time.monotonic()
        with pytest.raises(PoolTimeout, match=r"within 0\.05 s"):
            pool.get()
        assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("attribute", "value", "error"),
    [
        ("timeout", -1, ValueError),
        ("timeout", "30", TypeError),
        ("connect_timeout", 0, ValueError),
        ("connect_timeout", True, TypeError),
        ("fail_fast", 1, TypeError),
    ],
)
def test_live_options_check_a_new_value_like_the_constructor(pool, attribute, value, error):
    """A bad value for a live option raises at once, naming it, and leaves the old value in place."""
    before = getattr(pool, attribute)
    with pytest.raises(error, match=attribute):
        setattr(pool, attribute, value)
    assert getattr(pool, attribute) == before


def test_live_options_take_a_new_value(pool):
    """timeout, connect_timeout and fail_fast accept a new value (None turning a duration off)."""
    pool.timeout = None
    pool.connect_timeout = 2
    pool.fail_fast = True
    assert (pool.timeout, pool.connect_timeout, pool.fail_fast) == (None, 2.0, True)
