"""geventconnpool.prometheus under a real ``gunicorn -k gevent -w 2``, prometheus_client in multiprocess mode.

The application (tests/metrics_app) keeps a pool per worker, exported with
``PROMETHEUS_MULTIPROC_DIR`` set; its requests hold a connection to this
process's line server, which holds the replies back.  The test scrapes
``/metrics`` over HTTP: the in-use gauge is the sum over both workers.  It
takes seconds, so it is a ``slow`` test, run by the tox env ``soak``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Dict, List, Set

import gevent
import pytest
from helpers import wait_until
from test_gunicorn import Gunicorn, http_get, requires_gunicorn

pytest.importorskip("prometheus_client", reason="pip install prometheus_client to run this test")
from prometheus_client.parser import text_string_to_metric_families

APP_DIR = Path(__file__).resolve().parent / "metrics_app"
# Each worker serves about this many requests at once, then stops accepting (gevent may take one more):
# held requests fill the first worker to accept, and the next ones go to the other.
WORKER_CONNECTIONS = 4
POOL_SIZE = 12  # per worker: more than it may hold, so that no held request waits for a connection
MAX_HELD = 10


class MetricsGunicorn(Gunicorn):
    """gunicorn with two gevent workers serving tests/metrics_app, in a process group of its own."""

    def __init__(self, line_port: int, multiproc_dir: Path, log_path: Path) -> None:
        args = [sys.executable, "-m", "gunicorn", "-c", str(APP_DIR / "gunicorn.conf.py")]
        args += ["-k", "gevent", "-w", "2", "--worker-connections", str(WORKER_CONNECTIONS)]
        args += ["--bind", "127.0.0.1:0", "--chdir", str(APP_DIR), "--pythonpath", str(APP_DIR.parent)]
        env = dict(
            LINE_PORT=str(line_port),
            POOL_SIZE=str(POOL_SIZE),
            PROMETHEUS_MULTIPROC_DIR=str(multiproc_dir),
        )
        self._start([*args, "app:application"], env, log_path)

    def wait_ready(self) -> None:
        """Wait until the master listens and both workers loaded the application (see post_worker_init)."""
        listening = r"Listening at: http://127\.0\.0\.1:(\d+)"

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
            serving = re.findall(r"worker (\d+) serves", self.log())
            return re.search(listening, self.log()) is not None and len(serving) == 2

        wait_until(ready, timeout=20, interval=0.05, message=lambda: f"gunicorn not ready:\n{self.log()}")
        self.port = int(re.search(listening, self.log()).group(1))


def scrape(port: int) -> Dict[str, float]:
    """GET /metrics; the samples of the pool named "backend", by name and state: {"name state": value}."""
    status, _, body = http_get(port, "/metrics")
    assert status == 200, body
    found: Dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.labels.get("pool") == "backend":
                found[f"{sample.name} {sample.labels.get('state', '')}".strip()] = sample.value
    return found


@requires_gunicorn
@pytest.mark.slow
@pytest.mark.watchdog(90)
def test_the_in_use_gauge_sums_the_connections_held_in_both_workers(line_server, tmp_path):
    """With requests held open in both workers, /metrics shows as many connections in use as requests held,
    the pools' sizes summed, and nobody waiting; once the replies go, none in use."""
    multiproc_dir = tmp_path / "prometheus"
    multiproc_dir.mkdir()
    server = MetricsGunicorn(line_server.port, multiproc_dir, tmp_path / "gunicorn.log")
    try:
        server.wait_ready()
        line_server.stalled.clear()  # the line server holds every reply back
        held: List[gevent.Greenlet] = []
        pids: Set[bytes] = set()
        while len(pids) < 2 and len(held) < MAX_HELD:
            held.append(gevent.spawn(http_get, server.port, "/hold"))
            wait_until(
                lambda: len(line_server.commands) == len(held),
                timeout=10,
                message=lambda: (
                    f"{len(held)} requests held, the line server saw {line_server.commands}\n" + server.log()
                ),
            )
            pids = {line.split()[1] for line in line_server.commands}
        assert len(pids) == 2, f"one worker took all {len(held)} requests: {server.log()}"

        def shows(used: int):
            def check() -> bool:
                figures = scrape(server.port)
                return figures.get("geventconnpool_connection_count used") == used

            return check

        wait_until(shows(len(held)), timeout=10, message=lambda: f"{scrape(server.port)}")
        figures = scrape(server.port)
        assert figures["geventconnpool_connection_max"] == 2 * POOL_SIZE
        assert figures["geventconnpool_connection_pending_requests"] == 0
        assert figures["geventconnpool_connection_opened_total"] == 2 * POOL_SIZE

        line_server.stalled.set()
        for greenlet in held:
            status, _, body = greenlet.get(timeout=10)
            assert status == 200 and body.strip().isdigit(), body
        wait_until(shows(0), timeout=10, message=lambda: f"{scrape(server.port)}")
        assert scrape(server.port)["geventconnpool_connection_checkouts_total"] == len(held)
    finally:
        line_server.stalled.set()
        server.kill()
