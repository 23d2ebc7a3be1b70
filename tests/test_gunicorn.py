"""Real gunicorn with gevent workers serving examples/gunicorn_app, whose pool talks TLS to a local backend.

Each gunicorn test starts ``gunicorn -k gevent -w 2`` (with and without
``--preload``) as a subprocess, sends a few hundred HTTP requests from this
process, and reads what the backend (a TLS line server run here, in this
process) saw: which process opened each connection and which pid came with
each command on it.  They take seconds each, so they are ``slow`` tests, run
once by the tox env ``soak`` rather than under every Python.
"""

from __future__ import annotations

import collections
import http.client
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Set, Tuple

import gevent
import gevent.pool
import pytest
from gevent import socket, ssl
from helpers import LinePool, serving, starting_a_program, wait_until

import geventconnpool

requires_gunicorn = pytest.mark.skipif(
    importlib.util.find_spec("gunicorn") is None,
    reason="gunicorn is not installed (pip install -e '.[test]')",
)
requires_trustme = pytest.mark.skipif(
    importlib.util.find_spec("trustme") is None, reason="trustme is not installed (pip install -e '.[test]')"
)

APP_DIR = Path(__file__).resolve().parent.parent / "examples" / "gunicorn_app"
POOL_SIZE = 3
REQUESTS = 300
CONCURRENCY = 30
MAX_REQUESTS = 1500  # more batches only if one worker happened to take every request


def backend_module():
    """examples/gunicorn_app/backend.py, imported once (it needs trustme)."""
    name = "gunicorn_app_backend"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, APP_DIR / "backend.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture
def backend(tmp_path):
    """The example's TLS backend, served by this process on a free loopback port."""
    yield from serving(backend_module().Backend(cafile=str(tmp_path / "ca.pem")))


@pytest.fixture
def restart_backend(backend):
    """Stop ``backend`` and start a new one on its port with its --cafile, as the example's README says
    to restart it (``while_down()``, if given, runs in between); the new one is stopped when the test ends."""
    started = []

    def stop_and_start(while_down: Optional[Callable[[], object]] = None):
        backend.stop()
        if while_down is not None:
            while_down()
        again = backend_module().Backend(port=backend.port, cafile=backend.cafile)
        started.append(again)
        again.start()
        return again

    yield stop_and_start
    for server in started:
        server.stop()


