"""The documented core API of issue 2: ConnectionPool's lending, discards, black boxes and keepalive."""

import imaplib
import logging
import socket
import ssl
import time

import gevent
import pytest
from doubles import FLAVOURS, FakeConn, FakePool, RecordingLinePool, holds
from gevent import socket as gsocket
from gevent.event import Event
from gevent.monkey import get_original
from helpers import LinePool, LineServer, pool_greenlets, recv_line, request, wait_until

from geventconnpool import ConnectionPool, PoolTimeout


def test_documented_imports():
    """`from geventconnpool import ConnectionPool, retry` gives the pool class and the decorator."""
    from geventconnpool import ConnectionPool, retry

    assert isinstance(ConnectionPool, type)
    assert callable(retry)


class TaggedKeepalivePool(RecordingLinePool):
    """A pool whose keepalive sends ``KA <local port>``: the server's log says which connection was pinged."""

    def _keepalive(self, c):
        tag = ka_tag(c)
        c.sendall(tag)
        if recv_line(c) + b"\n" != tag:
            raise OSError("keepalive: wrong reply")


def ka_tag(c) -> bytes:
    """The keepalive command line that :class:`TaggedKeepalivePool` sends on ``c``."""
    return b"KA %d\n" % c.getsockname()[1]


def pings(server: LineServer, c) -> int:
    """How many keepalive pings the server received on the connection ``c``."""
    return server.commands.count(ka_tag(c))


class HandshakePool(LinePool):
    """A pool whose connections need a HELLO exchange first, like a login; counts handshakes in flight."""

    def __init__(self, *args, **kwargs):
        self.in_flight = 0
        self.most_in_flight = 0
        super().__init__(*args, **kwargs)

    def _new_connection(self):
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            sock = super()._new_connection()
            sock.sendall(b"HELLO\n")
            if recv_line(sock) != b"HELLO":
                raise OSError("bad greeting")
            return sock
        finally:
            self.in_flight -= 1


def test_construction_does_not_block_and_opens_all_connections_at_once(line_server, leak_check):
    """The constructor returns before any connection opens, and all `size` handshakes run at once."""
    line_server.stalled.clear()  # every handshake now waits for the server's answer
    with HandshakePool(line_server, 50) as pool:
        assert line_server.accepted == 0
        assert pool.stats().connecting == 50
        assert "size=50 idle=0 in_use=0 connecting=50" in repr(pool)
        assert pool.stats().idle == 0
        # All 50 are mid-handshake together: impossible if they were opened one after another.
        wait_until(lambda: len(line_server.commands) == 50, timeout=10)
        assert line_server.accepted == 50
        assert pool.most_in_flight == 50
        assert pool.stats().idle == 0
        line_server.stalled.set()
        # 0.2.1 staggered the opens 0.1 s apart: 5 s for 50.  In parallel they all land together.
        pool.wait(timeout=2.5)
        stats = pool.stats()
        assert (stats.idle, stats.opened, stats.connecting, stats.failed_connects) == (50, 50, 0, 0)
    leak_check()


def test_get_hands_back_the_object_new_connection_returned(line_server, leak_check):
    """`with pool.get() as c` yields the very object that _new_connection returned, and it works."""
    with RecordingLinePool(line_server, 3) as pool:
        pool.wait(timeout=5)
        with pool.get() as c:
            assert holds(pool.created, c)
            c.sendall(b"ECHO identity\n")
            assert recv_line(c) == b"identity"
        assert len(pool.created) == 3
    leak_check()


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_no_two_holders_share_a_connection(flavour, line_server, leak_check):
    """Many greenlets borrowing concurrently never hold the same connection at the same time."""
    holders = {}
    overlaps = []
    used = set()

    def worker(n):
        for i in range(8):
            token = b"w%d-%d" % (n, i)
            with pool.get() as c:
                if id(c) in holders:
                    overlaps.append((holders[id(c)], n))
                holders[id(c)] = n
                used.add(id(c))
                c.sendall(b"ECHO " + token + b"\n")
                gevent.sleep(0)  # let the others run while this one holds c
                reply = recv_line(c)
                del holders[id(c)]
            assert reply == token

    with RecordingLinePool(line_server, 4, **FLAVOURS[flavour]) as pool:
        pool.wait(timeout=5)
        workers = [gevent.spawn(worker, n) for n in range(24)]
        gevent.joinall(workers, timeout=20, raise_error=True)
        assert all(w.successful() for w in workers)
        assert overlaps == []
        assert used <= {id(c) for c in pool.created}
        assert len(used) == 4
        assert line_server.accepted == 4
        assert pool.stats().checkouts == 24 * 8
    leak_check()


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
        error = OSError("the peer spoke nonsense")
        with pytest.raises(OSError) as info, pool.get() as c:
            victim = c
            raise error
        assert info.value is error
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


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_other_exception_returns_the_connection(flavour, line_server, leak_check):
    """Any other Exception in the block propagates unchanged and the same connection is lent again."""
    with RecordingLinePool(line_server, 1, **FLAVOURS[flavour]) as pool:
        pool.wait(timeout=5)
        error = KeyError("not a network problem")
        with pytest.raises(KeyError) as info, pool.get() as c:
            first = c
            raise error
        assert info.value is error
        with pool.get() as c:
            assert c is first
            c.sendall(b"PING\n")
            assert recv_line(c) == b"PONG"
        assert pool.dropped == []
        assert line_server.accepted == 1
        assert line_server.closed == 0
        assert pool.stats().discarded == 0
    leak_check()


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_normal_exit_returns_the_connection(flavour, line_server, leak_check):
    """A block that ends normally gives its connection back, and it is lent again."""
    with RecordingLinePool(line_server, 1, **FLAVOURS[flavour]) as pool:
        pool.wait(timeout=5)
        for _ in range(5):
            assert request(pool, b"PING") == b"PONG"
        with pool.get() as c:
            assert c is pool.created[0]
        assert line_server.accepted == 1
        assert pool.stats().checkouts == 6
    leak_check()


