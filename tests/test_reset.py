"""_reset: the subclass hook that undoes a borrower's session state before the next borrower has it."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import gevent
import pytest
from doubles import FLAVOURS
from gevent import socket
from gevent.event import Event
from helpers import LinePool, LineServer, local_port, recv_line, serving, wait_until

from geventconnpool._lease import Entry, ResettingEntry


class MailboxServer(LineServer):
    """An IMAP-like LineServer that remembers, per connection, the selected mailbox.

    ``SELECT <name>`` and ``UNSELECT`` answer ``OK``; ``SELECTED`` answers the selected mailbox, or
    ``NONE``; the LineServer's commands (``WHO``...) work too.  ``commands`` holds every line received.
    """

    def __init__(self) -> None:
        super().__init__()
        self.selected: Dict[Tuple[str, int], bytes] = {}  # by client address

    def answer(self, command: bytes, address: Tuple[str, int]) -> Optional[bytes]:
        if command.startswith(b"SELECT "):
            self.selected[address] = command[7:]
        elif command == b"UNSELECT":
            self.selected.pop(address, None)
        elif command == b"SELECTED":
            return self.selected.get(address, b"NONE")
        else:
            return super().answer(command, address)
        return b"OK"


def say(c: socket.socket, command: bytes) -> bytes:
    """Send one command and return the reply line."""
    c.sendall(command + b"\n")
    return recv_line(c)


class MailboxPool(LinePool):
    """A pool of connections to a MailboxServer that unselects the mailbox when a connection comes back.

    ``gate``, when cleared, holds ``_reset`` until the test sets it; ``fail_with`` makes it raise.
    """

    def __init__(self, server: LineServer, size: int, **kwargs: Any) -> None:
        self.gate = Event()
        self.gate.set()
        self.fail_with: Optional[BaseException] = None
        self.resets: List[int] = []  # the local port of each connection reset
        super().__init__(server, size, **kwargs)

    def _reset(self, c: socket.socket) -> None:
        self.resets.append(local_port(c))
        self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        if say(c, b"UNSELECT") != b"OK":
            raise OSError("UNSELECT failed")


@pytest.fixture
def mailbox_server():
    """A MailboxServer on a free loopback port."""
    yield from serving(MailboxServer())


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_the_next_borrower_finds_no_mailbox_selected(mailbox_server, leak_check, flavour):
    """After a block that SELECTs a mailbox, the next borrower of that same connection finds none selected,
    whatever the pool's options."""
    with MailboxPool(mailbox_server, 1, **FLAVOURS[flavour]) as pool:
        with pool.get() as c:
            port = local_port(c)
            assert say(c, b"SELECT INBOX") == b"OK"
            assert say(c, b"SELECTED") == b"INBOX"
        with pool.get() as c:
            assert local_port(c) == port
            assert say(c, b"SELECTED") == b"NONE"
        assert pool.resets == [port, port]
        assert pool.stats().discarded == 0
    leak_check()


def test_the_reset_runs_in_the_returning_greenlet_before_anyone_else_has_it(mailbox_server, leak_check):
    """A caller whose block ends waits for its connection's reset; meanwhile the connection counts as in use
    and a waiting caller is not served."""
    order: List[str] = []

    def borrow_next() -> None:
        with pool.get() as c:
            order.append("next borrower")
            assert say(c, b"SELECTED") == b"NONE"

    def give_back() -> None:
        with pool.get() as c:
            say(c, b"SELECT INBOX")
            order.append("block ends")
        order.append("reset done")

    with MailboxPool(mailbox_server, 1) as pool:
        pool.wait(timeout=5)
        pool.gate.clear()
        returner = gevent.spawn(give_back)
        wait_until(lambda: order == ["block ends"])
        waiter = gevent.spawn(borrow_next)
        wait_until(lambda: pool.stats().waiting == 1)
        s = pool.stats()
        assert (s.in_use, s.idle, s.waiting) == (1, 0, 1)  # being reset: in use, lent to nobody
        gevent.idle()
        assert order == ["block ends"]
        pool.gate.set()
        gevent.joinall([returner, waiter], timeout=5, raise_error=True)
        assert order == ["block ends", "reset done", "next borrower"]
        assert mailbox_server.commands == [b"SELECT INBOX\n", b"UNSELECT\n", b"SELECTED\n", b"UNSELECT\n"]
    leak_check()


