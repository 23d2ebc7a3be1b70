"""The keyword options that issue 3 adds to retry(): backoff, max_interval, jitter, max_time, giveup,
the {attempt} and {wait} message fields, template checks, the exceptions never retried, and bad values.

The waits are read from the retry log line's {wait} field, so no test needs to sleep long or
patch the clock: intervals are milliseconds.
"""

from __future__ import annotations

import logging
import math
import ssl
import time
from typing import List

import gevent
import pytest
from doubles import FastLinePool, Flaky, LogCapture
from greenlet import GreenletExit
from helpers import LineServer, request, wait_until

from geventconnpool import PoolUnavailable, retry

WAITS = "{attempt} {wait}"


def logged_waits(log: LogCapture) -> List[float]:
    """The {wait} of every retry line logged with the WAITS template, checking {attempt} counts 1, 2, ..."""
    lines = log.messages(logging.INFO)
    assert [int(line.split()[0]) for line in lines] == list(range(1, len(lines) + 1))
    return [float(line.split()[1]) for line in lines]


# -- backoff, max_interval, jitter ---------------------------------------------------------------


def test_default_backoff_keeps_the_interval_constant(retry_log):
    """Without backoff or jitter every wait is the interval, as in 0.2.1."""
    f = Flaky(failures=math.inf)
    with pytest.raises(OSError):
        retry(f, logger=retry_log.logger, retry_log_message=WAITS, max_failures=4, interval=0.001)()
    assert logged_waits(retry_log) == [0.001] * 4
    assert f.calls == 5


def test_backoff_multiplies_each_wait(retry_log):
    """With backoff=2.0 the k-th wait is interval * 2**(k-1)."""
    f = Flaky(failures=math.inf)
    with pytest.raises(OSError):
        retry(
            f, logger=retry_log.logger, retry_log_message=WAITS, max_failures=5, interval=0.001, backoff=2.0
        )()
    assert logged_waits(retry_log) == pytest.approx([0.001, 0.002, 0.004, 0.008, 0.016])


def test_max_interval_caps_every_wait(retry_log):
    """max_interval caps each wait of a fast-growing backoff."""
    f = Flaky(failures=math.inf)
    decorated = retry(
        f,
        logger=retry_log.logger,
        retry_log_message=WAITS,
        max_failures=5,
        interval=0.001,
        backoff=10,
        max_interval=0.003,
    )
    with pytest.raises(OSError):
        decorated()
    assert logged_waits(retry_log) == pytest.approx([0.001, 0.003, 0.003, 0.003, 0.003])


def test_backoff_never_overflows(retry_log):
    """A backoff whose powers overflow a float still gives capped waits, for hundreds of attempts."""
    f = Flaky(failures=300)
    decorated = retry(
        f,
        logger=retry_log.logger,
        retry_log_message=WAITS,
        max_failures=400,
        interval=1e-9,
        backoff=1e200,
        max_interval=1e-5,
    )
    assert decorated() == "ok"
    waits = logged_waits(retry_log)
    assert len(waits) == 300
    assert waits[0] == 1e-9 and all(w == 1e-5 for w in waits[1:])


def test_overflowing_wait_without_a_cap_gives_up_within_max_time(retry_log):
    """An uncapped wait too large for a float ends the retries under max_time instead of raising
    OverflowError.
    """
    f = Flaky(failures=math.inf)
    decorated = retry(
        f, logger=retry_log.logger, retry_log_message=WAITS, interval=1e-6, backoff=1e300, max_time=5
    )
    with pytest.raises(OSError) as info:
        decorated()
    assert info.value is f.raised[-1]
    assert f.calls == 2  # the second wait would be 1e294 s


@pytest.mark.parametrize("jitter", [0.5, 1.0])
def test_jitter_spreads_each_wait_below_the_capped_value(retry_log, jitter):
    """With jitter j each wait lies in ((1 - j) * w, w], after the cap, and the waits differ."""
    f = Flaky(failures=math.inf)
    decorated = retry(
        f,
        logger=retry_log.logger,
        retry_log_message=WAITS,
        max_failures=30,
        interval=0.5,
        backoff=2.0,
        max_interval=0.002,
        jitter=jitter,
    )
    with pytest.raises(OSError):
        decorated()
    waits = logged_waits(retry_log)
    assert len(waits) == 30
    assert all((1 - jitter) * 0.002 <= w <= 0.002 for w in waits), waits
    assert len(set(waits)) > 20  # 30 draws, from a continuous distribution


# -- max_time -----------------------------------------------------------------------------------------


