"""A pool of logged-in IMAP-over-TLS sessions with imaplib, kept alive with NOOP.

Run it as a script; it needs the ``trustme`` package (``pip install trustme``)::

    python examples/imap_tls.py

It makes a throwaway certificate authority at run time and starts a tiny IMAP
server on 127.0.0.1 (just enough of IMAP4rev1 for the example: the greeting,
CAPABILITY, LOGIN, SELECT, NOOP and LOGOUT).  Each pooled connection is an
:class:`imaplib.IMAP4_SSL` that has verified the server's certificate, logged
in and selected INBOX before the pool lends it.  ``_keepalive`` sends NOOP to
idle sessions; imaplib reports protocol failures with ``imaplib.IMAP4.error``,
which does not derive from ``OSError``, so the pool's ``exc_classes`` names both.
A session the server logs out (its ``* BYE``, then the end of the stream) is
dropped while idle, as soon as it happens: the pool watches idle connections
(an ``IMAP4_SSL`` keeps its socket in ``sock``).

The server then restarts while both sessions are idle: the pool drops them
as soon as the server closes them and logs in new ones, so the commands that
follow the restart all succeed, without any retry.  The NOOP keepalive is not
what finds them; it is there because IMAP servers log out a session idle for
half an hour, and because only a round trip tells that a firewall dropped an
idle connection without a word.  (A NOOP that happens to be under way when
the server stops finds its session closed too: the pool discards it and logs
in another just the same.)
"""

# imaplib and ssl are blocking stdlib modules: patch them first, the way
# gunicorn's gevent worker does, so that they cooperate with gevent.
from gevent import monkey

monkey.patch_all()

import imaplib  # noqa: E402
import logging  # noqa: E402
import ssl  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Callable, Dict, Optional, Tuple  # noqa: E402

import gevent  # noqa: E402
import trustme  # noqa: E402
from gevent import socket  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

from geventconnpool import ConnectionPool  # noqa: E402

HOST = "127.0.0.1"
USER, PASSWORD = "ada", "correct horse"

# -- the remote end: a tiny IMAP server -------------------------------------------


class ImapServer:
    """Just enough of IMAP4rev1 over TLS for the example, counting the NOOPs it answers."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.noops = 0
        self.sessions: Dict[Tuple[str, int], socket.socket] = {}
        self.context = context
        self.port = 0  # a free port the first time, then the same one
        self.server: Optional[StreamServer] = None

    def start(self) -> None:
        server = StreamServer(
            (HOST, self.port),
            lambda sock, client: self.handle(server, sock, client),
            ssl_context=self.context,
        )
        server.start()
        self.server, self.port = server, server.address[1]

    def stop(self) -> None:
        """Stop listening and close every session, as the server's process does when it exits."""
        if self.server is not None:
            self.server.stop()
            self.server = None
        for sock in list(self.sessions.values()):
            sock.shutdown(socket.SHUT_RDWR)

    def handle(self, server: StreamServer, sock: socket.socket, address: Tuple[str, int]) -> None:
        if server.closed:
            return  # accepted just before the server stopped: closed unanswered, like the others
        self.sessions[address] = sock
        try:
            sock.sendall(b"* OK geventconnpool example IMAP server ready\r\n")
            for line in sock.makefile("rb"):
                tag, _, rest = line.rstrip(b"\r\n").decode().partition(" ")
                command, _, args = rest.partition(" ")
                reply = self.reply(tag, command.upper(), args)
                sock.sendall(reply.encode())
                if command.upper() == "LOGOUT":
                    break
        except OSError:
            pass
        finally:
            self.sessions.pop(address, None)
            sock.close()

    def reply(self, tag: str, command: str, args: str) -> str:
        if command == "CAPABILITY":
            return f"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n{tag} OK CAPABILITY completed\r\n"
        if command == "LOGIN":
            if args == f'{USER} "{PASSWORD}"':
                return f"{tag} OK LOGIN completed\r\n"
            return f"{tag} NO [AUTHENTICATIONFAILED] Invalid credentials\r\n"
        if command == "SELECT":
            return (
                "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n* 2 EXISTS\r\n* 0 RECENT\r\n"
                f"* OK [UIDVALIDITY 1] UIDs valid\r\n{tag} OK [READ-WRITE] SELECT completed\r\n"
            )
        if command == "NOOP":
            self.noops += 1
            return f"{tag} OK NOOP completed\r\n"
        if command == "LOGOUT":
            return f"* BYE logging out\r\n{tag} OK LOGOUT completed\r\n"
        return f"{tag} BAD unknown command\r\n"

    def autologout_one(self) -> None:
        """Drop one idle session the way IMAP servers do: an untagged BYE, then close."""
        sock = next(iter(self.sessions.values()))
        sock.sendall(b"* BYE Autologout; idle for too long\r\n")
        sock.shutdown(socket.SHUT_RDWR)


