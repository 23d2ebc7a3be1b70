"""The defects that 1.0 showed against real servers and other pools' test suites (issue 10).

Each test's docstring says what 1.0 did.
"""

from __future__ import annotations

import logging
import resource
import time
from typing import Any, List

import gevent
import pytest
from doubles import FLAVOURS, FakePool
from helpers import LinePool, LineServer, recv_line, wait_until

from geventconnpool import PoolTimeout, PoolUnavailable, retry
from geventconnpool._outage import OutageLog

LOGGER = "geventconnpool"


class ControlFlow(BaseException):
    """A BaseException that is neither an Exception nor a gevent.Timeout, as some libraries raise."""


class Conn:
    """A black-box connection that the pool can close."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.closed = False

    def close(self) -> None:
        self.closed = True


def warnings_of(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# -- 1. a BaseException from a hook never loses a slot ----------------------------------------------


def test_a_base_exception_from_new_connection_is_a_failed_attempt(leak_check, capsys):
    """1.0: a BaseException raised by _new_connection escaped the connect greenlet, printed a traceback and
    left connecting=1 for ever; now it is a failed attempt like any other, retried with backoff.
    """
    made: List[Conn] = []

    def factory() -> Conn:
        if len(made) < 3 and not getattr(factory, "healed", False):
            made.append(Conn(-1))
            raise ControlFlow("not now")
        conn = Conn(len(made))
        made.append(conn)
        return conn

    with FakePool(1, factory=factory, timeout=5) as pool:
        pool.wait(timeout=5)
        s = pool.stats()
        assert (s.idle, s.connecting, s.failed_connects) == (1, 0, 3)
        with pool.get() as c:
            assert c is made[-1]
    assert "Traceback" not in capsys.readouterr().err
    leak_check()


def test_a_base_exception_from_a_background_keepalive_discards_the_connection(leak_check, capsys, caplog):
    """1.0: a BaseException raised by _keepalive in the background escaped its greenlet with a traceback;
    now it is a failed check: the connection is discarded and replaced.
    """
    caplog.set_level(logging.DEBUG, logger=LOGGER)

    class Pool(FakePool):
        def _keepalive(self, c: Any) -> None:
            if c.number == 0:
                raise ControlFlow("bad ping")

    counter = iter(range(1000))
    with Pool(1, factory=lambda: Conn(next(counter)), keepalive=0.01) as pool:
        wait_until(lambda: pool.stats().keepalive_failures == 1 and pool.stats().idle == 1)
        with pool.get() as c:
            assert c.number == 1
        assert pool.stats().discarded == 1
    assert "Traceback" not in capsys.readouterr().err
    leak_check()


def test_a_base_exception_from_a_background_close_is_logged_and_ignored(leak_check, capsys, caplog):
    """1.0: a BaseException raised by _close_connection in a background close escaped with a traceback; now
    it is logged at DEBUG and ignored, like any error of that hook.
    """
    caplog.set_level(logging.DEBUG, logger=LOGGER)

    class Pool(FakePool):
        def _close_connection(self, c: Any) -> None:
            super()._close_connection(c)
            raise ControlFlow("cannot say goodbye")

    counter = iter(range(1000))
    with Pool(1, factory=lambda: Conn(next(counter)), max_lifetime=0.05) as pool:
        wait_until(lambda: pool.stats().recycled >= 2 and pool.stats().idle == 1)
    assert "Traceback" not in capsys.readouterr().err
    debug = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.DEBUG]
    assert any("_close_connection() failed" in m for m in debug), debug
    leak_check()


# -- 2. a lease exits once --------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_a_second_exit_of_a_lease_raises_and_changes_nothing(flavour, leak_check):
    """1.0: exiting a lease twice put its connection in the pool twice (idle=2, in_use=-1 on a pool of 1),
    so two callers then held one connection; now the second exit raises RuntimeError and changes nothing.
    """

    class Pool(FakePool):
        def _keepalive(self, c: Any) -> None:
            pass

    counter = iter(range(1000))
    with Pool(1, factory=lambda: Conn(next(counter)), **FLAVOURS[flavour]) as pool:
        pool.wait(timeout=5)
        lease = pool.get()
        lease.__enter__()
        lease.__exit__(None, None, None)
        with pytest.raises(RuntimeError, match="once"):
            lease.__exit__(None, None, None)
        s = pool.stats()
        assert (s.idle, s.in_use, s.connecting) == (1, 0, 0)
        with pool.get() as c:
            assert pool.stats().idle == 0
            with pytest.raises(PoolTimeout):
                pool.get(timeout=0)
        assert c.number == 0


def test_a_second_exit_after_a_discard_raises_and_discards_nothing_more(leak_check):
    """A lease whose block broke its connection, exited again, raises RuntimeError and discards no other."""
    counter = iter(range(1000))
    with FakePool(1, factory=lambda: Conn(next(counter))) as pool:
        pool.wait(timeout=5)
        lease = pool.get()
        lease.__enter__()
        error = OSError("broken")
        lease.__exit__(OSError, error, None)
        pool.wait(timeout=5)
        with pytest.raises(RuntimeError, match="once"):
            lease.__exit__(OSError, error, None)
        assert pool.stats().discarded == 1
        s = pool.stats()
        assert (s.idle, s.in_use, s.connecting) == (1, 0, 0)


def test_exiting_a_lease_that_was_never_entered_raises(leak_check):
    """A lease exited without being entered raises RuntimeError: only a with statement gives a loan back."""
    counter = iter(range(1000))
    with FakePool(1, factory=lambda: Conn(next(counter))) as pool:
        pool.wait(timeout=5)
        lease = pool.get()
        with pytest.raises(RuntimeError):
            lease.__exit__(None, None, None)
        with lease:
            pass
        assert pool.stats().idle == 1


# -- 3. one WARNING line per discarded connection ----------------------------------------------------


def test_a_failed_background_keepalive_logs_one_warning(line_server, leak_check, caplog):
    """1.0: a failed keepalive check logged "keepalive check failed" and then "discarding a broken
    connection": two WARNING lines for one connection; now one line names the pool, the check and the error.
    """
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with LinePool(line_server, 1, keepalive=0.02, name="ka-pool", watch_idle=False) as pool:
        pool.wait(timeout=5)
        line_server.cut_all()
        wait_until(lambda: pool.stats().keepalive_failures == 1)
        warnings = warnings_of(caplog)
        assert len(warnings) == 1, warnings
        assert "ka-pool" in warnings[0] and "keepalive" in warnings[0] and "Error" in warnings[0]
        pool.wait(timeout=5)
    line_server.stop()
    leak_check()


def test_a_failed_check_after_logs_one_warning(line_server, leak_check, caplog):
    """1.0: a check_after check that failed in get() logged two WARNING lines; now one, naming the check."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with LinePool(line_server, 1, check_after=0.01, name="ca-pool", watch_idle=False) as pool:
        pool.wait(timeout=5)
        line_server.cut_all()
        wait_until(lambda: line_server.closed == 1)
        gevent.sleep(0.1)  # a precondition, not the thing asserted: idle past check_after, so get() checks it
        with pool.get() as c:
            c.sendall(b"PING\n")
            assert recv_line(c) == b"PONG"
        warnings = warnings_of(caplog)
        assert len(warnings) == 1, warnings
        assert "ca-pool" in warnings[0] and "check_after" in warnings[0]
    line_server.stop()
    leak_check()


