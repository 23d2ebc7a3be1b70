"""Fork safety with real os.fork(): a pool made before fork works in the child, and no connection
crosses the process boundary.

The LineServer runs in its own OS thread with its own gevent hub, so that the forked child
(which keeps only the forking thread) never runs server code: every connection the server
sees is served by the parent process, which can then tell whose connection is whose.  Each
child reports to the parent through a pipe as JSON and always leaves through os._exit().
"""

from __future__ import annotations

import json
import os
import signal
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Set

import gevent
import pytest
from doubles import FakePool, FastLinePool
from gevent import socket
from gevent.monkey import get_original, is_module_patched
from helpers import LinePool, LineServer, local_port, recv_line, wait_until

from geventconnpool import Address, ConnectionPool, PoolTimeout

start_new_thread = get_original("_thread", "start_new_thread")

# Python 3.12+ warns on fork() in a process with threads.  Here the only other thread is the
# test's server thread, which the child never touches: it reports over a pipe and os._exit()s.
pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")


class ServerThread:
    """A LineServer served by another OS thread, which a forked child does not inherit."""

    def __init__(self) -> None:
        self.server = LineServer()
        self._started: List[bool] = []
        self._stopped: List[bool] = []
        self._stop = False

    def start(self) -> None:
        def body() -> None:
            hub = gevent.get_hub()
            try:
                self.server.start()
                self._started.append(True)
                while not self._stop:
                    gevent.sleep(0.005)
                self.server.stop()
                gevent.sleep(0.01)  # let the handlers see their sockets closed
            finally:
                hub.destroy(destroy_loop=True)
                self._stopped.append(True)

        start_new_thread(body, ())
        wait_until(lambda: self._started, timeout=10)

    def stop(self) -> None:
        self._stop = True
        wait_until(lambda: self._stopped, timeout=10)

    @property
    def client_ports(self) -> Set[int]:
        """The client ports of every connection the server accepted."""
        return {port for _, port in self.server.peers}


@pytest.fixture
def threaded_server():
    """A LineServer in its own OS thread, stopped at the end."""
    server = ServerThread()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def plain_fork() -> int:
    """The os.fork() of the standard library, even under monkey-patching, then gevent.reinit() in the child.

    gevent documents that a program forking without gevent.fork() must call reinit() in the child.
    """
    pid = get_original("os", "fork")()
    if pid == 0:
        gevent.reinit()
    return pid


def os_fork() -> int:
    """Whatever os.fork is: the standard one, or gevent's when os is monkey-patched."""
    return os.fork()


FORKS = {"os.fork": os_fork, "plain-fork+reinit": plain_fork, "gevent.fork": gevent.fork}


@pytest.fixture(params=sorted(FORKS))
def fork(request: pytest.FixtureRequest) -> Callable[[], int]:
    """Each way to fork: os.fork as it is, the original fork plus gevent.reinit(), and gevent.fork."""
    return FORKS[request.param]


def run_child(
    fork: Callable[[], int],
    child: Callable[[], Any],
    timeout: float = 20.0,
    meanwhile: Optional[Callable[[], Any]] = None,
) -> Any:
    """Fork; run ``child`` in the child and return what it returned (JSON), or fail with its traceback.

    ``meanwhile`` runs in a greenlet of the parent, spawned after the fork (so the child has no copy of
    it), while the child runs; its errors are raised here.
    """
    read_end, write_end = os.pipe()
    pid = fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(read_end)
            # gevent runs its fork watchers (its resolver's thread pool resets there) at the start of
            # the child's next loop iteration; after a plain os.fork() without reinit(), a child that
            # resolved a name before then could hang, as gevent documents.  A turn of the loop first.
            gevent.sleep(0.001)
            try:
                report = {"result": child()}
            except BaseException:
                report = {"error": traceback.format_exc()}
            data = json.dumps(report).encode()
            while data:
                data = data[os.write(write_end, data) :]
        finally:
            os._exit(0)
    os.close(write_end)
    parent_work = gevent.spawn(meanwhile) if meanwhile is not None else None
    try:
        deadline = time.monotonic() + timeout
        status = None
        while status is None:
            try:
                done, code = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break  # already reaped by gevent's child watcher
            if done:
                status = code
            elif time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError(f"the child {pid} did not exit within {timeout} s")
            else:
                gevent.sleep(0.005)
        chunks = []
        while True:
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
    if parent_work is not None:
        parent_work.get(timeout=timeout)
    assert chunks, f"the child {pid} exited ({status}) without a report"
    report = json.loads(b"".join(chunks))
    assert "error" not in report, "the child failed:\n" + report["error"]
    return report["result"]


