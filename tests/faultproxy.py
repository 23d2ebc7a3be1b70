"""A fault-injecting TCP proxy for the reliability tests: gevent, 127.0.0.1 only.

Put a :class:`FaultProxy` between a pool and a real server, then break the
network from the test with its switches::

    proxy = FaultProxy(server.address)
    proxy.start()
    pool = MyPool(proxy.address, 4)
    proxy.reset_all()          # every connection gets a TCP RST
    proxy.cut_when_idle(2.0)   # a load balancer's idle cut-off
    proxy.heal()               # every switch off

Each client connection is a :class:`Link`: the client's socket, the proxy's
own socket to the server, and two pump greenlets copying bytes between them.
The proxy keeps every link it ever accepted, so a test can compare the
connections the pool opened with those the network saw, and whether each one
is closed.
"""

from __future__ import annotations

import struct
import time
from typing import List, Optional, Set, Tuple

import gevent
from gevent import socket
from gevent.event import Event

_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST


def _rst_close(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    except OSError:
        pass
    sock.close()


class Link:
    """One client connection through the proxy."""

    def __init__(self, client: socket.socket, peer: Tuple[str, int]) -> None:
        self.client = client
        self.server: Optional[socket.socket] = None
        self.port = peer[1]  #: the client's port: the pool's end of the connection
        self.server_port = 0  #: the proxy's port towards the server, once connected
        self.bytes = 0  #: bytes forwarded, both ways
        self.last_active = time.monotonic()
        self.black = False  #: swallowed by a black hole: it never carries a byte again
        self.closed = False
        self.how = ""  #: why the proxy closed it: "eof", "reset", "bytes", "idle", "stop"
        self.greenlets: List[gevent.Greenlet] = []


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream``, with switches that break the network.

    The switches stay on until :meth:`heal` (or their own off switch).
    :attr:`faults` counts how many times a switch was turned on.
    """

    def __init__(self, upstream: Tuple[str, int], port: int = 0) -> None:
        self.upstream = upstream
        self.port = port
        self.links: List[Link] = []
        self.faults = 0
        self._listener: Optional[socket.socket] = None
        self._acceptor: Optional[gevent.Greenlet] = None
        self._reaper: Optional[gevent.Greenlet] = None
        self._stuck: List[socket.socket] = []  # the connection filling a tiny backlog
        self._flowing = Event()
        self._flowing.set()
        self._blackhole = False
        self._latency = 0.0
        self._byte_limit: Optional[int] = None
        self._idle_cutoff: Optional[float] = None

    @property
    def address(self) -> Tuple[str, int]:
        return ("127.0.0.1", self.port)

    # -- lifetime -------------------------------------------------------------

    def start(self) -> None:
        """Listen on 127.0.0.1 (on a free port the first time) and forward every connection."""
        self._listen(backlog=128)
        self._acceptor = gevent.spawn(self._accept_loop)
        self._reaper = gevent.spawn(self._reap_loop)

    def stop(self) -> None:
        """Stop listening and close every link, client side and server side."""
        self._stop_listening()
        if self._reaper is not None:
            self._reaper.kill()
            self._reaper = None
        for link in self.links:
            self._close(link, "stop")

    # -- the switches ---------------------------------------------------------

    def refuse(self) -> None:
        """Refuse new connections: close the listening socket, so a connect gets ECONNREFUSED.

        Links already open keep working.  :meth:`accept` (or :meth:`heal`) listens again.
        """
        self.faults += 1
        self._stop_listening()

    def accept(self) -> None:
        """Listen again on the same port, after :meth:`refuse` or :meth:`blackhole_connects`."""
        if self._acceptor is not None:
            return
        self._stop_listening()
        self._listen(backlog=128)
        self._acceptor = gevent.spawn(self._accept_loop)

    def reset_all(self) -> None:
        """Reset every open link: both of its sockets are closed with a TCP RST (SO_LINGER 0).

        The client's next read or write fails with ECONNRESET (or it reads EOF).
        """
        self.faults += 1
        for link in self.open_links():
            self._close(link, "reset", rst=True)

    def cut_after_bytes(self, limit: Optional[int]) -> None:
        """Close each link quietly (a FIN, no RST) once ``limit`` bytes went through it; None turns it off.

        The bytes beyond the limit are dropped: a request may be cut in the
        middle, or its reply lost.
        """
        self.faults += limit is not None
        self._byte_limit = limit
        if limit is not None:
            for link in self.open_links():
                if link.bytes >= limit:
                    self._close(link, "bytes")

    def cut_when_idle(self, seconds: Optional[float]) -> None:
        """Close each link quietly (a FIN, no RST) after ``seconds`` without a byte either way.

        A load balancer's or a NAT's idle cut-off; None turns it off.
        """
        self.faults += seconds is not None
        self._idle_cutoff = seconds

    def blackhole(self) -> None:
        """Accept and never answer: from now on every byte, on every link old or new, is dropped.

        New connections are accepted (the client's connect succeeds) but never
        reach the server, so a handshake never completes.  A link swallowed
        once stays dead after :meth:`heal`, like a firewall that lost its flow
        state; only new links work again.
        """
        self.faults += 1
        self._blackhole = True
        for link in self.open_links():
            link.black = True

    def blackhole_connects(self) -> None:
        """Connects never complete: a listener with a backlog of 0, kept full by a connection never accepted.

        Linux drops the SYN of each new connect while the accept queue is full,
        so ``connect()`` hangs (retransmitting its SYN) until the client's own
        timeout.  Links already open keep working.  :meth:`accept` or
        :meth:`heal` restores a normal listener.
        """
        self.faults += 1
        self._stop_listening()
        self._listen(backlog=0)
        filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        filler.connect(self.address)  # completes: it takes the one place in the queue
        self._stuck.append(filler)

    def latency(self, seconds: float) -> None:
        """Delay every chunk of bytes, each way, by ``seconds`` (0 turns it off)."""
        self.faults += seconds > 0
        self._latency = seconds

    def pause(self) -> None:
        """Stop forwarding, keeping the bytes: a stalled network. :meth:`resume` delivers them."""
        self.faults += 1
        self._flowing.clear()

    def resume(self) -> None:
        """Forward again what :meth:`pause` held back, and all that follows."""
        self._flowing.set()

    def heal(self) -> None:
        """Turn every switch off: listen normally, no black hole, no latency, no cut-off, not paused."""
        self._blackhole = False
        self._latency = 0.0
        self._byte_limit = None
        self._idle_cutoff = None
        self._flowing.set()
        self.accept()

    # -- what the test can look at -------------------------------------------

    def open_links(self) -> List[Link]:
        return [link for link in self.links if not link.closed]

    def open_ports(self) -> Set[int]:
        """The client ports of the links still open."""
        return {link.port for link in self.open_links()}

    def seen_ports(self) -> Set[int]:
        """The client ports of every link ever accepted."""
        return {link.port for link in self.links}

    # -- the machinery --------------------------------------------------------

    def _listen(self, backlog: int) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(backlog)
        self.port = listener.getsockname()[1]
        self._listener = listener

    def _stop_listening(self) -> None:
        if self._acceptor is not None:
            self._acceptor.kill()
            self._acceptor = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for sock in self._stuck:
            sock.close()
        self._stuck.clear()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        listener = self._listener
        while True:
            client, peer = listener.accept()
            link = Link(client, peer)
            link.black = self._blackhole
            self.links.append(link)
            link.greenlets.append(gevent.spawn(self._serve, link))

    def _serve(self, link: Link) -> None:
        if link.black:
            self._pump(link.client, None, link)  # read and drop until the client gives up
            self._close(link, "eof")
            return
        try:
            link.server = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            self._close(link, "eof")  # the server is down: the client sees the connection end
            return
        link.server.settimeout(None)
        link.server_port = link.server.getsockname()[1]
        up = gevent.spawn(self._pump, link.client, link.server, link)
        down = gevent.spawn(self._pump, link.server, link.client, link)
        link.greenlets += [up, down]
        gevent.joinall([up, down], count=1)
        self._close(link, "eof")

    def _pump(self, source: socket.socket, sink: Optional[socket.socket], link: Link) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    return
                link.last_active = time.monotonic()
                self._flowing.wait()
                if link.black or self._blackhole:
                    link.black = True
                    continue
                if self._latency:
                    gevent.sleep(self._latency)
                limit = self._byte_limit
                if limit is not None and link.bytes + len(data) >= limit:
                    data = data[: max(limit - link.bytes, 0)]
                    if data and sink is not None:
                        sink.sendall(data)
                    link.bytes += len(data)
                    self._close(link, "bytes")
                    return
                if sink is not None:
                    sink.sendall(data)
                link.bytes += len(data)
        except OSError:
            return

    def _reap_loop(self) -> None:
        """Apply the idle cut-off."""
        while True:
            cutoff = self._idle_cutoff
            if cutoff is not None:
                now = time.monotonic()
                for link in self.open_links():
                    if now - link.last_active >= cutoff:
                        self._close(link, "idle")
            gevent.sleep(0.02)

    def _close(self, link: Link, how: str, rst: bool = False) -> None:
        if link.closed:
            return
        link.closed = True
        link.how = how
        current = gevent.getcurrent()
        gevent.killall([g for g in link.greenlets if g is not current], block=False)
        for sock in (link.client, link.server):
            if sock is None:
                continue
            if rst:
                _rst_close(sock)
            else:
                sock.close()
