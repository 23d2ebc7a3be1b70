"""The server that the documentation's examples talk to, for tests/docs_runner.py.

The docs describe "a small line protocol on 127.0.0.1, port 2485": every
command is one line and every reply is one line.  :class:`DocServer`
implements it on a free loopback port (the runner puts that port where the
docs say 2485):

- ``PING`` answers ``PONG``; ``ECHO x`` answers ``x``; ``PUT x`` answers ``OK``;
- ``STARTTLS`` answers ``OK`` and then does a TLS handshake as the server, with a
  certificate for 127.0.0.1 from a throwaway CA made with trustme (``NO`` when
  the server is made without TLS);
- ``LOGIN name password`` answers ``OK`` for the password ``secret``, else ``NO``;
- ``QUIT`` closes the connection; anything else answers ``ERR``.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional, Set, Tuple

import trustme
from gevent import socket, ssl
from gevent.server import StreamServer


class DocServer:
    """The docs' line protocol on 127.0.0.1, with STARTTLS; counts the connections it accepted."""

    def __init__(self) -> None:
        self.accepted = 0
        self.open: Set[socket.socket] = set()
        self._ca = trustme.CA()
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ca.issue_cert("127.0.0.1", "localhost").configure_cert(self._context)
        self._dir = tempfile.TemporaryDirectory(prefix="geventconnpool-docs-")
        self.ca_file = os.path.join(self._dir.name, "ca.pem")
        self._ca.cert_pem.write_to_path(self.ca_file)
        self._server: Optional[StreamServer] = None
        self.port = 0

    def start(self) -> None:
        self._server = StreamServer(("127.0.0.1", 0), self._handle)
        self._server.start()
        self.port = self._server.address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(timeout=5)
            self._server = None
        for sock in list(self.open):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._dir.cleanup()

    def _handle(self, sock: socket.socket, address: Tuple[str, int]) -> None:
        self.accepted += 1
        conn = sock
        self.open.add(sock)
        buffer = b""
        try:
            while True:
                while b"\n" not in buffer:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    buffer += chunk
                line, buffer = buffer.split(b"\n", 1)
                command, _, argument = line.rstrip(b"\r").partition(b" ")
                if command == b"STARTTLS":
                    conn.sendall(b"OK\n")
                    conn = self._context.wrap_socket(conn, server_side=True)
                    buffer = b""
                    continue
                if command == b"QUIT":
                    return
                conn.sendall(self._reply(command, argument) + b"\n")
        except OSError:
            pass
        finally:
            self.open.discard(sock)
            conn.close()
            sock.close()

    @staticmethod
    def _reply(command: bytes, argument: bytes) -> bytes:
        if command == b"PING":
            return b"PONG"
        if command == b"ECHO":
            return argument
        if command == b"PUT":
            return b"OK"
        if command == b"LOGIN":
            return b"OK" if argument.split(b" ")[-1:] == [b"secret"] else b"NO"
        return b"ERR"
