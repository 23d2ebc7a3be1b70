"""Per-socket TCP keepalive: :func:`enable_tcp_keepalive`."""

from __future__ import annotations

import socket
import sys
from typing import Dict, Optional, Protocol, Tuple

from geventconnpool._arguments import whole_number

__all__ = ["enable_tcp_keepalive"]

# The largest values Linux accepts (MAX_TCP_KEEPIDLE, MAX_TCP_KEEPINTVL,
# MAX_TCP_KEEPCNT).  They are checked on every platform, so that a value that
# Linux would refuse with a bare EINVAL fails everywhere, with a clear message.
_MAX_SECONDS = 32767
_MAX_COUNT = 127

# macOS names the idle time TCP_KEEPALIVE (0x10 in <netinet/tcp.h>); the
# number is the fallback for Pythons whose socket module lacks the constant.
_TCP_KEEPALIVE_MACOS = 0x10


class _SocketLike(Protocol):
    """What :func:`enable_tcp_keepalive` needs: a socket, a gevent socket or an SSL socket."""

    @property
    def family(self) -> int: ...

    @property
    def type(self) -> int: ...

    def setsockopt(self, level: int, optname: int, value: int, /) -> None: ...


def _idle_option() -> Tuple[str, Optional[int]]:
    """The name and number of the option that sets the idle time before the first probe."""
    option: Optional[int] = getattr(socket, "TCP_KEEPIDLE", None)
    if option is None and sys.platform == "darwin":
        return "TCP_KEEPALIVE", getattr(socket, "TCP_KEEPALIVE", _TCP_KEEPALIVE_MACOS)
    return "TCP_KEEPIDLE", option


def enable_tcp_keepalive(
    sock: _SocketLike,
    idle: Optional[int] = None,
    interval: Optional[int] = None,
    count: Optional[int] = None,
) -> Dict[str, int]:
    """Turn TCP keepalive on for one socket, and tune it where the platform allows.

    It sets ``SO_KEEPALIVE``, then each tuning option that is not ``None``
    and that the platform has: ``TCP_KEEPIDLE`` (``TCP_KEEPALIVE`` on macOS),
    ``TCP_KEEPINTVL`` and ``TCP_KEEPCNT``.  An option the platform lacks is
    left alone, and the system-wide default applies to it.  Call it in
    :meth:`~geventconnpool.ConnectionPool._new_connection` on the socket you
    return, before any TLS wrapping or on the SSL socket itself::

        s = socket.create_connection(address)
        enable_tcp_keepalive(s, idle=60, interval=10, count=5)

    With these values the kernel sends the first probe after 60 idle seconds
    and another every 10 seconds, and declares the connection dead after 5
    unanswered ones: a dead peer is noticed within about 110 seconds, and a
    firewall or load balancer that drops idle connections sees traffic every
    minute.

    :param sock: a connected or unconnected TCP socket (IPv4 or IPv6): a
        :class:`socket.socket`, a gevent socket or an :class:`ssl.SSLSocket`.
    :param idle: seconds of idleness before the first probe, 1 to 32767;
        ``None`` keeps the system default.
    :param interval: seconds between probes, 1 to 32767; ``None`` keeps the
        system default.
    :param count: unanswered probes before the connection is dropped, 1 to
        127; ``None`` keeps the system default.
    :returns: the options set, by name, with their values, such as
        ``{"SO_KEEPALIVE": 1, "TCP_KEEPIDLE": 60}``.
    :raises TypeError: ``sock`` is not a socket, or a value is not an int.
    :raises ValueError: ``sock`` is not a TCP socket, or a value is out of
        range.
    :raises OSError: the operating system refused an option.

    .. versionadded:: 1.0
    """
    checked: Dict[str, Optional[int]] = {}
    for argument, value, limit, unit in (
        ("idle", idle, _MAX_SECONDS, "seconds"),
        ("interval", interval, _MAX_SECONDS, "seconds"),
        ("count", count, _MAX_COUNT, "probes"),
    ):
        checked[argument] = (
            None if value is None else whole_number(value, argument, minimum=1, maximum=limit, unit=unit)
        )
    if not callable(getattr(sock, "setsockopt", None)):
        raise TypeError(f"sock must be a socket, not {sock!r}")
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        raise ValueError(f"sock must be a TCP socket (AF_INET or AF_INET6, SOCK_STREAM), not {sock!r}")

    options = [
        ("idle", *_idle_option()),
        ("interval", "TCP_KEEPINTVL", getattr(socket, "TCP_KEEPINTVL", None)),
        ("count", "TCP_KEEPCNT", getattr(socket, "TCP_KEEPCNT", None)),
    ]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    applied = {"SO_KEEPALIVE": 1}
    for argument, name, option in options:
        value = checked[argument]
        if value is None or option is None:
            continue
        sock.setsockopt(socket.IPPROTO_TCP, option, value)
        applied[name] = value
    return applied
