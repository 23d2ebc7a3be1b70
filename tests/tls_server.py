"""A TLS 1.3 line server that sends session tickets after each handshake, and the client side the tests use.

:class:`TLSLineServer` is a :class:`~misbehaving_server.MisbehavingServer`
behind TLS 1.3, with a certificate for 127.0.0.1 and ``localhost`` from a
throwaway certificate authority (trustme).  Like every TLS 1.3 server built on
OpenSSL, it sends ``num_tickets`` NewSessionTicket records right after the
handshake: the client's socket becomes readable with no application data
behind it, and a non-blocking read raises :exc:`ssl.SSLWantReadError`.  It
keeps its connections open until the client ends them (or the test does, with
the switches of the misbehaving server: a FIN, a RST, unsolicited bytes, sent
as TLS application data).

:func:`client_context` makes the client's context from the ``ssl`` module an
application would use (see there), and :class:`TLSLinePool` is a pool of
connections to the server::

    server = TLSLineServer()
    server.start()
    with TLSLinePool(server, 4) as pool:
        assert request(pool, b"PING") == b"PONG"
"""

from __future__ import annotations

import ssl as stdlib_ssl
from typing import Optional, Tuple

import gevent.ssl
import trustme
from gevent import monkey, socket
from helpers import LinePool
from misbehaving_server import MisbehavingServer

HANDSHAKE_TIMEOUT = 5.0  # seconds a client may take to finish its handshake


def client_context(ca: trustme.CA) -> stdlib_ssl.SSLContext:
    """A client context that trusts ``ca``, from the ``ssl`` module an application would use here.

    Under ``gevent.monkey.patch_all()`` that is the standard library's
    ``ssl.create_default_context()`` (whose classes are then gevent's); under
    plain gevent, ``gevent.ssl.SSLContext``, just as strict (the standard
    library's would block the hub, and ``gevent.ssl.create_default_context``
    is the standard library's function, which makes one of those).
    """
    if monkey.is_module_patched("ssl"):
        context = stdlib_ssl.create_default_context()
    else:
        context = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(context)
    return context


def tls_connect(
    address: Tuple[str, int], context: stdlib_ssl.SSLContext, timeout: Optional[float] = 5.0
) -> stdlib_ssl.SSLSocket:
    """Open a TCP connection to ``address`` and do the TLS handshake over it, checking the IP address."""
    raw = socket.create_connection(address, timeout=timeout)
    try:
        return context.wrap_socket(raw, server_hostname=address[0])
    except BaseException:
        raw.close()
        raise


class TLSLineServer(MisbehavingServer):
    """The line protocol over TLS 1.3 only, on 127.0.0.1, sending session tickets after each handshake.

    :param num_tickets: how many session tickets to send after each handshake
        (OpenSSL's default is 2; 0 sends none).
    :param banner: as for :class:`~misbehaving_server.MisbehavingServer`, sent
        once the handshake is done.
    """

    def __init__(self, port: int = 0, num_tickets: int = 2, banner: Optional[bytes] = None) -> None:
        super().__init__(port, banner)
        self.ca = trustme.CA()
        # gevent's own SSLContext, so that handshakes are cooperative with or without patch_all().
        self.context = gevent.ssl.SSLContext(gevent.ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = gevent.ssl.TLSVersion.TLSv1_3
        self.context.maximum_version = gevent.ssl.TLSVersion.TLSv1_3
        self.context.num_tickets = num_tickets
        self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(self.context)
        #: a client context that trusts the server's certificate (see :func:`client_context`).
        self.client_context = client_context(self.ca)
        self.handshakes = 0  #: handshakes completed

    def connect(self, timeout: Optional[float] = 5.0) -> stdlib_ssl.SSLSocket:
        """Open a new TLS connection to the server, handshake done, as a client would."""
        return tls_connect(self.address, self.client_context, timeout)

    def _handle(self, sock: socket.socket, address: Tuple[str, int]) -> None:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            tls = self.context.wrap_socket(sock, server_side=True)  # the handshake; tickets go out
        except OSError:
            sock.close()
            return
        self.handshakes += 1
        tls.settimeout(None)  # then idle connections stay open for ever
        super()._handle(tls, address)


class TLSLinePool(LinePool):
    """A pool of TLS connections to a :class:`TLSLineServer`, with a PING keepalive."""

    def __init__(self, server: TLSLineServer, size: int, *args: object, **kwargs: object) -> None:
        self.tls_server = server
        super().__init__(server, size, *args, **kwargs)

    def _new_connection(self) -> socket.socket:
        return self.tls_server.connect()
