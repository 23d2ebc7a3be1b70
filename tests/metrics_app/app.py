"""The WSGI application of tests/test_gunicorn_metrics.py: a pool per gunicorn worker, exported to Prometheus.

``PROMETHEUS_MULTIPROC_DIR`` is set, so ``prometheus_client`` is in multiprocess
mode: each worker writes its figures to files there, and ``/metrics`` (served
by whichever worker gets the request) sums them over the live workers.  Any
other path sends ``ECHO <pid>`` on a pooled connection to the test's line
server (``LINE_PORT``), which holds the reply back while the test wants the
connection in use, and answers with the reply.
"""

import os

from gevent import socket
from helpers import recv_line  # tests/helpers.py: gunicorn runs with --pythonpath tests
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from geventconnpool import ConnectionPool, prometheus


class LinePool(ConnectionPool):
    def _new_connection(self):
        return socket.create_connection(("127.0.0.1", int(os.environ["LINE_PORT"])), timeout=10)


pool = LinePool(int(os.environ["POOL_SIZE"]), name="backend")
prometheus.instrument(pool)


def application(environ, start_response):
    if environ["PATH_INFO"] == "/metrics":
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
        return [generate_latest(registry)]
    with pool.get() as c:
        c.sendall(f"ECHO {os.getpid()}\n".encode())
        reply = recv_line(c) + b"\n"
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [reply]
