"""The rows of ``run.py --instructions``, and the loops that valgrind's callgrind counts.

A row repeats one operation: a *checkout* (one greenlet, a pool of 10,
``with pool.get() as c: pass``) or a *contended request* (100 greenlets
sharing a pool of 10, ``with pool.get() as c: gevent.sleep(0)``), done by
this library with some options, or by a reference design.  The connections
are ends of ``socket.socketpair()``: real gevent sockets that nothing writes
to, so that no network I/O is counted.

Run as a script (``instructions.py`` starts it under callgrind), it imports
everything once, under ``gevent.monkey.patch_all()`` like the rest of the
benchmark, then forks one child per row: every row starts from the same
state, whichever rows run and in whatever order, and the start-up is paid
once.  A child builds its row, warms it up, then runs a loop of ``low`` and
a loop of ``high`` operations between calls of :func:`mark`.  Callgrind,
started with ``--dump-before=getloadavg``, writes its counters out and zeroes
them at each mark, so each of the two parts holds one loop plus the same
constant cost; ``instructions.py`` divides their difference by
``high - low``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import inspect
import os
import sys
import traceback
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

SIZE = 10
GREENLETS = 100
#: The C function whose every call makes callgrind dump its counters (``--dump-before``).
MARK_FUNCTION = "getloadavg"

# Operations per loop: (warm-up, low, high).  A contended loop is GREENLETS greenlets doing
# count / GREENLETS requests each.
COUNTS = {
    ("checkout", False): (500, 1_000, 6_000),
    ("checkout", True): (100, 100, 600),
    ("contended", False): (3 * GREENLETS, 5 * GREENLETS, 25 * GREENLETS),
    ("contended", True): (1 * GREENLETS, 2 * GREENLETS, 6 * GREENLETS),
    ("turn", False): (500, 1_000, 6_000),
    ("turn", True): (100, 100, 600),
}


@dataclass(frozen=True)
class Row:
    """One measured operation: which loop, and the keyword arguments of the pool (or design) it uses."""

    section: str  # "checkout", "contended", or "turn" (a checkout, then one turn of the hub)
    name: str
    #: "pool" (this library), "queue" (a bare gevent.queue.Queue), "design021" (the 0.2.1 design),
    #: "null_with" (a with statement on a ready object) or "nothing" (the loop alone, or sleep(0) alone).
    loop: str
    #: The pool's keyword arguments beyond those of "features off"; the 0.2.1 design's open() options.
    options: Dict[str, Any] = field(default_factory=dict)
    #: The metrics exporter instrumenting the pool: "otel", "otel use_time" or "prometheus" (see EXPORTERS).
    exporter: Optional[str] = None

    @property
    def key(self) -> str:
        """The row's unique name, as ``--only`` matches it."""
        return f"{self.section}: {self.name}"

    @property
    def is_pool(self) -> bool:
        return self.loop == "pool"


LIB = "geventconnpool"
FEATURES_OFF = f"{LIB} features off"
BARE_QUEUE = "bare Queue get+put"
CONTENDED_DEFAULT = f"{LIB} timeout=30 (default)"
SLEEP_ALONE = "sleep(0) alone"
WATCH_IDLE = f"{LIB} watch_idle on"
ADDRESS_ON = f"{LIB} address= (one IP)"
OTEL_ON = f"{LIB} otel exporter on"
PROMETHEUS_ON = f"{LIB} prometheus exporter on"
#: What each exporter of a row needs: its module here, and the package that records.
EXPORTERS = {
    "otel": ("geventconnpool.otel", "opentelemetry.sdk"),
    "otel use_time": ("geventconnpool.otel", "opentelemetry.sdk"),
    "prometheus": ("geventconnpool.prometheus", "prometheus_client"),
}


