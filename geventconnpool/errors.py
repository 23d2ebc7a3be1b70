"""The exceptions raised by :mod:`geventconnpool`.

Every one of them derives from :class:`PoolError`, and each leaf also derives
from the builtin exception that callers already catch for the same condition.
"""

from typing import Optional

__all__ = ["PoolClosed", "PoolError", "PoolOverloaded", "PoolTimeout", "PoolUnavailable"]


class PoolError(Exception):
    """Base class of every error raised by a :class:`~geventconnpool.ConnectionPool`."""

    __module__ = "geventconnpool"


class PoolTimeout(PoolError, TimeoutError):
    """No connection became free within the timeout of :meth:`~geventconnpool.ConnectionPool.get`."""

    __module__ = "geventconnpool"

    #: Seconds until the pool's next attempt to open a connection, when the
    #: timeout happened while the remote end was failing; ``None`` when the
    #: pool was only busy.  :func:`~geventconnpool.retry` waits at least that long.
    #:
    #: .. versionadded:: 1.1
    retry_after: Optional[float] = None


class PoolOverloaded(PoolTimeout):
    """``max_waiting`` callers already waited for a connection: :meth:`~geventconnpool.ConnectionPool.get`
    refused to wait, at once.

    A :class:`PoolTimeout`, so that ``except PoolTimeout`` handlers keep working.

    .. versionadded:: 1.1
    """

    __module__ = "geventconnpool"


class PoolClosed(PoolError):
    """The pool was closed: it lends no more connections."""

    __module__ = "geventconnpool"


class PoolUnavailable(PoolError, ConnectionError):
    """The remote end is unreachable and the pool was made with ``fail_fast=True``."""

    __module__ = "geventconnpool"

    #: Seconds until the pool's next attempt to open a connection.
    #: :func:`~geventconnpool.retry` waits at least that long before it calls
    #: again, so that retrying during an outage does not spin.
    #:
    #: .. versionadded:: 1.1
    retry_after: Optional[float] = None
