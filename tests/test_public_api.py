"""What the package exports: the pool, retry, and the errors under one root."""

from __future__ import annotations

import pickle

import pytest
from gevent import socket

import geventconnpool
from geventconnpool import (
    ConnectionPool,
    PoolClosed,
    PoolError,
    PoolOverloaded,
    PoolTimeout,
    PoolUnavailable,
    retry,
)


def test_documented_imports():
    """`from geventconnpool import ConnectionPool, retry` gives the pool class and the decorator, both listed
    in __all__.
    """
    assert isinstance(ConnectionPool, type)
    assert callable(retry)
    assert {"ConnectionPool", "retry"} <= set(geventconnpool.__all__)


def test_exception_hierarchy():
    """The errors live in the package root under PoolError; each leaf is a builtin callers already catch."""
    assert issubclass(PoolError, Exception)
    assert issubclass(PoolTimeout, PoolError) and issubclass(PoolTimeout, TimeoutError)
    assert issubclass(PoolTimeout, OSError)  # code that catches socket.error still sees it
    assert issubclass(PoolTimeout, socket.error)
    assert issubclass(PoolClosed, PoolError) and not issubclass(PoolClosed, OSError)
    assert issubclass(PoolUnavailable, PoolError) and issubclass(PoolUnavailable, ConnectionError)
    assert issubclass(PoolOverloaded, PoolTimeout)  # except PoolTimeout handlers keep working
    for cls in (PoolError, PoolTimeout, PoolOverloaded, PoolClosed, PoolUnavailable):
        assert cls.__module__ == "geventconnpool"
        assert getattr(geventconnpool, cls.__name__) is cls
        assert cls.__doc__ and cls.__doc__.strip()
        assert cls.__name__ in geventconnpool.__all__


@pytest.mark.parametrize("cls", [PoolError, PoolTimeout, PoolOverloaded, PoolClosed, PoolUnavailable])
def test_errors_pickle(cls):
    """Each error survives pickling (multiprocessing, task queues), keeping its type and message."""
    error = cls("pool 'p' did something")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls and str(copy) == str(error)