def rows() -> List[Row]:
    """Every row, in the order of the tables."""
    from scenarios import FEATURES

    checkout = [Row("checkout", FEATURES_OFF, "pool")]
    checkout += [Row("checkout", f"{LIB} {label}", "pool", dict(kw)) for label, kw in FEATURES]
    checkout += [
        Row("checkout", WATCH_IDLE, "pool", {"watch_idle": True}),
        Row("checkout", ADDRESS_ON, "pool", {"address": ("backend.test", 80)}),
        Row("checkout", OTEL_ON, "pool", exporter="otel"),
        Row("checkout", f"{LIB} otel use_time on", "pool", exporter="otel use_time"),
        Row("checkout", PROMETHEUS_ON, "pool", exporter="prometheus"),
        Row("checkout", BARE_QUEUE, "queue"),
        Row("checkout", "0.2.1 design", "design021"),
        Row("checkout", "with on a ready object", "null_with"),
        Row("checkout", "the loop alone", "nothing"),
    ]
    contended = [
        Row("contended", CONTENDED_DEFAULT, "pool"),
        Row("contended", f"{LIB} timeout=None", "pool", {"timeout": None}),
        Row("contended", WATCH_IDLE, "pool", {"watch_idle": True}),
        # Every request waits here: each records a wait_time.
        Row("contended", OTEL_ON, "pool", exporter="otel"),
        Row("contended", PROMETHEUS_ON, "pool", exporter="prometheus"),
        Row("contended", "bare Queue as the pool", "queue"),
        Row("contended", "0.2.1 design", "design021", {"timeout": 30.0}),
        Row("contended", SLEEP_ALONE, "nothing"),
    ]
    # What watch_idle costs where it works: the hub turns between two checkouts, so the idle
    # connection's watcher is started (by the hub) and stopped (by the next checkout).
    turn = [
        Row("turn", FEATURES_OFF, "pool"),
        Row("turn", WATCH_IDLE, "pool", {"watch_idle": True}),
        Row("turn", SLEEP_ALONE, "nothing"),
    ]
    return checkout + contended + turn


def references(row: Row) -> List[str]:
    """The keys of the rows that ``row``'s ratios are taken against."""
    if row.section == "checkout":
        return [f"checkout: {BARE_QUEUE}", f"checkout: {FEATURES_OFF}"]
    if row.section == "turn":
        return [f"turn: {SLEEP_ALONE}", f"turn: {FEATURES_OFF}", f"checkout: {BARE_QUEUE}"]
    return [f"contended: {SLEEP_ALONE}"]


def pool_parameters() -> Sequence[str]:
    """The keyword arguments this checkout's ConnectionPool accepts."""
    from geventconnpool import ConnectionPool

    return list(inspect.signature(ConnectionPool).parameters)


def missing_options(row: Row) -> List[str]:
    """The options of ``row`` that this version of the pool does not have (the row is then n/a)."""
    if not row.is_pool:
        return []
    accepted = pool_parameters()
    missing = [k for k in row.options if k not in accepted]
    if row.exporter is not None:
        missing += [m for m in EXPORTERS[row.exporter] if not importable(m)]
    return missing


