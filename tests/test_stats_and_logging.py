"""stats(), repr() and the pool's name, and what the pool logs."""

from __future__ import annotations

import dataclasses
import logging
import time

import gevent
import pytest
from doubles import LOGGER, Conn, FakePool, FastLinePool, warnings_of
from helpers import LinePool, recv_line, request, wait_until

import geventconnpool
from geventconnpool import PoolError, PoolStats, PoolTimeout
from geventconnpool._outage import OutageLog


def test_stats_is_a_frozen_dataclass_with_the_documented_fields(line_server, leak_check):
    """stats() returns a frozen PoolStats with the gauges and counters the issue names."""
    with LinePool(line_server, 2) as pool:
        pool.wait(timeout=5)
        s = pool.stats()
        assert isinstance(s, PoolStats)
        assert geventconnpool.PoolStats is PoolStats and PoolStats.__module__ == "geventconnpool"
        assert dataclasses.is_dataclass(s)
        assert {f.name for f in dataclasses.fields(s)} == {
            "size",
            "idle",
            "in_use",
            "connecting",
            "waiting",
            "checkouts",
            "opened",
            "failed_connects",
            "discarded",
            "recycled",
            "keepalive_failures",
            "closed_while_idle",
            "timeouts",
            "overloaded",
            "retiring",
            "retired",
            "min_size",
        }
        with pytest.raises(dataclasses.FrozenInstanceError):
            s.idle = 5  # type: ignore[misc]
        assert s == PoolStats(2, 2, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0)  # min_size: size, when not given
        assert s.min_size == 2
    leak_check()


def test_stats_counters_add_up(line_server, leak_check):
    """Checkouts, discards, opens and timeouts are counted as a user's requests make them happen."""
    with FastLinePool(line_server, 2) as pool:
        pool.wait(timeout=5)
        with pool.get() as a:
            s = pool.stats()
            assert (s.idle, s.in_use, s.connecting) == (1, 1, 0)
            a.sendall(b"PING\n")
            assert recv_line(a) == b"PONG"
        for _ in range(3):
            assert request(pool, b"PING") == b"PONG"
        with pytest.raises(OSError), pool.get():
            raise OSError("broken")
        with pytest.raises(ValueError), pool.get():
            raise ValueError("not a connection error")
        pool.wait(timeout=5)
        with pool.get(), pool.get(), pytest.raises(PoolTimeout), pool.get(timeout=0):
            pass
        s = pool.stats()
        assert s.checkouts == 1 + 3 + 1 + 1 + 2
        assert s.discarded == 1
        assert s.opened == 3
        line_server.wait_for_accepted(3)
        assert s.timeouts == 1
        assert s.failed_connects == s.recycled == s.keepalive_failures == 0
        assert (s.idle, s.in_use, s.connecting, s.waiting) == (2, 0, 0, 0)
    leak_check()


def test_stats_gauges_invariant_under_churn(line_server, leak_check):
    """idle + in_use + connecting == size at every point observed while holders, discards, checks, recycles
    and an outage churn.
    """
    violations: list[PoolStats] = []
    observations = [0]
    with FastLinePool(
        line_server, 4, keepalive=0.01, check_after=0.005, max_lifetime=0.1, timeout=0.05
    ) as pool:
        pool.wait(timeout=5)
        deadline = time.monotonic() + 1.5

        def observe() -> None:
            observations[0] += 1
            s = pool.stats()
            if s.idle + s.in_use + s.connecting != s.size:
                violations.append(s)

        def observer() -> None:
            while time.monotonic() < deadline:
                observe()
                gevent.sleep(0)

        def worker(n: int) -> None:
            for i in range(400):
                if time.monotonic() > deadline:
                    return
                try:
                    with pool.get() as c:
                        observe()
                        if (i + n) % 23 == 0:
                            raise OSError("discard this one")
                        c.sendall(b"PING\n")
                        recv_line(c)
                        observe()
                except (OSError, PoolError):
                    pass
                observe()
                gevent.sleep(0.001 * (n % 3))

        def saboteur() -> None:
            for _ in range(2):
                gevent.sleep(0.3)
                line_server.cut_all()
                observe()
            line_server.stop()
            gevent.sleep(0.1)
            observe()
            line_server.start()

        greenlets = [gevent.spawn(observer), gevent.spawn(saboteur)]
        greenlets += [gevent.spawn(worker, n) for n in range(6)]
        gevent.joinall(greenlets, timeout=10, raise_error=True)
        pool.wait(timeout=5)
        observe()
        s = pool.stats()
        assert violations == []
        assert observations[0] > 500
        assert s.discarded > 0 and s.checkouts > 50
        wait_until(lambda: pool.stats().recycled > 0)  # idle now, they reach max_lifetime if they had not
        # The server counts a connection when its handler starts, a loop turn after the pool counts it.
        wait_until(lambda: pool.stats().opened == line_server.accepted)
    line_server.stop()
    leak_check()


