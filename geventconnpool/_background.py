"""The bodies of a pool's background greenlets.

They hold the pool by weak reference only, dropping the strong one before
each sleep, so that a pool nobody uses any more can be garbage collected;
they stop when it is.  Each step's work is a method of the pool.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

import gevent

if TYPE_CHECKING:
    from geventconnpool._lease import Entry
    from geventconnpool.pool import ConnectionPool

logger = logging.getLogger("geventconnpool")


def connect_loop(pool_ref: weakref.ref[ConnectionPool[Any]], generation: int) -> None:
    """Open one connection for a slot, retrying with backoff until it is open.

    Only the pool's own stop (close, fork, or the pool collected) ends it
    sooner: any other failure, of the hook or of the pool's own code, is a
    failed attempt.
    """
    attempt = 0
    while True:
        pool = pool_ref()
        if pool is None or pool._generation != generation or pool._closed:
            return
        attempt += 1
        try:
            wait = pool._connect_once(attempt)
        except BaseException:
            if pool._stopping():
                return
            logger.exception("pool %r: unexpected error while connecting", pool.name)
            wait = pool.RECONNECT_MAX_DELAY
        if wait is None:
            return
        reconnected = pool._reconnected
        del pool
        try:
            reconnected.wait(wait)  # another slot connecting again ends the backoff
        except BaseException:
            pool = pool_ref()
            if pool is None or pool._stopping():
                return
            del pool


def maintenance_loop(pool_ref: weakref.ref[ConnectionPool[Any]], generation: int) -> None:
    """Recycle, ping and watch the pool's connections, for as long as the pool is open."""
    while True:
        pool = pool_ref()
        if pool is None or pool._generation != generation or pool._closed:
            return
        try:
            wait = pool._maintain()
        except Exception:
            logger.exception("pool %r: unexpected error in maintenance", pool.name)
            wait = 1.0
        del pool
        gevent.sleep(wait)


def close_recycled(pool_ref: weakref.ref[ConnectionPool[Any]], entry: Entry[Any]) -> None:
    """Close a connection that the maintenance greenlet recycled, so that a slow close never delays it."""
    pool = pool_ref()
    if pool is None or entry not in pool._closing:
        return  # close() took it over
    pool._closing.discard(entry)
    pool._close_quietly(entry.conn, in_background=True)


def keepalive_check(pool_ref: weakref.ref[ConnectionPool[Any]], entry: Entry[Any]) -> None:
    """Ping one idle connection that the maintenance greenlet took out of the pool."""
    pool = pool_ref()
    if pool is None:
        return
    try:
        if pool._check(entry, pool.connect_timeout, in_background=True):
            pool._release(entry)
    finally:
        pool._checking.discard(entry)
