"""The documented retry decorator of issue 2: its forms, options, logging and what it never retries."""

import functools
import imaplib
import inspect
import logging
import socket
import traceback

import gevent
import pytest
from doubles import Flaky, RecordingLinePool
from helpers import recv_line, wait_until

from geventconnpool import retry

RETRY_MESSAGE = "Connection broken in '{f}' (error: '{e}'); retrying with new connection."
GIVE_UP_MESSAGE = "Max retries reached for '{f}'. Aborting."


def failing(calls, make_error=lambda n: OSError(f"failure {n}")):
    """A function named 'operation' that always fails with a new exception, recorded in ``calls``."""

    def operation():
        error = make_error(len(calls) + 1)
        calls.append(error)
        raise error  # the raising line

    return operation


def test_bare_decorator():
    """Bare @retry re-runs the function after OSError until it succeeds, with its arguments each time."""
    flaky = Flaky(OSError("a"), ConnectionResetError("b"), socket.timeout("c"))

    @retry
    def operation(x, y=0):
        return flaky(x, y=y)

    assert operation(1, y=2) == "ok"
    assert flaky.calls == 4
    assert flaky.args == ((1,), {"y": 2})


def test_decorator_with_keywords():
    """@retry(...) with keyword options makes a decorator that uses them."""
    flaky = Flaky(ValueError("a"), ValueError("b"))

    @retry(exc_classes=ValueError, max_failures=5, interval=0)
    def operation():
        return flaky()

    assert operation() == "ok"
    assert flaky.calls == 3


def test_call_form():
    """retry(f, **options) wraps f directly."""
    flaky = Flaky(KeyError("a"))
    wrapped = retry(flaky, exc_classes=(KeyError,), max_failures=1)
    assert wrapped() == "ok"
    assert flaky.calls == 2


def test_functools_partial_codifies_options(retry_log):
    """functools.partial(retry, ...) works as a house decorator, bare or called, with the codified options."""
    network_retry = functools.partial(
        retry, exc_classes=(OSError, imaplib.IMAP4.error), logger=retry_log.logger, max_failures=2
    )
    first = Flaky(imaplib.IMAP4.error("NO"), OSError("reset"))
    second = Flaky(imaplib.IMAP4.abort("BYE"))

    @network_retry
    def fetch():
        return first()

    @network_retry()
    def store():
        return second()

    assert fetch() == "ok"
    assert store() == "ok"
    assert (first.calls, second.calls) == (3, 2)
    assert [level for level, _ in retry_log.entries()] == [logging.INFO] * 3
    calls = []
    doomed = network_retry(failing(calls))
    with pytest.raises(OSError):
        doomed()
    assert len(calls) == 3


def test_nine_original_parameters_by_position(retry_log):
    """The nine 0.2.1 parameters keep their order and names and work when passed by position; a tenth
    positional argument is a TypeError: the options added since are keyword-only."""
    names = list(inspect.signature(retry).parameters)[:9]
    assert names == [
        "f",
        "exc_classes",
        "logger",
        "retry_log_level",
        "retry_log_message",
        "max_failures",
        "interval",
        "max_failure_log_level",
        "max_failure_log_message",
    ]
    flaky = Flaky(ValueError("one"), ValueError("two"), ValueError("three"))
    wrapped = retry(
        flaky,
        (ValueError,),
        retry_log.logger,
        logging.WARNING,
        "again {f}: {e}",
        1,
        0,
        logging.CRITICAL,
        "stop {f}: {e}",
    )
    with pytest.raises(ValueError) as info:
        wrapped()
    assert info.value is flaky.raised[1]
    assert flaky.calls == 2
    assert retry_log.entries() == [
        (logging.WARNING, "again flaky: one"),
        (logging.CRITICAL, "stop flaky: two"),
    ]
    with pytest.raises(TypeError):
        retry(flaky, (ValueError,), None, logging.INFO, "r", 1, 0, logging.ERROR, "m", 2.0)  # type: ignore[misc]


def test_documented_defaults():
    """The defaults are 0.2.1's: OSError, no logger, INFO/ERROR, its two messages, no limit, no interval."""
    defaults = {name: p.default for name, p in inspect.signature(retry).parameters.items() if name != "f"}
    assert defaults["exc_classes"] == (OSError,)
    assert defaults["logger"] is None
    assert defaults["retry_log_level"] == logging.INFO
    assert defaults["retry_log_message"] == RETRY_MESSAGE
    assert defaults["max_failures"] is None
    assert defaults["interval"] == 0
    assert defaults["max_failure_log_level"] == logging.ERROR
    assert defaults["max_failure_log_message"] == GIVE_UP_MESSAGE


