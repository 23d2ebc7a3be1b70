"""Discards: which errors in a block end its connection, and how the pool closes it (_close_connection)."""

from __future__ import annotations

import imaplib
import logging
import ssl

# -- exc_classes -----------------------------------------------------------------------------------
from typing import Any

import gevent
import pytest
from doubles import (
    FLAVOURS,
    LOGGER,
    Conn,
    ControlFlow,
    FakePool,
    FastLinePool,
    LineTrackingPool,
    RecordingLinePool,
    warnings_of,
)
from gevent import socket
from gevent.event import Event
from helpers import LinePool, LineServer, raise_in_block, recv_line, request, wait_until
from reliability_checks import check_closed, check_recovered

from geventconnpool import PoolTimeout, PoolUnavailable, retry


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_exc_classes_error_discards_closes_and_replaces(flavour, line_server, leak_check):
    """An exc_classes error in the block closes the connection at once, starts opening another in the same
    loop turn, and propagates.

    0.2.1: a discarded connection was dropped, never closed: a descriptor leaked per failure while
    referenced; and its replacement was scheduled with gevent.spawn_later(1, ...): a fixed second
    without a connection.
    """
    with RecordingLinePool(line_server, 2, **FLAVOURS[flavour]) as pool:
        pool.wait(timeout=5)
        victim = raise_in_block(pool, OSError("the peer spoke nonsense"))
        assert pool.dropped == [victim]
        assert victim.fileno() == -1
        # One turn of the event loop: the replacement starts in it, not after a delay or the backoff.
        gevent.sleep(0)
        assert pool.calls == 3
        wait_until(lambda: line_server.closed == 1)
        pool.wait(timeout=5)
        line_server.wait_for_accepted(3)
        stats = pool.stats()
        assert (stats.idle, stats.opened, stats.discarded) == (2, 3, 1)
        with pool.get() as a, pool.get() as b:
            assert victim is not a
            assert victim is not b
    leak_check()


def test_exc_classes_as_a_single_class(line_server, leak_check):
    """exc_classes=ValueError discards on ValueError only: an OSError then leaves the connection pooled."""
    with RecordingLinePool(line_server, 1, exc_classes=ValueError) as pool:
        assert pool.exc_classes == (ValueError,)
        pool.wait(timeout=5)
        first = raise_in_block(pool, OSError("not in exc_classes here"))
        with pool.get() as c:
            assert c is first
        raise_in_block(pool, ValueError("broken"))
        assert pool.dropped == [first]
        pool.wait(timeout=5)
        with pool.get() as c:
            assert c is not first
            assert c is pool.created[1]
        line_server.wait_for_accepted(2)
    leak_check()


class ImapishPool(RecordingLinePool):
    """A pool that treats IMAP-style protocol errors as broken connections, as the documentation shows."""

    def __init__(self, server, size):
        super().__init__(server, size, exc_classes=(OSError, imaplib.IMAP4.error))


def imap_select(pool, reply):
    """Send a command answered with ``reply``; raise imaplib's error on a NO/BAD answer, as imaplib does."""
    with pool.get() as c:
        c.sendall(b"ECHO " + reply + b"\n")
        answer = recv_line(c)
        if not answer.startswith(b"OK"):
            raise imaplib.IMAP4.error(answer.decode())
        return c


