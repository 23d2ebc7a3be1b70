"""geventconnpool: a pool of open, initialised TCP connections for gevent programs.

Subclass :class:`ConnectionPool`, override ``_new_connection``, and borrow
connections with ``with pool.get() as c:``; wrap operations in :func:`retry` to
run them again on a fresh connection when the network fails.
"""

from geventconnpool._addresses import Address
from geventconnpool._version import __version__
from geventconnpool.errors import PoolClosed, PoolError, PoolOverloaded, PoolTimeout, PoolUnavailable
from geventconnpool.pool import ConnectionPool, PoolStats
from geventconnpool.retry import retry
from geventconnpool.tcp_keepalive import enable_tcp_keepalive

__all__ = [
    "Address",
    "ConnectionPool",
    "PoolClosed",
    "PoolError",
    "PoolOverloaded",
    "PoolStats",
    "PoolTimeout",
    "PoolUnavailable",
    "__version__",
    "enable_tcp_keepalive",
    "retry",
]
