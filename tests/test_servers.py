"""The servers the tests start, checked with plain client sockets: each produces what it exists to produce.

The in-process servers (a line server that ends or garbles connections on
command, a TLS 1.3 server sending session tickets) run in every test env; the
real ones (nginx reloaded, haproxy cutting idle connections), marked
``servers``, run in the tox env ``soak``.  The last tests show today's pool
failing requests on idle connections that the server has closed: what
``watch_idle`` is to fix.
"""

from __future__ import annotations

import ssl
import time

import pytest
from gevent import socket
from helpers import recv_line, request, wait_until
from misbehaving_server import MisbehavingServer
from nginx_server import https_get
from redis_server import call
from tls_server import TLSLinePool

pytestmark = pytest.mark.event_loop

REQUESTS = 20


def peek_under_tls(sock: ssl.SSLSocket) -> bytes:
    """Wait, within the socket's timeout, for bytes under the TLS layer of ``sock``; return one, unread.

    A peek rather than ``gevent.socket.wait_read``: on the libuv loop a new
    watcher of a socket that was just read reports it readable at once.
    """
    return bytes(socket.socket.recv(sock, 1, socket.MSG_PEEK))


def connect_and_ping(server: MisbehavingServer) -> socket.socket:
    """A new client connection to ``server``, checked with one PING."""
    sock = socket.create_connection(server.address, timeout=5)
    sock.sendall(b"PING\n")
    assert recv_line(sock) == b"PONG"
    return sock


# -- the misbehaving line server ------------------------------------------------------------------


def test_fin_makes_an_idle_client_read_eof(misbehaving_server, leak_check):
    """A connection the server closes with a FIN reads EOF on the client, and the server records it."""
    with connect_and_ping(misbehaving_server) as sock:
        conn = misbehaving_server.connection(sock.getsockname()[1])
        conn.fin()
        assert sock.recv(100) == b""
    misbehaving_server.wait_for_ended(1)
    assert conn.how == "fin"


def test_reset_makes_an_idle_client_read_connection_reset(misbehaving_server, leak_check):
    """A connection the server resets raises ConnectionResetError on the client's next read."""
    with connect_and_ping(misbehaving_server) as sock:
        conn = misbehaving_server.connection(sock.getsockname()[1])
        conn.reset()
        with pytest.raises(ConnectionResetError):
            sock.recv(100)
    misbehaving_server.wait_for_ended(1)
    assert conn.how == "rst"


def test_unsolicited_bytes_reach_an_idle_client_and_it_still_works(misbehaving_server, leak_check):
    """Bytes the server writes unasked arrive on the idle client, and PING still answers PONG after them."""
    with connect_and_ping(misbehaving_server) as sock:
        misbehaving_server.send_all(b"UNASKED\n")
        assert recv_line(sock) == b"UNASKED"
        sock.sendall(b"PING\n")
        assert recv_line(sock) == b"PONG"
    assert misbehaving_server.connections[0].sent == len(b"UNASKED\n")


def test_banner_comes_first_on_every_connection(leak_check):
    """A server with a banner sends it on accept, before the client asks anything."""
    server = MisbehavingServer(banner=b"HELLO geventconnpool\n")
    server.start()
    try:
        with socket.create_connection(server.address, timeout=5) as sock:
            assert recv_line(sock) == b"HELLO geventconnpool"
            sock.sendall(b"PING\n")
            assert recv_line(sock) == b"PONG"
    finally:
        server.stop()


def test_records_which_connections_ended_and_how(misbehaving_server, leak_check):
    """The server records each connection's client port and how it ended: by the client, a FIN or a RST."""
    socks = [connect_and_ping(misbehaving_server) for _ in range(3)]
    try:
        ports = [sock.getsockname()[1] for sock in socks]
        assert [conn.port for conn in misbehaving_server.connections] == ports
        socks[0].close()
        misbehaving_server.wait_for_ended(1)
        misbehaving_server.connection(ports[1]).fin()
        misbehaving_server.connection(ports[2]).reset()
        misbehaving_server.wait_for_ended(3)
        assert [conn.how for conn in misbehaving_server.connections] == ["client", "fin", "rst"]
        assert misbehaving_server.open_connections() == []
    finally:
        for sock in socks:
            sock.close()