def test_default_messages_exactly(retry_log):
    """With a logger the messages are the documented ones, {f} the function's __name__ and {e} the error."""
    calls = []
    operation = retry(failing(calls), logger=retry_log.logger, max_failures=1)
    with pytest.raises(OSError):
        operation()
    assert retry_log.entries() == [
        (
            logging.INFO,
            "Connection broken in 'operation' (error: 'failure 1'); retrying with new connection.",
        ),
        (logging.ERROR, "Max retries reached for 'operation'. Aborting."),
    ]


def test_custom_messages_and_levels(retry_log):
    """Custom messages and levels are used, with {f} and {e} filled in both."""
    calls = []
    operation = retry(
        failing(calls),
        logger=retry_log.logger,
        max_failures=2,
        retry_log_level=logging.DEBUG,
        retry_log_message="{f} failed with {e}",
        max_failure_log_level=logging.WARNING,
        max_failure_log_message="{f} gave up on {e}",
    )
    with pytest.raises(OSError):
        operation()
    assert retry_log.entries() == [
        (logging.DEBUG, "operation failed with failure 1"),
        (logging.DEBUG, "operation failed with failure 2"),
        (logging.WARNING, "operation gave up on failure 3"),
    ]


@pytest.mark.parametrize("max_failures", [0, 1, 4])
def test_max_failures_runs_at_most_n_plus_one_times(max_failures):
    """max_failures=N runs at most N+1 times, then re-raises the last exception object itself."""
    calls = []
    operation = retry(failing(calls), max_failures=max_failures)
    with pytest.raises(OSError) as info:
        operation()
    assert len(calls) == max_failures + 1
    assert info.value is calls[-1]
    assert str(info.value) == f"failure {max_failures + 1}"


def test_the_reraised_traceback_is_intact():
    """The re-raised exception's traceback still ends at the line that raised it in the wrapped function."""
    calls = []
    operation = retry(failing(calls), max_failures=2)
    with pytest.raises(OSError) as info:
        operation()
    frames = traceback.extract_tb(info.value.__traceback__)
    assert frames[-1].name == "operation"
    assert frames[-1].line == "raise error  # the raising line"
    assert any(frame.name == "test_the_reraised_traceback_is_intact" for frame in frames)


@pytest.mark.watchdog(5)
def test_no_sleep_before_the_final_raise():
    """With max_failures=0 the first failure is re-raised at once, without waiting the (huge) interval."""
    calls = []
    operation = retry(failing(calls), max_failures=0, interval=1000)
    with pytest.raises(OSError):
        operation()
    assert len(calls) == 1


def test_one_log_line_per_failed_attempt(retry_log):
    """@retry(...) logs one line per failed attempt, naming the function by __name__; the attempt that gives
    up logs only the give-up message.

    0.2.1: @retry(logger=...) raised TypeError (f was required), logging used Python 2's func_name, and the
    failure that gave up first logged a false "retrying" line and slept the interval before raising.
    """
    attempts = []

    @retry(exc_classes=(OSError,), logger=retry_log.logger, max_failures=2, interval=0)
    def senddata(data):
        attempts.append(data)
        raise OSError("reset by peer")

    with pytest.raises(OSError, match="reset by peer"):
        senddata(b"x")
    assert attempts == [b"x"] * 3
    again = "Connection broken in 'senddata' (error: 'reset by peer'); retrying with new connection."
    assert retry_log.entries() == [
        (logging.INFO, again),
        (logging.INFO, again),
        (logging.ERROR, "Max retries reached for 'senddata'. Aborting."),
    ]
    retry_log.clear()
    flaky = Flaky(OSError("x"), OSError("y"))
    assert retry(flaky, logger=retry_log.logger, max_failures=3)() == "ok"
    assert [level for level, _ in retry_log.entries()] == [logging.INFO] * 2


def test_without_logger_nothing_is_logged(caplog):
    """Without a logger, retry logs nothing at all."""
    caplog.set_level(logging.DEBUG)
    calls = []
    with pytest.raises(OSError):
        retry(failing(calls), max_failures=2)()
    assert caplog.records == []


def test_unlimited_by_default():
    """max_failures=None (the default) keeps retrying until the function succeeds."""
    flaky = Flaky(*[OSError(n) for n in range(50)])
    assert retry(flaky)() == "ok"
    assert flaky.calls == 51