def test_exc_classes_as_a_single_class(line_server, leak_check):
    """exc_classes=ValueError discards on ValueError only: an OSError then leaves the connection pooled."""
    with RecordingLinePool(line_server, 1, exc_classes=ValueError) as pool:
        assert pool.exc_classes == (ValueError,)
        pool.wait(timeout=5)
        with pytest.raises(OSError), pool.get() as c:
            first = c
            raise OSError("not in exc_classes here")
        with pool.get() as c:
            assert c is first
        with pytest.raises(ValueError), pool.get() as c:
            raise ValueError("broken")
        assert pool.dropped == [first]
        pool.wait(timeout=5)
        with pool.get() as c:
            assert c is not first
            assert c is pool.created[1]
        assert line_server.accepted == 2
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
        error = error_class("the server gave up")
        with pytest.raises(error_class) as info, pool.get() as c:
            second = c
            raise error
        assert info.value is error
        assert pool.dropped == [first, second]
        pool.wait(timeout=5)
        third = imap_select(pool, b"OK selected")
        assert third is not first
        assert third is not second
        wait_until(lambda: line_server.closed == 2)
        assert line_server.accepted == 3
    leak_check()


BLACK_BOXES = {
    "object": object,  # no close() at all
    "dict": dict,  # falsy while empty
    "FakeConn": lambda: FakeConn(0),  # a close() the pool must call
}


@pytest.mark.parametrize("kind", list(BLACK_BOXES))
def test_black_box_connections(kind, leak_check):
    """Any non-None object is a connection: lent as is, never re-created while alive, and discarded safely."""
    with FakePool(2, factory=BLACK_BOXES[kind]) as pool:
        pool.wait(timeout=5)
        assert pool.connect_calls == 2
        with pool.get() as c:
            assert holds(pool.conns, c)
        with pytest.raises(OSError), pool.get() as c:
            victim = c
            raise OSError("broken")
        assert pool.close_calls == [victim]
        if isinstance(victim, FakeConn):
            assert victim.closed == 1
        pool.wait(timeout=5)
        stats = pool.stats()
        assert (stats.idle, stats.opened, stats.discarded, stats.failed_connects) == (2, 3, 1, 0)
        with pool.get() as a, pool.get() as b:
            assert a is not victim
            assert b is not victim
            assert a is not b
    leak_check()


class OwnClosePool(FakePool):
    """A pool that closes its connections its own way (e.g. an IMAP logout) instead of calling close()."""

    def _close_connection(self, c):
        self.close_calls.append(c)


def test_close_connection_override_gets_the_discarded_object(leak_check):
    """An overridden _close_connection gets the discarded object, and replaces the default close()."""
    with OwnClosePool(1) as pool:
        pool.wait(timeout=5)
        with pytest.raises(TimeoutError), pool.get() as c:
            victim = c
            raise TimeoutError("a timeout is an OSError")
        assert pool.close_calls == [victim]
        assert victim.closed == 0
        pool.wait(timeout=5)
        with pool.get() as c:
            assert c is pool.conns[1]
    leak_check()