def talk(sock: socket.socket, command: str) -> str:
    """Send one command line on ``sock`` and return the reply line."""
    sock.sendall(command.encode() + b"\n")
    return recv_line(sock).decode()


class TracingPool(LinePool):
    """A LinePool whose keepalive and closes say which process did them, on which connection."""

    handshake = False  # SlowCheckPool: whether _new_connection has a slow handshake

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.closes: List[Dict[str, int]] = []
        self.checks: List[Dict[str, int]] = []
        super().__init__(*args, **kwargs)

    def _keepalive(self, c: socket.socket) -> None:
        port = local_port(c)
        if talk(c, f"ECHO ka {os.getpid()} {port}") != f"ka {os.getpid()} {port}":
            raise OSError("keepalive: wrong reply")
        self.checks.append({"pid": os.getpid(), "port": port})

    def _close_connection(self, c: socket.socket) -> None:
        self.closes.append({"pid": os.getpid(), "port": local_port(c)})
        super()._close_connection(c)


def own_ports(pool: ConnectionPool[socket.socket]) -> Set[int]:
    """The local ports of every connection the pool has open now (borrowing them all)."""
    with pool.get(timeout=5) as a, pool.get(timeout=5) as b:
        return {local_port(a), local_port(b)}


def commands_by(server: LineServer, pid: int) -> List[List[str]]:
    """The ECHO commands that process ``pid`` sent, split into words: [kind, pid, port]."""
    found = []
    for line in server.commands:
        words = line.decode().split()
        if len(words) == 4 and words[0] == "ECHO" and words[2] == str(pid):
            found.append(words[1:])
    return found


def test_pool_made_before_fork_works_in_the_child_on_its_own_connections(fork, threaded_server, leak_check):
    """The child opens its own connections; parent and child, talking at the same time, each get their own
    replies.
    """
    server = threaded_server.server
    with TracingPool(server, 2, keepalive=0.05) as pool:
        pool.wait(timeout=5)
        parent_ports = own_ports(pool)
        # The server thread notes a connection when its handler starts, maybe after pool.wait() returned.
        wait_until(lambda: parent_ports <= threaded_server.client_ports)

        def child() -> Dict[str, Any]:
            me = os.getpid()
            replies = []
            ports = set()
            for i in range(50):
                with pool.get(timeout=5) as c:
                    ports.add(local_port(c))
                    replies.append(talk(c, f"ECHO req {me} {local_port(c)}-{i}"))
                gevent.sleep(0)
            pool.wait(timeout=5)
            own = own_ports(pool)  # both of the child's connections, lent or only pinged
            expected = [f"req {me} " for _ in range(50)]
            mixed = [r for r, e in zip(replies, expected) if not r.startswith(e)]
            return {
                "pid": me,
                "ports": sorted(ports),
                "own": sorted(own),
                "mixed": mixed,
                "stats": [pool.stats().opened, pool.stats().checkouts],
                "closes": pool.closes,
            }

        # The parent talks on its own connections while the child does.
        parent_replies: List[str] = []

        def parent_talks() -> None:
            for i in range(200):
                with pool.get(timeout=5) as c:
                    parent_replies.append(talk(c, f"ECHO req {os.getpid()} {local_port(c)}-{i}"))
                gevent.sleep(0.001)

        report = run_child(fork, child, meanwhile=parent_talks)

        child_ports = set(report["ports"])
        assert report["mixed"] == [], "the child got replies meant for the parent"
        assert all(r.startswith(f"req {os.getpid()} ") for r in parent_replies)
        assert child_ports and not child_ports & parent_ports
        # The server accepted the child's connections as new ones.
        wait_until(lambda: child_ports <= threaded_server.client_ports)
        assert report["stats"][0] == 2  # the child opened its own two
        assert report["closes"] == []  # and closed none of the parent's
        # Every command the child sent went over one of the child's connections.
        own = set(report["own"])
        assert child_ports <= own and not own & parent_ports
        for kind, _, port in commands_by(server, report["pid"]):
            assert int(port.split("-")[0]) in own, (kind, port)
        # The parent's connections were not disturbed: same ones, still working.
        assert own_ports(pool) == parent_ports
        assert pool.stats().discarded == 0 and pool.stats().keepalive_failures == 0
    threaded_server.stop()
    leak_check()


