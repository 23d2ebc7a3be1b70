"""The remote ends of the benchmark: a redis-server on loopback, with TLS, started and stopped here.

Everything listens on 127.0.0.1 only.  redis-server is run with ``--save ''
--appendonly no`` so that it never touches the disk; its TLS port, when the
binary was built with TLS, serves the TLS scenario.  Where it was not, a
small TLS PING server of our own (a gevent subprocess) stands in.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

PING = b"*1\r\n$4\r\nPING\r\n"
PONG = b"+PONG\r\n"

# The fallback TLS server: answers every PING (inline or RESP) with +PONG.
_TLS_PING_SERVER = r"""
import sys
from gevent import monkey; monkey.patch_all()
import ssl
from gevent.server import StreamServer
cert, key, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
def handle(sock, addr):
    buf = b""
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return
            buf += data
            n = buf.count(b"PING")
            if n:
                buf = buf[buf.rindex(b"PING") + 4:]
                sock.sendall(b"+PONG\r\n" * n)
    except OSError:
        pass
StreamServer(("127.0.0.1", port), handle, ssl_context=ctx).serve_forever()
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> Optional[str]:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )


def redis_version() -> str:
    binary = redis_binary()
    if binary is None:
        return "none"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    for word in out.split():
        if word.startswith("v="):
            return word[2:]
    return out.strip()


def _blocking_ping(port: int, timeout: float = 0.2) -> bool:
    """One PING with the standard library's blocking socket (usable before and after monkey-patching)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(PING)
            return s.recv(16) == PONG
    except OSError:
        return False


class TLSFiles:
    """A throwaway CA and a server certificate for ``localhost`` / 127.0.0.1, as files in a temp dir."""

    def __init__(self) -> None:
        import trustme

        self.dir = tempfile.mkdtemp(prefix="geventconnpool-bench-")
        ca = trustme.CA()
        server = ca.issue_cert("localhost", "127.0.0.1")
        self.ca_file = os.path.join(self.dir, "ca.pem")
        self.cert_file = os.path.join(self.dir, "server.pem")
        self.key_file = os.path.join(self.dir, "server.key")
        ca.cert_pem.write_to_path(self.ca_file)
        server.cert_chain_pems[0].write_to_path(self.cert_file)
        for pem in server.cert_chain_pems[1:]:
            pem.write_to_path(self.cert_file, append=True)
        server.private_key_pem.write_to_path(self.key_file)

    def client_context(self):  # type: ignore[no-untyped-def]
        import ssl

        ctx = ssl.create_default_context(cafile=self.ca_file)
        return ctx

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class Redis:
    """A redis-server subprocess on a free loopback port; it can be killed and restarted on that port."""

    def __init__(self, tls: Optional[TLSFiles] = None) -> None:
        binary = redis_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.binary = binary
        self.port = free_port()
        self.tls = tls
        self.tls_port: Optional[int] = None
        self.tls_by = "none"
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._tls_proc: Optional[subprocess.Popen[bytes]] = None
        if tls is not None:
            self.tls_port = free_port()

    def _command(self, with_tls: bool) -> List[str]:
        cmd = [
            self.binary,
            "--save",
            "",
            "--appendonly",
            "no",
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        cmd += ["--maxclients", "10000", "--loglevel", "warning", "--daemonize", "no"]
        if with_tls and self.tls is not None and self.tls_port is not None:
            cmd += [
                "--tls-port",
                str(self.tls_port),
                "--tls-cert-file",
                self.tls.cert_file,
                "--tls-key-file",
                self.tls.key_file,
                "--tls-ca-cert-file",
                self.tls.ca_file,
                "--tls-auth-clients",
                "no",
            ]
        return cmd

    def start(self) -> None:
        """Start redis-server and wait until it answers PING (at most 10 s)."""
        want_tls = self.tls is not None and self.tls_by in ("none", "redis")
        self._proc = subprocess.Popen(
            self._command(want_tls),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _blocking_ping(self.port):
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                if want_tls and self.tls_by == "none":
                    # This redis-server has no TLS: run it plain, with our own TLS server beside it.
                    self.tls_by = "python"
                    self.start()
                    return
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {err.strip()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not answer PING within 10 s")
            time.sleep(0.001)
        if want_tls:
            self.tls_by = "redis"
        if self.tls is not None and self.tls_by == "python" and self._tls_proc is None:
            self._start_tls_fallback()

    def _start_tls_fallback(self) -> None:
        assert self.tls is not None and self.tls_port is not None
        self._tls_proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _TLS_PING_SERVER,
                self.tls.cert_file,
                self.tls.key_file,
                str(self.tls_port),
            ],
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.tls_port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline or self._tls_proc.poll() is not None:
                    raise RuntimeError("the TLS PING server did not start") from None
                time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL redis-server, as a crash would, and reap it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(10)
        self._proc = None

    def stop(self) -> None:
        self.kill()
        if self._tls_proc is not None and self._tls_proc.poll() is None:
            self._tls_proc.kill()
            self._tls_proc.wait(10)
        self._tls_proc = None

    def answers(self) -> bool:
        return _blocking_ping(self.port)
