"""A small TLS line service on 127.0.0.1 for the gunicorn example, with a certificate authority of its own.

It stands for the remote API a web application calls: the app in ``app.py``
keeps a pool of TLS connections to it.  It also writes down everything a test
needs to tell the processes' connections apart: the client port of every
connection, the pid its opener announced, and the pid sent with every request.

The protocol, one command a line, one reply a line:

``HELLO <pid>``
    the first command of a connection: the pid of the process that opened it;
    the reply is ``HELLO <client port>``.
``PING <pid>``
    answers ``PONG`` (the pool's keepalive).
``ECHO <token> <pid>``
    answers ``<token> <pid>``.
``QUIT <pid>``
    a goodbye: the server closes the connection.
``STATS``
    answers one JSON line: the open connections, every connection and every
    request seen so far (see :meth:`Backend.report`).

Run it by hand with ``python backend.py --port 7000 --cafile /tmp/backend-ca.pem``
(see README.rst), and ask it what it saw with ``python backend.py --stats ...``.
Started again with the same ``--cafile``, it keeps its certificate authority,
so that the clients that already trust it reconnect.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import gevent
import trustme
from gevent import socket, ssl
from gevent.server import StreamServer


@dataclass
class Request:
    """One command a client sent: on which connection (its client port), and with which pid."""

    port: int
    verb: str
    pid: Optional[int]
    token: Optional[str] = None


@dataclass(eq=False)
class Connection:
    """One TLS connection the backend accepted."""

    port: int
    #: the pid announced by ``HELLO``, None until then.
    opener: Optional[int] = None
    #: how it ended: None while open, "QUIT" after a goodbye, "EOF" when the client just went away.
    ended: Optional[str] = None
    commands: List[Request] = field(default_factory=list)


class Backend:
    """The TLS line server, run in this process with gevent.

    ``start()`` issues a certificate for ``localhost`` and ``127.0.0.1``
    signed by the certificate authority in :attr:`cafile` (what clients must
    trust) and its key file (:func:`ca_key_file`), and listens on
    ``127.0.0.1:port`` (0 picks a free port).  The authority is made and
    written there the first time, and kept after, so that the clients that
    loaded ``cafile`` still trust a restarted backend.  Without ``cafile`` it
    lives in a temporary directory that ``stop()`` removes.
    """

    def __init__(self, port: int = 0, cafile: Optional[str] = None, verbose: bool = False) -> None:
        self.port = port
        self.cafile = cafile
        self.verbose = verbose
        self.connections: List[Connection] = []
        self.requests: List[Request] = []
        self._open: Dict[Connection, ssl.SSLSocket] = {}
        self._server: Optional[StreamServer] = None
        self._tmpdir: Optional[tempfile.TemporaryDirectory[str]] = None

    # -- lifetime ----------------------------------------------------------------------

    def start(self) -> None:
        if self.cafile is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="gunicorn-app-backend-")
            self.cafile = os.path.join(self._tmpdir.name, "ca.pem")
        certificate = certificate_authority(self.cafile).issue_cert("localhost", "127.0.0.1")
        # gevent's own SSLContext, so that the handshakes are cooperative whether
        # or not this process called gevent.monkey.patch_all().
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        certificate.configure_cert(context)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(256)
        self.port = listener.getsockname()[1]
        self._server = StreamServer(listener, self._handle, ssl_context=context)
        self._server.start()

    def stop(self) -> None:
        """Stop listening and close every open connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for sock in list(self._open.values()):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> Backend:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- what it saw ---------------------------------------------------------------------

    @property
    def open_connections(self) -> List[Connection]:
        """The connections open now (``STATS`` connections, which send no HELLO, left out)."""
        return [c for c in self._open if c.opener is not None or c.commands]

    def report(self) -> Dict[str, Any]:
        """Everything seen so far, as plain data (what ``STATS`` sends as JSON)."""
        return {
            "open": [c.port for c in self.open_connections],
            "connections": [
                {"port": c.port, "opener": c.opener, "ended": c.ended, "commands": len(c.commands)}
                for c in self.connections
                if c.opener is not None or c.commands
            ],
            "requests": [asdict(r) for r in self.requests],
        }

    # -- serving -------------------------------------------------------------------------

    def _handle(self, sock: ssl.SSLSocket, address: Tuple[str, int]) -> None:
        # The TLS handshake is already done: the server wraps the socket first.
        conn = Connection(port=address[1])
        self.connections.append(conn)
        self._open[conn] = sock
        try:
            reader = sock.makefile("rb")
            for raw in reader:
                reply = self._answer(conn, raw.decode("ascii", "replace").split())
                if reply is None:
                    conn.ended = "QUIT"
                    break
                sock.sendall(reply.encode("ascii") + b"\n")
            else:
                conn.ended = "EOF"
        except OSError:
            conn.ended = "EOF"
        finally:
            del self._open[conn]
            sock.close()

    def _answer(self, conn: Connection, words: List[str]) -> Optional[str]:
        """The reply to one command, or None to close the connection."""
        verb = words[0] if words else ""
        if verb == "STATS" and len(words) == 1:
            return json.dumps(self.report())
        pid = _int(words[-1]) if len(words) > 1 else None
        token = words[1] if verb == "ECHO" and len(words) == 3 else None
        request = Request(port=conn.port, verb=verb, pid=pid, token=token)
        conn.commands.append(request)
        self.requests.append(request)
        if self.verbose:
            print(f"port {conn.port}: {' '.join(words)}", flush=True)
        if verb == "HELLO" and len(words) == 2 and pid is not None:
            if conn.opener is None:
                conn.opener = pid
            return f"HELLO {conn.port}"
        if verb == "PING" and len(words) == 2:
            return "PONG"
        if verb == "ECHO" and token is not None:
            return f"{token} {pid}"
        if verb == "QUIT":
            return None
        return "ERROR unknown command"


