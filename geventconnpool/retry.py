"""The :func:`retry` decorator: run an operation again when the network fails."""

from __future__ import annotations

import functools
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar, overload

import gevent
from greenlet import GreenletExit

from geventconnpool._arguments import ExcClasses, exception_classes, number, seconds, whole_number
from geventconnpool._backoff import backoff_delay
from geventconnpool.errors import PoolTimeout, PoolUnavailable

if TYPE_CHECKING:
    from typing import ParamSpec

    P = ParamSpec("P")

__all__ = ["retry"]

R = TypeVar("R")

RETRY_LOG_MESSAGE = "Connection broken in '{f}' (error: '{e}'); retrying with new connection."
MAX_FAILURE_LOG_MESSAGE = "Max retries reached for '{f}' (error: '{e}'). Aborting."

# The pool's errors that say when its next connect attempt is (retry_after):
# calling again before then only meets the same error.
_WAITS_FOR_THE_POOL = (PoolTimeout, PoolUnavailable)
# Exceptions that mean "stop now", never "the network failed": retrying them
# would defeat a timeout, a kill() or Ctrl-C.
_NEVER_RETRIED = (gevent.Timeout, GreenletExit, KeyboardInterrupt, SystemExit)
_MESSAGE_FIELDS = {"f": "function", "e": OSError("error"), "attempt": 1, "wait": 0.5}