@pytest.mark.parametrize("error_class", [imaplib.IMAP4.error, imaplib.IMAP4.abort])
def test_custom_exc_classes_with_imap_errors(line_server, leak_check, error_class):
    """exc_classes=(OSError, imaplib.IMAP4.error) discards on an IMAP error (or a subclass), as on OSError."""
    with ImapishPool(line_server, 1) as pool:
        pool.wait(timeout=5)
        first = imap_select(pool, b"OK selected")
        with pytest.raises(imaplib.IMAP4.error, match="NO no such mailbox"):
            imap_select(pool, b"NO no such mailbox")
        pool.wait(timeout=5)
        second = raise_in_block(pool, error_class("the server gave up"))
        assert pool.dropped == [first, second]
        pool.wait(timeout=5)
        third = imap_select(pool, b"OK selected")
        assert third is not first
        assert third is not second
        wait_until(lambda: line_server.closed == 2)
        assert line_server.accepted == 3
    leak_check()


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError(104, "reset"),
        BrokenPipeError(32, "broken pipe"),
        socket.timeout("timed out"),
        ssl.SSLError("bad record mac"),
        ssl.SSLEOFError("EOF occurred in violation of protocol"),
        imaplib.IMAP4.abort("socket error: EOF"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_subclasses_of_exc_classes_discard(error, leak_check):
    """Subclasses of exc_classes discard too: the OSError family (resets, timeouts, SSL errors) by default."""
    exc_classes = (OSError, imaplib.IMAP4.error)
    with FakePool(1, exc_classes=exc_classes) as pool:
        pool.wait(timeout=5)
        victim = raise_in_block(pool, error)
        assert pool.close_calls == [victim]
        assert victim.closed == 1
        pool.wait(timeout=5)
        with pool.get() as c:
            assert c is not victim
    leak_check()


@pytest.mark.parametrize("error", ["PoolTimeout", "PoolUnavailable"])
def test_another_pools_error_inside_a_block_keeps_the_held_connection(line_server, leak_check, error):
    """A PoolTimeout or PoolUnavailable from a second pool, raised through a block, leaves the held connection
    alive.
    """
    down = LineServer()
    down.start()
    down.stop()
    fail_fast = error == "PoolUnavailable"
    cache = FastLinePool(down, 1, fail_fast=fail_fast, timeout=0.05)
    with FastLinePool(line_server, 1) as db, cache:
        db.wait(timeout=5)
        wait_until(lambda: cache.stats().failed_connects >= 1)
        expected = PoolTimeout if error == "PoolTimeout" else PoolUnavailable
        for _ in range(3):
            with pytest.raises(expected), db.get() as c:
                c.sendall(b"PING\n")
                assert recv_line(c) == b"PONG"
                if error == "PoolTimeout":
                    with cache.get(timeout=0):  # raises at once: nothing idle
                        pass
                else:
                    with cache.get():
                        pass
        assert db.stats().discarded == 0
        assert db.dropped == [] and line_server.accepted == 1
    leak_check()


def test_holder_closing_the_connection_gives_the_next_user_a_clear_error(line_server, leak_check):
    """A holder that closes its connection before giving it back makes the next user fail with OSError, at
    once, on that connection only; with @retry the next user succeeds."""
    pool = LineTrackingPool(line_server, 1, name="closed-by-holder")
    pool.wait(timeout=5)
    with pool.get() as c:
        c.close()
    with gevent.Timeout(5, AssertionError("the next user hung")):
        with pytest.raises(OSError):
            request(pool, b"ECHO next")
        pool.wait(timeout=5)
        assert request(pool, b"ECHO fresh") == b"fresh"
        with pool.get() as c:
            c.close()
        assert retry(request, max_failures=1)(pool, b"ECHO retried") == b"retried"
    assert pool.stats().discarded == 2
    check_recovered(pool)
    check_closed(pool)
    leak_check()


# -- a BaseException in the block ------------------------------------------------------------------


def interrupt_by_timeout(pool, server):
    """Send a request and let a gevent.Timeout fire while the reply is still unread."""
    with pytest.raises(gevent.Timeout), gevent.Timeout(0.05), pool.get() as c:
        c.sendall(b"ECHO first\n")
        recv_line(c)
    return c


def interrupt_by_kill(pool, server):
    """Send a request from another greenlet and kill that greenlet while the reply is still unread."""
    held = []

    def holder():
        with pool.get() as c:
            held.append(c)
            c.sendall(b"ECHO first\n")
            recv_line(c)

    g = gevent.spawn(holder)
    wait_until(lambda: len(server.commands) == 1)
    g.kill(block=True, timeout=5)
    assert g.dead
    return held[0]


def interrupt_by_keyboard(pool, server):
    """Send a request and raise KeyboardInterrupt (Ctrl-C) before the reply is read."""
    with pytest.raises(KeyboardInterrupt), pool.get() as c:
        c.sendall(b"ECHO first\n")
        wait_until(lambda: len(server.commands) == 1)
        raise KeyboardInterrupt
    return c


@pytest.mark.parametrize(
    "interrupt",
    [interrupt_by_timeout, interrupt_by_kill, interrupt_by_keyboard],
    ids=["gevent.Timeout", "Greenlet.kill", "KeyboardInterrupt"],
)
@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_defect5_baseexception_in_block_discards_the_connection(flavour, interrupt, line_server, leak_check):
    """A BaseException that is not an Exception, mid-exchange, discards the connection and its unread reply.

    0.2.1: its bare `except:` put the connection back, so the next caller read the previous caller's reply.
    """
    with RecordingLinePool(line_server, 1, **FLAVOURS[flavour]) as pool:
        pool.wait(timeout=5)
        line_server.stalled.clear()  # the server holds its reply to "ECHO first"
        victim = interrupt(pool, line_server)
        line_server.stalled.set()  # the stale reply "first" is sent now
        assert request(pool, b"ECHO second") == b"second"
        assert pool.dropped == [victim]
        assert victim.fileno() == -1
        assert line_server.accepted == 2
        assert pool.stats().discarded == 1
        wait_until(lambda: line_server.closed == 1)
    leak_check()


# -- _close_connection -----------------------------------------------------------------------------


class OwnClosePool(FakePool):
    """A pool that closes its connections its own way (e.g. an IMAP logout) instead of calling close()."""

    def _close_connection(self, c):
        self.close_calls.append(c)


def test_close_connection_override_gets_the_discarded_object(leak_check):
    """An overridden _close_connection gets the discarded object, and replaces the default close()."""
    with OwnClosePool(1) as pool:
        pool.wait(timeout=5)
        victim = raise_in_block(pool, TimeoutError("a timeout is an OSError"))
        assert pool.close_calls == [victim]
        assert victim.closed == 0
        pool.wait(timeout=5)
        with pool.get() as c:
            assert c is pool.conns[1]
    leak_check()


class RaisingClosePool(LineTrackingPool):
    """_close_connection() closes the socket, then raises."""

    def _close_connection(self, c: socket.socket) -> None:
        super()._close_connection(c)
        raise RuntimeError("close failed")


def test_close_connection_raising_is_logged_and_ignored(line_server, leak_check, pool_log):
    """_close_connection() raising is logged at DEBUG and stops neither the block's exception, nor a discard's
    replacement, nor close()."""
    pool = RaisingClosePool(line_server, 2, name="raising-close")
    pool.wait(timeout=5)
    raise_in_block(pool, OSError("broken"))
    pool.wait(timeout=5)
    assert pool.stats().discarded == 1
    check_recovered(pool)
    check_closed(pool)
    failures = [r for r in pool_log.records() if "_close_connection() failed" in r.getMessage()]
    assert len(failures) == 3 and all(r.levelno == logging.DEBUG and r.exc_info for r in failures)
    wait_until(lambda: line_server.closed == line_server.accepted)
    leak_check()


def test_a_hanging_close_connection_is_bounded_by_connect_timeout(caplog, leak_check):
    """A hanging _close_connection is cut off by connect_timeout, logged at DEBUG; the caller goes on."""
    caplog.set_level(logging.DEBUG, logger="geventconnpool")
    with FakePool(1, connect_timeout=0.2) as pool:
        pool.close_gates.append(Event())  # the first close waits for a goodbye that a dead peer never sends
        pool.wait(timeout=5)
        victim = raise_in_block(pool, OSError("broken"))
        assert pool.close_calls == [victim]
        timeouts = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], TimeoutError)]
        assert [r.levelno for r in timeouts] == [logging.DEBUG]
        assert "_close_connection() exceeded connect_timeout=0.2" in str(timeouts[0].exc_info[1])
        pool.wait(timeout=5)
    leak_check()