@pytest.mark.parametrize(
    ("error", "found"),
    [(OSError("UNSELECT refused"), "OSError('UNSELECT refused')"), (KeyError("bug"), "KeyError('bug')")],
    ids=["in exc_classes", "unexpected"],
)
def test_a_reset_that_raises_discards_its_connection(mailbox_server, pool_log, leak_check, error, found):
    """An error from _reset discards that connection with one WARNING naming the pool, _reset and the
    error; a replacement opens, and the next borrower gets it."""
    with MailboxPool(mailbox_server, 1, name="mail") as pool:
        with pool.get() as c:
            port = local_port(c)
            pool.fail_with = error
        pool.fail_with = None
        warnings = pool_log.messages(logging.WARNING)
        assert len(warnings) == 1
        assert warnings[0].startswith(f"pool 'mail': discarding a connection: _reset() raised {found}")
        pool.wait(timeout=5)
        with pool.get() as c:
            assert local_port(c) != port
            assert say(c, b"SELECTED") == b"NONE"
        s = pool.stats()
        assert (s.discarded, s.opened) == (1, 2)
    leak_check()


def test_a_callers_timeout_during_the_reset_discards_the_connection(mailbox_server, leak_check):
    """The caller's own gevent.Timeout cutting _reset short leaves the connection's state unknown: it is
    discarded, and the timeout propagates out of the with statement."""
    with MailboxPool(mailbox_server, 1) as pool:
        pool.gate.clear()
        with pytest.raises(gevent.Timeout), gevent.Timeout(0.05), pool.get():
            pass
        pool.gate.set()
        pool.wait(timeout=5)
        assert pool.stats().discarded == 1
    leak_check()


def test_the_reset_follows_a_block_that_keeps_its_connection_not_one_that_breaks(mailbox_server, leak_check):
    """An exception that does not break the connection (not in exc_classes) keeps it, reset; one in
    exc_classes discards it, unreset."""
    with MailboxPool(mailbox_server, 1) as pool:
        with pytest.raises(KeyError), pool.get() as c:
            say(c, b"SELECT INBOX")
            raise KeyError("the application's own error")
        assert len(pool.resets) == 1
        with pytest.raises(OSError), pool.get() as c:
            raise OSError("broken")
        assert len(pool.resets) == 1
        assert pool.stats().discarded == 1
    leak_check()


def test_a_pool_that_does_not_override_reset_lends_the_plain_entry(line_server, mailbox_server, leak_check):
    """_reset costs nothing when it is not overridden: such a pool's checkout and exit are the plain ones."""
    with LinePool(line_server, 1) as plain, MailboxPool(mailbox_server, 1) as resetting:
        lease = plain.get()
        assert type(lease) is Entry
        with lease:
            pass
        lease = resetting.get()
        assert type(lease) is ResettingEntry
        with lease:
            pass
    leak_check()


def test_an_explicit_lease_is_reset_when_released(mailbox_server, leak_check):
    """acquire()/release() follow the rules of a with block: the released connection is reset first."""
    pool = MailboxPool(mailbox_server, 1)
    pool.wait(timeout=5)
    c = pool.acquire(timeout=5)
    assert say(c, b"SELECT inbox") == b"OK"
    pool.release(c)
    assert pool.resets == [local_port(c)]
    with pool.get() as again:
        assert again is c
        assert say(again, b"SELECTED") == b"NONE"
    pool.close()
    leak_check()


def test_a_connection_the_holder_discarded_is_closed_without_a_reset(mailbox_server, leak_check):
    """discard(c) in a block: the connection is closed and replaced when the block ends, never reset."""
    pool = MailboxPool(mailbox_server, 1)
    pool.wait(timeout=5)
    with pool.get() as c:
        assert say(c, b"SELECT inbox") == b"OK"
        pool.discard(c)
    assert pool.resets == []
    wait_until(lambda: mailbox_server.closed == 1 and pool.stats().idle == 1)
    with pool.get() as fresh:
        assert fresh is not c
        assert say(fresh, b"SELECTED") == b"NONE"
    pool.close()
    leak_check()
