"""A pool of verified HTTPS connections to a REST API, with http.client.HTTPSConnection.

Run it as a script; it needs the ``trustme`` package (``pip install trustme``)::

    python examples/https_rest.py

It makes a throwaway certificate authority at run time, starts a small JSON
REST server on 127.0.0.1 with a certificate from it, and runs a pool of
:class:`http.client.HTTPSConnection` against it.  Each connection does its TCP
and TLS handshakes once, in ``_new_connection``, and then serves many requests
(HTTP/1.1 keep-alive).  The certificate is verified: a client that does not
trust the throwaway CA is refused.

The server then restarts while the three connections are idle.  The pool
watches each idle connection's socket (an ``HTTPSConnection`` keeps it in
``sock``), drops the ones the server closed as soon as that happens, and
opens new ones: the requests that follow the restart all succeed, without
any retry or any check before lending.  The same holds for connections the
server closes after its keep-alive timeout.
"""

# http.client and ssl are blocking stdlib modules: patch them first, the way
# gunicorn's gevent worker does, so that they cooperate with gevent.
from gevent import monkey

monkey.patch_all()

import http.client  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import sys  # noqa: E402
from typing import Any, Callable, Dict, Iterable, List, Optional, Set  # noqa: E402

import gevent  # noqa: E402
import trustme  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

from geventconnpool import ConnectionPool  # noqa: E402

HOST = "127.0.0.1"

# -- the remote end: a tiny JSON REST API --------------------------------------

USERS: Dict[int, Dict[str, Any]] = {1: {"id": 1, "name": "Ada"}, 2: {"id": 2, "name": "Grace"}}
CLIENT_PORTS: Set[str] = set()  # one per TCP connection the server saw


def rest_app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    CLIENT_PORTS.add(environ["REMOTE_PORT"])
    method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
    status, body = "404 Not Found", {"error": "no such resource"}
    if method == "GET" and path.startswith("/users/") and path[7:].isdigit():
        user = USERS.get(int(path[7:]))
        if user is not None:
            status, body = "200 OK", user
    elif method == "POST" and path == "/users":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        user = json.loads(environ["wsgi.input"].read(length))
        user["id"] = max(USERS) + 1
        USERS[user["id"]] = user
        status, body = "201 Created", user
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


class RestServer(WSGIServer):
    """gevent's WSGI server, reporting refused TLS handshakes in one line instead of a traceback."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections: Set[Any] = set()

    def handle(self, sock: Any, address: Any) -> None:
        if self.closed:
            return  # accepted just before the server stopped: closed unanswered, like the others
        self.connections.add(sock)
        try:
            super().handle(sock, address)
        finally:
            self.connections.discard(sock)

    def exit(self) -> None:
        """Stop listening and close every connection, as the server's process does when it exits."""
        self.stop()
        for sock in list(self.connections):
            sock.shutdown(socket.SHUT_RDWR)

    def wrap_socket_and_handle(self, client_socket: Any, address: Any) -> Any:
        try:
            return super().wrap_socket_and_handle(client_socket, address)
        except ssl.SSLError as error:
            print(f"server: TLS handshake refused by the client: {error.reason}")
            return None


# -- the client: a pool of HTTPS connections ------------------------------------


