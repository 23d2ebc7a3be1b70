"""The smallest end-to-end check: a pool fills, lends a working connection, and closes."""

from helpers import LinePool, request


def test_pool_fills_and_serves_a_request(line_server, leak_check):
    """A new pool opens all its connections and a borrowed one answers PING."""
    with LinePool(line_server, 3) as pool:
        pool.wait(timeout=5)
        assert request(pool, b"PING") == b"PONG"
        assert line_server.accepted == 3
    leak_check()