# -- the TLS 1.3 server ---------------------------------------------------------------------------


def test_tls13_session_tickets_make_the_socket_readable_with_no_application_data(tls_server, leak_check):
    """Right after a TLS 1.3 handshake the socket turns readable (the tickets), a non-blocking read raises
    SSLWantReadError, and the connection still works."""
    with tls_server.connect() as sock:
        assert sock.version() == "TLSv1.3"
        assert peek_under_tls(sock)  # the server sent nothing but its session tickets
        sock.setblocking(False)
        with pytest.raises(ssl.SSLWantReadError):
            sock.recv(100)
        sock.settimeout(5)
        sock.sendall(b"PING\n")
        assert recv_line(sock) == b"PONG"
    assert tls_server.handshakes == 1


def test_tls_server_switches_work_through_tls(tls_server, leak_check):
    """On the TLS server, unasked bytes arrive as application data, and a FIN or a RST ends the connection."""
    with tls_server.connect() as unasked, tls_server.connect() as finned, tls_server.connect() as reset:
        tls_server.wait_for_accepted(3)
        by_port = {sock.getsockname()[1]: sock for sock in (unasked, finned, reset)}
        for conn in tls_server.connections:
            if by_port[conn.port] is unasked:
                conn.send(b"UNASKED\n")
            elif by_port[conn.port] is finned:
                conn.fin()
            else:
                conn.reset()
        assert recv_line(unasked) == b"UNASKED"
        assert finned.recv(100) == b""
        # Through TLS, Python 3.10 to 3.12 report a RST as an EOF (b"", a suppressed SSLEOFError);
        # 3.9 and 3.13 raise ConnectionResetError, as a plain socket does.
        try:
            assert reset.recv(100) == b""
        except ConnectionResetError:
            pass
    tls_server.wait_for_ended(3)


def test_tls_line_pool_talks_to_the_tls_server(tls_server, leak_check):
    """A TLSLinePool opens TLS 1.3 connections to the server and its requests get their replies."""
    with TLSLinePool(tls_server, 2) as pool:
        pool.wait(timeout=5)
        assert [request(pool, b"ECHO %d" % i) for i in range(5)] == [b"%d" % i for i in range(5)]
    assert tls_server.handshakes == 2


# -- nginx --------------------------------------------------------------------------------------------


@pytest.mark.servers
def test_nginx_reload_closes_idle_keepalive_connections(nginx, leak_check):
    """After ``nginx -s reload`` each idle keep-alive HTTPS connection reads EOF, and new ones are served."""
    socks = [nginx.connect() for _ in range(3)]
    try:
        responses = [https_get(sock) for sock in socks]
        assert [r.status for r in responses] == [200, 200, 200]
        assert len({r.connection for r in responses}) == 3
        old_workers = nginx.workers()
        started = time.monotonic()
        nginx.reload()
        for sock in socks:
            assert sock.recv(100) == b""  # within the socket's timeout
        print(f"nginx closed {len(socks)} idle connections {time.monotonic() - started:.2f} s after reload")
        with nginx.connect() as fresh:
            assert https_get(fresh).worker not in old_workers
    finally:
        for sock in socks:
            sock.close()
    assert {entry[0] for entry in nginx.access_log()} >= {r.connection for r in responses}


# -- haproxy in front of redis ------------------------------------------------------------------------


@pytest.mark.servers
def test_haproxy_cuts_an_idle_connection_after_timeout_client(haproxy_redis, leak_check):
    """haproxy closes a client connection idle for ``timeout client`` (2 s), and its connection to redis."""
    haproxy, redis = haproxy_redis
    with socket.create_connection(haproxy.address, timeout=5) as sock:
        assert call(sock, "PING") == b"PONG"
        last_byte = time.monotonic()
        sock.settimeout(5 * haproxy.timeout_client)
        assert sock.recv(100) == b""
        idle = time.monotonic() - last_byte
    print(f"haproxy cut the connection after {idle:.2f} s idle (timeout client {haproxy.timeout_client} s)")
    assert idle > haproxy.timeout_client / 2, "cut long before the idle timeout: not the idle cut"
    wait_until(lambda: redis.client_ports() == set(), message=lambda: f"redis has {redis.client_ports()}")