def test_child_never_closes_or_pings_the_parents_connections(fork, threaded_server, leak_check):
    """The child neither closes nor pings an inherited connection, even when it closes its pool, and the
    parent's still work after.
    """
    server = threaded_server.server
    with TracingPool(server, 2, keepalive=0.02) as pool:
        pool.wait(timeout=5)
        parent_ports = own_ports(pool)
        wait_until(lambda: len(pool.checks) >= 2)  # the keepalive runs in the parent

        def child() -> Dict[str, Any]:
            before = len(pool.closes)
            gevent.sleep(0.2)  # ten keepalive periods without touching the pool
            ports = own_ports(pool)
            gevent.sleep(0.1)  # five more periods, then close: the child must touch none of the parent's
            pool.close()
            return {
                "pid": os.getpid(),
                "ports": sorted(ports),
                "closes": pool.closes[before:],
                "checks": [c for c in pool.checks if c["pid"] == os.getpid()],
            }

        report = run_child(fork, child)
        child_ports = set(report["ports"])
        assert not child_ports & parent_ports
        assert all(c["port"] not in parent_ports for c in report["closes"]), report["closes"]
        assert {c["port"] for c in report["closes"]} <= child_ports
        assert all(c["port"] in child_ports for c in report["checks"]), report["checks"]
        for kind, _, port in commands_by(server, report["pid"]):
            assert int(port) in child_ports, (kind, port)
        # Back in the parent: the same two connections still answer.
        with pool.get(timeout=5) as a, pool.get(timeout=5) as b:
            assert {local_port(a), local_port(b)} == parent_ports
            assert talk(a, "PING") == "PONG" and talk(b, "WHO") == str(local_port(b))
        assert pool.stats().discarded == 0
    threaded_server.stop()
    leak_check()


def test_child_closing_the_pool_before_using_it_leaves_the_parents_connections(
    fork, threaded_server, leak_check
):
    """A child that closes the inherited pool at once closes nothing of the parent's connections."""
    server = threaded_server.server
    with TracingPool(server, 2, keepalive=0.02, max_lifetime=30, leak_warning=30) as pool:
        pool.wait(timeout=5)
        parent_ports = own_ports(pool)

        def child() -> Dict[str, Any]:
            s = pool.stats()
            pool.close()
            gevent.sleep(0.1)  # time for a wrong close to happen: a negative check
            return {
                "gauges": [s.idle, s.in_use, s.connecting, s.size],
                "counters": [s.checkouts, s.opened],
                "closes": pool.closes,
                "closed": pool.closed,
            }

        report = run_child(fork, child)
        idle, in_use, connecting, size = report["gauges"]
        assert idle + in_use + connecting == size == 2
        assert idle == 0
        assert report["closes"] == [] and report["closed"] is True
        with pool.get(timeout=5) as a, pool.get(timeout=5) as b:
            assert {local_port(a), local_port(b)} == parent_ports
            assert talk(a, "PING") == "PONG" and talk(b, "PING") == "PONG"
        assert pool.stats().discarded == 0 and pool.stats().keepalive_failures == 0
    threaded_server.stop()
    leak_check()


