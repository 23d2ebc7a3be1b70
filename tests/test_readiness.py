"""wait(min_open=...) and last_connect_error: is the pool ready, and if not, why not."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, List

import gevent
import greenlet
import pytest
from docs_blocks import ROOT, find_blocks
from doubles import FastLinePool
from gevent import socket
from helpers import LineServer, request, starting_a_program, wait_until
from test_connecting import HandshakePool
from test_gunicorn import http_get, requires_gunicorn

import geventconnpool
from geventconnpool import PoolClosed, PoolTimeout


class SlowAcceptor:
    """A line server whose accept the test controls: a client's connect completes in the kernel's
    backlog, but nothing answers it until the test accepts it with :meth:`accept_one`."""

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.lines = LineServer(self.listener.getsockname()[1])  # not started: its protocol only
        self.handlers: List[Any] = []

    def accept_one(self) -> None:
        """Accept the oldest pending connection, and answer it from now on."""
        sock, address = self.listener.accept()
        self.handlers.append(gevent.spawn(self.lines._handle, sock, address))

    def close(self) -> None:
        self.listener.close()
        self.lines.stop()
        gevent.joinall(self.handlers, timeout=5)


@pytest.fixture
def acceptor():
    server = SlowAcceptor()
    try:
        yield server
    finally:
        server.close()


def test_each_wait_returns_when_the_connect_that_completes_its_count_does(acceptor, leak_check):
    """wait(min_open=1) returns once one connection is open, the others still connecting; wait(min_open=2)
    and wait() each return once their count is open, and not before."""
    with HandshakePool(acceptor.lines, 3, name="slow") as pool:
        waiters = {n: gevent.spawn(pool.wait, timeout=10, min_open=n) for n in (1, 2)}
        waiters[3] = gevent.spawn(pool.wait, timeout=10)
        gevent.idle()  # every caller blocked in wait(), every connect in its handshake
        assert not any(waiter.ready() for waiter in waiters.values())
        for opened in (1, 2, 3):
            acceptor.accept_one()
            wait_until(lambda: waiters[opened].ready())  # noqa: B023 (used at once)
            assert waiters[opened].get() is None
            s = pool.stats()
            assert (s.opened, s.connecting) == (opened, 3 - opened)
            assert all(not waiters[n].ready() for n in range(opened + 1, 4))
        assert request(pool, b"PING") == b"PONG"
        pool.wait(timeout=0, min_open=3)  # ready already: returns at once
    leak_check()


def test_a_waiting_caller_is_not_run_until_the_connect(acceptor, leak_check):
    """wait() does not poll: while no connection opens, the hub never switches to the waiting caller."""
    switched_to: List[Any] = []

    def trace(event: str, args: Any) -> None:
        if event == "switch" and args[1] is waiter:
            switched_to.append(args[1])

    with HandshakePool(acceptor.lines, 1) as pool:
        waiter = gevent.spawn(pool.wait, timeout=10)
        gevent.idle()  # the caller blocked in wait(), the connect in its handshake
        previous = greenlet.settrace(trace)
        try:
            gevent.sleep(0.05)  # five rounds of the 10 ms poll of 1.0
            assert switched_to == []
            acceptor.accept_one()
            waiter.get(timeout=5)
        finally:
            greenlet.settrace(previous)
        assert len(switched_to) == 1  # woken once, by the connect
    leak_check()


def test_wait_times_out_naming_the_last_connect_error(line_server, leak_check):
    """Against a refused port, wait(min_open=1) raises PoolTimeout naming the pool, the count and the last
    connect error (its __cause__ too), which last_connect_error also gives, until a connect succeeds."""
    line_server.stop()  # its port refuses connections
    with FastLinePool(line_server, 2, name="refused") as pool:
        assert pool.last_connect_error is None
        with pytest.raises(PoolTimeout) as info:
            pool.wait(timeout=0.2, min_open=1)
        message = str(info.value)
        assert "pool 'refused' did not open 1 of its 2 connections within 0.2 s" in message
        assert "last connect error: ConnectionRefusedError" in message
        assert isinstance(info.value.__cause__, ConnectionRefusedError)
        assert isinstance(pool.last_connect_error, ConnectionRefusedError)
        assert pool.stats().timeouts == 0  # get()'s timeouts only
        line_server.start()  # the same port
        pool.wait(timeout=5)
        assert pool.last_connect_error is None
        with pytest.raises(AttributeError):
            pool.last_connect_error = None  # type: ignore[misc]
    line_server.stop()  # its listener is a new socket since the test began
    leak_check()


def test_closing_the_pool_wakes_its_waiting_callers_with_pool_closed(acceptor, leak_check):
    """close() wakes every caller blocked in wait() with PoolClosed; wait() on a closed pool raises it."""
    pool = HandshakePool(acceptor.lines, 2, name="closing")
    waiters = [gevent.spawn(pool.wait), gevent.spawn(pool.wait, timeout=10, min_open=1)]
    gevent.idle()  # both blocked in wait()
    pool.close()
    for waiter in waiters:
        with pytest.raises(PoolClosed, match="'closing'"):
            waiter.get(timeout=5)
    with pytest.raises(PoolClosed):
        pool.wait(min_open=1)
    leak_check()


def test_a_wait_interrupted_by_the_callers_timeout_leaves_nothing_behind(acceptor, leak_check):
    """A caller's own gevent.Timeout ends wait(); the pool goes on, and a later wait() is served."""
    with HandshakePool(acceptor.lines, 1) as pool:
        with pytest.raises(gevent.Timeout), gevent.Timeout(0.01):
            pool.wait()
        acceptor.accept_one()
        pool.wait(timeout=5)
    leak_check()