def test_repr_and_name(line_server, leak_check, pool_log):
    """repr() shows the name and the gauges; the default name is the class name and a number; name= appears in
    logs and errors.
    """
    with LinePool(line_server, 2) as unnamed:
        assert unnamed.name.startswith("LinePool-")
    with FastLinePool(line_server, 2, name="orders-db", timeout=0.05) as pool:
        pool.wait(timeout=5)
        with pool.get():
            text = repr(pool)
            assert "orders-db" in text and "FastLinePool" in text
            for gauge in ("size=2", "idle=1", "in_use=1", "connecting=0", "waiting=0"):
                assert gauge in text
        with pool.get(), pool.get(), pytest.raises(PoolTimeout, match="orders-db"), pool.get():
            pass
        line_server.stop()
        with pytest.raises(OSError), pool.get() as c:
            c.sendall(b"PING\n")
            recv_line(c)
        wait_until(lambda: pool.stats().failed_connects >= 1)
        assert all("orders-db" in r.getMessage() for r in pool_log.records())
        assert pool_log.records(logging.WARNING)
    leak_check()


def test_outage_logs_a_handful_of_warnings_and_recovery_at_info(line_server, leak_check, pool_log):
    """A long streak of failed connects logs its first failure at WARNING with the error, the rest at DEBUG,
    and the recovery at INFO with the count.
    """
    with FastLinePool(line_server, 2, name="flaky") as pool:
        pool.wait(timeout=5)
        pool_log.clear()
        line_server.stop()
        for _ in range(2):
            with pytest.raises(OSError), pool.get() as c:
                c.sendall(b"PING\n")
                recv_line(c)
        wait_until(lambda: pool.stats().failed_connects >= 40, timeout=10)
        line_server.start()
        pool.wait(timeout=5)
        failures = pool.stats().failed_connects
        warnings = [r for r in pool_log.records(logging.WARNING) if "failed to open" in r.getMessage()]
        assert 1 <= len(warnings) <= 3, [r.getMessage() for r in warnings]
        assert "ConnectionRefusedError" in warnings[0].getMessage()
        assert "flaky" in warnings[0].getMessage()
        debug_failures = [r for r in pool_log.records(logging.DEBUG) if "failed to open" in r.getMessage()]
        assert len(debug_failures) + len(warnings) == failures
        infos = [r.getMessage() for r in pool_log.records(logging.INFO)]
        assert any("connected again" in m and "flaky" in m for m in infos), infos
        counts = [int(w) for m in infos for w in m.split() if w.isdigit()]
        assert counts and max(counts) >= 40 - 3
    line_server.stop()
    leak_check()


def test_outage_log_warns_at_the_first_failure_then_only_on_change_or_each_minute():
    """The WARNING lines of a streak of failed connects: the first failure, each change of cause, and a
    summary at most once a minute; the rest are DEBUG.
    """
    log = OutageLog()
    refused = ConnectionRefusedError(111, "Connection refused")
    bad_cert = OSError("certificate verify failed")
    timeline = [
        (0.0, refused, "failed to open a connection"),
        (0.5, refused, None),
        (30.0, refused, None),
        (59.9, refused, None),
        (60.0, refused, "still failing after 5 attempts in 60.0 s"),
        (61.0, refused, None),
        (62.0, bad_cert, "failed to open a connection"),
        (63.0, bad_cert, None),
        (121.9, bad_cert, None),
        (122.0, bad_cert, "still failing after 10 attempts in 122.0 s"),
        (122.5, refused, "failed to open a connection"),
    ]
    for now, error, expected in timeline:
        message = log.failed(error, now)
        if expected is None:
            assert message is None, (now, message)
        else:
            assert message is not None and expected in message, (now, message)
            assert repr(error) in message
    assert log.succeeded(130.0) == "connected again after 11 failed attempts in 130.0 s"
    assert log.succeeded(131.0) is None
    assert "failed to open" in (log.failed(refused, 140.0) or "")  # a new streak starts over


def test_outage_log_sees_the_same_cause_with_another_message_as_a_change():
    """Two errors of one type with different messages are two causes (refused by one host, then another)."""
    log = OutageLog()
    assert log.failed(OSError("a"), 0.0) is not None
    assert log.failed(OSError("a"), 1.0) is None
    assert log.failed(OSError("b"), 2.0) is not None
    assert log.failed(TimeoutError("b"), 3.0) is not None


def test_a_changed_cause_during_an_outage_reaches_the_warning_log(leak_check, caplog):
    """1.0 logged only the first error of a streak at WARNING, so a new cause (the server back with another
    certificate) stayed hidden behind "refused"; now each new cause is a WARNING line.
    """
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    causes = iter(
        [ConnectionRefusedError(111, "Connection refused")] * 5 + [OSError("certificate verify")] * 5
    )

    def factory() -> Conn:
        cause = next(causes, None)
        if cause is not None:
            raise cause
        return Conn(0)

    with FakePool(1, factory=factory, name="tls-pool") as pool:
        pool.wait(timeout=5)
    warnings = [m for m in warnings_of(caplog) if "tls-pool" in m]
    assert len(warnings) == 2, warnings
    assert "Connection refused" in warnings[0] and "certificate verify" in warnings[1]
    leak_check()