def test_other_exceptions_propagate_at_once(retry_log):
    """An exception outside exc_classes propagates on the first failure, without a log line."""
    error = ValueError("not the network")
    flaky = Flaky(error)
    with pytest.raises(ValueError) as info:
        retry(flaky, logger=retry_log.logger)()
    assert info.value is error
    assert flaky.calls == 1
    assert retry_log.entries() == []


def test_interval_is_slept_with_gevent():
    """Between attempts retry sleeps the interval cooperatively, so other greenlets run meanwhile."""
    seen = []
    ticks = []

    def ticker():
        for _ in range(1000):
            ticks.append(1)
            gevent.sleep(0.001)

    def operation():
        seen.append(len(ticks))
        if len(seen) < 3:
            raise OSError("again")
        return "ok"

    side = gevent.spawn(ticker)
    try:
        ticks.clear()
        assert retry(operation, interval=0.02)() == "ok"
    finally:
        side.kill()
    assert seen[0] < seen[1] < seen[2]


def test_functools_wraps_metadata():
    """The wrapper keeps the function's name, qualname, docstring, module, attributes and __wrapped__."""

    def operation(a, b=2):
        """Do the operation."""

    operation.marker = "kept"
    wrappers = (
        retry(operation),
        retry(max_failures=1)(operation),
        retry(operation, interval=0),
        retry(operation, backoff=2.0, max_interval=0.01, jitter=0.5, max_time=10),
    )
    for wrapped in wrappers:
        assert wrapped.__name__ == "operation"
        assert wrapped.__qualname__ == operation.__qualname__
        assert wrapped.__doc__ == "Do the operation."
        assert wrapped.__module__ == __name__
        assert wrapped.marker == "kept"
        assert wrapped.__wrapped__ is operation
        assert inspect.signature(wrapped) == inspect.signature(operation)


def test_methods():
    """@retry works on methods: each call gets its own instance as self, bare or with options."""

    class Service:
        def __init__(self, failures):
            self.flaky = Flaky(*[OSError(n) for n in range(failures)])

        @retry
        def call(self, value):
            return self.flaky(value), self

        @retry(max_failures=0)
        def once(self):
            return self.flaky()

    a, b = Service(2), Service(1)
    assert a.call("x") == ("ok", a)
    assert b.call("y") == ("ok", b)
    assert (a.flaky.calls, b.flaky.calls) == (3, 2)
    assert a.flaky.args == (("x",), {})
    c = Service(1)
    with pytest.raises(OSError):
        c.once()
    assert c.flaky.calls == 1
    assert Service.call.__name__ == "call"


@pytest.mark.parametrize("where", [socket.error, OSError, (OSError, ValueError)])
def test_exception_class_where_the_function_belongs(where):
    """@retry(socket.error) is a TypeError that tells the user to pass exc_classes=."""
    with pytest.raises(TypeError, match=r"exc_classes="):

        @retry(where)
        def operation():
            pass


def test_documented_usage_with_a_real_pool(line_server, retry_log, leak_check):
    """The README's @retry senddata succeeds on a fresh connection after the server cut all pooled ones."""
    attempts = []
    with RecordingLinePool(line_server, 3) as pool:

        @retry(
            exc_classes=(socket.error, imaplib.IMAP4.error),
            logger=retry_log.logger,
            max_failures=5,
            interval=0.001,
        )
        def senddata(data):
            attempts.append(1)
            with pool.get() as c:
                c.sendall(b"ECHO " + data + b"\n")
                if recv_line(c) != b"OK":
                    raise OSError("something awful happened")

        pool.wait(timeout=5)
        senddata(b"OK")
        assert len(attempts) == 1
        line_server.cut_all()
        wait_until(lambda: line_server.closed == 3)
        attempts.clear()
        senddata(b"OK")
        assert 2 <= len(attempts) <= 4  # at most the 3 broken connections, then a fresh one
        assert pool.stats().discarded == len(attempts) - 1
        assert len(pool.dropped) == len(attempts) - 1
        messages = retry_log.entries()
        assert len(messages) == len(attempts) - 1
        for level, message in messages:
            assert level == logging.INFO
            assert message.startswith("Connection broken in 'senddata' (error: '")
            assert message.endswith("'); retrying with new connection.")
        pool.wait(timeout=5)  # every discarded connection was replaced
        line_server.wait_for_accepted(3 + len(attempts) - 1)
    leak_check()
