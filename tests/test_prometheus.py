"""geventconnpool.prometheus, read with a real prometheus_client registry: in one process, and in
multiprocess mode (its files in a temporary directory); tests/test_gunicorn_metrics.py runs it in gunicorn."""

from __future__ import annotations

from typing import Dict

import gevent
import pytest
from doubles import IPS, NAME, FastLinePool, exported_addresses_follow, instrumented_pools, metrics_workload
from helpers import LinePool, pool_greenlets, request, wait_until

from geventconnpool import Address, PoolClosed
from geventconnpool._figures import BUCKETS

pytest.importorskip("prometheus_client", reason="pip install prometheus_client to run these tests")
from prometheus_client import CollectorRegistry, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector

from geventconnpool import prometheus

# The Prometheus name of each gauge and counter (counters with their _total), and the stats() field.
FIGURES: Dict[str, str] = {
    "geventconnpool_connection_max": "size",
    "geventconnpool_connection_idle_max": "size",
    "geventconnpool_connection_idle_min": "size",
    "geventconnpool_connection_pending_requests": "waiting",
    "geventconnpool_connection_connecting": "connecting",
    "geventconnpool_connection_timeouts_total": "timeouts",
    "geventconnpool_connection_checkouts_total": "checkouts",
    "geventconnpool_connection_opened_total": "opened",
    "geventconnpool_connection_failed_connects_total": "failed_connects",
    "geventconnpool_connection_discarded_total": "discarded",
    "geventconnpool_connection_recycled_total": "recycled",
    "geventconnpool_connection_closed_while_idle_total": "closed_while_idle",
    "geventconnpool_connection_keepalive_failures_total": "keepalive_failures",
    "geventconnpool_connection_overloaded_total": "overloaded",
}


ADDRESS_COUNT = "geventconnpool_connection_address_count"  # a pool made with address= only


def addresses_of(registry: CollectorRegistry, pool: str) -> Dict[Address, float]:
    """The connections per address that ADDRESS_COUNT reports for the pool named ``pool``."""
    found = {}
    for metric in registry.collect():
        for sample in metric.samples:
            labels = dict(sample.labels)
            if sample.name == ADDRESS_COUNT and labels.pop("pool") == pool:
                assert set(labels) == {"host", "port", "ip"}
                found[Address(labels["host"], int(labels["port"]), labels["ip"])] = sample.value
    return found


def assert_matches_stats(registry: CollectorRegistry, pool) -> None:
    """Every gauge and counter of ``pool`` in ``registry`` says what stats() says."""
    stats = pool.stats()
    for name, field in FIGURES.items():
        assert registry.get_sample_value(name, {"pool": pool.name}) == getattr(stats, field), name
    for state, field in (("idle", "idle"), ("used", "in_use")):
        got = registry.get_sample_value(
            "geventconnpool_connection_count", {"pool": pool.name, "state": state}
        )
        assert got == getattr(stats, field), state


def test_one_process_a_collector_reads_stats_at_each_scrape(line_server, leak_check):
    """In one process every gauge and counter equals stats() at the scrape, labelled with the pool's name;
    the histograms count the connects, the waits and (use_time) the checkouts."""
    registry = CollectorRegistry()
    with FastLinePool(line_server, 2, name="prom-lines") as pool:
        prometheus.instrument(pool, registry, use_time=True)
        metrics_workload(pool)
        assert_matches_stats(registry, pool)
        stats = pool.stats()
        assert (stats.timeouts, stats.discarded, stats.opened) == (1, 1, 3)
        labels = {"pool": "prom-lines"}
        sample = registry.get_sample_value
        assert sample("geventconnpool_connection_create_time_seconds_count", labels) == stats.opened
        assert sample("geventconnpool_connection_wait_time_seconds_count", labels) == 1
        assert sample("geventconnpool_connection_use_time_seconds_count", labels) == stats.checkouts
        text = generate_latest(registry).decode()
        assert "# TYPE geventconnpool_connection_count gauge" in text
        assert 'geventconnpool_connection_timeouts_total{pool="prom-lines"} 1.0' in text
        prometheus.uninstrument(pool)
        assert registry.get_sample_value("geventconnpool_connection_max", labels) is None
        assert sample("geventconnpool_connection_create_time_seconds_count", labels) is None
    leak_check()


