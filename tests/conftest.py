"""Test configuration: gevent mode, a watchdog on every test, shared fixtures.

Set GEVENTCONNPOOL_PATCH_ALL=1 to run the whole suite under
gevent.monkey.patch_all(), the way gunicorn's gevent worker runs applications.
"""

import os

if os.environ.get("GEVENTCONNPOOL_PATCH_ALL"):
    from gevent import monkey

    monkey.patch_all()

import gc

import gevent
import pytest
from doubles import LogCapture
from faultproxy import FaultProxy
from helpers import LineServer, open_fds, pool_greenlets
from redis_server import RedisServer

PATCHED = bool(os.environ.get("GEVENTCONNPOOL_PATCH_ALL"))


def pytest_report_header(config):
    return f"gevent {gevent.__version__}, monkey.patch_all(): {'yes' if PATCHED else 'no'}"


def pytest_configure(config):
    config.addinivalue_line("markers", "watchdog(seconds): the test's deadlock watchdog, 30 s by default")


class WatchdogExpired(BaseException):
    """A test blocked past its watchdog.

    A BaseException, like gevent.Timeout, so that no ``except Exception`` on
    the way (the pool's own checks among them) can swallow it.
    """


@pytest.fixture(autouse=True)
def watchdog(request):
    """Fail a test that blocks longer than its watchdog instead of hanging the suite."""
    marker = request.node.get_closest_marker("watchdog")
    seconds = marker.args[0] if marker else 30
    timer = gevent.Timeout(seconds, WatchdogExpired(f"the test blocked for more than {seconds} s"))
    timer.start()
    try:
        yield
    finally:
        timer.close()


@pytest.fixture
def line_server():
    """A real line-protocol server on a free loopback port (PING, ECHO, QUIT, ...)."""
    server = LineServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis():
    """A real redis-server on a free port of 127.0.0.1, killed at the end."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def proxy(redis):
    """A :class:`FaultProxy` in front of ``redis``."""
    fault_proxy = FaultProxy(redis.address)
    fault_proxy.start()
    try:
        yield fault_proxy
    finally:
        fault_proxy.stop()


@pytest.fixture
def pool_log(caplog):
    """What the package's logger ("geventconnpool") emitted during the test, from DEBUG up."""
    return LogCapture(caplog, "geventconnpool")


@pytest.fixture
def retry_log(caplog):
    """A logger of the test's own for retry(logger=...), as ``retry_log.logger``, and what it emitted."""
    return LogCapture(caplog, "tests.retry")


@pytest.fixture
def leak_check():
    """Assert at the end of the test that no file descriptor or pool greenlet was left behind.

    Call the yielded function once the test's pools are closed, to check earlier.
    """
    gc.collect()
    fds_before = open_fds()
    greenlets_before = pool_greenlets()

    def check():
        from helpers import wait_until

        def settled():
            gc.collect()
            return open_fds() <= fds_before and pool_greenlets() <= greenlets_before

        wait_until(
            settled,
            timeout=5,
            message=lambda: (
                f"leak: fds {open_fds() - fds_before}, greenlets {pool_greenlets() - greenlets_before}"
            ),
        )

    yield check
    check()