def ca_key_file(cafile: str) -> str:
    """The file of the private key of the certificate authority in ``cafile``: its name, ending in .key."""
    return os.path.splitext(cafile)[0] + ".key"


def certificate_authority(cafile: str) -> trustme.CA:
    """The authority in ``cafile`` and its key file, or a new one written there when either is missing."""
    keyfile = ca_key_file(cafile)
    if os.path.exists(cafile) and os.path.exists(keyfile):
        with open(cafile, "rb") as cert, open(keyfile, "rb") as key:
            return trustme.CA.from_pem(cert.read(), key.read())
    ca = trustme.CA()
    # The key readable by its owner only; the certificate is public.
    with open(os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as key:
        key.write(ca.private_key_pem.bytes())
    ca.cert_pem.write_to_path(cafile)
    return ca


def _int(word: str) -> Optional[int]:
    try:
        return int(word)
    except ValueError:
        return None


def ask_stats(port: int, cafile: str) -> Dict[str, Any]:
    """Connect to a running backend and return its ``STATS`` report."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=cafile)
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with raw, context.wrap_socket(raw, server_hostname="localhost") as sock:
        sock.sendall(b"STATS\n")
        reply = sock.makefile("rb").readline()
    return json.loads(reply)  # type: ignore[no-any-return]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=7000, help="port on 127.0.0.1 (default 7000)")
    parser.add_argument(
        "--cafile",
        default=None,
        help="the CA certificate: kept from the last run (with its key, in the same name ending in .key)"
        " or written there; with --stats, read",
    )
    parser.add_argument("--stats", action="store_true", help="print what a running backend saw, and exit")
    args = parser.parse_args(argv)
    if args.stats:
        if args.cafile is None:
            parser.error("--stats needs --cafile")
        print(json.dumps(ask_stats(args.port, args.cafile), indent=1))
        return 0
    backend = Backend(args.port, args.cafile, verbose=True)
    backend.start()
    print(f"backend listening on 127.0.0.1:{backend.port} with TLS", flush=True)
    print(f"export BACKEND_PORT={backend.port} BACKEND_CAFILE={backend.cafile}", flush=True)
    try:
        gevent.wait()
    except KeyboardInterrupt:
        pass
    finally:
        backend.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
