"""A WSGI application whose requests call a TLS backend through a geventconnpool pool.

Serve it with gunicorn's gevent worker (README.rst shows the whole recipe)::

    BACKEND_PORT=7000 BACKEND_CAFILE=/tmp/backend-ca.pem \\
        gunicorn -k gevent -w 2 -c gunicorn.conf.py app:application

``GET /?token=abc`` sends ``ECHO abc <pid>`` to the backend on a pooled
connection and answers with the backend's reply, ``abc <pid>``;
``GET /stats`` answers the worker's ``pool.stats()`` as JSON, with the
count of requests that failed since the worker started.

A quiet restart of the backend costs no request: the pool watches its idle
connections, drops each one as soon as the backend closes it, and opens a
new one once the backend is back, so the requests that come after that find
working connections.  While the backend is away, requests fail fast (503) and the worker logs the
outage once, when the first request fails, and once more with the count of
failed requests when a request succeeds again: not a line per failed request.

It is configured by the environment: ``BACKEND_PORT`` (required),
``BACKEND_CAFILE`` (required: the certificate authority that signed the
backend's certificate), ``BACKEND_POOL_SIZE`` (4), ``BACKEND_KEEPALIVE``
(seconds between PINGs on an idle connection, 30) and ``BACKEND_WAIT``
(seconds to wait at import for every connection to open, 10; 0 not to wait).

The pool is made when this module is imported.  Without ``--preload`` that
happens in each worker.  With ``--preload`` it happens once, in the gunicorn
master, before it forks the workers: every worker inherits the master's open
connections, and geventconnpool never uses them there; each worker opens
connections of its own on its first request.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from typing import Callable, Iterable, List, Optional, Tuple
from urllib.parse import parse_qs

# gevent's socket and ssl modules, not the standard library's: with --preload
# this module is imported by the gunicorn master, before the gevent worker
# calls monkey.patch_all(), and the connections must be cooperative anyway.
from gevent import socket, ssl

from geventconnpool import ConnectionPool, PoolError, retry

logger = logging.getLogger("gunicorn_app")

StartResponse = Callable[[str, List[Tuple[str, str]]], object]
TOKEN = re.compile(r"[A-Za-z0-9_.-]{1,100}\Z")


class BackendConnection:
    """One TLS connection to the backend, speaking its line protocol."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.reader = sock.makefile("rb")

    def call(self, *words: object) -> str:
        """Send one command and return the reply line; raise an OSError if the connection broke."""
        self.sock.sendall(" ".join(map(str, words)).encode("ascii") + b"\n")
        line = self.reader.readline()
        if not line.endswith(b"\n"):
            raise ConnectionError("the backend closed the connection")
        return line[:-1].decode("ascii")

    def close(self) -> None:
        """Say goodbye to the backend and close the socket."""
        try:
            self.sock.sendall(f"QUIT {os.getpid()}\n".encode("ascii"))
        except OSError:
            pass
        finally:
            self.reader.close()
            self.sock.close()


class BackendPool(ConnectionPool[BackendConnection]):
    """TLS connections to the backend on 127.0.0.1, kept alive with PING when idle.

    The pool itself drops a connection the backend closes while it is idle (a
    restart, an idle timeout): it watches idle connections.  The PING is for
    what only a round trip can tell: a firewall or NAT between here and the
    backend that forgets an idle connection without a word.
    """

    def __init__(self, port: int, cafile: str, size: int = 4, keepalive: float = 30.0) -> None:
        self.address = ("127.0.0.1", port)
        # Verifies the certificate and the host name, like ssl.create_default_context(cafile=...),
        # but as a gevent SSLContext, whose sockets are cooperative even in the unpatched master.
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.context.load_verify_locations(cafile=cafile)
        super().__init__(
            size,
            (OSError,),  # ssl.SSLError and socket.timeout are OSErrors too
            keepalive,
            timeout=10.0,
            connect_timeout=5.0,
            fail_fast=True,  # answer 503 at once while the backend is down
            name="backend",
        )

    def _new_connection(self) -> BackendConnection:
        raw = socket.create_connection(self.address, timeout=5.0)
        try:
            conn = BackendConnection(self.context.wrap_socket(raw, server_hostname="localhost"))
        except BaseException:
            raw.close()
            raise
        try:
            reply = conn.call("HELLO", os.getpid())
            if not reply.startswith("HELLO "):
                raise ConnectionError(f"unexpected greeting from the backend: {reply!r}")
        except BaseException:
            conn.sock.close()
            raise
        return conn

    def _keepalive(self, c: BackendConnection) -> None:
        if c.call("PING", os.getpid()) != "PONG":
            raise ConnectionError("the backend did not answer PING with PONG")


