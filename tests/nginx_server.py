"""Debian's nginx serving HTTPS with keep-alive on 127.0.0.1, run by the test, and a pool of its connections.

:class:`Nginx` writes a configuration, a certificate from a throwaway
certificate authority (trustme) and its key into a scratch directory, and runs
``nginx -p <dir> -c <dir>/nginx.conf`` in the foreground, one worker process.
Every connection may stay idle for an hour and carry 100000 requests; every
answer (``GET /`` answers ``ok``) says which connection and which worker
served it, in the headers ``X-Connection`` (nginx's ``$connection`` number,
which the access log records too) and ``X-Worker``.

:meth:`Nginx.reload` is ``nginx -s reload``: the master starts new workers
and tells the old ones to finish gracefully; an old worker closes its idle
keep-alive connections at once (the client reads EOF, 0.1 to 0.2 s after the
signal here) and exits.  That is the event a pool's idle connections must
survive.  (A connection that has not carried a request yet is not a keep-alive
one: nginx waits ``client_header_timeout``, 60 s, for its first request.)
:class:`HttpsPool` checks each new connection with one request, as a pool of
HTTP connections that were all used once would be::

    nginx = Nginx()
    nginx.start()
    with HttpsPool(nginx, 10) as pool:
        pool.wait()
        nginx.reload()  # every idle connection of the pool is now closed
        get(pool)       # today: fails on a closed connection
    nginx.cleanup()
"""

from __future__ import annotations

import os
import re
import shutil
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import trustme
from gevent import socket
from server_process import ServerProcess
from tls_server import client_context, tls_connect

from geventconnpool import ConnectionPool

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

CONFIG = """\
{user}worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format connections '$connection $connection_requests $pid $status "$request"';
    access_log {dir}/access.log connections;
    # Debian's build puts these under /var/lib/nginx: keep everything in the scratch directory.
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_timeout 3600s;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        location / {{
            default_type text/plain;
            add_header X-Connection $connection;
            add_header X-Worker $pid;
            return 200 "ok\\n";
        }}
    }}
}}
"""


def nginx_available() -> bool:
    """Whether the ``nginx`` program can be run here."""
    return os.access(NGINX, os.X_OK)


@dataclass(frozen=True)
class Response:
    """One HTTP response: its status, its headers (names in lower case) and its body."""

    status: int
    headers: Dict[str, str]
    body: bytes

    @property
    def connection(self) -> int:
        """nginx's number of the connection that carried it (``$connection``)."""
        return int(self.headers["x-connection"])

    @property
    def worker(self) -> int:
        """The pid of the nginx worker that served it."""
        return int(self.headers["x-worker"])


def https_get(sock: socket.socket, path: str = "/") -> Response:
    """Send ``GET path`` on a kept-alive connection and read the whole response.

    :raises ConnectionError: the server closed the connection before the response was whole.
    """
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += _recv(sock)
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    while len(body) < int(headers["content-length"]):
        body += _recv(sock)
    return Response(int(status_line.split()[1]), headers, body)


def _recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("nginx closed the connection")
    return chunk


def _children(pid: int) -> Set[int]:
    """The live (not zombie) child processes of ``pid``."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # it exited meanwhile
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]  # the name, in parentheses, may hold spaces
        if int(ppid) == pid and state != "Z":
            found.add(int(entry))
    return found


class Nginx(ServerProcess):
    """Debian's nginx with TLS on 127.0.0.1, from a configuration in its own scratch directory."""

    name = "nginx"

    def __init__(self, port: int = 0) -> None:
        super().__init__(port)
        self.ca = trustme.CA()
        certificate = self.ca.issue_cert("127.0.0.1", "localhost")
        certificate.cert_chain_pems[0].write_to_path(str(self.dir / "cert.pem"))
        certificate.private_key_pem.write_to_path(str(self.dir / "key.pem"))
        user = "user root;\n" if os.geteuid() == 0 else ""  # else the workers would run as nobody
        (self.dir / "nginx.conf").write_text(CONFIG.format(user=user, dir=self.dir, port=self.port))
        #: a client context that trusts nginx's certificate
        self.client_context = client_context(self.ca)

    def command(self, *args: str) -> List[str]:
        """``nginx`` with this server's files, followed by ``args`` (such as ``-s reload``)."""
        files = ["-p", str(self.dir), "-c", str(self.dir / "nginx.conf"), "-e", str(self.dir / "error.log")]
        return [NGINX, *files, *args]

    def ready(self) -> bool:
        """Whether a new connection gets ``200`` to ``GET /``."""
        try:
            with self.connect(timeout=2) as sock:
                return https_get(sock).status == 200
        except OSError:
            return False

    def reload(self, timeout: float = 10.0) -> None:
        """``nginx -s reload``; return once the old workers have exited and new ones serve.

        An old worker closes its idle keep-alive connections at once and exits:
        when this returns, every connection idle after a request at the reload
        is closed.  A connection that never carried a request is not idle to
        nginx: it keeps its old worker until ``client_header_timeout`` (60 s),
        so do not hold one across a reload.
        """
        old = self.workers()
        self.run(self.command("-s", "reload"), timeout)
        self.wait_until(
            lambda: not (self.workers() & old) and bool(self.workers()) and self.ready(),
            f"the old workers {sorted(old)} gone and new ones serving",
            timeout,
        )

    def workers(self) -> Set[int]:
        """The pids of nginx's worker processes running now (old ones too, during a reload)."""
        return _children(self._process.pid) if self._process is not None else set()

    def connect(self, timeout: Optional[float] = 5.0) -> ssl.SSLSocket:
        """Open a new HTTPS connection to nginx, handshake done."""
        return tls_connect(self.address, self.client_context, timeout)

    def access_log(self) -> List[Tuple[int, int, int]]:
        """(connection number, request number on it, worker pid) of each request logged so far."""
        entries = []
        for line in (self.dir / "access.log").read_text().splitlines():
            match = re.match(r"(\d+) (\d+) (\d+) ", line)
            if match:
                entries.append((int(match[1]), int(match[2]), int(match[3])))
        return entries


class HttpsPool(ConnectionPool[ssl.SSLSocket]):
    """A pool of kept-alive HTTPS connections to an :class:`Nginx`, each checked with one request when opened.

    That first request also makes the idle connection a keep-alive one, which
    nginx closes when it reloads (see :meth:`Nginx.reload`).
    """

    def __init__(self, nginx: Nginx, size: int, *args: object, **kwargs: object) -> None:
        self.nginx = nginx
        super().__init__(size, *args, **kwargs)  # type: ignore[arg-type]

    def _new_connection(self) -> ssl.SSLSocket:
        c = self.nginx.connect()
        try:
            self._keepalive(c)
        except BaseException:
            c.close()
            raise
        return c

    def _keepalive(self, c: ssl.SSLSocket) -> None:
        if https_get(c).status != 200:
            raise ConnectionError("nginx did not answer 200")


def get(pool: HttpsPool) -> Response:
    """``GET /`` on a pooled connection, with no retry."""
    with pool.get() as c:
        return https_get(c)