class Gunicorn:
    """A real gunicorn master and its two gevent workers, in a process group of their own."""

    def __init__(self, backend, log_path: Path, preload: bool, keepalive: float) -> None:
        args = [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            str(APP_DIR / "gunicorn.conf.py"),
            "-k",
            "gevent",
            "-w",
            "2",
            # Port 0: the kernel picks a free port, which the master logs; no race
            # with other programs picking ports at the same time.
            "--bind",
            "127.0.0.1:0",
            "--chdir",
            str(APP_DIR),
            *(["--preload"] if preload else []),
            "app:application",
        ]
        env = dict(
            BACKEND_PORT=str(backend.port),
            BACKEND_CAFILE=backend.cafile,
            BACKEND_POOL_SIZE=str(POOL_SIZE),
            BACKEND_KEEPALIVE=str(keepalive),
        )
        self._start(args, env, log_path)

    def _start(self, args: List[str], env: Dict[str, str], log_path: Path) -> None:
        """Run ``args`` with ``env`` added to this process's, in a process group of its own, its output in
        ``log_path``."""
        package_root = str(Path(geventconnpool.__file__).resolve().parent.parent)
        env = dict(
            os.environ,
            **env,
            # The same geventconnpool as the tests import, whether installed or not.
            PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p),
        )
        self.log_path = log_path
        # Output to a file, not a pipe: nothing here has to keep reading it.
        with open(log_path, "wb") as log, starting_a_program():
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group, for kill()
            )
        self.port = 0

    @property
    def master_pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> List[int]:
        """The pid of every worker the master booted, in order."""
        return [int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", self.log())]

    def wait_ready(self) -> None:
        """Wait until the master listens and has booted both workers."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
            found = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", self.log())
            return found is not None and len(self.worker_pids()) == 2

        wait_until(ready, timeout=20, interval=0.05, message=lambda: f"gunicorn not ready:\n{self.log()}")
        self.port = int(re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", self.log()).group(1))

    def stop(self) -> int:
        """SIGTERM, the way a service manager stops gunicorn; return its exit status."""
        self.proc.send_signal(signal.SIGTERM)
        wait_until(
            lambda: self.proc.poll() is not None,
            timeout=20,
            interval=0.05,
            message=lambda: f"gunicorn still running 20 s after SIGTERM:\n{self.log()}",
        )
        return self.proc.returncode

    def kill(self) -> None:
        """Make sure nothing is left running (after a failure): SIGKILL the master's process group."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            wait_until(lambda: self.proc.poll() is not None, timeout=10, interval=0.05)


@pytest.fixture
def start_gunicorn(backend, tmp_path):
    """Start gunicorn in front of ``backend`` (its pools ping idle connections every ``keepalive`` seconds);
    whatever happens, it is gone when the test ends."""
    started: List[Gunicorn] = []

    def start(preload: bool, keepalive: float = 0.5) -> Gunicorn:
        server = Gunicorn(backend, tmp_path / "gunicorn.log", preload, keepalive)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.kill()


def http_get(port: int, path: str) -> Tuple[int, Optional[str], str]:
    """One HTTP/1.1 GET on a gevent socket (cooperative whether or not this process is patched)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(15)
        sock.connect(("127.0.0.1", port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        response = http.client.HTTPResponse(sock)
        try:
            response.begin()
            body = response.read().decode()
        finally:
            response.close()
    return response.status, response.getheader("X-Worker-Pid"), body


def send_requests(port: int, count: int) -> Dict[str, Tuple[int, Optional[str], str]]:
    """``count`` requests, ``CONCURRENCY`` at a time, each with a new token; the responses by token."""
    tokens = [uuid.uuid4().hex for _ in range(count)]
    workers = gevent.pool.Pool(CONCURRENCY)
    with gevent.Timeout(30, AssertionError(f"{count} requests did not finish within 30 s")):
        responses = workers.map(lambda token: http_get(port, f"/?token={token}"), tokens)
    return dict(zip(tokens, responses))


def commands_by_port(backend) -> Dict[int, List[Tuple[str, Optional[int]]]]:
    return {c.port: [(r.verb, r.pid) for r in c.commands] for c in backend.connections}


def assert_no_foreign_commands(backend) -> None:
    """Every command the backend received on a connection came from the process that opened it."""
    by_port = commands_by_port(backend)
    foreign = {
        c.port: by_port[c.port] for c in backend.connections if any(r.pid != c.opener for r in c.commands)
    }
    assert not foreign, f"connections used by another process than their opener: {foreign}"


@requires_gunicorn
@requires_trustme
@pytest.mark.slow
@pytest.mark.watchdog(60)
@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_each_gunicorn_worker_uses_only_its_own_connections(leak_check, backend, start_gunicorn, preload):
    """Under gunicorn -k gevent -w 2 every reply is right, each worker sends on its own connections only,
    the master's (--preload) are never used, and SIGTERM closes every connection."""
    server = start_gunicorn(preload)
    master = server.master_pid

    # Load: a few hundred requests; more only until both workers have answered some.
    responses: Dict[str, Tuple[int, Optional[str], str]] = {}
    while len(responses) < REQUESTS or (
        len({pid for _, pid, _ in responses.values()}) < 2 and len(responses) < MAX_REQUESTS
    ):
        responses.update(send_requests(server.port, 100 if responses else REQUESTS))

    workers = set(server.worker_pids())
    assert len(workers) == 2, f"a worker died and was replaced:\n{server.log()}"
    assert master not in workers
    wrong = {t: r for t, r in responses.items() if r[0] != 200 or r[2] != f"{t} {r[1]}\n"}
    assert not wrong, f"{len(wrong)} wrong responses, e.g. {next(iter(wrong.items()))}"
    answered_by = {int(pid) for _, pid, _ in responses.values()}
    assert answered_by == workers, "both workers should have answered requests"

    # The backend saw each request once, with the pid of the worker that answered it.
    echoes = [r for r in backend.requests if r.verb == "ECHO"]
    assert collections.Counter(r.token for r in echoes) == collections.Counter(responses.keys())
    assert all(r.pid == int(responses[r.token][1]) for r in echoes)

    # Each worker pings its own idle connections: wait until both have, so that
    # the checks below also cover the keepalive.
    def pinged_by() -> Set[Optional[int]]:
        return {r.pid for r in backend.requests if r.verb == "PING"}

    wait_until(lambda: workers <= pinged_by(), timeout=10, message=lambda: f"PINGs from {pinged_by()}")

    assert_no_foreign_commands(backend)
    # The client ports each worker sent requests from: disjoint.
    ports = {pid: {r.port for r in backend.requests if r.pid == pid} for pid in workers}
    first, second = (ports[pid] for pid in sorted(workers))
    assert first and second
    assert not first & second, f"ports used by both workers: {first & second}"
    # Each worker opened its pool once, and nothing had to be replaced.
    openers = collections.Counter(c.opener for c in backend.connections)
    assert {pid: openers[pid] for pid in workers} == {pid: POOL_SIZE for pid in workers}, openers

    master_conns = [c for c in backend.connections if c.opener == master]
    if preload:
        # The master filled its pool at import, before fork; every worker inherited
        # those sockets, and none of them ever sent anything on one (checked above,
        # by pid): no request went over them, and they are still open.
        assert len(master_conns) == POOL_SIZE
        assert not [r for c in master_conns for r in c.commands if r.verb == "ECHO"]
        assert not {c.port for c in master_conns} & (first | second)
        assert all(c in backend.open_connections for c in master_conns), "the master's connections stay open"
    else:
        assert master_conns == [], "without --preload the master never imports the app"

    # SIGTERM: the workers close their pools (gunicorn.conf.py's worker_exit) and
    # every process exits, so no connection to the backend is left open.
    assert server.stop() == 0, server.log()
    wait_until(
        lambda: not backend.open_connections,
        timeout=10,
        message=lambda: f"still open after gunicorn stopped: {[c.port for c in backend.open_connections]}",
    )
    assert_no_foreign_commands(backend)
    # Each worker's pool said goodbye (QUIT) on its own connections; the master's
    # were simply closed when the master exited: no worker sent QUIT on them.
    endings = [(c.port, c.opener, c.ended) for c in backend.connections]
    assert endings == [(port, opener, "EOF" if opener == master else "QUIT") for port, opener, _ in endings]
    assert "Traceback" not in server.log(), server.log()


class Answer(NamedTuple):
    """One request of a load: when it was sent (time.monotonic()), its status, whether its reply was right."""

    sent: float
    status: int
    right: bool


class Load:
    """``CONCURRENCY`` greenlets sending requests to gunicorn until stopped, or 60 s, or 20,000 requests."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answers: List[Answer] = []
        self._deadline = time.monotonic() + 60
        self._senders = gevent.pool.Group()
        for _ in range(CONCURRENCY):
            self._senders.spawn(self._send)

    def _send(self) -> None:
        while time.monotonic() < self._deadline and len(self.answers) < 20_000:
            token = uuid.uuid4().hex
            sent = time.monotonic()
            status, pid, body = http_get(self.port, f"/?token={token}")
            self.answers.append(Answer(sent, status, status == 200 and body == f"{token} {pid}\n"))

    def failed(self, since: float = 0.0) -> List[Answer]:
        """The requests sent at ``since`` or later that got no right answer."""
        return [a for a in self.answers if a.sent >= since and not a.right]

    def succeeded(self, since: float) -> List[Answer]:
        """The requests sent at ``since`` or later that got a right answer."""
        return [a for a in self.answers if a.sent >= since and a.right]

    def stop(self) -> None:
        self._senders.kill()


@requires_gunicorn
@requires_trustme
@pytest.mark.slow
@pytest.mark.watchdog(90)
def test_requests_succeed_within_2_s_of_a_backend_restart_under_load(
    leak_check, restart_backend, start_gunicorn
):
    """The backend restarted under load as the example's README says: requests succeed again within 2 s of
    its return, and each worker logs the outage in one line and its end in another, with the count of the
    requests that failed, instead of a line per failed request."""
    server = start_gunicorn(preload=False)
    load = Load(server.port)
    try:
        wait_until(lambda: len(load.answers) >= 100, timeout=10, message=lambda: f"{len(load.answers)} sent")
        assert load.failed() == [], load.failed()[:3]

        def outage_seen_by_clients() -> None:
            wait_until(lambda: len(load.failed()) >= 50, timeout=10, message=lambda: "no request failed")

        restart_backend(while_down=outage_seen_by_clients)
        back = time.monotonic()
        wait_until(
            lambda: load.succeeded(since=back),
            timeout=2,
            message=lambda: f"{len(load.failed(since=back))} failed since the restart:\n{server.log()}",
        )
        # And they go on succeeding: the last 100 of the next 300 requests all do.
        wait_until(lambda: len(load.answers) >= 300 + len(load.failed()), timeout=10)
        load.stop()
        assert [a for a in load.answers[-100:] if not a.right] == [], server.log()
    finally:
        load.stop()

    log = server.log()
    began = re.findall(r"^backend unavailable .*$", log, re.M)
    ended = [int(n) for n in re.findall(r"^backend back after .*: (\d+) requests failed", log, re.M)]
    assert 1 <= len(began) <= 2, log  # once in each worker that saw the outage
    assert len(ended) == len(began), log
    assert sum(ended) == len(load.failed()), log
    assert server.stop() == 0, log


def connections_by_worker(backend) -> Dict[Optional[int], int]:
    """How many connections to ``backend`` each process holds open, by the pid it announced."""
    return dict(collections.Counter(c.opener for c in backend.open_connections))


def pool_stats_by_worker(port: int, workers: Set[int]) -> Dict[int, Dict[str, int]]:
    """Each worker's ``/stats``, asked ``CONCURRENCY`` at a time until every worker has answered."""
    reports: Dict[int, Dict[str, int]] = {}

    def every_worker_answered() -> bool:
        asking = gevent.pool.Pool(CONCURRENCY)
        for status, pid, body in asking.map(lambda _: http_get(port, "/stats"), range(CONCURRENCY)):
            assert status == 200, body
            reports[int(pid)] = json.loads(body)
        return set(reports) >= workers

    wait_until(every_worker_answered, timeout=10, interval=0.01, message=lambda: f"answered: {set(reports)}")
    return reports


@requires_gunicorn
@requires_trustme
@pytest.mark.slow
@pytest.mark.watchdog(60)
def test_a_quiet_backend_restart_fails_no_request(leak_check, backend, restart_backend, start_gunicorn):
    """The backend restarted while no request is in flight and both workers' pools hold only idle
    connections: each worker replaces the connections the backend closed by itself (closed_while_idle in
    its /stats, one log line), and every request that comes after that answers 200, with no outage."""
    # A keepalive of a minute: no PING finds the closed connections, the watching of idle ones must.
    server = start_gunicorn(preload=False, keepalive=60)
    workers = set(server.worker_pids())
    responses = send_requests(server.port, 100)
    assert all(status == 200 for status, _, _ in responses.values()), server.log()
    wait_until(
        lambda: connections_by_worker(backend) == {pid: POOL_SIZE for pid in workers},
        timeout=10,
        message=lambda: f"connections by worker: {connections_by_worker(backend)}\n{server.log()}",
    )

    restart_backend()

    def replaced_by_every_worker() -> bool:
        stats = pool_stats_by_worker(server.port, workers)
        return all(stats[pid]["closed_while_idle"] == stats[pid]["idle"] == POOL_SIZE for pid in workers)

    wait_until(replaced_by_every_worker, timeout=10, interval=0.01, message=server.log)
    responses = send_requests(server.port, REQUESTS)

    wrong = {t: r for t, r in responses.items() if r[0] != 200 or r[2] != f"{t} {r[1]}\n"}
    assert not wrong, f"{len(wrong)} wrong responses, e.g. {next(iter(wrong.items()))}\n{server.log()}"

    def dropped() -> List[int]:
        return [int(n) for n in re.findall(r"dropped (\d+) idle connections? that the remote", server.log())]

    # One log line per worker, or more if the closures came in more than one burst.
    wait_until(lambda: sum(dropped()) == len(workers) * POOL_SIZE, timeout=5, message=server.log)
    assert "backend unavailable" not in server.log(), server.log()
    assert server.stop() == 0, server.log()


def tls_handshake_with(cafile: str, port: int) -> str:
    """Connect to the backend on ``port`` trusting ``cafile``, as the app's pool does; its HELLO reply."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=cafile)
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with raw, context.wrap_socket(raw, server_hostname="localhost") as sock:
        sock.sendall(f"HELLO {os.getpid()}\n".encode())
        return sock.makefile("rb").readline().decode().strip()


@requires_trustme
def test_a_restarted_backend_keeps_the_certificate_authority_its_clients_loaded(
    tmp_path, backend, restart_backend
):
    """The backend restarted with the same --cafile is signed by the same CA, so a client that read the
    CA file before the restart (the app reads it at import) still verifies the new certificate."""
    read_before = tmp_path / "read-before-the-restart.pem"
    read_before.write_bytes(Path(backend.cafile).read_bytes())
    assert tls_handshake_with(str(read_before), backend.port).startswith("HELLO ")

    again = restart_backend()

    assert again.port == backend.port
    assert tls_handshake_with(str(read_before), again.port).startswith("HELLO ")


class GoodbyePool(LinePool):
    """A LinePool whose connections say QUIT before they close, like the example's BackendConnection."""

    def _close_connection(self, c: socket.socket) -> None:
        try:
            c.sendall(b"QUIT\n")
        finally:
            c.close()


def test_close_interrupted_by_gunicorns_quick_exit_still_closes_idle_connections(line_server, leak_check):
    """A close() interrupted by SystemExit from another greenlet, as in a gunicorn worker stopped with
    Ctrl-C, still closes every idle connection through _close_connection (the backend sees each QUIT)."""
    # On SIGINT or SIGQUIT gunicorn's gevent worker spawns a greenlet that ends in
    # sys.exit(0); gevent raises that SystemExit in the main greenlet, wherever it
    # waits: with Ctrl-C each worker gets two signals, and the second SystemExit
    # lands inside pool.close() called from worker_exit.  keepalive= gives the pool
    # a background greenlet, so that close() has to wait for it to end.
    pool = GoodbyePool(line_server, 2, keepalive=10)
    try:
        pool.wait(timeout=5)
        gevent.spawn(sys.exit, 0)
        with pytest.raises(SystemExit):
            pool.close()
        pool.close()  # and calling it again does not help
        quits = lambda: line_server.commands.count(b"QUIT\n")  # noqa: E731
        wait_until(lambda: quits() == 2, timeout=2, message=lambda: f"QUIT received {quits()} times, not 2")
    finally:
        pool.close()
    leak_check()