# -- the client: a pool of IMAP sessions ------------------------------------------


class ImapPool(ConnectionPool[imaplib.IMAP4_SSL]):
    """IMAP sessions that are connected over verified TLS, logged in, with INBOX selected."""

    def __init__(self, port: int, context: ssl.SSLContext, size: int, keepalive: float) -> None:
        self.port, self.context = port, context
        super().__init__(size, exc_classes=(OSError, imaplib.IMAP4.error), keepalive=keepalive, name="imap")

    def _new_connection(self) -> imaplib.IMAP4_SSL:
        c = imaplib.IMAP4_SSL(HOST, self.port, ssl_context=self.context, timeout=10)
        try:
            c.login(USER, PASSWORD)
            c.select("INBOX")
        except BaseException:
            c.shutdown()  # do not leak the socket of a session that failed half-way
            raise
        return c

    def _keepalive(self, c: imaplib.IMAP4_SSL) -> None:
        typ, data = c.noop()
        if typ != "OK":
            raise imaplib.IMAP4.error(f"NOOP failed: {data!r}")

    def _close_connection(self, c: imaplib.IMAP4_SSL) -> None:
        c.logout()  # says goodbye when it can, and closes the socket in any case


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate`` (yielding to gevent) until it is true or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        gevent.sleep(0.01)
    return True


def main() -> int:
    logging.basicConfig(format="log: %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    ca = trustme.CA()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(HOST).configure_cert(server_context)
    remote = ImapServer(server_context)
    remote.start()
    port = remote.port
    print(f"IMAP server listening on {HOST}:{port} (TLS, certificate from a throwaway CA)")

    context = ssl.create_default_context()  # verifies the certificate and the host name
    ca.configure_trust(context)
    with ImapPool(port, context, size=2, keepalive=0.3) as pool:
        pool.wait(timeout=10)
        print(f"pool ready: {pool.stats().idle} sessions logged in as {USER!r} with INBOX selected")

        with pool.get() as c:
            typ, data = c.select("INBOX")
            print(f"SELECT INBOX -> {typ} {data[0].decode()} messages")

        if not wait_for(lambda: remote.noops >= 2, timeout=10):
            print(f"FAILED: only {remote.noops} NOOPs in 10 s")
            return 1
        print(f"keepalive sent NOOP to the idle sessions: {remote.noops} so far")

        gevent.sleep(1.0)  # an idle half hour, compressed: older than a session just opened
        remote.autologout_one()
        print("the server logged one idle session out")

        def dropped() -> int:
            stats = pool.stats()
            return stats.closed_while_idle + stats.discarded

        if not wait_for(lambda: dropped() >= 1 and pool.stats().idle == 2, timeout=10):
            print(f"FAILED: the session was not replaced: {pool.stats()}")
            return 1
        stats = pool.stats()
        print(
            f"the pool dropped it at once and logged in a new session: dropped={dropped()} "
            f"opened={stats.opened} idle={stats.idle}"
        )
        before = pool.stats()
        remote.stop()
        gevent.sleep(0.2)  # the server takes a moment to come back; meanwhile the pool drops its sessions
        remote.start()

        def command_succeeds() -> bool:
            """One command, without retry: does the server answer OK?"""
            try:
                with pool.get() as c:
                    return c.noop()[0] == "OK"
            except (OSError, imaplib.IMAP4.error):
                return False

        jobs = [gevent.spawn(command_succeeds) for _ in range(10)]
        gevent.joinall(jobs, timeout=20)
        failed = sum(1 for job in jobs if job.value is not True)
        pool.wait(timeout=10)
        after = pool.stats()
        replaced = after.opened - before.opened
        print(
            f"the server restarted while the pool's {before.size} sessions were idle: "
            f"{len(jobs)} NOOP commands, {failed} failed; "
            f"the pool replaced {replaced} sessions the server closed "
            f"(closed_while_idle={after.closed_while_idle - before.closed_while_idle}, "
            f"discarded={after.discarded - before.discarded})"
        )
    remote.stop()
    if failed:
        print("FAILED: commands failed after the restart")
        return 1
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