class OutageLog:
    """Logs a run of failed requests in two lines, when it begins and when it ends, and counts them.

    A request that fails while the backend is away says nothing new: the
    first one of the run is logged, the others are only counted, and the
    first request that succeeds logs how long the run lasted and how many
    failed.  ``failed`` counts every failed request since the worker started.
    """

    def __init__(self) -> None:
        self.failed = 0
        self._run_started: Optional[float] = None  # time.monotonic() of the run's first failure
        self._run_failed = 0

    def failure(self, error: BaseException) -> None:
        """Count a failed request; log the first of a run."""
        self.failed += 1
        self._run_failed += 1
        if self._run_started is None:
            self._run_started = time.monotonic()
            logger.error("backend unavailable (%s); counting the failed requests until one succeeds", error)

    def success(self) -> None:
        """End the run of failures, if there is one, with a line saying how long and how many."""
        if self._run_started is not None:
            logger.warning(
                "backend back after %.1f s: %d requests failed meanwhile",
                time.monotonic() - self._run_started,
                self._run_failed,
            )
            self._run_started = None
            self._run_failed = 0


def make_pool() -> BackendPool:
    """The pool described by the environment (see the module's docstring)."""
    try:
        port = int(os.environ["BACKEND_PORT"])
        cafile = os.environ["BACKEND_CAFILE"]
    except (KeyError, ValueError) as error:
        raise RuntimeError("set BACKEND_PORT and BACKEND_CAFILE to the backend's port and CA file") from error
    pool = BackendPool(
        port,
        cafile,
        size=int(os.environ.get("BACKEND_POOL_SIZE", "4")),
        keepalive=float(os.environ.get("BACKEND_KEEPALIVE", "30")),
    )
    wait = float(os.environ.get("BACKEND_WAIT", "10"))
    if wait > 0:
        pool.wait(timeout=wait)  # fail at start-up, not on the first request, if the backend is away
    return pool


pool = make_pool()
outages = OutageLog()


# One more attempt on another connection when a connection breaks under a
# request: reset on the way, or closed by the backend in the very moment it was
# lent, which no watching can see coming (ECHO is idempotent, so it may run
# twice).  Stale idle connections need no retry: the pool drops them while idle.
# A PoolError (the backend is down) gives up at once: fail_fast said so.  The
# give-up line goes to DEBUG: a request that fails is counted by ``outages``,
# which logs the first one of an outage rather than each of them.
@retry(
    max_failures=1,
    giveup=lambda error: isinstance(error, PoolError),
    logger=logger,
    max_failure_log_level=logging.DEBUG,
)
def echo(token: str) -> str:
    """Ask the backend to echo ``token``; a connection that breaks under it is retried once on another."""
    with pool.get() as backend:
        return backend.call("ECHO", token, os.getpid())


def application(environ: dict[str, object], start_response: StartResponse) -> Iterable[bytes]:
    """The WSGI entry point."""
    path = environ.get("PATH_INFO", "/")
    if path == "/stats":
        stats = dict(dataclasses.asdict(pool.stats()), failed_requests=outages.failed, pid=os.getpid())
        return _respond(start_response, "200 OK", json.dumps(stats), "application/json")
    if path != "/":
        return _respond(start_response, "404 Not Found", "not found")
    token: Optional[str] = parse_qs(str(environ.get("QUERY_STRING", ""))).get("token", [None])[0]
    if token is None or not TOKEN.match(token):
        return _respond(start_response, "400 Bad Request", "give ?token= with letters, digits, _ . -")
    try:
        reply = echo(token)
    except PoolError as error:  # PoolTimeout, PoolUnavailable
        outages.failure(error)
        return _respond(start_response, "503 Service Unavailable", f"backend unavailable: {error}")
    except OSError as error:
        outages.failure(error)
        return _respond(start_response, "502 Bad Gateway", f"backend failed: {error!r}")
    outages.success()
    return _respond(start_response, "200 OK", reply)


def _respond(
    start_response: StartResponse, status: str, body: str, content_type: str = "text/plain"
) -> List[bytes]:
    data = body.encode("utf-8") + b"\n"
    start_response(
        status,
        [
            ("Content-Type", f"{content_type}; charset=utf-8"),
            ("Content-Length", str(len(data))),
            ("X-Worker-Pid", str(os.getpid())),
        ],
    )
    return [data]