def test_a_connection_broken_in_a_block_logs_one_warning(line_server, leak_check, caplog):
    """A connection whose block raised one of exc_classes logs one WARNING naming the pool and the error."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with LinePool(line_server, 1, name="blk-pool") as pool:
        with pytest.raises(OSError), pool.get():
            raise OSError("the reply was garbage")
        warnings = warnings_of(caplog)
        assert len(warnings) == 1, warnings
        assert "blk-pool" in warnings[0] and "the reply was garbage" in warnings[0]
    line_server.stop()
    leak_check()


# -- 4. the log of an outage names every cause ------------------------------------------------------


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


# -- 5. retry waits for the pool's next connect attempt ---------------------------------------------


class DownPool(LinePool):
    """A line pool that retries failed connects every 0.1 to 0.2 s."""

    RECONNECT_DELAY = 0.2
    RECONNECT_MAX_DELAY = 0.2


def test_pool_unavailable_says_when_the_next_connect_attempt_is(leak_check):
    """PoolUnavailable carries retry_after, the seconds until the pool's next connect attempt."""
    server = LineServer()
    server.start()
    server.stop()
    with DownPool(server, 1, fail_fast=True) as pool:
        wait_until(lambda: pool.stats().failed_connects >= 1)
        with pytest.raises(PoolUnavailable) as info:
            pool.get()
        assert 0 <= info.value.retry_after <= DownPool.RECONNECT_MAX_DELAY + 0.01  # a few ms past the attempt
    leak_check()


