"""leak_warning: a connection held too long logs one warning with the stack of the get() that took it."""

from __future__ import annotations

import logging
import os
import sys
import time

import gevent
from gevent.event import Event
from helpers import LinePool, pool_greenlets, request, wait_until


def test_leak_warning_logs_once_per_loan_with_the_get_stack(line_server, leak_check, pool_log):
    """A connection held past leak_warning logs one WARNING naming the pool, the time held, and where get()
    was called.
    """
    with LinePool(line_server, 1, leak_warning=0.05, name="leaky") as pool:
        pool.wait(timeout=5)
        taken = time.time()
        get_line = sys._getframe().f_lineno + 1
        with pool.get():
            wait_until(lambda: any("held" in r.getMessage() for r in pool_log.records(logging.WARNING)))
            gevent.sleep(0.2)  # four more leak_warning periods: still a single warning (a negative check)
        records = pool_log.records(logging.WARNING)
        warnings = [r.getMessage() for r in records]
        assert len(warnings) == 1, warnings
        # Never early; at most a quarter of leak_warning late (maintenance looks four times per period),
        # plus a margin for a loaded machine.
        assert 0.05 <= records[0].created - taken < 0.05 * 1.25 + 0.5
        message = warnings[0]
        assert "leaky" in message
        assert "held for" in message
        assert "test_leak_warning_logs_once_per_loan_with_the_get_stack" in message
        # The innermost frame names the line of the get() call, not where the holder is now.
        assert f'{os.path.basename(__file__)}", line {get_line}, in test_leak_warning' in message, message
        # A new loan may warn again.
        with pool.get():
            wait_until(lambda: len(pool_log.records(logging.WARNING)) == 2)
        # A short loan does not.
        assert request(pool, b"PING") == b"PONG"
        gevent.sleep(0.15)  # three leak_warning periods: no warning about it (a negative check)
        assert len(pool_log.records(logging.WARNING)) == 2
    leak_check()


def test_leak_warning_names_the_get_of_a_loan_that_had_to_wait(line_server, leak_check, pool_log):
    """A loan obtained after waiting in get() is watched too; its warning shows the waiting caller's stack."""
    with LinePool(line_server, 1, leak_warning=0.05, name="waited") as pool:
        pool.wait(timeout=5)
        release = Event()

        def borrower_that_waited() -> None:
            with pool.get(timeout=5):
                release.wait(5)

        with pool.get():
            g = gevent.spawn(borrower_that_waited)
            wait_until(lambda: pool.stats().waiting == 1)

        def about_the_waiter() -> list[str]:
            messages = [r.getMessage() for r in pool_log.records(logging.WARNING)]
            return [m for m in messages if "borrower_that_waited" in m]

        wait_until(about_the_waiter)
        gevent.sleep(0.2)  # four more leak_warning periods: no second warning (a negative check)
        release.set()
        g.get(timeout=5)
        assert len(about_the_waiter()) == 1
    leak_check()


def test_no_leak_warning_when_off(line_server, leak_check, pool_log):
    """Without leak_warning a long loan logs nothing."""
    with LinePool(line_server, 1) as pool:
        pool.wait(timeout=5)
        with pool.get():
            gevent.sleep(0.3)  # a long loan, and nothing is logged: a bounded wait for a negative check
        assert pool_log.records(logging.WARNING) == []
        assert not [g for g in pool_greenlets() if "maintenance" in g.name and pool.name in g.name]
    leak_check()