def test_a_hanging_close_connection_is_bounded_by_connect_timeout(caplog, leak_check):
    """A hanging _close_connection is cut off by connect_timeout, logged at DEBUG; the caller goes on."""
    caplog.set_level(logging.DEBUG, logger="geventconnpool")
    with FakePool(1, connect_timeout=0.2) as pool:
        pool.close_gates.append(Event())  # the first close waits for a goodbye that a dead peer never sends
        pool.wait(timeout=5)
        error = OSError("broken")
        with pytest.raises(OSError) as info, pool.get() as c:
            victim = c
            raise error
        assert info.value is error
        assert pool.close_calls == [victim]
        timeouts = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], TimeoutError)]
        assert [r.levelno for r in timeouts] == [logging.DEBUG]
        assert "_close_connection() exceeded connect_timeout=0.2" in str(timeouts[0].exc_info[1])
        pool.wait(timeout=5)
    leak_check()


def test_keepalive_pings_every_idle_connection_and_never_a_held_one(line_server, leak_check):
    """Every idle connection is pinged each period, in turn with the others; a held one is never pinged."""
    with TaggedKeepalivePool(line_server, 4, keepalive=0.1) as pool:
        pool.wait(timeout=5)
        with pool.get() as held:
            before = pings(line_server, held)
            start = len(line_server.commands)
            others = [c for c in pool.created if c is not held]
            assert len(others) == 3
            # Three pings of one connection span at least two periods.
            wait_until(lambda: all(pings(line_server, c) - before >= 3 for c in others), timeout=10)
            gevent.sleep(0.1)  # one more period, still held: a bounded wait for a negative check
            assert pings(line_server, held) == before
            # Between any connection's first and third ping, every other idle one was pinged too.
            log = line_server.commands[start:]
            for c in others:
                mine = [i for i, line in enumerate(log) if line == ka_tag(c)]
                window = set(log[mine[0] : mine[2]])
                for other in others:
                    assert ka_tag(other) in window, (ka_tag(c), ka_tag(other), log)
            # The held connection is still in a clean protocol state: no ping reply is waiting on it.
            held.sendall(b"ECHO mine\n")
            assert recv_line(held) == b"mine"
        count = pings(line_server, held)
        wait_until(lambda: pings(line_server, held) > count, timeout=10)  # idle again, so pinged again
        assert line_server.accepted == 4
        assert pool.stats().keepalive_failures == 0
    leak_check()


def test_keepalive_never_touches_a_connection_in_use(line_server, leak_check):
    """With pings due all the time, callers still read their own replies: held connections are not pinged."""
    replies = []

    def worker(n):
        for i in range(8):
            token = b"w%d-%d" % (n, i)
            with pool.get() as c:
                c.sendall(b"ECHO " + token + b"\n")
                gevent.sleep(0.003)  # hold it across the keepalive period
                replies.append((token, recv_line(c)))
            gevent.sleep(0.012)  # and leave it idle long enough to be pinged

    with TaggedKeepalivePool(line_server, 3, keepalive=0.005) as pool:
        pool.wait(timeout=5)
        workers = [gevent.spawn(worker, n) for n in range(6)]
        gevent.joinall(workers, timeout=20, raise_error=True)
        assert all(w.successful() for w in workers)
        assert len(replies) == 6 * 8
        assert [token for token, reply in replies if token != reply] == []
        wait_until(lambda: all(pings(line_server, c) >= 2 for c in pool.created))
        stats = pool.stats()
        assert (stats.keepalive_failures, stats.discarded, stats.opened) == (0, 0, 3)
    leak_check()


def test_close_closes_connections_taken_for_a_keepalive_check(line_server, leak_check):
    """close() closes every connection once, even those the keepalive took out for a check that has not run
    yet.
    """
    real_sleep = get_original("time", "sleep")
    with TaggedKeepalivePool(line_server, 4, keepalive=0.05) as pool:
        pool.wait(timeout=5)
        # A CPU-bound stretch blocks the loop: the keepalive and this test's timer fall due in the same
        # loop iteration, the keepalive first, so close() runs before the checks it spawned have started.
        gevent.spawn(real_sleep, 0.15)
        gevent.sleep(0.1)
        pool.close()
        # close() has closed them all, each once, by the time it returns.
        assert sorted(map(id, pool.dropped)) == sorted(map(id, pool.created))
        assert pool.stats().in_use == 0
        wait_until(lambda: line_server.closed == 4, timeout=5)
    leak_check()


class OneBadPingPool(TaggedKeepalivePool):
    """A pool whose first keepalive check says its connection is broken."""

    def __init__(self, *args, **kwargs):
        self.victim = None
        super().__init__(*args, **kwargs)

    def _keepalive(self, c):
        if self.victim is None:
            self.victim = c
            raise OSError("keepalive: no PONG")
        super()._keepalive(c)


