"""The six scenarios of the benchmark; each returns a :class:`Table`.

Repetitions are interleaved across rows (every repetition runs each row once,
in a shuffled order), and each figure is the median over the repetitions.  A
ratio is the median of the per-repetition ratios to this library's row, so a
slow moment of the machine weighs on both sides of each ratio alike.
"""

from __future__ import annotations

import contextlib
import gc
import random
import socket
import statistics
import time
import tracemalloc
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import gevent
import greenlet
from gevent.event import Event
from peers import (
    Adapter,
    BareQueue,
    Dedicated,
    Design021,
    Fresh,
    GeventConnPool,
    NullWith,
    Unavailable,
    peer_rows,
)
from servers import Redis

LIB = "geventconnpool"
perf = time.perf_counter
# The checkout loops never block: timing them in CPU time of this thread leaves out the moments
# when the machine runs something else.
cpu = time.thread_time


@dataclass
class Settings:
    quick: bool
    seed: int = 1

    @property
    def checkout_reps(self) -> int:
        return 7 if self.quick else 31

    @property
    def checkout_sample_s(self) -> float:
        return 0.01 if self.quick else 0.025

    @property
    def load_reps(self) -> int:
        return 1 if self.quick else 5

    @property
    def window_s(self) -> float:
        return 0.25 if self.quick else 1.0

    # The TLS table has three rows and a target within 10%: more, shorter windows, so that a
    # minute when the machine runs slower weighs on fewer pairs of rows.
    @property
    def tls_reps(self) -> int:
        return 1 if self.quick else 15

    @property
    def tls_window_s(self) -> float:
        return 0.25 if self.quick else 0.4

    @property
    def recovery_watch_s(self) -> float:
        return 1.2 if self.quick else 3.0

    @property
    def memory_conns(self) -> int:
        return 100 if self.quick else 400


