"""The reconnect backoff: a pure function of the attempt number, tested as lists of numbers."""

import math

import pytest
from doubles import DownPool
from helpers import LineServer, recv_line, wait_until

from geventconnpool import ConnectionPool, PoolTimeout, PoolUnavailable
from geventconnpool._backoff import backoff_delay


def schedule(attempts, **options):
    """The waits after failures 1..attempts, rounded to hide float noise."""
    return [round(backoff_delay(n, **options), 9) for n in range(1, attempts + 1)]


def test_pool_reconnect_constants():
    """The documented reconnect pace: 0.1 s first, twice as long after each failure, at most 10 s, shortened
    by up to half at random.
    """
    assert ConnectionPool.RECONNECT_DELAY == 0.1
    assert ConnectionPool.RECONNECT_MAX_DELAY == 10.0
    assert ConnectionPool.RECONNECT_FACTOR == 2.0
    assert ConnectionPool.RECONNECT_JITTER == 0.5


class ScheduledPool(ConnectionPool):
    """A pool whose only use here is its reconnect schedule; its connects fail at once."""

    def _new_connection(self):
        raise ConnectionRefusedError("nobody listens")


def test_the_pools_own_schedule_doubles_to_the_cap_with_random_jitter():
    """The waits the pool itself uses after failures 1..10: each between half and all of 0.1 s doubled per
    failure and capped at 10 s, and spread at random within that range.
    """
    with ScheduledPool(1) as pool:
        for attempt, full in enumerate([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0], start=1):
            waits = [pool._reconnect_wait(attempt) for _ in range(200)]
            low, high = min(waits), max(waits)
            assert full * 0.5 - 1e-9 <= low and high <= full + 1e-9, (attempt, low, high)
            assert high - low > full * 0.3, "jitter spreads the waits"


def test_no_cap_keeps_growing():
    """Without a cap the waits grow geometrically with the factor."""
    assert schedule(5, initial=1.0, factor=3.0) == [1.0, 3.0, 9.0, 27.0, 81.0]


def test_factor_one_is_a_constant_interval():
    """A factor of 1 gives the same wait after every failure (retry's default interval behaviour)."""
    assert schedule(4, initial=2.0, factor=1.0) == [2.0, 2.0, 2.0, 2.0]


def test_cap_applies_before_the_first_doubling_too():
    """A cap smaller than the initial wait limits every wait, the first included."""
    assert schedule(3, initial=5.0, factor=2.0, cap=1.5) == [1.5, 1.5, 1.5]


@pytest.mark.parametrize("factor", [1.0, 2.0, 10.0])
def test_zero_initial_never_waits(factor):
    """An initial wait of 0 means no wait at all, whatever the factor and attempt."""
    assert schedule(6, initial=0, factor=factor, cap=10, jitter=0.5) == [0.0] * 6
    assert backoff_delay(10**6, initial=0.0, factor=factor) == 0.0


def test_jitter_bounds_with_injected_uniform():
    """Jitter multiplies the capped wait by 1 - jitter * U, so it stays in (wait * (1 - jitter), wait]."""
    draws = [0.0, 0.25, 0.5, 0.999999]
    for u in draws:
        waits = schedule(9, initial=0.1, factor=2.0, cap=10.0, jitter=0.5, uniform=lambda u=u: u)
        plain = schedule(9, initial=0.1, factor=2.0, cap=10.0)
        for got, full in zip(waits, plain):
            assert full * 0.5 < got <= full
            assert got == pytest.approx(full * (1 - 0.5 * u))


def test_jitter_draws_once_per_call():
    """Each call draws exactly one number from the injected uniform."""
    draws = []

    def uniform():
        draws.append(1)
        return 0.5

    waits = schedule(3, initial=1.0, factor=2.0, jitter=0.2, uniform=uniform)
    assert waits == [0.9, 1.8, 3.6]
    assert len(draws) == 3


def test_no_jitter_draws_nothing():
    """With jitter 0 the injected uniform is never called, so the schedule is exact."""

    def uniform():
        raise AssertionError("uniform() called with jitter=0")

    assert schedule(3, initial=0.5, factor=2.0, uniform=uniform) == [0.5, 1.0, 2.0]


def test_full_jitter_can_reach_near_zero():
    """jitter=1 spreads the wait over (0, wait]."""
    got = backoff_delay(4, initial=0.1, factor=2.0, jitter=1.0, uniform=lambda: 0.999)
    assert 0 < got < 0.001


@pytest.mark.parametrize("attempt", [1100, 10**6, 10**12, 10**400])
def test_huge_attempts_do_not_overflow(attempt):
    """A huge attempt number gives the cap (or infinity without one) instead of raising OverflowError."""
    assert backoff_delay(attempt, initial=0.1, factor=2.0, cap=10.0) == 10.0
    assert backoff_delay(attempt, initial=0.1, factor=2.0, cap=10.0, jitter=0.5, uniform=lambda: 0.5) == 7.5
    assert backoff_delay(attempt, initial=0.1, factor=2.0) == math.inf


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
