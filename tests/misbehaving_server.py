"""A line server that breaks its connections on command, for tests of what a pool does with idle ones.

:class:`MisbehavingServer` is a :class:`~helpers.LineServer` (``PING`` answers
``PONG``, ...) that keeps a :class:`ServerSide` record of every connection it
accepted, and lets the test, at any moment:

- close a connection, or all of them, with a FIN (:meth:`ServerSide.fin`,
  :meth:`MisbehavingServer.fin_all`): the client reads EOF;
- reset them (SO_LINGER 0, then close: a RST): the client's next read raises
  :exc:`ConnectionResetError`;
- write bytes nobody asked for on them (:meth:`ServerSide.send`);
- greet every new connection with a ``banner``.

A server that cuts connections idle for some time is a
:class:`~faultproxy.FaultProxy` in front of this one, with
``proxy.cut_when_idle(seconds)``::

    server = MisbehavingServer(banner=b"HELLO\\n")
    server.start()
    ...
    server.wait_for_accepted(2)
    server.connections[0].send(b"surprise\\n")
    server.reset_all()
"""

from __future__ import annotations

import struct
from typing import List, Optional, Tuple

from gevent import socket
from helpers import LineServer, wait_until

_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: closing the socket sends a RST


def fin(sock: socket.socket) -> None:
    """Shut the TCP connection of ``sock`` down both ways: a FIN goes out, the peer reads EOF.

    The plain socket's ``shutdown``, also on an SSL socket: no TLS
    close_notify, the way a crashed or impolite peer ends a connection (and
    an SSL socket's own ``shutdown`` would drop its TLS state under the
    greenlet reading it).
    """
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


class ServerSide:
    """One connection the server accepted, as the server sees it, with the test's switches."""

    def __init__(self, sock: socket.socket, port: int) -> None:
        self.sock = sock
        self.port = port  #: the client's port: the client's end of this connection
        #: how it ended: None while open; "fin" or "rst" when the test ended it, else "client"
        #: (the client closed it, sent QUIT, or broke it).
        self.how: Optional[str] = None
        self.ended = False  #: the server has closed its socket
        self.sent = 0  #: unsolicited bytes written by :meth:`send`

    @property
    def open(self) -> bool:
        """Whether the server still holds this connection open."""
        return not self.ended

    def fin(self) -> None:
        """Close the connection with a FIN; the client reads EOF."""
        if self.how is None:
            self.how = "fin"
        fin(self.sock)

    def reset(self) -> None:
        """Close the connection with a RST; the client's next read raises ConnectionResetError."""
        if self.how is None:
            self.how = "rst"
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            # close() here would not close the descriptor, which the server's reader
            # (a makefile()) still holds: wake that reader with an EOF instead, and
            # the server closes the socket at once, with the RST.
            socket.socket.shutdown(self.sock, socket.SHUT_RD)
        except OSError:
            pass  # already closed

    def send(self, data: bytes) -> None:
        """Write ``data`` on the connection, while the client asked for nothing."""
        self.sock.sendall(data)
        self.sent += len(data)


class MisbehavingServer(LineServer):
    """A :class:`~helpers.LineServer` that ends or garbles its connections when the test says so.

    :param banner: bytes sent on every new connection before anything else
        (a greeting, as SMTP, IMAP or FTP servers send), or None.
    """

    def __init__(self, port: int = 0, banner: Optional[bytes] = None) -> None:
        super().__init__(port)
        self.banner = banner
        self.connections: List[ServerSide] = []  #: every connection accepted, oldest first

    def open_connections(self) -> List[ServerSide]:
        """The connections the server holds open now."""
        return [conn for conn in self.connections if conn.open]

    def connection(self, port: int) -> ServerSide:
        """The last connection accepted from the client port ``port``."""
        for conn in reversed(self.connections):
            if conn.port == port:
                return conn
        raise LookupError(f"no connection from port {port}: {[c.port for c in self.connections]}")

    def wait_for_ended(self, count: int, timeout: float = 5.0) -> None:
        """Wait until ``count`` connections have ended, the server's socket closed."""
        wait_until(
            lambda: len(self.connections) - len(self.open_connections()) == count,
            timeout,
            message=lambda: f"ended: {[(c.port, c.how) for c in self.connections if not c.open]}",
        )

    def fin_all(self) -> None:
        """Close every open connection with a FIN."""
        self.settle()
        for conn in self.open_connections():
            conn.fin()

    def reset_all(self) -> None:
        """Close every open connection with a RST."""
        self.settle()
        for conn in self.open_connections():
            conn.reset()

    def send_all(self, data: bytes) -> None:
        """Write ``data`` on every open connection, unasked."""
        self.settle()
        for conn in self.open_connections():
            conn.send(data)

    def cut_all(self) -> None:
        """Close every open connection with a FIN (what :meth:`stop` does), with no TLS goodbye."""
        self.fin_all()

    def _handle(self, sock: socket.socket, address: Tuple[str, int]) -> None:
        conn = ServerSide(sock, address[1])
        self.connections.append(conn)
        try:
            if self.banner is not None:
                sock.sendall(self.banner)
            super()._handle(sock, address)  # serves the line protocol until the connection ends
        except OSError:
            pass  # the banner could not be sent: the client is gone
        finally:
            if conn.how is None:
                conn.how = "client"
            conn.ended = True
            sock.close()
