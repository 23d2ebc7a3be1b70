"""gunicorn settings of tests/metrics_app: gevent workers whose metrics leave with them."""

import sys

from prometheus_client import multiprocess

worker_class = "gevent"
control_socket_disable = True


def worker_exit(server, worker):
    """Close the worker's pool: its exporter stops and sets the worker's gauges to 0."""
    app = sys.modules.get("app")
    if app is not None:
        app.pool.close()


def child_exit(server, worker):
    """In the master: drop a dead worker's live gauges from the sums (multiprocess mode "livesum")."""
    multiprocess.mark_process_dead(worker.pid)


def post_worker_init(worker):
    """Say when a worker has loaded the application: it starts accepting right after."""
    worker.log.info("worker %s serves", worker.pid)
