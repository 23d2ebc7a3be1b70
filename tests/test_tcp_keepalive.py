"""enable_tcp_keepalive(): the options read back from real connected sockets, and its argument checks."""

import socket as stdlib_socket
import ssl
import sys

import pytest
from gevent import socket
from helpers import LinePool, request

from geventconnpool import enable_tcp_keepalive

IDLE_OPTION = getattr(stdlib_socket, "TCP_KEEPIDLE", None)
if IDLE_OPTION is None and sys.platform == "darwin":
    IDLE_OPTION = getattr(stdlib_socket, "TCP_KEEPALIVE", 0x10)
IDLE_NAME = (
    "TCP_KEEPALIVE"
    if sys.platform == "darwin" and not hasattr(stdlib_socket, "TCP_KEEPIDLE")
    else "TCP_KEEPIDLE"
)
INTERVAL_OPTION = getattr(stdlib_socket, "TCP_KEEPINTVL", None)
COUNT_OPTION = getattr(stdlib_socket, "TCP_KEEPCNT", None)


def tcp_options(sock):
    """Read SO_KEEPALIVE and the tuning options the platform has back from ``sock``."""
    found = {"SO_KEEPALIVE": bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))}
    for name, option in (
        (IDLE_NAME, IDLE_OPTION),
        ("TCP_KEEPINTVL", INTERVAL_OPTION),
        ("TCP_KEEPCNT", COUNT_OPTION),
    ):
        if option is not None:
            found[name] = sock.getsockopt(socket.IPPROTO_TCP, option)
    return found


@pytest.fixture
def connected(line_server):
    """A gevent socket connected to the line server, closed after the test."""
    sock = socket.create_connection(line_server.address, timeout=5)
    try:
        yield sock
    finally:
        sock.close()


def test_sets_every_option_on_a_connected_socket(connected):
    """idle, interval and count are read back from the socket exactly as given, with SO_KEEPALIVE on."""
    assert tcp_options(connected)["SO_KEEPALIVE"] is False
    applied = enable_tcp_keepalive(connected, idle=42, interval=7, count=4)
    expected = {"SO_KEEPALIVE": True}
    for name, option, value in (
        (IDLE_NAME, IDLE_OPTION, 42),
        ("TCP_KEEPINTVL", INTERVAL_OPTION, 7),
        ("TCP_KEEPCNT", COUNT_OPTION, 4),
    ):
        if option is not None:
            expected[name] = value
    assert tcp_options(connected) == expected
    assert applied == {name: int(value) for name, value in expected.items()}


def test_only_keepalive_leaves_the_system_defaults(connected):
    """With no tuning argument only SO_KEEPALIVE changes; the other options keep their defaults."""
    before = tcp_options(connected)
    applied = enable_tcp_keepalive(connected)
    assert applied == {"SO_KEEPALIVE": 1}
    assert tcp_options(connected) == {**before, "SO_KEEPALIVE": True}


def test_one_option_changes_only_that_option(connected):
    """Setting only count changes TCP_KEEPCNT and leaves the idle time and interval alone."""
    if COUNT_OPTION is None:
        pytest.skip("this platform has no TCP_KEEPCNT")
    before = tcp_options(connected)
    enable_tcp_keepalive(connected, count=9)
    assert tcp_options(connected) == {**before, "SO_KEEPALIVE": True, "TCP_KEEPCNT": 9}


def test_accepts_the_largest_values(connected):
    """The upper limits, 32767 seconds and 127 probes, are accepted and read back."""
    enable_tcp_keepalive(connected, idle=32767, interval=32767, count=127)
    options = tcp_options(connected)
    if IDLE_OPTION is not None:
        assert options[IDLE_NAME] == 32767
    if COUNT_OPTION is not None:
        assert options["TCP_KEEPCNT"] == 127