def importable(module: str) -> bool:
    """Whether ``module`` (dotted, its parents perhaps missing) can be imported here."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def pool_options(row: Row) -> Dict[str, Any]:
    """The keyword arguments of ``row``'s pool: every feature off, then the row's own."""
    off: Dict[str, Any] = {"watch_idle": False} if "watch_idle" in pool_parameters() else {}
    return {**off, **row.options}


def counts(section: str, quick: bool) -> Tuple[int, int, int]:
    """(warm-up, low, high) operations of a loop of ``section`` ("checkout" or "contended")."""
    return COUNTS[(section, quick)]


# -- in the child, under callgrind ---------------------------------------------------------


def mark() -> None:
    """Make callgrind dump its counters here (it was started with ``--dump-before=getloadavg``)."""
    os.getloadavg()


def socketpair_connect(keep: List[Any]) -> Callable[[], Any]:
    """A connect callable returning one end of a socket pair; the other end is kept open in ``keep``."""
    import socket

    def connect() -> Any:
        mine, theirs = socket.socketpair()
        keep.append(theirs)
        return mine

    return connect


def turn_loop(row: Row, keep: List[Any]) -> Callable[[int], None]:
    """``run(n)``: ``n`` checkouts by this greenlet, each followed by one turn of the hub (``sleep(0)``)."""
    import gevent

    sleep = gevent.sleep
    if row.loop == "pool":
        get = lender(row, socketpair_connect(keep))

        def run(n: int) -> None:
            for _ in repeat(None, n):
                with get() as _c:
                    pass
                sleep(0)

    else:

        def run(n: int) -> None:
            for _ in repeat(None, n):
                sleep(0)

    return run


def checkout_loop(row: Row, keep: List[Any]) -> Callable[[int], None]:
    """``run(n)``: ``n`` checkouts by this greenlet, the way ``row`` does one."""
    from peers import NullWith

    connect = socketpair_connect(keep)
    # The loops iterate over repeat(None, n), not range(n): range's ints past 256 are
    # allocated, at a cost that grows with the index and would blur the difference of two loops.
    if row.loop in ("pool", "design021"):
        get = lender(row, connect)

        def run(n: int) -> None:
            for _ in repeat(None, n):
                with get() as _c:
                    pass

    elif row.loop == "queue":
        q_get, q_put = filled_queue(connect)

        def run(n: int) -> None:
            for _ in repeat(None, n):
                c = q_get()
                q_put(c)

    elif row.loop == "null_with":
        cm = NullWith._CM()

        def run(n: int) -> None:
            for _ in repeat(None, n):
                with cm as _c:
                    pass

    else:

        def run(n: int) -> None:
            for _ in repeat(None, n):
                pass

    return run


def contended_loop(row: Row, keep: List[Any]) -> Callable[[int], None]:
    """``run(n)``: GREENLETS greenlets each doing ``n / GREENLETS`` requests the way ``row`` does one."""
    import gevent

    connect = socketpair_connect(keep)
    sleep = gevent.sleep
    if row.loop in ("pool", "design021"):
        get = lender(row, connect)

        def requests(k: int) -> None:
            for _ in repeat(None, k):
                with get() as _c:
                    sleep(0)

    elif row.loop == "queue":
        q_get, q_put = filled_queue(connect)

        def requests(k: int) -> None:
            for _ in repeat(None, k):
                c = q_get()
                sleep(0)
                q_put(c)

    else:

        def requests(k: int) -> None:
            for _ in repeat(None, k):
                sleep(0)

    def run(n: int) -> None:
        workers = [gevent.spawn(requests, n // GREENLETS) for _ in range(GREENLETS)]
        gevent.joinall(workers, raise_error=True)

    return run


def lender(row: Row, connect: Callable[[], Any]) -> Callable[[], Any]:
    """The ``get`` of ``row``'s pool (this library's or the 0.2.1 design's), once all SIZE are open."""
    if row.loop == "pool":
        return make_pool(row, connect).get  # type: ignore[no-any-return]
    from peers import Design021

    design = Design021()
    design.open(SIZE, connect, **row.options)
    design.wait_ready()
    return design.get


def filled_queue(connect: Callable[[], Any]) -> Tuple[Callable[[], Any], Callable[[Any], None]]:
    """``get`` and ``put`` of a bare gevent.queue.Queue holding SIZE connections."""
    import gevent.queue

    q: gevent.queue.Queue[Any] = gevent.queue.Queue()
    for _ in range(SIZE):
        q.put(connect())
    return q.get, q.put


def make_pool(row: Row, connect: Callable[[], Any]) -> Any:
    """This library's pool of SIZE socket pairs, with ``row``'s options, once all are open."""
    from geventconnpool import ConnectionPool

    class SocketPairPool(ConnectionPool[Any]):
        def _new_connection(self) -> Any:
            return connect()

        def _keepalive(self, c: Any) -> None:
            pass  # never due within a measurement: keepalive and check_after are 60 s

    class AddressedSocketPairPool(ConnectionPool[Any]):
        """The same, made with address=: its name resolves to one IP, and _connect opens the pair."""

        def _resolve(self, host: str, port: int) -> List[str]:
            return ["127.0.0.1"]

        def _connect(self, address: Any) -> Any:
            return connect()

    cls = AddressedSocketPairPool if "address" in row.options else SocketPairPool
    pool = cls(SIZE, **pool_options(row))
    pool.wait(10)
    instrument(row, pool)
    return pool