def test_max_time_stops_before_the_budget_and_reraises_the_last_error(retry_log):
    """No attempt starts past max_time; the give-up message is logged and the last exception re-raised
    unchanged.
    """
    f = Flaky(failures=math.inf)
    decorated = retry(
        f,
        logger=retry_log.logger,
        retry_log_message=WAITS,
        max_failure_log_message="gave up on {f} after {attempt}: {e}",
        max_failure_log_level=logging.ERROR,
        interval=0.05,
        max_time=0.3,
    )
    with pytest.raises(OSError) as info:
        decorated()
    assert info.value is f.raised[-1]
    assert 2 <= f.calls <= 7
    assert all(start - f.started[0] <= 0.3 for start in f.started)
    # The wait after the last attempt would have ended past the budget.
    assert f.started[-1] + 0.05 > f.started[0] + 0.3 - 0.05
    assert retry_log.messages(logging.ERROR) == [f"gave up on flaky after {f.calls}: {f.raised[-1]}"]


def test_max_time_never_begins_a_wait_that_ends_past_it(retry_log):
    """A first wait longer than max_time is not begun: retry gives up right after the first failure."""
    f = Flaky(failures=math.inf)
    started = time.monotonic()
    with pytest.raises(OSError):
        retry(f, logger=retry_log.logger, interval=10, max_time=1)()
    assert f.calls == 1
    assert time.monotonic() - started < 5  # not the 10 s wait


# -- giveup -------------------------------------------------------------------------------------------


def test_giveup_reraises_at_once_errors_that_will_not_heal(retry_log):
    """When giveup(exc) is true the exception is re-raised at once, and other errors are still retried."""
    seen: List[BaseException] = []

    def giveup(error: BaseException) -> bool:
        seen.append(error)
        return isinstance(error, ssl.SSLCertVerificationError)

    cert = Flaky(failures=math.inf, error=lambda: ssl.SSLCertVerificationError("certificate verify failed"))
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        retry(cert, logger=retry_log.logger, max_failures=5, giveup=giveup)()
    assert cert.calls == 1
    assert seen == [info.value]
    assert len(retry_log.messages(logging.ERROR)) == 1  # the give-up message

    transient = Flaky(failures=3)
    assert retry(transient, max_failures=5, giveup=giveup)() == "ok"
    assert transient.calls == 4


# -- message fields and templates ---------------------------------------------------------------------


def test_attempt_and_wait_fields_in_both_messages(retry_log):
    """{attempt} is the 1-based failed attempt and {wait} the next wait; the give-up line has its attempt and
    0.
    """
    f = Flaky(failures=math.inf)

    def operation() -> str:
        return f()

    decorated = retry(
        operation,
        logger=retry_log.logger,
        retry_log_message="{f} failed ({e}) on attempt {attempt}; next in {wait:.3f} s",
        max_failure_log_message="{f}: giving up after attempt {attempt} ({wait}) on {e!r}",
        max_failures=2,
        interval=0.001,
        backoff=3,
    )
    with pytest.raises(OSError):
        decorated()
    assert retry_log.messages(logging.INFO) == [
        "operation failed () on attempt 1; next in 0.001 s",
        "operation failed () on attempt 2; next in 0.003 s",
    ]
    assert retry_log.messages(logging.ERROR) == ["operation: giving up after attempt 3 (0.0) on OSError()"]


@pytest.mark.parametrize("argument", ["retry_log_message", "max_failure_log_message"])
@pytest.mark.parametrize("template", ["{x}", "{f", "{0}", "{attempts}", "{e.no_such_attribute}", "{f!z}"])
def test_a_template_with_an_unknown_field_fails_at_decoration(argument, template):
    """A message template naming an unknown or malformed field is a ValueError when retry() is called."""
    with pytest.raises(ValueError, match=argument):
        retry(**{argument: template})
    with pytest.raises(ValueError, match=argument):
        retry(lambda: None, **{argument: template})


@pytest.mark.parametrize("argument", ["retry_log_message", "max_failure_log_message"])
def test_a_template_must_be_a_string(argument):
    """A message that is not a str is a TypeError at decoration."""
    with pytest.raises(TypeError, match=argument):
        retry(**{argument: 42})


# -- never retried -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [gevent.Timeout, GreenletExit, KeyboardInterrupt, lambda: SystemExit(3)],
    ids=["gevent.Timeout", "GreenletExit", "KeyboardInterrupt", "SystemExit"],
)
def test_stop_signals_are_never_retried_even_with_base_exception(make, retry_log):
    """gevent.Timeout, GreenletExit, KeyboardInterrupt and SystemExit propagate at once, even when
    exc_classes is BaseException.
    """
    f = Flaky(failures=math.inf, error=make)
    with pytest.raises(BaseException) as info:
        retry(f, exc_classes=BaseException, logger=retry_log.logger, interval=0.001)()
    assert info.value is f.raised[0]
    assert f.calls == 1
    assert retry_log.messages(logging.INFO) == [] and retry_log.messages(logging.ERROR) == []


