"""watch_idle: the event loop watches idle connections, and the pool never lends one the remote end closed.

Real servers on loopback: a line server that ends or garbles its connections
on command, a TLS 1.3 server that sends session tickets, and (in the tox env
soak, marker ``servers``) nginx reloading and haproxy cutting idle
connections in front of redis-server.  The tests marked ``event_loop`` also
run on gevent's libuv loop.
"""

from __future__ import annotations

import gc
import http.client
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, List, Optional, Set

import gevent
import gevent.socket
import pytest
from doubles import FastRedisPool
from gevent import socket
from helpers import LinePool, LineServer, recv_line, request, starting_a_program, wait_until
from misbehaving_server import MisbehavingServer
from nginx_server import HttpsPool, get
from redis_server import RedisPool, echo, needs_redis
from tls_server import TLSLinePool

from geventconnpool import ConnectionPool

pytestmark = pytest.mark.event_loop

LOGGER = "geventconnpool"
REQUESTS = 20


def ports_of(pool: ConnectionPool[Any], count: int) -> Set[int]:
    """The client ports of the pool's ``count`` connections, borrowing them all at once."""
    leases = [pool.get(timeout=5) for _ in range(count)]
    ports = set()
    for lease in leases:
        with lease as c:
            ports.add(c.getsockname()[1])
    return ports


def fds_of(pool: ConnectionPool[Any], count: int) -> Set[int]:
    """The descriptors of the pool's ``count`` connections, borrowing them all at once."""
    leases = [pool.get(timeout=5) for _ in range(count)]
    fds = set()
    for lease in leases:
        with lease as c:
            fds.add(c.fileno())
    return fds


def active_watched_fds() -> Set[int]:
    """The descriptors that some active io watcher of the hub's loop is watching now."""
    probe, other = socket.socketpair()
    with probe, other:
        io_class = type(gevent.get_hub().loop.io(probe.fileno(), 1))
    return {w.fd for w in gc.get_objects() if type(w) is io_class and w.active}


def after_a_poll() -> None:
    """Return once the event loop has polled for I/O and handled every event that poll found.

    An event of our own (a socketpair made readable) wakes us from that poll;
    yielding once more lets the hub finish the events it found with ours.
    ``gevent.idle()`` would not do: libuv runs idle callbacks before it polls.
    """
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.send(b"!")
        gevent.socket.wait_read(ours.fileno(), timeout=5)
        gevent.sleep(0)


def serving(server: MisbehavingServer, count: int) -> None:
    """Wait until the server's handlers hold ``count`` connections: a loop turn after the pool has them."""
    wait_until(lambda: len(server.open_connections()) == count, message=lambda: f"{server.connections}")


