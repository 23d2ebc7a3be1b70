"""A pool belongs to the gevent hub of the thread that made it: other threads get a clear RuntimeError.

Real OS threads are started in a way that works with and without monkey-patching: gevent's
thread pool (always real threads) and the original ``_thread.start_new_thread`` (which
patch_all() replaces with a greenlet spawner in the ``threading`` module, hence not
``threading.Thread``).
"""

from __future__ import annotations

from typing import Callable, List, Tuple

import gevent
import pytest
from gevent.monkey import get_original
from helpers import LinePool, request, wait_until

start_new_thread = get_original("_thread", "start_new_thread")
real_thread_ident = get_original("_thread", "get_ident")


def run_in_real_thread(fn: Callable[[], object]) -> Tuple[str, object, int]:
    """Run ``fn`` in a new OS thread; return ("ok", result) or ("error", exception), and the thread id."""
    outcome: List[Tuple[str, object, int]] = []

    def body() -> None:
        try:
            outcome.append(("ok", fn(), real_thread_ident()))
        except BaseException as error:
            outcome.append(("error", error, real_thread_ident()))

    start_new_thread(body, ())
    wait_until(lambda: outcome, timeout=10)
    return outcome[0]


def test_get_from_another_thread_raises_runtime_error(line_server, leak_check):
    """get() from a real thread other than the pool's raises RuntimeError saying the pool belongs to another
    thread.
    """
    with LinePool(line_server, 2, name="hub-bound") as pool:
        pool.wait(timeout=5)

        def borrow() -> object:
            with pool.get(timeout=1) as c:
                return c

        kind, error, ident = run_in_real_thread(borrow)
        assert ident != real_thread_ident()
        assert kind == "error"
        assert isinstance(error, RuntimeError)
        assert "hub-bound" in str(error) and "thread" in str(error)
        assert "cannot switch" not in str(error)
        # The pool is untouched and still serves its own thread.
        s = pool.stats()
        assert (s.idle, s.in_use, s.waiting, s.checkouts) == (2, 0, 0, 0)
        assert request(pool, b"PING") == b"PONG"
    leak_check()


def test_get_from_gevent_threadpool_raises_runtime_error(line_server, leak_check):
    """get() from a worker of gevent's thread pool raises RuntimeError, also when no connection is idle."""
    with LinePool(line_server, 1) as pool:
        pool.wait(timeout=5)

        def borrow() -> None:
            with pool.get(timeout=0.5):
                pass

        threadpool = gevent.get_hub().threadpool
        with pytest.raises(RuntimeError, match="thread"):
            threadpool.spawn(borrow).get(timeout=10)
        # Now nothing is idle: the slow path must say the same.
        with pool.get(), pytest.raises(RuntimeError, match="thread"):
            threadpool.spawn(borrow).get(timeout=10)
        assert pool.stats().waiting == 0 and pool.stats().timeouts == 0
    leak_check()


def test_wait_from_another_thread_raises_runtime_error(line_server, leak_check):
    """wait() from another thread raises RuntimeError too, instead of a gevent hub error."""
    with LinePool(line_server, 1) as pool:
        kind, error, _ = run_in_real_thread(lambda: pool.wait(timeout=1))
        assert kind == "error" and isinstance(error, RuntimeError)
        pool.wait(timeout=5)
    leak_check()


def test_a_pool_made_in_another_thread_works_there(line_server, leak_check):
    """A pool made in a second thread serves that thread's greenlets, and refuses the main thread."""
    made: List[LinePool] = []

    def in_thread() -> List[bytes]:
        hub = gevent.get_hub()
        try:
            with LinePool(line_server, 2, name="worker-pool") as pool:
                made.append(pool)
                pool.wait(timeout=5)
                replies = gevent.joinall(
                    [gevent.spawn(request, pool, f"ECHO t{i}".encode()) for i in range(4)], timeout=5
                )
                return [g.get() for g in replies]
        finally:
            hub.destroy(destroy_loop=True)

    kind, replies, _ = run_in_real_thread(in_thread)
    assert kind == "ok", replies
    assert sorted(replies) == [b"t0", b"t1", b"t2", b"t3"]  # type: ignore[call-overload]
    with pytest.raises(RuntimeError, match="worker-pool"):
        made[0].get(timeout=0)
    leak_check()