@dataclass
class Table:
    title: str
    columns: List[str]
    rows: List[List[str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    #: Machine-readable figures, for the target checks.
    data: Dict[str, Dict[str, float]] = field(default_factory=dict)
    #: Each row's kind: "lib", "peer" or "ref".
    kinds: Dict[str, str] = field(default_factory=dict)
    #: How many columns, from the left, are names (left-aligned); the others are figures.
    left_columns: int = 2


def log(message: str) -> None:
    print(f"  .. {message}", flush=True)


def connect_plain(port: int) -> Callable[[], Any]:
    def connect() -> Any:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    return connect


def connect_tls(port: int, ctx: Any) -> Callable[[], Any]:
    def connect() -> Any:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            return ctx.wrap_socket(s, server_hostname="localhost")
        except BaseException:
            s.close()
            raise

    return connect


def open_rows(
    candidates: Sequence[Adapter], size: int, connect: Callable[[], Any], **options: Any
) -> List[Adapter]:
    """Open each row's pool; drop, with a printed note, the peers that do not work here."""
    opened = []
    for row in candidates:
        try:
            row.open(size, connect, **options)
            row.wait_ready()
            if row.kind == "peer":
                row.ping()  # a peer that cannot do one round trip under gevent does not run here
        except Unavailable as e:
            print(f"  note: dropped {row.name}: {e}", flush=True)
            continue
        except Exception as e:
            print(f"  note: dropped {row.name}: it fails on Python 3 under gevent: {e!r}", flush=True)
            try:
                row.close()
            except Exception:
                pass
            continue
        opened.append(row)
    return opened


def fmt(value: float, digits: int = 2) -> str:
    if value != value:  # NaN
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def paired_ratio(samples: Dict[str, List[float]], name: str, base: str) -> float:
    pairs = [a / b for a, b in zip(samples[name], samples[base]) if b]
    return statistics.median(pairs) if pairs else float("nan")


def interleaved(names: Sequence[str], reps: int, seed: int) -> List[List[str]]:
    rng = random.Random(seed)
    orders = []
    for _ in range(reps):
        order = list(names)
        rng.shuffle(order)
        orders.append(order)
    return orders


# -- scenario 1: checkout overhead ---------------------------------------------------

# Each option of the pool that adds work to a checkout, as (row label, keyword arguments); the
# checkout table and the instruction counts (instruction_rows.py) both have a row for each.
FEATURES: List[Tuple[str, Dict[str, Any]]] = [
    ("keepalive=60", {"keepalive": 60.0}),
    ("max_lifetime=3600", {"max_lifetime": 3600.0}),
    ("check_after=60", {"check_after": 60.0}),
    ("leak_warning=60", {"leak_warning": 60.0}),
    ("fail_fast=True", {"fail_fast": True}),
]


def checkout_rows() -> List[Adapter]:
    rows: List[Adapter] = [GeventConnPool()]
    rows += [GeventConnPool(f"{LIB} {label}", **kw) for label, kw in FEATURES]
    rows += [BareQueue(), NullWith(), Design021()]
    rows += peer_rows()
    return rows


def scenario_checkout(redis: Redis, settings: Settings) -> Table:
    """One greenlet, a pool of 10, ``with pool.get() as c: pass`` in a loop."""
    rows = open_rows(checkout_rows(), 10, connect_plain(redis.port))
    names = [r.name for r in rows]
    by_name = {r.name: r for r in rows}
    # Calibrate: how many checkouts fill one sample.
    counts: Dict[str, int] = {}
    for row in rows:
        row.checkout_loop(200)
        t0 = cpu()
        row.checkout_loop(2000)
        per_op = max(cpu() - t0, 1e-6) / 2000
        counts[row.name] = max(200, int(settings.checkout_sample_s / per_op))
    samples: Dict[str, List[float]] = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        for order in interleaved(names, settings.checkout_reps, settings.seed):
            for name in order:
                n = counts[name]
                loop = by_name[name].checkout_loop
                t0 = cpu()
                loop(n)
                samples[name].append((cpu() - t0) / n * 1e6)
    finally:
        gc.enable()
        for row in rows:
            row.close()
    base = samples[LIB]
    table = Table(
        "Checkout overhead: one greenlet, pool of 10, `with pool.get() as c: pass`",
        ["row", "µs per checkout", f"x {LIB}", "x bare Queue", "+µs vs features off"],
    )
    for name in names:
        s = samples[name]
        med = statistics.median(s)
        extra = ""
        if name.startswith(LIB + " "):
            extra = fmt(statistics.median(a - b for a, b in zip(s, base)), 3)
        ratio_q = paired_ratio(samples, name, BareQueue.name) if BareQueue.name in samples else float("nan")
        table.rows.append([name, fmt(med, 3), fmt(paired_ratio(samples, name, LIB)), fmt(ratio_q), extra])
        table.data[name] = {
            "us": med,
            "x_lib": paired_ratio(samples, name, LIB),
            "x_queue": ratio_q,
            "plus_us": statistics.median(a - b for a, b in zip(s, base)),
        }
    table.notes.append(
        f"{settings.checkout_reps} interleaved repetitions of about"
        f" {settings.checkout_sample_s * 1000:.0f} ms per row, timed in CPU time of the thread"
        " (time.thread_time) with the garbage collector off;"
        " the loop itself is included in every row."
    )
    table.notes += [f"{r.name}: {r.note}" for r in rows if r.note and r.kind != "lib"]
    return table


# -- scenarios 2 and 3: many greenlets doing PING/PONG -----------------------------------


@dataclass
class Window:
    ops: int
    failed: int
    hung: int
    elapsed: float
    latencies: List[float]

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.elapsed if self.elapsed else 0.0


def percentile(sorted_values: List[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


def run_window(row: Adapter, greenlets: int, seconds: float, max_ops_per_greenlet: int = 1_000_000) -> Window:
    """``greenlets`` workers send PINGs through ``row`` for ``seconds``; every worker stops by itself."""
    start = Event()
    stop_at = [0.0]
    latencies: List[float] = []
    counts = {"failed": 0}
    ready = [0]
    dedicated = isinstance(row, Dedicated)

    def worker() -> None:
        if dedicated:
            row.prepare()  # type: ignore[attr-defined]
        ready[0] += 1
        start.wait()
        ping = row.ping
        record = latencies.append
        deadline = stop_at[0]
        for _ in range(max_ops_per_greenlet):
            t0 = perf()
            if t0 >= deadline:
                return
            try:
                ping()
            except Exception:
                counts["failed"] += 1
                gevent.sleep(0.001)
                continue
            record(perf() - t0)

    workers = [gevent.spawn(worker) for _ in range(greenlets)]
    with gevent.Timeout(30, False):
        while ready[0] < greenlets and not all(w.dead for w in workers):
            gevent.sleep(0.001)
    gc.collect()
    t0 = perf()
    stop_at[0] = t0 + seconds
    start.set()
    # Wait for the workers: each stops at its first request after the deadline.
    gevent.joinall(workers, timeout=seconds + 10)
    elapsed = perf() - t0
    hung = sum(1 for w in workers if not w.dead)
    gevent.killall(workers, timeout=5)
    if dedicated:
        row.close()
        row.all.clear()  # type: ignore[attr-defined]
    latencies.sort()
    return Window(len(latencies), counts["failed"], hung, min(elapsed, seconds + 10), latencies)


def load_table(
    title: str,
    rows: List[Adapter],
    levels: Sequence[int],
    settings: Settings,
    base: str = LIB,
    extra_notes: Sequence[str] = (),
    reps: Optional[int] = None,
    window_s: Optional[float] = None,
) -> Table:
    """Run ``rows`` at each load level: ``reps`` windows of ``window_s`` (by default, the settings')."""
    reps = settings.load_reps if reps is None else reps
    window_s = settings.window_s if window_s is None else window_s
    names = [r.name for r in rows]
    by_name = {r.name: r for r in rows}
    kinds = {r.name: r.kind for r in rows}
    results: Dict[Tuple[int, str], List[Window]] = {(c, n): [] for c in levels for n in names}
    for c in levels:
        for rep, order in enumerate(interleaved(names, reps, settings.seed + c)):
            for name in order:
                results[(c, name)].append(run_window(by_name[name], c, window_s))
            log(f"{c} greenlets: repetition {rep + 1}/{reps} done")
    table = Table(
        title,
        ["greenlets", "row", "ops/s", f"x {base}", "p50 ms", "p99 ms", "p99/p50", "failed", "hung"],
        kinds=kinds,
    )
    for c in levels:
        base_ops = [w.ops_per_s for w in results[(c, base)]]
        for name in names:
            ws = results[(c, name)]
            ops = statistics.median(w.ops_per_s for w in ws)
            ratio = statistics.median(w.ops_per_s / b for w, b in zip(ws, base_ops) if b) if base_ops else 0.0
            p50, p90, p99, p999 = (
                statistics.median(percentile(w.latencies, q) for w in ws) * 1000
                for q in (0.5, 0.9, 0.99, 0.999)
            )
            failed = sum(w.failed for w in ws)
            hung = sum(w.hung for w in ws)
            spread = fmt(p99 / p50 if p50 else 0.0, 1)
            table.rows.append(
                [str(c), name, fmt(ops, 0), fmt(ratio), fmt(p50), fmt(p99), spread, str(failed), str(hung)]
            )
            table.data[f"{c} {name}"] = {
                "ops": ops,
                "ratio": ratio,
                "p50": p50,
                "p90": p90,
                "p99": p99,
                "p999": p999,
                "failed": failed,
            }
    table.notes.append(
        f"{reps} interleaved repetitions of a {window_s:g} s window per row;"
        " latency is the whole request, from asking the pool to reading PONG, waiting included."
    )
    table.notes += list(extra_notes)
    table.notes += [f"{r.name}: {r.note}" for r in rows if r.note and r.kind != "lib"]
    return table


def scenario_contended(redis: Redis, settings: Settings) -> Table:
    """Pool of 10; 200 and 1,000 greenlets doing PING/PONG against redis."""
    candidates: List[Adapter] = [GeventConnPool(), Design021(), BareQueue()]
    candidates += peer_rows()
    candidates += [Dedicated(), Fresh()]
    rows = open_rows(candidates, 10, connect_plain(redis.port), timeout=30.0)
    try:
        return load_table(
            "Contended: pool of 10, N greenlets doing PING/PONG against redis",
            rows,
            (200, 1000),
            settings,
            extra_notes=[
                "dedicated connection: N connections, one per greenlet, the physical limit of no waiting;"
                " fresh connection per request: a TCP connect and close around every PING."
            ],
        )
    finally:
        for row in rows:
            row.close()


def scenario_tls(redis: Redis, tls_ctx: Any, settings: Settings) -> Table:
    """TLS, 10 and 50 greenlets: a pool of 10, a dedicated TLS connection each, a handshake per request."""
    assert redis.tls_port is not None
    rows = open_rows(
        [GeventConnPool(), Dedicated(), Fresh()], 10, connect_tls(redis.tls_port, tls_ctx), timeout=30.0
    )
    rows[1].name = "dedicated TLS connection"
    rows[2].name = "fresh TLS connection per request"
    server = "redis-server itself" if redis.tls_by == "redis" else "a gevent TLS PING server"
    try:
        return load_table(
            "TLS: 10 and 50 greenlets doing PING/PONG over TLS",
            rows,
            (10, 50),
            settings,
            reps=settings.tls_reps,
            window_s=settings.tls_window_s,
            extra_notes=[
                f"TLS served by {server} with a throwaway trustme certificate; the client verifies it.",
                "pooled: pool of 10; dedicated: one connection per greenlet, opened before the clock starts;"
                " fresh: TCP connect + TLS handshake + PING + close per request.",
            ],
        )
    finally:
        for row in rows:
            row.close()


# -- scenario 4: recovery -------------------------------------------------------------


class Monitor:
    """Counts redis' clients (less itself) over a connection of its own, reconnecting as needed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: Optional[Any] = None

    def clients(self) -> Optional[int]:
        try:
            if self.sock is None:
                self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=1)
            self.sock.sendall(b"INFO clients\r\n")
            data = b""
            while b"connected_clients:" not in data or not data.endswith(b"\r\n"):
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError
                data += chunk
            for line in data.split(b"\r\n"):
                if line.startswith(b"connected_clients:"):
                    return int(line.split(b":")[1]) - 1
            return None
        except (OSError, ValueError):
            self.close()
            return None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


@dataclass
class Recovery:
    healed_s: float  # nan when not within the watch window
    ok: int
    failed: int
    hung: int
    max_request_s: float


def steady_load(
    row: Adapter, greenlets: int, hang_after: float
) -> Tuple[Callable[[], Tuple[int, int, int, float]], Any]:
    """Start ``greenlets`` workers, each sending a PING every 10 ms; return (stop, state)."""
    state = {"ok": 0, "failed": 0, "hung": 0, "max": 0.0}
    running = [True]

    def worker() -> None:
        for _ in range(100_000):
            if not running[0]:
                return
            t0 = perf()
            try:
                with gevent.Timeout(hang_after):
                    row.ping()
                state["ok"] += 1
            except gevent.Timeout:
                state["hung"] += 1
            except Exception:
                state["failed"] += 1
            state["max"] = max(state["max"], perf() - t0)
            gevent.sleep(0.01)

    workers = [gevent.spawn(worker) for _ in range(greenlets)]

    def stop() -> Tuple[int, int, int, float]:
        running[0] = False
        gevent.joinall(workers, timeout=hang_after + 2)
        state["hung"] += sum(1 for w in workers if not w.dead)
        gevent.killall(workers, timeout=5)
        return int(state["ok"]), int(state["failed"]), int(state["hung"]), float(state["max"])

    return stop, state


def watch_heal(redis: Redis, monitor: Monitor, size: int, watch_s: float) -> float:
    """Wait until redis answers, then until it counts ``size`` clients; seconds from answering to healed."""
    deadline = perf() + 10
    while not redis.answers():
        if perf() > deadline:
            raise RuntimeError("redis-server did not come back")
        gevent.sleep(0.002)
    up_at = perf()
    healed = float("nan")
    while perf() - up_at < watch_s:
        n = monitor.clients()
        if n is not None and n >= size:
            healed = perf() - up_at
            break
        gevent.sleep(0.005)
    # Keep the load on for the rest of the window, so that late failures are counted.
    remaining = watch_s - (perf() - up_at)
    if remaining > 0:
        gevent.sleep(remaining)
    return healed


def recovery_once(row: Adapter, redis: Redis, settings: Settings, started_down: bool) -> Recovery:
    size, get_timeout = 10, 2.0
    monitor = Monitor(redis.port)
    if started_down:
        redis.kill()
        row.open(size, connect_plain(redis.port), timeout=get_timeout)
    else:
        row.open(size, connect_plain(redis.port), timeout=get_timeout)
        row.wait_ready()
    stop, _ = steady_load(row, 20, hang_after=get_timeout + 1.0)
    try:
        if not started_down:
            gevent.sleep(0.3)
            redis.kill()
        gevent.sleep(1.0)
        redis.start()
        healed = watch_heal(redis, monitor, size, settings.recovery_watch_s)
    finally:
        ok, failed, hung, longest = stop()
        row.close()
        monitor.close()
    return Recovery(healed, ok, failed, hung, longest)


def recovery_rows() -> List[Adapter]:
    return [GeventConnPool(), Design021(), *peer_rows()]


def scenario_recovery(redis: Redis, settings: Settings) -> Table:
    """redis killed under steady load and restarted 1 s later; and a pool started while redis is down."""
    table = Table(
        "Recovery: redis-server killed (SIGKILL) under steady load, restarted 1 s later",
        ["case", "row", "healed in s", "requests ok", "failed", "hung", "longest request s"],
    )
    reps = 1 if settings.quick else 3
    cases = [("killed and restarted", False, recovery_rows), ("pool started while down", True, None)]
    for case, started_down, make_rows in cases:
        candidates = make_rows() if make_rows else [GeventConnPool(), Design021()]
        # Check each row can run at all (with redis up) before the faults.
        rows = open_rows(candidates, 10, connect_plain(redis.port), timeout=2.0)
        for row in rows:
            row.close()
        results: Dict[str, List[Recovery]] = {r.name: [] for r in rows}
        by_name = {r.name: r for r in rows}
        for order in interleaved(list(results), reps, settings.seed):
            for name in order:
                results[name].append(recovery_once(by_name[name], redis, settings, started_down))
        log(f"recovery: {case} done")
        for name, rs in results.items():
            healed = [r.healed_s for r in rs]
            ok_heal = [h for h in healed if h == h]
            shown = (
                fmt(statistics.median(ok_heal), 3)
                if len(ok_heal) == len(healed)
                else (f"> {settings.recovery_watch_s:g} ({len(healed) - len(ok_heal)}/{len(healed)} runs)")
            )
            table.rows.append(
                [
                    case,
                    name,
                    shown,
                    str(sum(r.ok for r in rs)),
                    str(sum(r.failed for r in rs)),
                    str(sum(r.hung for r in rs)),
                    fmt(max(r.max_request_s for r in rs), 3),
                ]
            )
            table.data[f"{case} {name}"] = {
                "healed": statistics.median(healed) if len(ok_heal) == len(healed) else float("inf"),
                "hung": sum(r.hung for r in rs),
                "failed": sum(r.failed for r in rs),
            }
    table.notes += [
        f"{reps} run(s) per row, interleaved; 20 greenlets each send a PING every 10 ms through a pool of 10"
        " with a 2 s checkout timeout; a request still running after 3 s counts as hung.",
        "healed in: seconds from redis answering again until redis counts 10 connections from the pool"
        f" (watched for {settings.recovery_watch_s:g} s); pools that connect lazily reopen only as many"
        " connections as the load needs at once.",
        "failed: requests that raised (a broken connection, a checkout timeout, an exhausted pool).",
        "pool started while down: the pool is made while redis-server is dead; peers that connect lazily are"
        " left out, as for them this is no different from the first case.",
    ]
    return table


# -- scenario 5: memory -----------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def live_greenlets() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet) and not o.dead)


def scenario_memory(redis: Redis, settings: Settings) -> Table:
    """Python memory (tracemalloc) and greenlets per idle pooled connection, vs dedicated sockets."""
    n = settings.memory_conns
    connect = connect_plain(redis.port)
    table = Table(
        f"Memory: {n} idle connections",
        [
            "row",
            "bytes per connection",
            "+bytes vs dedicated",
            "RSS bytes per connection",
            "greenlets per idle connection",
        ],
    )
    figures: Dict[str, Tuple[float, float, float]] = {}
    # Two passes over fresh rows; the first only warms the allocator up, the second is reported.
    passes = [[GeventConnPool(), Dedicated(), Design021(), *peer_rows()] for _ in range(2)]
    for row in passes[0] + passes[1]:
        gc.collect()
        gevent.sleep(0.05)
        greenlets_before = live_greenlets()
        rss_before = rss_bytes()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        try:
            if isinstance(row, Dedicated):
                row.open(n, connect)
                held = [connect() for _ in range(n)]
                row.all.extend(held)
            else:
                row.open(n, connect, timeout=10.0)
                row.wait_ready()
                if row.kind == "peer":  # make the lazy ones open all n connections
                    with contextlib.ExitStack() as stack:
                        for _ in range(n):
                            stack.enter_context(row.checkout())
        except Exception as e:
            tracemalloc.stop()
            if row in passes[1]:
                why = str(e) if isinstance(e, Unavailable) else repr(e)
                print(f"  note: dropped {row.name} from the memory table: {why}", flush=True)
            continue
        gevent.sleep(0.05)  # let the connecting greenlets finish
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        rss_after = rss_bytes()
        greenlets_after = live_greenlets()
        figures[row.name] = (
            (after - before) / n,
            (rss_after - rss_before) / n,
            (greenlets_after - greenlets_before) / n,
        )
        row.close()
    dedicated = figures.get(Dedicated.name, (float("nan"),) * 3)[0]
    for name, (per, rss, glets) in figures.items():
        plus = "" if name == Dedicated.name else fmt(per - dedicated, 0)
        table.rows.append([name, fmt(per, 0), plus, fmt(rss, 0), fmt(glets, 3)])
        table.data[name] = {"bytes": per, "plus": per - dedicated, "greenlets": glets}
    table.notes += [
        "bytes per connection: Python memory traced by tracemalloc while the pool is made and filled,"
        " divided by the number of connections; the dedicated row is the same number of bare gevent sockets.",
        "RSS is the process's resident memory delta (coarse: allocator arenas, first-touch pages).",
        "greenlets per idle connection: greenlets alive once the pool is full and idle, less those before,"
        " divided by the number of connections (a pool-wide background greenlet counts 1/N).",
    ]
    return table


# -- scenario 6: readiness --------------------------------------------------------------


def scenario_readiness(redis: Redis, settings: Settings) -> Table:
    """How soon pool.wait(min_open=...) returns after the connect that completes its count."""
    from geventconnpool import ConnectionPool

    connect = connect_plain(redis.port)
    size = 10
    reps = 30 if settings.quick else 300

    class TimedPool(ConnectionPool[Any]):
        def __init__(self) -> None:
            self.connected_at: List[float] = []  # when each _new_connection returned
            super().__init__(size, name="readiness")

        def _new_connection(self) -> Any:
            sock = connect()
            self.connected_at.append(perf())
            return sock

    def polled(pool: TimedPool, min_open: int) -> None:
        """The wait() of 1.0: a check every 10 ms."""
        while pool.stats().idle < min_open:
            gevent.sleep(0.01)

    def woken(pool: TimedPool, min_open: int) -> None:
        pool.wait(timeout=5, min_open=min_open)

    cases = [
        ("wait(min_open=1)", 1, woken, "lib"),
        ("wait(), all 10", size, woken, "lib"),
        ("polling every 10 ms (1.0's wait)", 1, polled, "ref"),
    ]
    table = Table(
        f"Readiness: from the connect that completes the count to wait() returning, a pool of {size}",
        ["row", "p50 µs", "p99 µs", "max µs"],
        left_columns=1,
    )
    for name, min_open, wait, kind in cases:
        latencies = []
        for _ in range(reps):
            pool = TimedPool()  # its connects start at the hub's next turn: wait() blocks first
            try:
                wait(pool, min_open)
                returned = perf()
                latencies.append(returned - sorted(pool.connected_at)[min_open - 1])
            finally:
                pool.close()
        latencies.sort()
        p50, p99 = percentile(latencies, 0.50), percentile(latencies, 0.99)
        table.rows.append([name, fmt(p50 * 1e6, 0), fmt(p99 * 1e6, 0), fmt(latencies[-1] * 1e6, 0)])
        table.data[name] = {"p50": p50, "p99": p99}
        table.kinds[name] = kind
    log("readiness done")
    table.notes += [
        f"{reps} pools made per row, each against redis-server; a row's figure is the time from the"
        " return of the _new_connection() that completes wait()'s count to wait() returning.",
        "polling every 10 ms: what wait() did in 1.0, for comparison.",
    ]
    return table