def warnings_of(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


class FastLinePool(LinePool):
    """A line pool that retries failed connects within milliseconds."""

    RECONNECT_DELAY = 0.01
    RECONNECT_MAX_DELAY = 0.05


# -- what the remote end does to an idle connection ---------------------------------------------------


@pytest.mark.parametrize("how", ["fin", "reset"])
@pytest.mark.parametrize("kind", ["plain", "tls"])
def test_a_connection_the_remote_end_closed_is_never_lent(request, leak_check, kind, how):
    """Once the FIN (or RST) of an idle connection has reached this host and the hub has run, no get()
    returns that connection: it was dropped, counted, and replaced; over TLS too (a FIN with no
    close_notify).
    """
    server = request.getfixturevalue("misbehaving_server" if kind == "plain" else "tls_server")
    pool_class = FastLinePool if kind == "plain" else TLSLinePool
    with pool_class(server, 3) as pool:
        pool.wait(timeout=5)
        old = ports_of(pool, 3)
        serving(server, 3)
        for conn in server.open_connections():
            getattr(conn, how)()
        after_a_poll()  # the FINs (or RSTs) are here, and the hub has run
        for _ in range(10):
            with pool.get(timeout=5) as c:
                assert c.getsockname()[1] not in old
                c.sendall(b"PING\n")
                assert recv_line(c) == b"PONG"
        assert pool.stats().closed_while_idle == 3
        assert pool.stats().discarded == 0
    server.stop()
    leak_check()


def test_unsolicited_bytes_on_an_idle_connection_drop_it(misbehaving_server, leak_check):
    """Bytes nobody asked for on an idle connection (a reply nobody will read) mean the protocol is out of
    step: the connection is dropped and replaced, and nobody ever reads those bytes as a reply.
    """
    with FastLinePool(misbehaving_server, 1) as pool:
        pool.wait(timeout=5)
        (old,) = ports_of(pool, 1)
        wait_until(lambda: pool.stats().idle == 1)
        gevent.sleep(1.1)  # a precondition: older than a greeting could be (see the next test)
        serving(misbehaving_server, 1)
        misbehaving_server.connection(old).send(b"STALE REPLY\n")
        wait_until(lambda: pool.stats().discarded == 1 and pool.stats().idle == 1)
        assert request(pool, b"ECHO fresh") == b"fresh"
        (new,) = ports_of(pool, 1)
        assert new != old
        assert pool.stats().failed_connects == 0
    misbehaving_server.stop()
    leak_check()


class NoGreetingPool(FastLinePool):
    """A pool whose _new_connection forgets to read the server's greeting."""

    RECONNECT_DELAY = 0.05
    RECONNECT_MAX_DELAY = 0.4


def test_a_greeting_nobody_read_is_a_failed_connect_with_backoff_not_a_reconnect_storm(leak_check, caplog):
    """A server that greets every new connection, against a _new_connection that does not read the greeting:
    each new connection is dropped as a failed connect and its replacement waits a growing backoff, so the
    server sees a handful of connections per second, not thousands; one WARNING says why and what to do.
    """
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    server = MisbehavingServer(banner=b"220 hello\n")
    server.start()
    try:
        with NoGreetingPool(server, 1, name="greeted") as pool:
            wait_until(lambda: pool.stats().failed_connects >= 3, timeout=5)
            accepted_then = server.accepted
            wait_until(lambda: pool.stats().failed_connects >= 6, timeout=5)
            # Six failed connects took the backoff's time, not a loop's: at most one connection each.
            assert server.accepted - accepted_then <= 4
        warnings = [w for w in warnings_of(caplog) if "greeted" in w]
        assert len(warnings) == 1, warnings
        assert "_new_connection()" in warnings[0] and "_idle_readable()" in warnings[0]
    finally:
        server.stop()
    leak_check()


class GreetingPool(FastLinePool):
    """A pool whose _new_connection reads the server's greeting, as it should."""

    def _new_connection(self) -> socket.socket:
        sock = super()._new_connection()
        if recv_line(sock) != b"220 hello":
            sock.close()
            raise OSError("no greeting")
        return sock


def test_a_greeting_read_by_new_connection_keeps_the_connection(leak_check):
    """A greeting that _new_connection reads leaves nothing unread: the connections stay and serve."""
    server = MisbehavingServer(banner=b"220 hello\n")
    server.start()
    try:
        with GreetingPool(server, 2) as pool:
            pool.wait(timeout=5)
            ports = ports_of(pool, 2)
            assert request(pool, b"PING") == b"PONG"
            assert ports_of(pool, 2) == ports
            s = pool.stats()
            assert (s.opened, s.failed_connects, s.discarded, s.closed_while_idle) == (2, 0, 0, 0)
    finally:
        server.stop()
    leak_check()


def test_a_server_restart_writes_one_log_line(misbehaving_server, leak_check, caplog):
    """A restart that closes all five idle connections at once writes one WARNING line, not five."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with FastLinePool(misbehaving_server, 5, name="restarted") as pool:
        pool.wait(timeout=5)
        serving(misbehaving_server, 5)
        misbehaving_server.fin_all()
        wait_until(lambda: pool.stats().closed_while_idle == 5)
        wait_until(lambda: any("restarted" in w for w in warnings_of(caplog)))
        pool.wait(timeout=5)
        warnings = warnings_of(caplog)
        assert len(warnings) == 1, warnings
        assert "5 idle connections" in warnings[0]
    misbehaving_server.stop()
    leak_check()


# -- TLS -----------------------------------------------------------------------------------------------


def test_a_fresh_tls13_connection_is_never_dropped_for_its_session_tickets(tls_server, leak_check):
    """TLS 1.3 session tickets make a new connection's socket readable with no application data: the pool
    keeps it, watched, through many loop turns, and serves on it.
    """
    with TLSLinePool(tls_server, 3) as pool:
        pool.wait(timeout=5)
        ports = ports_of(pool, 3)
        for _ in range(50):
            gevent.sleep(0.002)
        s = pool.stats()
        assert (s.opened, s.closed_while_idle, s.discarded) == (3, 0, 0)
        assert [request(pool, b"ECHO %d" % i) for i in range(6)] == [b"%d" % i for i in range(6)]
        assert ports_of(pool, 3) == ports
        assert tls_server.handshakes == 3
    tls_server.stop()
    leak_check()


# -- the hooks ------------------------------------------------------------------------------------------


class HeartbeatPool(FastLinePool):
    """A pool whose server writes HEARTBEAT on idle connections: _idle_readable reads it and keeps them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.heartbeats: List[bytes] = []
        super().__init__(*args, **kwargs)

    def _idle_readable(self, c: socket.socket) -> bool:
        line = recv_line(c)
        self.heartbeats.append(line)
        return line == b"HEARTBEAT"


def test_idle_readable_override_keeps_connections_whose_server_writes_heartbeats(
    misbehaving_server, leak_check
):
    """A subclass's _idle_readable reads what the server wrote on an idle connection and keeps it (true), or
    drops it (false)."""
    with HeartbeatPool(misbehaving_server, 2) as pool:
        pool.wait(timeout=5)
        ports = ports_of(pool, 2)
        serving(misbehaving_server, 2)
        misbehaving_server.send_all(b"HEARTBEAT\n")
        wait_until(lambda: len(pool.heartbeats) == 2 and pool.stats().idle == 2)
        assert ports_of(pool, 2) == ports
        assert pool.stats().closed_while_idle == 0
        misbehaving_server.connection(min(ports)).send(b"GOODBYE\n")
        wait_until(lambda: pool.stats().closed_while_idle == 1)
        pool.wait(timeout=5)
        assert min(ports) not in ports_of(pool, 2)
    misbehaving_server.stop()
    leak_check()


class Session:
    """A client object that keeps its socket in ``sock``, as http.client and imaplib do."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def close(self) -> None:
        self.sock.close()


class SessionPool(FastLinePool):
    def _new_connection(self) -> Any:
        return Session(super()._new_connection())


def test_a_client_that_keeps_its_socket_in_sock_is_watched(misbehaving_server, leak_check):
    """The default _socket_of finds the socket of a client object in its ``sock`` attribute."""
    with SessionPool(misbehaving_server, 1) as pool:
        pool.wait(timeout=5)
        serving(misbehaving_server, 1)
        misbehaving_server.fin_all()
        wait_until(lambda: pool.stats().closed_while_idle == 1)
    misbehaving_server.stop()
    leak_check()


def test_an_http_client_connection_is_watched(leak_check):
    """An http.client.HTTPConnection is watched through its ``sock``: the server closing it drops it."""
    server = LineServer()
    server.start()

    class HttpPool(ConnectionPool[http.client.HTTPConnection]):
        RECONNECT_DELAY = 0.01

        def _new_connection(self) -> http.client.HTTPConnection:
            conn = http.client.HTTPConnection(*server.address, timeout=5)
            conn.connect()
            return conn

    try:
        with HttpPool(1) as pool:
            pool.wait(timeout=5)
            server.wait_for_accepted(1)
            server.cut_all()
            wait_until(lambda: pool.stats().closed_while_idle == 1)
    finally:
        server.stop()
    leak_check()


class Unwatched(FastLinePool):
    def _socket_of(self, c: socket.socket) -> Optional[socket.socket]:
        return None


@pytest.mark.parametrize("pool_class, options", [(Unwatched, {}), (FastLinePool, {"watch_idle": False})])
def test_without_a_watched_socket_a_closed_idle_connection_is_lent(
    misbehaving_server, leak_check, pool_class, options
):
    """With watch_idle=False, or a _socket_of that returns None, nothing is watched: a connection the
    server closed is lent, and its block fails (1.0's behaviour)."""
    with pool_class(misbehaving_server, 1, **options) as pool:
        pool.wait(timeout=5)
        serving(misbehaving_server, 1)
        misbehaving_server.fin_all()
        misbehaving_server.wait_for_ended(1)
        gevent.sleep(0.05)  # a bounded wait for something that must not happen
        assert pool.stats().closed_while_idle == 0
        with pytest.raises(OSError), pool.get() as c:
            c.sendall(b"PING\n")
            recv_line(c)
    misbehaving_server.stop()
    leak_check()


def test_objects_without_a_socket_are_lent_as_before(leak_check):
    """A connection that is no socket and has no ``sock`` (a table, a client object) is simply not watched."""

    class TablePool(ConnectionPool[dict]):
        def _new_connection(self) -> dict:
            return {"table": "users"}

    with TablePool(2) as pool:
        pool.wait(timeout=5)
        with pool.get() as table:
            assert table == {"table": "users"}
        assert pool.stats().idle == 2
    leak_check()


# -- descriptors, close, fork, garbage collection --------------------------------------------------------


def test_a_descriptor_reused_by_another_socket_is_never_acted_on(misbehaving_server, leak_check):
    """A holder closes its pooled socket and its descriptor number goes to another socket at once: the pool
    drops the closed connection once it is back, never watches that number again, and never reads the other
    socket's data.
    """
    with FastLinePool(misbehaving_server, 1) as pool:
        pool.wait(timeout=5)
        with pool.get() as c:
            fd = c.fileno()
            c.close()
            mine, theirs = socket.socketpair()  # the lowest free numbers: fd is among them
            reused = mine if mine.fileno() == fd else theirs
            other = theirs if reused is mine else mine
            assert reused.fileno() == fd
        wait_until(lambda: pool.stats().discarded == 1)  # at the hub's next turn, before it watches fd
        pool.wait(timeout=5)
        other.sendall(b"for the other socket's owner")
        after_a_poll()
        reused.settimeout(5)
        assert reused.recv(100) == b"for the other socket's owner"
        assert pool.stats().closed_while_idle == 0
        assert fd not in active_watched_fds()
        mine.close()
        theirs.close()
    misbehaving_server.stop()
    leak_check()


def test_close_stops_every_watcher(misbehaving_server, leak_check):
    """After close(), no io watcher of the hub watches any of the pool's former connections."""
    pool = FastLinePool(misbehaving_server, 3)
    pool.wait(timeout=5)
    fds = fds_of(pool, 3)
    after_a_poll()
    assert fds <= active_watched_fds()
    pool.close()
    assert not fds & active_watched_fds()
    misbehaving_server.stop()
    leak_check()


def test_a_child_after_fork_never_watches_its_parents_sockets(misbehaving_server, leak_check):
    """In a forked child, once its hub has run, none of the parent's idle sockets is watched; the child's own
    connections are."""
    with FastLinePool(misbehaving_server, 2) as pool:
        pool.wait(timeout=5)
        parent_fds = fds_of(pool, 2)
        after_a_poll()  # the hub watches them again from its next turn
        assert parent_fds <= active_watched_fds()
        read_end, write_end = os.pipe()
        pid = gevent.fork()
        if pid == 0:  # the child
            status = 1
            try:
                gevent.sleep(0)  # the child's hub runs once, after gevent reinitialised its loop
                inherited = parent_fds & active_watched_fds()
                pool.wait(timeout=5)  # the child's first call: it opens its own
                own = fds_of(pool, 2)
                after_a_poll()
                status = 0 if not inherited and own <= active_watched_fds() else (2 if inherited else 3)
            finally:
                os.write(write_end, bytes([status]))
                os._exit(0)
        os.close(write_end)
        try:
            result = gevent.os.tp_read(read_end, 1)
        finally:
            os.close(read_end)
            os.waitpid(pid, 0)
        assert result == b"\x00", f"child status {result!r}"
        assert parent_fds <= active_watched_fds()  # the parent still watches its own
    misbehaving_server.stop()
    leak_check()


def test_a_pool_dropped_without_close_stops_its_watchers_before_its_sockets_close(tmp_path):
    """A pool garbage collected without close() must not leave a watcher on a descriptor the collector
    closes (libev aborts the process when it meets one): run in a process of its own, which must survive.
    """
    script = tmp_path / "dropped.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import gc, sys
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            import gevent
            from gevent import socket
            from helpers import LinePool, LineServer
            server = LineServer()
            server.start()
            pool = LinePool(server, 3)
            pool.wait(timeout=5)
            del pool
            gc.collect()
            others = [socket.create_connection(server.address) for _ in range(3)]  # the freed numbers
            gevent.sleep(0.1)
            server.stop()
            print("survived")
            """
        )
    )
    with starting_a_program():
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "survived"


# -- real servers nobody here wrote (tox env soak) ------------------------------------------------------


@pytest.mark.servers
def test_requests_after_nginx_reload_do_not_fail(nginx, leak_check):
    """After ``nginx -s reload`` closed all ten idle pooled HTTPS connections, 20 sequential requests with no
    retry all succeed: the pool saw the closures and reconnected before anyone asked."""
    with HttpsPool(nginx, 10) as pool:
        pool.wait(timeout=10)
        nginx.reload()
        wait_until(lambda: pool.stats().closed_while_idle == 10, 10, message=lambda: str(pool.stats()))
        failures = []
        for _ in range(REQUESTS):
            try:
                assert get(pool).status == 200
            except OSError as error:
                failures.append(error)
    assert failures == []


@pytest.mark.servers
def test_requests_after_haproxy_cut_idle_connections_do_not_fail(haproxy_redis, leak_check):
    """After haproxy cut all ten idle pooled connections to redis (timeout client), 20 sequential requests
    with no retry all succeed."""
    haproxy, _ = haproxy_redis
    with RedisPool(haproxy.address, 10) as pool:
        pool.wait(timeout=10)
        wait_until(lambda: pool.stats().closed_while_idle >= 10, timeout=5 * haproxy.timeout_client)
        failures = []
        for i in range(REQUESTS):
            try:
                assert echo(pool, f"token-{i}") == f"token-{i}".encode()
            except OSError as error:
                failures.append(error)
    assert failures == []


@needs_redis
@pytest.mark.watchdog(60)
def test_a_connection_handed_to_a_waiter_is_never_watched_while_lent(redis, leak_check, caplog):
    """Under contention, with gevent splitting its callbacks into many batches, a connection given back
    while its watcher was due to start goes straight to a waiter and is never watched while lent: every
    request gets its own reply.  (A watcher started on a lent connection read the caller's reply: about
    one request in 3,000 timed out.)
    """
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # gevent cuts a batch of callbacks after this long
    try:
        with FastRedisPool(redis.address, 4, timeout=10) as pool:
            pool.wait(timeout=5)
            deadline = time.monotonic() + 5
            rounds = 0
            while rounds < 60 and time.monotonic() < deadline:  # bounded in count and in time
                jobs = [gevent.spawn(echo, pool, f"{rounds}-{i}") for i in range(200)]
                gevent.joinall(jobs, timeout=20)
                assert [job.value for job in jobs] == [f"{rounds}-{i}".encode() for i in range(200)], rounds
                rounds += 1
                gevent.sleep(0.001)
            assert pool.stats().closed_while_idle == pool.stats().discarded == 0
    finally:
        sys.setswitchinterval(interval)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    leak_check()
