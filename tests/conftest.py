"""Test configuration: gevent mode, a watchdog on every test, shared fixtures.

Set GEVENTCONNPOOL_PATCH_ALL=1 to run the whole suite under
gevent.monkey.patch_all(), the way gunicorn's gevent worker runs applications.
"""

import os

if os.environ.get("GEVENTCONNPOOL_PATCH_ALL"):
    from gevent import monkey

    monkey.patch_all()

import gc
import re
import warnings

import gevent
import pytest
from doubles import IPS, LogCapture
from faultproxy import FaultProxy
from haproxy_server import HAPROXY, HAProxy, haproxy_available
from helpers import FORK_WARNING, LineServer, open_fds, pool_greenlets, serving
from misbehaving_server import MisbehavingServer
from nginx_server import NGINX, Nginx, nginx_available
from redis_server import REDIS_SERVER, RedisServer, redis_available
from tls_server import TLSLineServer

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


@pytest.fixture(autouse=True)
def fork_warnings_fail():
    """Fail a test in which this process forked while it had threads other than gevent's pool workers.

    Python 3.12+ warns then; tests start programs inside helpers.starting_a_program(),
    which silences the warning only for those workers, so one that gets here
    means a thread nobody expected.  Other warnings go on to pytest unchanged.
    """
    with warnings.catch_warnings(record=True) as caught:
        yield
    fork_warnings = [w for w in caught if re.match(FORK_WARNING, str(w.message))]
    for w in caught:
        if w not in fork_warnings:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    if fork_warnings:
        w = fork_warnings[0]
        pytest.fail(f"forked with unknown threads: {w.filename}:{w.lineno}: {w.message}", pytrace=False)


@pytest.fixture
def line_server():
    """A real line-protocol server on a free loopback port (PING, ECHO, QUIT, ...)."""
    yield from serving(LineServer())


@pytest.fixture
def servers():
    """Four line servers, on 127.0.0.2 to 127.0.0.5 (doubles.IPS), all on one port: one name's addresses."""
    started = []
    try:
        for ip in IPS[:4]:
            server = LineServer(started[0].port if started else 0, host=ip)
            server.start()
            started.append(server)
        yield started
    finally:
        for server in started:
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

    The garbage collector runs only when something is still open: it takes
    tens of milliseconds with pytest's heap, and most tests close their
    pools.  (A descriptor named before the test and freed during it by the
    collector is no leak: /proc names each socket by its own inode.)
    """
    fds_before = open_fds()
    greenlets_before = pool_greenlets()

    def check():
        from helpers import wait_until

        def settled():
            if open_fds() <= fds_before and pool_greenlets() <= greenlets_before:
                return True
            gc.collect()  # a pool dropped without close(), in a reference cycle
            return False

        wait_until(
            settled,
            timeout=5,
            message=lambda: (
                f"leak: fds {open_fds() - fds_before}, greenlets {pool_greenlets() - greenlets_before}"
            ),
        )

    yield check
    check()


@pytest.fixture
def misbehaving_server():
    """A line server on a free loopback port that closes (FIN), resets or garbles connections on command."""
    yield from serving(MisbehavingServer())


@pytest.fixture
def tls_server():
    """A TLS 1.3 line server on a free loopback port, sending session tickets after each handshake."""
    yield from serving(TLSLineServer())


@pytest.fixture
def nginx():
    """Debian's nginx serving HTTPS with keep-alive on a free loopback port; skipped where it is missing."""
    if not nginx_available():
        pytest.skip(f"{NGINX} is missing: install Debian's nginx (.ci/run does) to run this test")
    server = Nginx()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def haproxy_redis():
    """(haproxy, redis): haproxy in TCP mode with ``timeout client 2s`` in front of a real redis-server."""
    for program, available in ((HAPROXY, haproxy_available()), (REDIS_SERVER, redis_available())):
        if not available:
            pytest.skip(f"{program} is missing: install Debian's package (.ci/run does) to run this test")
    redis = RedisServer()
    haproxy = HAProxy(redis.address, timeout_client=2.0)
    try:
        redis.start()
        haproxy.start()
        yield haproxy, redis
    finally:
        haproxy.cleanup()
        redis.cleanup()