class ApiPool(ConnectionPool[http.client.HTTPSConnection]):
    """Open HTTPS connections to one API host, each verified and handshaken before it is lent."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, size: int) -> None:
        self.host, self.port, self.context = host, port, context
        # http.client raises HTTPException subclasses (RemoteDisconnected is also
        # an OSError) when a connection breaks mid-exchange: discard on both.
        super().__init__(size, exc_classes=(OSError, http.client.HTTPException), name="api")

    def _new_connection(self) -> http.client.HTTPSConnection:
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=10)
        conn.connect()  # TCP and TLS handshakes now, not during the first request
        return conn


class ApiError(Exception):
    """The API answered with an error status; the connection itself is fine."""


def call(pool: ApiPool, method: str, path: str, body: Optional[Dict[str, Any]] = None) -> Any:
    """One request on a pooled connection; the response is read in full so the connection can be reused."""
    with pool.get() as conn:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        response = conn.getresponse()
        data = response.read()
    if response.status >= 400:
        raise ApiError(f"{method} {path}: {response.status} {data.decode()}")
    return json.loads(data)


def get_user(pool: ApiPool, user_id: int) -> Any:
    """Fetch a user."""
    return call(pool, "GET", f"/users/{user_id}")


def start_server(port: int, context: ssl.SSLContext) -> RestServer:
    """The REST API on ``HOST:port`` (0 for a free port), with TLS."""
    server = RestServer((HOST, port), rest_app, ssl_context=context, log=None, error_log=None)
    server.start()
    return server


def main() -> int:
    ca = trustme.CA()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(HOST).configure_cert(server_context)
    server = start_server(0, server_context)
    port = server.address[1]
    print(f"HTTPS server listening on {HOST}:{port}, certificate from a throwaway CA")

    untrusting = ssl.create_default_context()  # the system CAs only
    try:
        http.client.HTTPSConnection(HOST, port, context=untrusting, timeout=10).connect()
    except ssl.SSLCertVerificationError as error:
        print(f"without the CA, the certificate is refused: {error.verify_message}")
        gevent.sleep(0.1)  # let the server greenlet report its side
    else:
        print("FAILED: an unverified certificate was accepted")
        return 1

    context = ssl.create_default_context()  # verifies the certificate and the host name
    ca.configure_trust(context)  # in real life: ssl.create_default_context(cafile=...) or the system CAs
    with ApiPool(HOST, port, context, size=3) as pool:
        pool.wait(timeout=10)
        print(f"pool ready: {pool.stats().idle} verified TLS connections")

        jobs = [gevent.spawn(get_user, pool, 1 + i % 2) for i in range(20)]
        gevent.joinall(jobs, timeout=20, raise_error=True)
        names: List[str] = sorted({job.value["name"] for job in jobs})
        print(f"20 GET requests from 20 greenlets: users {names}")

        created = call(pool, "POST", "/users", {"name": "Barbara"})
        print(f"POST /users created {created}")
        try:
            call(pool, "GET", "/users/99")
        except ApiError as error:
            print(f"an API error leaves the connection in the pool: {error}")

        before = pool.stats()
        print(
            f"{before.checkouts} requests over {len(CLIENT_PORTS)} TCP connections "
            f"(opened={before.opened}, discarded={before.discarded})"
        )
        if (before.opened, len(CLIENT_PORTS)) != (3, 3):
            print(f"FAILED: expected 3 connections, saw {(before.opened, len(CLIENT_PORTS))}")
            return 1

        server.exit()
        gevent.sleep(0.2)  # the server takes a moment to come back; meanwhile the pool drops its connections
        server = start_server(port, server_context)

        def request_succeeds(user_id: int) -> bool:
            """One GET, without retry: does it get its user?"""
            try:
                return bool(get_user(pool, user_id)["id"] == user_id)
            except (OSError, http.client.HTTPException, ApiError):
                return False

        jobs = [gevent.spawn(request_succeeds, 1 + i % 2) for i in range(20)]
        gevent.joinall(jobs, timeout=20)
        failed = sum(1 for job in jobs if job.value is not True)
        pool.wait(timeout=10)
        after = pool.stats()
        replaced = after.opened - before.opened
        print(
            f"the server restarted while the pool's {before.size} connections were idle: "
            f"{len(jobs)} requests, {failed} failed; "
            f"the pool replaced {replaced} connections the server closed "
            f"(closed_while_idle={after.closed_while_idle})"
        )
    server.exit()
    if failed:
        print("FAILED: requests failed after the restart")
        return 1
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