def test_pool_timeout_has_retry_after_only_while_the_remote_is_down(line_server, leak_check):
    """A PoolTimeout raised during an outage carries retry_after; one raised while the pool is only busy has
    retry_after None.
    """
    with DownPool(line_server, 1, timeout=0.05) as pool:
        with pool.get():
            with pytest.raises(PoolTimeout) as info:
                pool.get()
            assert info.value.retry_after is None
        line_server.stop()
        with pytest.raises(OSError), pool.get() as c:
            c.sendall(b"PING\n")
            recv_line(c)
        wait_until(lambda: pool.stats().failed_connects >= 1)
        with pytest.raises(PoolTimeout) as info:
            pool.get()
        assert info.value.retry_after is not None
        assert 0 <= info.value.retry_after <= DownPool.RECONNECT_MAX_DELAY + 0.01  # a few ms past the attempt
    leak_check()


def test_a_bare_retry_around_a_fail_fast_pool_does_not_spin_during_an_outage(leak_check):
    """1.0: a bare @retry around a fail_fast pool whose remote was down made 209,741 attempts in 2 s on a
    full core; now it makes about one attempt per connect attempt of the pool, and returns soon after the
    remote is back.
    """
    server = LineServer()
    server.start()
    port = server.port
    server.stop()
    with DownPool(server, 1, fail_fast=True) as pool:
        wait_until(lambda: pool.stats().failed_connects >= 1)
        calls = 0

        @retry
        def ping() -> bytes:
            nonlocal calls
            calls += 1
            with pool.get() as c:
                c.sendall(b"PING\n")
                return recv_line(c)

        connects_before = pool.stats().failed_connects
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        caller = gevent.spawn(ping)
        outage_ends = time.monotonic() + 1.5
        wait_until(lambda: time.monotonic() >= outage_ends, timeout=5, interval=0.05)
        assert not caller.ready()
        back = LineServer(port)
        back.start()
        back_at = time.monotonic()
        try:
            assert caller.get(timeout=5) == b"PONG"
            returned_after = time.monotonic() - back_at
            cpu_after = resource.getrusage(resource.RUSAGE_SELF)
            connects = pool.stats().failed_connects - connects_before + 1  # the one that succeeded
            cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
            assert calls <= connects + 2, (calls, connects, cpu)
            assert returned_after < 1.0, returned_after
        finally:
            pool.close()
            back.stop()
    leak_check()


def test_retry_waits_at_least_retry_after_whatever_its_interval():
    """retry waits at least an error's retry_after before the next attempt on PoolUnavailable or
    PoolTimeout, even with interval=0; errors without one keep retry's own schedule.
    """
    waits: List[float] = []
    errors = [PoolUnavailable("down"), PoolTimeout("down"), PoolTimeout("busy"), OSError("plain")]
    errors[0].retry_after = 0.7
    errors[1].retry_after = 0.3
    script = iter(errors)

    @retry(sleep=waits.append, interval=0.1)
    def operation() -> str:
        error = next(script, None)
        if error is not None:
            raise error
        return "done"

    assert operation() == "done"
    assert waits == [0.7, 0.3, 0.1, 0.1]


# -- 6. retry's give-up line ----------------------------------------------------------------------


def test_giveup_writes_no_max_retries_line(caplog):
    """1.0 wrote "Max retries reached ... Aborting." at ERROR also when giveup stopped at the first failure;
    now giving up by giveup writes no such line (DEBUG at most).  (The default give-up line now names the
    error: tests/test_retry.py pins the exact messages.)
    """
    log = logging.getLogger("test-giveup")
    caplog.set_level(logging.DEBUG, logger="test-giveup")

    @retry(logger=log, giveup=lambda e: True)
    def operation() -> None:
        raise OSError("refused")

    with pytest.raises(OSError):
        operation()
    assert [r for r in caplog.records if r.levelno > logging.DEBUG] == []