def test_a_close_pending_at_fork_is_not_done_by_the_child(fork, threaded_server, leak_check):
    """A fork between the recycling of a connection and its close leaves that close to the parent: the child
    never closes the parent's connection, even when it closes its pool.
    """
    server = threaded_server.server
    with TracingPool(server, 1, max_lifetime=0.3) as pool:
        pool.wait(timeout=5)
        # Yield through the hub's callbacks until the maintenance greenlet has recycled the connection,
        # before the greenlet that closes it has run.
        deadline = time.monotonic() + 5
        while pool.stats().recycled == 0:
            assert time.monotonic() < deadline, "the connection was not recycled"
            gevent.sleep(0)
        assert pool.closes == []

        def child() -> Dict[str, Any]:
            pool.close()
            gevent.sleep(0.1)  # time for a wrong close to happen: a negative check
            return {"closes": [c for c in pool.closes if c["pid"] == os.getpid()]}

        report = run_child(fork, child)
        assert report["closes"] == []
        wait_until(lambda: [c for c in pool.closes if c["pid"] == os.getpid()], timeout=5)
        with pool.get(timeout=5) as c:
            assert talk(c, "PING") == "PONG"
    threaded_server.stop()
    leak_check()


def test_fork_while_connections_are_held(fork, threaded_server, leak_check):
    """A fork while the parent holds connections: the child serves on its own ones, the held ones go on
    working in the parent.
    """
    server = threaded_server.server
    with TracingPool(server, 2) as pool:
        pool.wait(timeout=5)
        with pool.get() as held:
            held_port = local_port(held)

            def child() -> Dict[str, Any]:
                me = os.getpid()
                ports = set()
                replies = []
                for i in range(5):
                    with pool.get(timeout=5) as c:
                        ports.add(local_port(c))
                        replies.append(talk(c, f"ECHO req {me} {i}"))
                return {"pid": me, "ports": sorted(ports), "replies": replies, "closes": pool.closes}

            report = run_child(fork, child)
            assert held_port not in report["ports"]
            assert report["replies"] == [f"req {report['pid']} {i}" for i in range(5)]
            assert report["closes"] == []
            assert talk(held, "WHO") == str(held_port)
        assert pool.stats().in_use == 0 and pool.stats().idle == 2
    threaded_server.stop()
    leak_check()


@pytest.mark.parametrize("how", ["returned", "discarded"])
def test_connection_held_across_fork_comes_back_to_nothing_in_the_child(
    fork, threaded_server, leak_check, how
):
    """In the child, a connection the parent held at fork time, given back or discarded, is neither reused nor
    closed.
    """
    server = threaded_server.server
    with TracingPool(server, 2) as pool:
        pool.wait(timeout=5)
        loan = pool.get()
        held = loan.__enter__()
        held_port = local_port(held)

        def child() -> Dict[str, Any]:
            if how == "returned":
                loan.__exit__(None, None, None)
            else:
                error = ConnectionResetError("as if the block failed")
                loan.__exit__(type(error), error, None)
            ports = set()
            for _ in range(6):
                with pool.get(timeout=5) as c:
                    ports.add(local_port(c))
            pool.wait(timeout=5)
            s = pool.stats()
            return {
                "ports": sorted(ports),
                "closes": pool.closes,
                "gauges": [s.idle, s.in_use, s.connecting, s.discarded],
            }

        report = run_child(fork, child)
        assert held_port not in report["ports"]
        assert report["closes"] == []
        assert report["gauges"] == [2, 0, 0, 0]
        assert talk(held, "WHO") == str(held_port)
        loan.__exit__(None, None, None)
        assert pool.stats().idle == 2 and pool.closes == []
    threaded_server.stop()
    leak_check()


def test_fork_of_a_pool_whose_remote_is_down(fork, leak_check):
    """A child forked during an outage reconnects on its own once the remote is back, with fresh counters."""
    server = LineServer()
    server.start()
    server.stop()

    with FastLinePool(server, 1, timeout=0.2) as pool:
        wait_until(lambda: pool.stats().failed_connects >= 1)
        with pytest.raises(PoolTimeout):
            pool.get(timeout=0).__enter__()
        assert pool.stats().timeouts == 1

        def child() -> Dict[str, Any]:
            with pytest.raises(PoolTimeout):
                pool.get().__enter__()  # the remote is still down
            back = LineServer(server.port)  # the remote comes back, served by the child itself
            back.start()
            try:
                pool.wait(timeout=5)
                reply = talk(pool.get(timeout=5).__enter__(), "ECHO child")
                s = pool.stats()
                return {"reply": reply, "counters": [s.opened, s.checkouts, s.timeouts]}
            finally:
                back.stop()

        report = run_child(fork, child)
        assert report == {"reply": "child", "counters": [1, 1, 1]}  # not the parent's timeout too
    leak_check()


