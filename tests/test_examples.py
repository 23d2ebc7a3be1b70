"""Every script in examples/ runs as a user would run it, against the loopback server it starts."""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

import gevent
import pytest
from gevent import socket, subprocess
from helpers import starting_a_program

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str) -> str:
    """Run ``examples/<name>`` with this interpreter from the checkout's root; return its output."""
    env = dict(os.environ)
    env.pop("GEVENTCONNPOOL_PATCH_ALL", None)  # each example decides for itself whether to patch
    with starting_a_program():
        result = subprocess.run(
            [sys.executable, str(EXAMPLES / name), *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    output = result.stdout.decode()
    assert result.returncode == 0, (
        f"{name} exited with {result.returncode}:\n{output}\n{result.stderr.decode()}"
    )
    assert "Traceback" not in result.stderr.decode(), result.stderr.decode()
    return output


def assert_replaced_after_restart(out: str, line: str, count: int) -> None:
    """``out`` has ``line``, then ``(closed_while_idle=N, discarded=M)`` with N + M == ``count``.

    The event loop finds the connections the server closed; a keepalive check
    under way at that moment finds its own, which the pool discards.
    """
    found = re.search(re.escape(line) + r" \(closed_while_idle=(\d+), discarded=(\d+)\)", out)
    assert found, out
    assert int(found[1]) + int(found[2]) == count, out


def test_every_example_is_listed_and_tested():
    """Each script in examples/ is listed in examples/README.rst and has a test in this file."""
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    readme = (EXAMPLES / "README.rst").read_text()
    source = Path(__file__).read_text()
    for script in scripts:
        assert script in readme, f"{script} is not listed in examples/README.rst"
        assert f'run_example("{script}"' in source, f"{script} has no test here"
    assert "gunicorn_app" in readme or not (EXAMPLES / "gunicorn_app").exists()


@pytest.mark.watchdog(90)
def test_demo_survives_a_cut_and_a_server_restart_and_exits_0():
    """The README's demo fills a pool of 3, serves 10 greenlets, retries a request whose connection is cut,
    and loses no request, without retry, to a restart of its server with 3 idle connections in the pool."""
    out = run_example("demo.py")
    assert re.search(r"server listening on 127\.0\.0\.1:\d+", out)
    assert "pool filled: 3 connections opened" in out
    assert "10 greenlets, 3 connections: 10 replies, e.g. 'hello 0' .. 'hello 9'" in out
    assert "-> 'after the cut' (2 attempts)" in out
    assert "pool full again: idle=3 opened=4 discarded=1" in out
    assert (
        "the server restarted while the pool's 3 connections were idle: 20 requests, 0 failed; "
        "the pool replaced 3 connections the server closed (closed_while_idle=3)"
    ) in out
    assert "pool closed: <LinePool 'demo' closed size=3 idle=0 in_use=0" in out
    assert out.endswith("demo finished\n")


@pytest.mark.watchdog(90)
def test_line_protocol_keepalive_pings_and_a_server_restart_fails_no_request():
    """The guide's PING keepalive pings idle connections, and a restart of the server with 4 idle
    connections in the pool fails none of the 20 requests that follow, sent without retry."""
    out = run_example("line_protocol.py", "--keepalive", "0.2")
    assert "reply: hello" in out
    assert re.search(r"keepalive pinged the idle connections: \d+ PINGs so far", out)
    assert_replaced_after_restart(
        out,
        "the server restarted while the pool's 4 connections were idle: 20 requests, 0 failed; "
        "the pool replaced 4 connections the server closed",
        4,
    )
    assert out.endswith("done\n")


@pytest.mark.watchdog(90)
def test_https_rest_verifies_the_certificate_reuses_three_connections_and_survives_a_restart():
    """The HTTPS example refuses an untrusted certificate, serves 22 requests over 3 TLS connections, and
    loses none of 20 GETs, sent without retry, to a restart of the server with 3 idle connections."""
    out = run_example("https_rest.py")
    assert "without the CA, the certificate is refused: unable to get local issuer certificate" in out
    assert "pool ready: 3 verified TLS connections" in out
    assert "20 GET requests from 20 greenlets: users ['Ada', 'Grace']" in out
    assert "POST /users created {'name': 'Barbara', 'id': 3}" in out
    assert "an API error leaves the connection in the pool: GET /users/99: 404" in out
    assert "22 requests over 3 TCP connections (opened=3, discarded=0)" in out
    assert (
        "the server restarted while the pool's 3 connections were idle: 20 requests, 0 failed; "
        "the pool replaced 3 connections the server closed (closed_while_idle=3)"
    ) in out
    assert out.endswith("done\n")


@pytest.mark.watchdog(90)
def test_imap_tls_logs_in_keeps_alive_replaces_a_logged_out_session_and_survives_a_restart():
    """The IMAP example logs in over verified TLS, NOOPs idle sessions, replaces one the server logged out,
    and loses none of 10 commands, sent without retry, to a restart of the server with 2 idle sessions."""
    out = run_example("imap_tls.py")
    assert "pool ready: 2 sessions logged in as 'ada' with INBOX selected" in out
    assert "SELECT INBOX -> OK 2 messages" in out
    assert re.search(r"keepalive sent NOOP to the idle sessions: \d+ so far", out)
    assert "the pool dropped it at once and logged in a new session: dropped=1 opened=3" in out
    assert_replaced_after_restart(
        out,
        "the server restarted while the pool's 2 sessions were idle: 10 NOOP commands, 0 failed; "
        "the pool replaced 2 sessions the server closed",
        2,
    )
    assert out.endswith("done\n")


@pytest.mark.watchdog(90)
@pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="redis-server is not installed (apt-get install redis-server)",
)
def test_redis_raw_counts_to_50_and_a_redis_restart_fails_no_request():
    """The Redis example runs 50 INCRs over 4 connections, restarts its redis-server with the 4 idle in the
    pool, and none of the 20 requests that follow, sent without retry, fails."""
    out = run_example("redis_raw.py")
    assert re.search(r"Redis at 127\.0\.0\.1:\d+", out)
    assert "PING -> PONG; ECHO -> b'hello'" in out
    assert "50 greenlets ran INCR over 4 connections: counter = b'50'" in out
    assert "an error reply leaves the connection in the pool: ERR wrong number of arguments" in out
    assert (
        "redis-server restarted while the pool's 4 connections were idle: 20 requests, 0 failed; "
        "the pool replaced 4 connections the server closed (closed_while_idle=4)"
    ) in out
    assert out.endswith("done\n")


@pytest.mark.watchdog(90)
@pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="redis-server is not installed (apt-get install redis-server)",
)
def test_redis_raw_uses_a_running_server_given_by_port(tmp_path):
    """With --port the Redis example uses the redis-server the test started and leaves it running: it kills
    the pool's 4 idle connections instead of a restart, and none of the 20 requests that follow fails."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with starting_a_program():
        server = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
             "--dir", str(tmp_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        wait_for_redis(port, server)
        out = run_example("redis_raw.py", "--port", str(port))
        assert f"Redis at 127.0.0.1:{port}" in out
        assert "50 greenlets ran INCR over 4 connections: counter = b'50'" in out
        assert (
            "CLIENT KILL closed the pool's 4 idle connections (a server not ours stays up): 20 requests, "
            "0 failed; the pool replaced 4 connections the server closed (closed_while_idle=4)"
        ) in out
        assert out.endswith("done\n")
        assert server.poll() is None, "the example must not stop a server it did not start"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"GET example:counter\r\n")
            assert c.recv(100) == b"$2\r\n50\r\n"
    finally:
        server.terminate()
        server.wait(timeout=10)


def wait_for_redis(port: int, server: subprocess.Popen) -> None:
    """Wait until redis-server answers PING on ``port``; fail if it exits or takes over 10 s."""
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                c.sendall(b"PING\r\n")
                if c.recv(100) == b"+PONG\r\n":
                    return
        except OSError:
            pass
        assert server.poll() is None, "redis-server exited"
        assert time.monotonic() < deadline, "redis-server did not answer within 10 s"
        gevent.sleep(0.05)