def test_one_process_a_wait_lands_in_its_bucket_and_sum(line_server, leak_check):
    """One caller waits about 60 ms for the only connection: the wait_time histogram has one observation,
    in every bucket from the first bound at or above its sum, as prometheus_client's own would."""
    registry = CollectorRegistry()
    with LinePool(line_server, 1, name="one-wait") as pool:
        prometheus.instrument(pool, registry)
        pool.wait(timeout=5)
        with pool.get():
            waiter = gevent.spawn(request, pool, b"PING")
            wait_until(lambda: pool.stats().waiting == 1)
            gevent.sleep(0.06)  # the wait to measure: held that long while the waiter waits
        assert waiter.get(timeout=5) == b"PONG"
        labels = {"pool": "one-wait"}
        name = "geventconnpool_connection_wait_time_seconds"
        waited = registry.get_sample_value(name + "_sum", labels)
        assert waited >= 0.06
        assert registry.get_sample_value(name + "_count", labels) == 1
        for bound in (*BUCKETS, float("inf")):
            le = "+Inf" if bound == float("inf") else repr(bound)
            expected = 1 if waited <= bound else 0
            assert registry.get_sample_value(name + "_bucket", {**labels, "le": le}) == expected, le
        assert f"# TYPE {name} histogram" in generate_latest(registry).decode()
    leak_check()


def test_one_process_several_pools_share_the_registry_and_close_stops_the_export(line_server, leak_check):
    """Two pools on one registry are two label values; a closed pool disappears from the scrape."""
    registry = CollectorRegistry()
    with LinePool(line_server, 1, name="a") as a, LinePool(line_server, 2, name="b") as b:
        prometheus.instrument(a, registry)
        prometheus.instrument(b, registry)
        assert registry.get_sample_value("geventconnpool_connection_max", {"pool": "a"}) == 1
        assert registry.get_sample_value("geventconnpool_connection_max", {"pool": "b"}) == 2
        a.close()
        assert registry.get_sample_value("geventconnpool_connection_max", {"pool": "a"}) is None
        assert registry.get_sample_value("geventconnpool_connection_max", {"pool": "b"}) == 2
    leak_check()


def test_bad_arguments_fail_at_once(line_server):
    """instrument() names what is wrong: not a pool, use_time not a bool, a name taken, a closed pool."""
    registry = CollectorRegistry()
    with pytest.raises(TypeError, match="pool must be a ConnectionPool"):
        prometheus.instrument(object(), registry)  # type: ignore[arg-type]
    with LinePool(line_server, 1, name="same") as pool, LinePool(line_server, 1, name="same") as other:
        with pytest.raises(TypeError, match="use_time"):
            prometheus.instrument(pool, registry, use_time=1)  # type: ignore[arg-type]
        prometheus.instrument(pool, registry)
        with pytest.raises(ValueError, match="'same' is instrumented"):
            prometheus.instrument(other, registry)
    with pytest.raises(PoolClosed):
        prometheus.instrument(pool, registry)


@pytest.fixture
def multiprocess_mode(tmp_path, monkeypatch):
    """prometheus_client in multiprocess mode, its files in a temporary directory; yields the directory.

    The client reads the variable when it is imported: the test switches its
    value class too, as that import would have.
    """
    if not hasattr(values, "close_all_multiprocess_files"):
        pytest.skip("this prometheus_client cannot close its multiprocess files: the leak check would fail")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())
    yield tmp_path
    values.close_all_multiprocess_files()  # the client keeps them open for the process's life