@pytest.mark.skipif(not is_module_patched("os"), reason="the point is the patched os.fork")
def test_patched_os_fork_is_gevents(threaded_server, leak_check):
    """Under patch_all os.fork is gevent's fork, and a pool survives it like any other."""
    assert os.fork is gevent.fork or "gevent" in getattr(os.fork, "__module__", "")
    with LinePool(threaded_server.server, 1) as pool:
        pool.wait(timeout=5)
        report = run_child(os.fork, lambda: talk(pool.get(timeout=5).__enter__(), "ECHO hi"))
        assert report == "hi"
    threaded_server.stop()
    leak_check()


class SlowCheckPool(TracingPool):
    """A pool whose keepalive and connect handshake each wait 0.15 s for the server's reply, noting who
    resumes them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.resumed: List[Dict[str, Any]] = []
        self.in_flight: List[str] = []
        super().__init__(*args, **kwargs)

    def _slow_exchange(self, c: socket.socket, what: str) -> None:
        port = local_port(c)
        c.sendall(f"ECHO {what} {os.getpid()} {port}\n".encode())
        self.in_flight.append(what)
        gevent.sleep(0.15)  # a slow remote
        self.resumed.append({"what": what, "pid": os.getpid(), "port": port})
        recv_line(c)

    def _keepalive(self, c: socket.socket) -> None:
        self._slow_exchange(c, "ka")

    def _new_connection(self) -> socket.socket:
        sock = super()._new_connection()
        if self.handshake:
            try:
                self._slow_exchange(sock, "hello")
            except BaseException:
                sock.close()
                raise
        return sock


@pytest.mark.parametrize("what", ["ka", "hello"], ids=["keepalive", "connect-handshake"])
def test_parent_greenlet_in_flight_at_fork_does_nothing_in_the_child(fork, threaded_server, leak_check, what):
    """A keepalive or connect in flight in the parent at fork time is not resumed in the child, which does not
    touch the pool.
    """

    class Pool(SlowCheckPool):
        handshake = what == "hello"

    server = threaded_server.server
    options = {"keepalive": 0.02} if what == "ka" else {}
    with Pool(server, 1, connect_timeout=2, **options) as pool:
        wait_until(lambda: what in pool.in_flight, timeout=5)

        def child() -> Dict[str, Any]:
            gevent.sleep(0.4)  # idle, like a worker waiting for its first request
            return {"pid": os.getpid(), "resumed": [r for r in pool.resumed if r["pid"] == os.getpid()]}

        report = run_child(fork, child)
        pool.wait(timeout=5)
        wait_until(lambda: len([r for r in pool.resumed if r["pid"] == os.getpid()]) >= 1)
        s = pool.stats()
        assert (report["resumed"], s.keepalive_failures, s.failed_connects) == ([], 0, 0), (
            f"the child resumed the parent's {what!r} exchange"
        )
    threaded_server.stop()
    leak_check()


def test_pools_of_an_ended_thread_do_not_keep_a_fork_from_dropping_the_other_pools(
    fork, threaded_server, leak_check
):
    """Pools left open by a thread that has ended, whose hub is destroyed, are forgotten in the child
    without touching that hub, and the forking thread's pool still drops the parent's connections and
    opens its own (an error on a dead pool used to stop the child from dropping the rest)."""
    made: List[ConnectionPool[Any]] = []

    def in_a_thread() -> None:
        for _ in range(3):
            dead = FakePool(1)
            dead.wait(timeout=5)
            made.append(dead)
        gevent.get_hub().destroy(destroy_loop=True)  # the thread ends; its pools stay open

    get_original("_thread", "start_new_thread")(in_a_thread, ())
    wait_until(lambda: len(made) == 3, timeout=10)
    with LinePool(threaded_server.server, 2) as pool:
        pool.wait(timeout=5)
        parent_ports = own_ports(pool)

        def child() -> Dict[str, Any]:
            pool.wait(timeout=5)
            return {"ports": sorted(own_ports(pool)), "opened": pool.stats().opened}

        report = run_child(fork, child)
        assert report["opened"] == 2
        assert not set(report["ports"]) & parent_ports
        assert own_ports(pool) == parent_ports
    threaded_server.stop()
    leak_check()


@pytest.mark.parametrize("discard", [False, True])
def test_lease_acquired_before_fork_and_released_in_the_child_comes_back_to_nothing(
    fork, threaded_server, leak_check, discard
):
    """A connection the parent took with acquire() is released in the child to nothing: neither reused nor
    closed there, discarded or not, and the parent still releases its own lease."""
    server = threaded_server.server
    with TracingPool(server, 2) as pool:
        pool.wait(timeout=5)
        held = pool.acquire()
        held_port = local_port(held)

        def child() -> Dict[str, Any]:
            pool.release(held, discard=discard)
            ports = own_ports(pool)
            s = pool.stats()
            return {"ports": sorted(ports), "closes": pool.closes, "gauges": [s.idle, s.in_use, s.discarded]}

        report = run_child(fork, child)
        assert held_port not in report["ports"]
        assert report["closes"] == []
        assert report["gauges"] == [2, 0, 0]
        assert talk(held, "WHO") == str(held_port)
        pool.release(held)
        assert pool.stats().idle == 2 and pool.closes == []
    threaded_server.stop()
    leak_check()


def test_fork_during_a_drain_leaves_the_drain_to_the_parent(fork, threaded_server, leak_check):
    """A child forked while a drain waits for a held old connection opens its own connections, replaces and
    closes nothing of the parent's, and has no drain under way; the parent's drain then finishes."""
    server = threaded_server.server
    with TracingPool(server, 2) as pool:
        pool.wait(timeout=5)
        with pool.get() as held:
            held_port = local_port(held)
            pool.drain()
            wait_until(lambda: pool.stats().retiring == 1 and pool.stats().idle == 2)

            def child() -> Dict[str, Any]:
                ports = own_ports(pool)
                gevent.sleep(0.05)  # a few drain polls: nothing happens to the parent's (a negative check)
                s = pool.stats()
                return {
                    "ports": sorted(ports),
                    "closes": [
                        c for c in pool.closes if c["pid"] == os.getpid()
                    ],  # not those copied from the parent
                    "gauges": [s.idle, s.in_use, s.connecting, s.retiring],
                }

            report = run_child(fork, child)
            assert held_port not in report["ports"]
            assert report["closes"] == []
            assert report["gauges"] == [2, 0, 0, 0]
        wait_until(lambda: held_port in [c["port"] for c in pool.closes])
        assert pool.stats().retiring == 0


class ForkedAddressPool(ConnectionPool[socket.socket]):
    """A pool with ``address=`` whose name resolves to the threaded server and to an address refusing all."""

    def _resolve(self, host: str, port: int) -> List[str]:
        return ["127.0.0.1", "127.0.0.3"]  # nothing listens on 127.0.0.3

    def _connect(self, address: Address) -> socket.socket:
        return socket.create_connection((address.ip, address.port), timeout=5)


def test_pool_with_address_works_in_the_child_on_its_own_connections(fork, threaded_server, leak_check):
    """A child of a pool made with ``address=`` resolves, routes around the dead address and spreads its
    own connections, none of them the parent's."""
    port = threaded_server.server.port
    with ForkedAddressPool(2, address=("backend.test", port), name="forked-addresses") as pool:
        pool.wait(timeout=5)
        parent_ports = own_ports(pool)

        def child() -> Dict[str, Any]:
            pool.wait(timeout=5)
            by_ip = {a.ip: n for a, n in pool.connections_by_address().items()}
            return {"ports": sorted(own_ports(pool)), "by_ip": by_ip, "opened": pool.stats().opened}

        report = run_child(fork, child)
        assert report["by_ip"] == {"127.0.0.1": 2, "127.0.0.3": 0}
        assert report["opened"] == 2
        assert report["ports"] and not set(report["ports"]) & parent_ports
        assert own_ports(pool) == parent_ports
    threaded_server.stop()
    leak_check()
