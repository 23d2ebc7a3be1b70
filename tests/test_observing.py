"""The pool's observers (geventconnpool/_observing.py): what the metrics exporters hear, and when."""

from __future__ import annotations

import logging
from typing import List, Tuple

import gevent
from doubles import FLAVOURS
from gevent.event import Event
from helpers import LinePool, request, wait_until

from geventconnpool._lease import Entry
from geventconnpool._observing import observe, unobserve


class RecordingObserver:
    """An observer that keeps what the pool told it, and can be made to fail."""

    def __init__(self, use_time: bool = False, fail: bool = False) -> None:
        self.use_time = use_time
        self.fail = fail
        self.heard: List[Tuple[str, float]] = []
        self.closures = 0

    def _hear(self, what: str, seconds: float) -> None:
        self.heard.append((what, seconds))
        if self.fail:
            raise RuntimeError(f"observer failed on {what}")

    def connected(self, seconds: float) -> None:
        self._hear("connected", seconds)

    def waited(self, seconds: float) -> None:
        self._hear("waited", seconds)

    def used(self, seconds: float) -> None:
        self._hear("used", seconds)

    def closed(self) -> None:
        self.closures += 1

    def events(self, what: str) -> List[float]:
        return [seconds for event, seconds in self.heard if event == what]


def test_a_pool_without_observers_lends_its_own_entries(line_server, leak_check):
    """With no observer the pool keeps the entry class its options chose, for every flavour of options."""
    for options in FLAVOURS.values():
        with LinePool(line_server, 1, **options) as pool:
            pool.wait(timeout=5)
            chosen = pool._entry_class
            observer = RecordingObserver(use_time=True)
            observe(pool, observer)
            assert pool._entry_class is not chosen and issubclass(pool._entry_class, chosen)
            assert request(pool, b"PING") == b"PONG"
            assert len(observer.events("used")) == 1
            unobserve(pool, observer)
            assert pool._entry_class is chosen and {type(e) for e in pool._entries} == {chosen}
            assert pool._observers == ()
    leak_check()


def test_connects_waits_and_uses_are_told_with_their_durations(line_server, leak_check):
    """connected after each connect, waited only for a caller that had to wait, used for each block."""
    with LinePool(line_server, 1) as pool:
        observer = RecordingObserver(use_time=True)
        observe(pool, observer)
        pool.wait(timeout=5)
        assert len(observer.events("connected")) == 1
        release = Event()

        def hold() -> None:
            with pool.get():
                release.wait()

        holder = gevent.spawn(hold)
        wait_until(lambda: pool.stats().in_use == 1)
        waiter = gevent.spawn(request, pool, b"PING")
        wait_until(lambda: pool.stats().waiting == 1)
        gevent.sleep(0.02)
        release.set()
        assert waiter.get(timeout=5) == b"PONG"
        holder.get(timeout=5)
        (waited,) = observer.events("waited")
        assert waited >= 0.02
        used = observer.events("used")
        assert len(used) == 2 and max(used) >= 0.02
    assert observer.closures == 1 and pool._observers == ()
    leak_check()


def test_an_entry_held_when_use_time_comes_keeps_its_exit(line_server, leak_check):
    """A block entered before an observer asked for use_time ends normally and reports nothing."""
    with LinePool(line_server, 1) as pool:
        pool.wait(timeout=5)
        observer = RecordingObserver(use_time=True)
        with pool.get():
            observe(pool, observer)
        assert observer.events("used") == []
        assert request(pool, b"PING") == b"PONG"
        assert len(observer.events("used")) == 1
        assert type(next(iter(pool._entries))) is not Entry
    leak_check()


def test_a_failing_observer_is_logged_and_the_caller_served(line_server, pool_log, leak_check):
    """An observer's error never reaches the caller: the pool logs it, naming the pool, and goes on."""
    with LinePool(line_server, 1, name="observed") as pool:
        observe(pool, RecordingObserver(use_time=True, fail=True))
        pool.wait(timeout=5)
        assert request(pool, b"PING") == b"PONG"
        assert request(pool, b"PING") == b"PONG"
    errors = pool_log.messages(logging.ERROR)
    assert errors.count("pool 'observed': a metrics exporter failed") == 3  # one connect, two uses
    leak_check()