GUNICORN_APP = """
import os

from gevent import socket
from geventconnpool import ConnectionPool


class LinePool(ConnectionPool):
    def _new_connection(self):
        return socket.create_connection(("127.0.0.1", int(os.environ["LINE_PORT"])), timeout=5)


pool = LinePool(2, name="app")


def application(environ, start_response):
    s = pool.stats()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"opened={s.opened} checkouts={s.checkouts}".encode()]
"""


def documented_gunicorn_conf() -> str:
    """The gunicorn.conf.py block of docs/production.rst, as a reader copies it."""
    (block,) = [b for b in find_blocks(ROOT / "docs" / "production.rst") if "def post_worker_init" in b.code]
    return block.code


@requires_gunicorn
@pytest.mark.slow
@pytest.mark.watchdog(60)
def test_the_documented_gunicorn_hook_opens_connections_before_requests(line_server, tmp_path, leak_check):
    """Under ``gunicorn --preload -k gevent -w 2``, the production guide's post_worker_init hook has each
    worker open its connections before it serves: the server sees them all before any request is sent,
    and the first request finds its worker's pool already open."""
    (tmp_path / "app.py").write_text(GUNICORN_APP)
    no_control_socket = "\ncontrol_socket_disable = True  # gunicorn 24+: none under ~/.gunicorn\n"
    (tmp_path / "gunicorn.conf.py").write_text(documented_gunicorn_conf() + no_control_socket)
    package_root = str(Path(geventconnpool.__file__).resolve().parent.parent)
    env = dict(
        os.environ,
        LINE_PORT=str(line_server.port),
        PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p),
    )
    args = [sys.executable, "-m", "gunicorn", "-c", str(tmp_path / "gunicorn.conf.py"), "-k", "gevent"]
    args += ["-w", "2", "--preload", "--bind", "127.0.0.1:0", "--chdir", str(tmp_path), "app:application"]
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as log, starting_a_program():
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        # 2 workers x 2 connections, with no request sent: the hook opened them (a preloaded pool would
        # otherwise open its connections on the worker's first request).
        line_server.wait_for_accepted(4, timeout=20)
        wait_until(lambda: "Listening at" in log_path.read_text(), timeout=20)
        port = int(re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", log_path.read_text()).group(1))
        status, _, body = http_get(port, "/")
        assert status == 200
        assert body.startswith("opened=2 checkouts=0"), body
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: proc.poll() is not None, timeout=20, interval=0.05)
        assert proc.returncode == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert line_server.accepted == 4, log_path.read_text()
    line_server.stop()
    leak_check()