def test_multiprocess_mode_a_greenlet_publishes_and_stops_with_the_pool(
    line_server, leak_check, multiprocess_mode
):
    """In multiprocess mode a greenlet sets the livesum gauges and adds to the counters within a few
    INTERVALs, never on the checkout path; closing the pool stops it and zeroes its gauges."""
    registry = CollectorRegistry()
    with FastLinePool(line_server, 2, name="mp-lines") as pool:
        prometheus.instrument(pool, registry)
        (greenlet,) = [g for g in pool_greenlets() if g.name == "geventconnpool mp-lines prometheus"]
        metrics_workload(pool)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=str(multiprocess_mode))

        def published() -> bool:
            stats = pool.stats()
            return (
                merged.get_sample_value("geventconnpool_connection_checkouts_total", {"pool": "mp-lines"})
                == stats.checkouts
                and merged.get_sample_value(
                    "geventconnpool_connection_count", {"pool": "mp-lines", "state": "idle"}
                )
                == stats.idle
            )

        wait_until(published, timeout=5)
        assert_matches_stats(merged, pool)
        assert (
            merged.get_sample_value("geventconnpool_connection_wait_time_seconds_count", {"pool": "mp-lines"})
            == 1
        )
    wait_until(lambda: greenlet.dead)
    assert merged.get_sample_value("geventconnpool_connection_max", {"pool": "mp-lines"}) == 0
    # leak_check checks at the end, once multiprocess_mode has closed the client's files.


def test_one_process_the_connections_to_each_address_follow_connections_by_address(
    servers, line_server, leak_check
):
    """In one process a pool made with address= shows its open connections per address, labelled host,
    port and ip, as connections_by_address() counts them, also once the name resolves to a new address;
    a pool without address shows none; a closed pool disappears from the scrape."""
    registry = CollectorRegistry()
    port = servers[0].port
    pools = instrumented_pools(servers, line_server, lambda p: prometheus.instrument(p, registry), 6)
    with pools as (pool, _):
        exported_addresses_follow(pool, lambda: addresses_of(registry, "spread"))
        text = generate_latest(registry).decode()
        assert "# TYPE geventconnpool_connection_address_count gauge" in text
        labels = f'host="{NAME}",ip="{IPS[2]}",pool="spread",port="{port}"'
        assert f"geventconnpool_connection_address_count{{{labels}}} 2.0" in text
        assert addresses_of(registry, "plain") == {}
        assert registry.get_sample_value("geventconnpool_connection_max", {"pool": "plain"}) == 1
    assert addresses_of(registry, "spread") == {}
    leak_check()


def test_multiprocess_mode_an_address_that_left_the_answer_goes_to_zero(
    servers, line_server, leak_check, multiprocess_mode
):
    """In multiprocess mode the publishing greenlet sets the gauge of each address; one that left the
    name's answer goes to 0 once its connections are closed, not left at its last count; a pool without
    address publishes no address series; closing the pool sets every address of it to 0."""
    registry = CollectorRegistry()
    merged = CollectorRegistry()
    MultiProcessCollector(merged, path=str(multiprocess_mode))
    port = servers[0].port
    first, second = (Address(NAME, port, ip) for ip in IPS[:2])
    pools = instrumented_pools(servers, line_server, lambda p: prometheus.instrument(p, registry), 4)
    with pools as (pool, _):

        def published(expected: Dict[Address, float]) -> bool:
            return addresses_of(merged, "spread") == expected

        wait_until(lambda: published({first: 2, second: 2}), interval=0.05)
        assert pool.connections_by_address() == {first: 2, second: 2}
        pool.answer = IPS[:1]
        wait_until(
            lambda: published({first: 4, second: 0}),
            interval=0.05,
            message=lambda: str(addresses_of(merged, "spread")),
        )
        assert pool.connections_by_address() == {first: 4}
        assert addresses_of(merged, "plain") == {}
        assert merged.get_sample_value("geventconnpool_connection_max", {"pool": "plain"}) == 1
    wait_until(lambda: not [g for g in pool_greenlets() if g.name == "geventconnpool spread prometheus"])
    assert addresses_of(merged, "spread") == {first: 0, second: 0}
    # leak_check checks at the end, once multiprocess_mode has closed the client's files.