def test_system_exit_keeps_its_code():
    """SystemExit leaves a retried function with its exit code."""
    with pytest.raises(SystemExit) as info:
        retry(Flaky(failures=math.inf, error=lambda: SystemExit(3)), exc_classes=(BaseException,))()
    assert info.value.code == 3


def test_an_expiring_gevent_timeout_stops_the_retries():
    """A gevent.Timeout around a function that retries for ever ends it, whether it fires in an attempt or a
    wait.
    """
    f = Flaky(failures=math.inf)

    @retry(exc_classes=BaseException, interval=0.002)
    def slow_failure() -> None:
        gevent.sleep(0.003)
        f()

    timer = gevent.Timeout(0.1)
    with pytest.raises(gevent.Timeout) as info, timer:
        slow_failure()
    assert info.value is timer
    calls = f.calls
    assert calls >= 2
    gevent.sleep(0.02)  # ten intervals: a retry still running would have called f again (a negative check)
    assert f.calls == calls


def test_killing_a_retrying_greenlet_stops_it():
    """Killing a greenlet that retries with exc_classes=BaseException ends it: GreenletExit is not retried."""
    f = Flaky(failures=math.inf)
    g = gevent.spawn(retry(f, exc_classes=BaseException, interval=0.001))
    wait_until(lambda: f.calls >= 2)
    g.kill(timeout=5)
    assert g.dead and isinstance(g.value, GreenletExit)
    calls = f.calls
    gevent.sleep(0.01)  # ten intervals: a retry still running would have called f again (a negative check)
    assert f.calls == calls


# -- bad values, keyword-only, signatures -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("backoff", 0),
        ("backoff", 0.5),
        ("backoff", -2),
        ("max_interval", -1),
        ("jitter", -0.1),
        ("jitter", 1.5),
        ("max_time", 0),
        ("max_time", -1),
        ("max_failures", -1),
        ("max_failures", -100),
        ("interval", -1),
        ("interval", -0.001),
        ("interval", -math.inf),
    ],
)
def test_out_of_range_options_are_value_errors_at_decoration(argument, value):
    """An out-of-range option is a ValueError naming it, when retry() is called, before any function is
    decorated.
    """
    with pytest.raises(ValueError, match=argument):
        retry(**{argument: value})
    with pytest.raises(ValueError, match=argument):
        retry(lambda: None, **{argument: value})


NUMERIC_OPTIONS = ["max_failures", "interval", "backoff", "max_interval", "jitter", "max_time"]


@pytest.mark.parametrize(
    ("argument", "value"),
    [(argument, value) for argument in NUMERIC_OPTIONS for value in ("1", True, float("nan"), [1])]
    + [("max_failures", 1.5), ("interval", None)],
    ids=repr,
)
def test_non_numeric_options_are_type_errors(argument, value):
    """A non-number option (or a bool, or NaN; a float max_failures; a None interval) is a TypeError naming
    it.
    """
    with pytest.raises(TypeError, match=argument):
        retry(**{argument: value})


def test_giveup_must_be_callable():
    """A giveup that is not callable is a TypeError."""
    with pytest.raises(TypeError, match="giveup"):
        retry(giveup=True)


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("backoff", 1),
        ("backoff", 2.5),
        ("max_interval", None),
        ("jitter", 0),
        ("jitter", 1),
        ("max_time", None),
    ],
)
def test_boundary_values_are_accepted(argument, value):
    """backoff 1, jitter 0 and 1, and None for max_interval and max_time are valid."""
    assert retry(Flaky(failures=1), interval=0.001, **{argument: value})() == "ok"


# -- with a real pool ------------------------------------------------------------------------------------


def test_backoff_rides_out_an_outage_of_a_fail_fast_pool(leak_check, retry_log):
    """A retried request against a fail_fast pool backs off through PoolUnavailable and succeeds once the
    server is up.
    """
    server = LineServer()
    server.start()
    server.stop()

    class StartServerOnThirdRetry(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("3 ") and not server.running:
                server.start()

    handler = StartServerOnThirdRetry()
    retry_log.logger.addHandler(handler)
    try:
        with FastLinePool(server, 1, fail_fast=True) as pool:
            gevent.sleep(0)
            errors: List[BaseException] = []

            @retry(
                logger=retry_log.logger,
                retry_log_message=WAITS,
                interval=0.01,
                backoff=2,
                max_interval=0.05,
                max_time=10,
            )
            def ping() -> bytes:
                try:
                    return request(pool, b"PING")
                except OSError as error:
                    errors.append(error)
                    raise

            assert ping() == b"PONG"
            assert any(isinstance(e, PoolUnavailable) for e in errors)
            waits = logged_waits(retry_log)
            assert len(waits) >= 3
            assert waits[:3] == pytest.approx([0.01, 0.02, 0.04])
    finally:
        retry_log.logger.removeHandler(handler)
        server.stop()
    leak_check()