def _template(value: object, argument: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be a str, not {value!r}")
    try:
        value.format(**_MESSAGE_FIELDS)
    except (KeyError, IndexError, AttributeError, ValueError) as error:
        raise ValueError(
            f"{argument} {value!r} is not a valid template: {error!r}; "
            "the fields are {f}, {e}, {attempt} and {wait}"
        ) from None
    return value


@overload
def retry(
    f: Callable[P, R],
    exc_classes: ExcClasses = ...,
    logger: Optional[logging.Logger] = ...,
    retry_log_level: int = ...,
    retry_log_message: str = ...,
    max_failures: Optional[int] = ...,
    interval: float = ...,
    max_failure_log_level: int = ...,
    max_failure_log_message: str = ...,
    *,
    backoff: float = ...,
    max_interval: Optional[float] = ...,
    jitter: float = ...,
    max_time: Optional[float] = ...,
    giveup: Optional[Callable[[BaseException], object]] = ...,
    sleep: Callable[[float], object] = ...,
) -> Callable[P, R]: ...


@overload
def retry(
    f: None = ...,
    exc_classes: ExcClasses = ...,
    logger: Optional[logging.Logger] = ...,
    retry_log_level: int = ...,
    retry_log_message: str = ...,
    max_failures: Optional[int] = ...,
    interval: float = ...,
    max_failure_log_level: int = ...,
    max_failure_log_message: str = ...,
    *,
    backoff: float = ...,
    max_interval: Optional[float] = ...,
    jitter: float = ...,
    max_time: Optional[float] = ...,
    giveup: Optional[Callable[[BaseException], object]] = ...,
    sleep: Callable[[float], object] = ...,
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def retry(
    f: Optional[Callable[..., Any]] = None,
    exc_classes: ExcClasses = (OSError,),
    logger: Optional[logging.Logger] = None,
    retry_log_level: int = logging.INFO,
    retry_log_message: str = RETRY_LOG_MESSAGE,
    max_failures: Optional[int] = None,
    interval: float = 0,
    max_failure_log_level: int = logging.ERROR,
    max_failure_log_message: str = MAX_FAILURE_LOG_MESSAGE,
    *,
    backoff: float = 1.0,
    max_interval: Optional[float] = None,
    jitter: float = 0.0,
    max_time: Optional[float] = None,
    giveup: Optional[Callable[[BaseException], object]] = None,
    sleep: Callable[[float], object] = gevent.sleep,
) -> Any:
    """Re-run the decorated function when it fails with one of ``exc_classes``.

    Use it bare (``@retry``), with options (``@retry(max_failures=5)``), or as a
    call (``retry(f, max_failures=5)``).  Since the pool discards a connection
    whose block raised one of its ``exc_classes``, each attempt of a function
    that borrows from the pool runs on a different connection.

    Between attempts it sleeps with gevent, so other greenlets run.  After a
    :class:`~geventconnpool.PoolUnavailable`, or a
    :class:`~geventconnpool.PoolTimeout` raised while the remote end is down,
    it waits at least until the pool's next connect attempt (the error's
    ``retry_after``), whatever its own schedule says.  The
    exception of the attempt that gives up is re-raised unchanged, traceback
    included.  :class:`gevent.Timeout`, :exc:`greenlet.GreenletExit`,
    :exc:`KeyboardInterrupt` and :exc:`SystemExit` are never retried.

    The first nine parameters keep the order of 0.2.x and may be passed by
    position; the rest are keyword-only.  Every value is checked when the
    decorator is made, so a mistake fails at import rather than mid-outage.

    :param f: the function to wrap; leave it out to get a decorator.
    :param exc_classes: an exception class, or a tuple of them, that triggers
        another attempt.
    :param logger: a :class:`logging.Logger`; when given, each failed attempt
        logs exactly one line: the retry message, or the give-up message for
        the failure that is re-raised.
    :param retry_log_level: the level of the retry message.
    :param retry_log_message: a :meth:`str.format` template with the fields
        ``{f}`` (the function's name), ``{e}`` (the exception), ``{attempt}``
        (the 1-based number of the failed attempt) and ``{wait}`` (seconds
        until the next attempt).
    :param max_failures: how many failures are tolerated: the next one is
        re-raised, so the function runs at most ``max_failures + 1`` times.
        ``None`` retries for ever.
    :param interval: seconds to wait before the first retry.
    :param max_failure_log_level: the level of the give-up message.
    :param max_failure_log_message: the give-up template, with the same fields.
    :param backoff: the growth of the wait: the k-th wait is
        ``interval * backoff ** (k - 1)``; 2.0 is exponential.  At least 1.
    :param max_interval: a cap on any one wait, or ``None``.
    :param jitter: a fraction in [0, 1]: each wait, after the cap, is
        multiplied by ``1 - jitter * U`` with ``U`` uniform in [0, 1).
    :param max_time: a budget in seconds since the first attempt (monotonic
        clock): no wait is begun that would end past it; ``None`` for none.
    :param giveup: a predicate on the exception; when it returns true the
        exception is re-raised at once, without another attempt (and without
        the give-up message, which is for running out of retries).
    :param sleep: the function that waits between attempts, given the
        seconds; a test can pass ``waits.append`` to record the waits instead
        of sleeping.
    :raises TypeError: ``f`` is an exception class (pass it as
        ``exc_classes=``), or an argument has the wrong type.
    :raises ValueError: a number is out of range, or a template names an
        unknown field.

    .. versionchanged:: 1.0
       Keyword options work with ``@retry(...)``; added ``backoff``,
       ``max_interval``, ``jitter``, ``max_time``, ``giveup`` and the
       ``{attempt}`` and ``{wait}`` fields.

    .. versionchanged:: 1.1
       Waits at least an error's ``retry_after``; added ``sleep``; the default
       give-up message names the error, and ``giveup`` writes no give-up message.
    """
    if isinstance(f, type) or (isinstance(f, tuple) and f):
        raise TypeError(
            f"retry() got {f!r} where the function belongs: "
            f"pass exception classes by keyword, as retry(exc_classes={f!r})"
        )
    if f is not None and not callable(f):
        raise TypeError(f"retry() needs a callable, not {f!r}")
    retried = exception_classes(exc_classes, "exc_classes")
    if max_failures is not None:
        whole_number(max_failures, "max_failures", minimum=0)
    first_wait = seconds(interval, "interval", optional=False, zero=True) or 0.0
    factor = number(backoff, "backoff", minimum=1.0)
    cap = seconds(max_interval, "max_interval", zero=True)
    spread = number(jitter, "jitter", minimum=0.0, maximum=1.0)
    budget = seconds(max_time, "max_time")
    if giveup is not None and not callable(giveup):
        raise TypeError(f"giveup must be a callable or None, not {giveup!r}")
    if not callable(sleep):
        raise TypeError(f"sleep must be a callable, not {sleep!r}")
    for level, name in (
        (retry_log_level, "retry_log_level"),
        (max_failure_log_level, "max_failure_log_level"),
    ):
        if isinstance(level, bool) or not isinstance(level, int):
            raise TypeError(f"{name} must be an int logging level, not {level!r}")
    retry_message = _template(retry_log_message, "retry_log_message")
    give_up_message = _template(max_failure_log_message, "max_failure_log_message")

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        name = getattr(func, "__name__", repr(func))

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            attempt = 0
            while True:
                attempt += 1
                try:
                    return func(*args, **kwargs)
                except retried as error:
                    if isinstance(error, _NEVER_RETRIED):
                        raise
                    wait = backoff_delay(attempt, initial=first_wait, factor=factor, cap=cap, jitter=spread)
                    if isinstance(error, _WAITS_FOR_THE_POOL) and error.retry_after is not None:
                        wait = max(wait, error.retry_after)
                    exhausted = max_failures is not None and attempt > max_failures
                    if not exhausted and giveup is not None and giveup(error):
                        if logger is not None:
                            logger.debug("giving up on %r at once: giveup(%r) is true", name, error)
                        raise
                    if exhausted or (budget is not None and time.monotonic() + wait > started + budget):
                        if logger is not None:
                            logger.log(
                                max_failure_log_level,
                                give_up_message.format(f=name, e=error, attempt=attempt, wait=0.0),
                            )
                        raise
                    if logger is not None:
                        logger.log(
                            retry_log_level, retry_message.format(f=name, e=error, attempt=attempt, wait=wait)
                        )
                    del error  # not kept alive, with its traceback, across the sleep
                    sleep(wait)

        return wrapper

    if f is None:
        return decorate
    return decorate(f)
