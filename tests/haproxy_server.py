"""Debian's haproxy in TCP mode on 127.0.0.1, in front of a real server, cutting idle client connections.

:class:`HAProxy` writes its configuration into a scratch directory and runs
``haproxy -db -f <dir>/haproxy.cfg`` in the foreground.  With
``timeout client`` (2 s by default) a client connection that carries no byte
for that long is closed by haproxy (the client reads EOF, 2.0 s after its last
byte here), together with haproxy's own connection to the server: what a load
balancer does to a pool's idle connections::

    redis = RedisServer()
    redis.start()
    haproxy = HAProxy(redis.address)
    haproxy.start()
    with RedisPool(haproxy.address, 10) as pool:
        pool.wait()
        ...  # idle past 2 s: haproxy has closed all ten
    haproxy.cleanup()
    redis.cleanup()
"""

from __future__ import annotations

import os
import shutil
from typing import List, Tuple

from gevent import socket
from server_process import ServerProcess

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

# In TCP mode haproxy closes a connection when the side whose timeout expires
# has been silent that long; `timeout server` is longer so that the cut is
# always the client's timeout.
CONFIG = """\
global
    maxconn 256
defaults
    mode tcp
    timeout connect 2s
    timeout client {timeout_client_ms}ms
    timeout server {timeout_server_ms}ms
frontend clients
    bind 127.0.0.1:{port}
    default_backend upstream
backend upstream
    server upstream {upstream_host}:{upstream_port}
"""


def haproxy_available() -> bool:
    """Whether the ``haproxy`` program can be run here."""
    return os.access(HAPROXY, os.X_OK)


class HAProxy(ServerProcess):
    """Debian's haproxy forwarding 127.0.0.1:``port`` to ``upstream`` in TCP mode.

    :param timeout_client: seconds a client connection may stay silent before
        haproxy closes it (``timeout client``).
    """

    name = "haproxy"

    def __init__(self, upstream: Tuple[str, int], timeout_client: float = 2.0, port: int = 0) -> None:
        super().__init__(port)
        self.upstream = upstream
        self.timeout_client = timeout_client
        self.config = self.dir / "haproxy.cfg"
        self.config.write_text(
            CONFIG.format(
                timeout_client_ms=round(timeout_client * 1000),
                timeout_server_ms=round(max(60, 10 * timeout_client) * 1000),
                port=self.port,
                upstream_host=upstream[0],
                upstream_port=upstream[1],
            )
        )

    def command(self) -> List[str]:
        """haproxy in the foreground (``-db``) with this configuration."""
        return [HAPROXY, "-db", "-f", str(self.config)]

    def ready(self) -> bool:
        """Whether haproxy accepts connections."""
        try:
            socket.create_connection(self.address, timeout=1).close()
            return True
        except OSError:
            return False