def instrument(row: Row, pool: Any) -> None:
    """Export ``pool``'s metrics as ``row`` says, to an SDK or a registry that keeps them in memory."""
    if row.exporter in ("otel", "otel use_time"):
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        from geventconnpool import otel

        provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
        otel.instrument(pool, provider, use_time=row.exporter == "otel use_time")
    elif row.exporter == "prometheus":
        from prometheus_client import CollectorRegistry

        from geventconnpool import prometheus

        prometheus.instrument(pool, CollectorRegistry())


def measure(row: Row, quick: bool) -> None:
    """Build ``row``, warm it up, then run its low and high loops between marks."""
    # gevent's hub runs its queued callbacks in batches of 50 and stops to poll for I/O when
    # a batch ends past the switch interval (5 ms).  Natively a batch takes some 0.1 ms; under
    # valgrind, 50 times slower, it would stop after nearly every batch, at a cost that varies
    # with the machine's speed.  A long interval keeps the hub doing what it does natively.
    sys.setswitchinterval(1000.0)
    keep: List[Any] = []
    loops = {"checkout": checkout_loop, "contended": contended_loop, "turn": turn_loop}
    run = loops[row.section](row, keep)
    warm_up, low, high = counts(row.section, quick)
    run(warm_up)
    # What was made so far is never collected: a collection's cost then depends only on
    # what the loops allocate.  The collector stays on, as in a real program.
    gc.collect()
    gc.freeze()
    mark()
    run(low)
    mark()
    run(high)
    mark()


NOT_CHOSEN = 3  # the exit status of a child whose row was not chosen


def child(index: int, row: Row, chosen_file: str, quick: bool) -> None:
    """In a forked child: count ``row`` if the flag at ``index`` of ``chosen_file`` is "1"; exit."""
    code = 1
    try:
        # The file has one flag per row whatever the choice, so reading it leaves the same heap.
        with open(chosen_file) as f:
            chosen = f.read()[index] == "1"
        if chosen:
            measure(row, quick)
        code = 0 if chosen else NOT_CHOSEN
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Fork a child for every row, ``--jobs`` at a time; write each one's row, pid and exit status.

    A child is forked for every row, chosen or not, in the same order, so
    that each row's child starts from the same state of this process
    whichever rows were chosen; a child whose row was not chosen exits at once.
    """
    from gevent import monkey

    monkey.patch_all()
    parser = argparse.ArgumentParser(description="run rows under callgrind (started by instructions.py)")
    parser.add_argument("--chosen", required=True, help='a file of one "1" or "0" per row of rows()')
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--manifest", required=True, help="file to write 'index<TAB>pid<TAB>status' lines to")
    args = parser.parse_args(argv)
    every = rows()
    # Import all that the children use before the first fork, so that each starts from this state.
    import gevent.queue  # noqa: F401
    import peers  # noqa: F401

    pool_parameters()
    fork = monkey.get_original("os", "fork")  # gevent's would start its hub here, before the next fork
    waitpid = monkey.get_original("os", "waitpid")
    running: Dict[int, int] = {}
    with open(args.manifest, "w") as manifest:

        def reap() -> None:
            pid, status = waitpid(-1, 0)
            index = running.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            manifest.write(f"{index}\t{pid}\t{code}\n")
            manifest.flush()
            if code != NOT_CHOSEN:
                print(f"  .. {every[index].key}: {'counted' if code == 0 else 'failed'}", flush=True)

        for _ in range(args.repeat):
            for index, row in enumerate(every):
                while len(running) >= args.jobs:
                    reap()
                sys.stdout.flush()
                pid = fork()
                if pid == 0:
                    child(index, row, args.chosen, args.quick)
                running[pid] = index
        while running:
            reap()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