def test_works_on_an_ipv6_socket():
    """An IPv6 TCP socket on ::1 gets the same options."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        listener.bind(("::1", 0))
    except OSError as error:
        pytest.skip(f"cannot bind ::1: {error}")
    with listener:
        listener.listen(1)
        with socket.create_connection(listener.getsockname()[:2], timeout=5) as sock:
            enable_tcp_keepalive(sock, idle=30)
            assert tcp_options(sock)["SO_KEEPALIVE"] is True
            if IDLE_OPTION is not None:
                assert tcp_options(sock)[IDLE_NAME] == 30


def test_works_on_a_stdlib_socket_and_an_ssl_socket(line_server):
    """A plain stdlib socket and an ssl.SSLSocket wrapping it (before the handshake) both get the options."""
    with stdlib_socket.create_connection(line_server.address, timeout=5) as raw:
        context = ssl.create_default_context()
        with context.wrap_socket(raw, server_hostname="127.0.0.1", do_handshake_on_connect=False) as tls:
            enable_tcp_keepalive(tls, idle=11)
            assert tcp_options(tls)["SO_KEEPALIVE"] is True
            if IDLE_OPTION is not None:
                assert tcp_options(tls)[IDLE_NAME] == 11


def test_in_new_connection_every_pooled_socket_has_keepalive(line_server, leak_check):
    """Called in _new_connection, it gives every connection of a pool the options, and the pool serves."""

    class KeepalivePool(LinePool):
        def _new_connection(self):
            s = super()._new_connection()
            enable_tcp_keepalive(s, idle=60, interval=10, count=5)
            return s

    with KeepalivePool(line_server, 2) as pool:
        pool.wait(timeout=5)
        assert request(pool, b"PING") == b"PONG"
        with pool.get() as a, pool.get() as b:
            for c in (a, b):
                assert tcp_options(c)["SO_KEEPALIVE"] is True
                if IDLE_OPTION is not None:
                    assert tcp_options(c)[IDLE_NAME] == 60
    leak_check()


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"idle": 0}, ValueError, "idle must be between 1 and 32767 seconds"),
        ({"idle": -5}, ValueError, "idle must be between 1 and 32767"),
        ({"interval": 32768}, ValueError, "interval must be between 1 and 32767"),
        ({"count": 128}, ValueError, "count must be between 1 and 127 probes"),
        ({"idle": 1.5}, TypeError, "idle must be an int number of seconds"),
        ({"interval": "10"}, TypeError, "interval must be an int"),
        ({"count": True}, TypeError, "count must be an int number of probes"),
    ],
)
def test_bad_values_are_rejected_before_touching_the_socket(connected, kwargs, error, words):
    """An out-of-range or non-int value raises an error naming the argument; SO_KEEPALIVE stays off."""
    with pytest.raises(error, match=words):
        enable_tcp_keepalive(connected, **kwargs)
    assert tcp_options(connected)["SO_KEEPALIVE"] is False


def test_a_udp_socket_is_a_value_error():
    """A UDP socket is refused with a ValueError saying a TCP socket is needed."""
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
        pytest.raises(ValueError, match="TCP socket"),
    ):
        enable_tcp_keepalive(udp, idle=10)


def test_a_unix_socket_is_a_value_error():
    """A Unix-domain stream socket is refused with a ValueError: it has no TCP options."""
    if not hasattr(socket, "AF_UNIX"):
        pytest.skip("no AF_UNIX here")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix, pytest.raises(ValueError, match="TCP"):
        enable_tcp_keepalive(unix)


def test_a_non_socket_is_a_type_error():
    """Passing something that is not a socket (a connection object, say) raises TypeError."""
    with pytest.raises(TypeError, match="sock must be a socket"):
        enable_tcp_keepalive(object(), idle=10)


def test_exported_from_the_package_root():
    """The helper is part of the public API, listed in __all__."""
    import geventconnpool

    assert "enable_tcp_keepalive" in geventconnpool.__all__
    assert geventconnpool.enable_tcp_keepalive is enable_tcp_keepalive