def test_a_base_exception_from_a_background_close_is_logged_and_ignored(leak_check, capsys, caplog):
    """1.0: a BaseException raised by _close_connection in a background close escaped with a traceback; now
    it is logged at DEBUG and ignored, like any error of that hook.
    """
    caplog.set_level(logging.DEBUG, logger=LOGGER)

    class Pool(FakePool):
        def _close_connection(self, c: Any) -> None:
            super()._close_connection(c)
            raise ControlFlow("cannot say goodbye")

    counter = iter(range(1000))
    with Pool(1, factory=lambda: Conn(next(counter)), max_lifetime=0.05) as pool:
        wait_until(lambda: pool.stats().recycled >= 2 and pool.stats().idle == 1)
    assert "Traceback" not in capsys.readouterr().err
    debug = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.DEBUG]
    assert any("_close_connection() failed" in m for m in debug), debug
    leak_check()


def test_a_connection_broken_in_a_block_logs_one_warning(line_server, leak_check, caplog):
    """A connection whose block raised one of exc_classes logs one WARNING naming the pool and the error."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with LinePool(line_server, 1, name="blk-pool") as pool:
        with pytest.raises(OSError), pool.get():
            raise OSError("the reply was garbage")
        warnings = warnings_of(caplog)
        assert len(warnings) == 1, warnings
        assert "blk-pool" in warnings[0] and "the reply was garbage" in warnings[0]
    line_server.stop()
    leak_check()