def test_keepalive_failure_discards_and_replaces(line_server, leak_check):
    """A _keepalive raising OSError closes that connection (the server sees it) and the pool opens another."""
    with OneBadPingPool(line_server, 2, keepalive=0.05) as pool:
        pool.wait(timeout=5)
        wait_until(lambda: pool.victim is not None and pool.stats().opened == 3, timeout=10)
        pool.wait(timeout=5)
        assert pool.dropped == [pool.victim]
        assert pool.victim.fileno() == -1
        wait_until(lambda: line_server.closed == 1)
        assert line_server.accepted == 3
        stats = pool.stats()
        assert (stats.keepalive_failures, stats.discarded) == (1, 1)
        with pool.get() as a, pool.get() as b:
            assert pool.victim is not a
            assert pool.victim is not b
    leak_check()


class StuckPingPool(TaggedKeepalivePool):
    """A pool whose first keepalive check hangs until the test releases it, like a peer gone silent."""

    def __init__(self, *args, **kwargs):
        self.stuck = None
        self.stuck_at = 0.0
        self.release = Event()
        super().__init__(*args, **kwargs)

    def _keepalive(self, c):
        if self.stuck is None:
            self.stuck = c
            self.stuck_at = time.monotonic()
            self.release.wait()
        super()._keepalive(c)


def test_a_hung_keepalive_does_not_delay_the_others(line_server, leak_check):
    """While one connection's keepalive hangs, every other idle connection is still pinged each period."""
    with StuckPingPool(line_server, 3, keepalive=0.05, connect_timeout=30) as pool:
        pool.wait(timeout=5)
        wait_until(lambda: pool.stuck is not None)
        others = [c for c in pool.created if c is not pool.stuck]
        wait_until(lambda: all(pings(line_server, c) >= 3 for c in others), timeout=10)
        assert pings(line_server, pool.stuck) == 0
        with pool.get() as a, pool.get() as b:  # the stuck check holds its connection: nobody else gets it
            assert pool.stuck is not a
            assert pool.stuck is not b
            with pytest.raises(PoolTimeout):
                pool.get(timeout=0.1)
        pool.release.set()
        wait_until(lambda: pings(line_server, pool.stuck) >= 1)
        assert pool.stats().keepalive_failures == 0
    leak_check()


def test_a_keepalive_that_hangs_past_connect_timeout_discards(line_server, leak_check, pool_log):
    """A keepalive check that hangs fails after connect_timeout, with a warning: its connection is closed and
    replaced, and the check's greenlet ends.
    """
    with StuckPingPool(line_server, 2, keepalive=0.05, connect_timeout=0.3, name="hanging-ka") as pool:
        pool.wait(timeout=5)
        wait_until(lambda: pool.stats().keepalive_failures == 1, timeout=10)
        assert time.monotonic() - pool.stuck_at >= 0.3
        assert pool.dropped == [pool.stuck]
        assert pool.stuck.fileno() == -1
        warnings = pool_log.messages(logging.WARNING)
        assert any("keepalive check failed" in m and "connect_timeout" in m for m in warnings), warnings
        pool.wait(timeout=5)
        assert pool.stats().opened == 3
        with pool.get() as a, pool.get() as b:
            assert pool.stuck is not a
            assert pool.stuck is not b
            # Held connections are never checked: no check can start, and the hung one has ended.
            wait_until(lambda: not [g for g in pool_greenlets() if "hanging-ka keepalive" in g.name])
        pool.release.set()
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
        with pytest.raises(type(error)) as info, pool.get() as c:
            victim = c
            raise error
        assert info.value is error
        assert pool.close_calls == [victim]
        assert victim.closed == 1
        pool.wait(timeout=5)
        with pool.get() as c:
            assert c is not victim
    leak_check()


class LateConfiguredPool(ConnectionPool):
    """A pool that sets what _new_connection needs after calling ConnectionPool.__init__, a common style."""

    def __init__(self, server, size):
        super().__init__(size)
        self.server_address = server.address

    def _new_connection(self):
        return gsocket.create_connection(self.server_address, timeout=5)


def test_attributes_set_after_super_init_are_seen_by_new_connection(line_server, leak_check):
    """The constructor only schedules the connects: attributes set after super().__init__() are in place."""
    with LateConfiguredPool(line_server, 3) as pool:
        pool.wait(timeout=5)
        assert request(pool, b"ECHO late") == b"late"
        stats = pool.stats()
        assert (stats.idle, stats.failed_connects) == (3, 0)
        assert line_server.accepted == 3
    leak_check()
