"""Observers: what a metrics exporter hears from a pool, on its slow paths only.

Private.  The exporters (:mod:`geventconnpool.otel`,
:mod:`geventconnpool.prometheus`) read gauges and counters from
:meth:`~geventconnpool.ConnectionPool.stats` when they are collected; only the
durations of their histograms need the pool to tell them something, and it
does so where it already pays for more than a clock read: after a successful
connect (``_connecting.connect_once``), and when a caller that had to wait in
:meth:`~geventconnpool.ConnectionPool.get` gets its connection
(``ConnectionPool._acquire``).  A pool with no observer tests one empty tuple
there, and nothing at all on the checkout's fast path.

The time a connection is held is on the fast path: an observer that wants
it (``use_time``) makes the pool lend *measured* entries, a subclass of the
entry class its options chose, whose ``__enter__`` and ``__exit__`` read the
clock; the other pools keep their entries untouched.
"""

from __future__ import annotations

import logging
import time
from types import TracebackType
from typing import Any, Dict, Optional, Protocol, Set, Tuple, Type, TypeVar, cast

from geventconnpool._lease import Entry
from geventconnpool.errors import PoolClosed

C = TypeVar("C")

logger = logging.getLogger("geventconnpool")

_now = time.monotonic


class Observer(Protocol):
    """What a pool tells a metrics exporter; the calls must not block nor switch greenlets."""

    #: Whether it wants :meth:`used`, which costs every checkout two clock reads.
    use_time: bool

    def connected(self, seconds: float) -> None:
        """A connect attempt succeeded; it took ``seconds``."""

    def waited(self, seconds: float) -> None:
        """A caller that had to wait in ``get()`` got its connection after ``seconds``."""

    def used(self, seconds: float) -> None:
        """A connection came back after ``seconds`` in a ``with`` block (only with :attr:`use_time`)."""

    def closed(self) -> None:
        """The pool was closed: it tells nothing more."""


class ObservedPool(Protocol[C]):
    """What observing uses of the pool: the private contract of this module."""

    @property
    def name(self) -> str: ...
    @property
    def closed(self) -> bool: ...

    _observers: Tuple[Observer, ...]
    _entry_class: Type[Entry[C]]
    _entries: Set[Entry[C]]


def tell(pool: Any, what: str, seconds: float) -> None:
    """Call ``what`` (``"connected"``, ``"waited"`` or ``"used"``) on each observer of ``pool``.

    An observer's error is logged, never raised: metrics must not fail a caller.
    """
    for observer in getattr(pool, "_observers", ()):  # a forked child's orphanage has none
        try:
            getattr(observer, what)(seconds)
        except Exception:
            logger.exception("pool %r: a metrics exporter failed", pool.name)


def observe(pool: ObservedPool[Any], observer: Observer) -> None:
    """Add ``observer`` to ``pool``; lend measured entries from now on if it wants ``use_time``.

    :raises PoolClosed: the pool is closed.
    """
    if pool.closed:
        raise PoolClosed(f"pool {pool.name!r} is closed")
    pool._observers += (observer,)
    _choose_entries(pool)


def unobserve(pool: ObservedPool[Any], observer: Observer) -> None:
    """Remove ``observer`` from ``pool`` (doing nothing if it is not there)."""
    pool._observers = tuple(o for o in pool._observers if o is not observer)
    _choose_entries(pool)


def _choose_entries(pool: ObservedPool[Any]) -> None:
    """Make every entry of ``pool``, and those it opens later, measured if an observer wants ``use_time``.

    An entry held now keeps the ``__exit__`` its ``with`` statement looked
    up; the entries' classes share one layout, so changing it is safe.
    """
    base = _PLAIN.get(pool._entry_class, pool._entry_class)
    wanted = measured(base) if any(o.use_time for o in pool._observers) else base
    if wanted is pool._entry_class:
        return
    pool._entry_class = wanted
    for entry in pool._entries:
        entry.__class__ = wanted


_MEASURED: Dict[type, type] = {}
_PLAIN: Dict[type, type] = {}


def measured(base: Type[Entry[C]]) -> Type[Entry[C]]:
    """The subclass of the entry class ``base`` that tells its pool's observers how long it was held."""
    if base in _MEASURED:
        return cast("Type[Entry[C]]", _MEASURED[base])
    base_enter = base.__enter__
    base_exit = base.__exit__

    def __enter__(self: Entry[C]) -> C:
        conn = base_enter(self)
        self.lent_at = _now()  # leak_warning's lent_at, read at get(), is a few instructions older
        return conn

    def __exit__(
        self: Entry[C],
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        held = _now() - self.lent_at
        pool = self.pool
        base_exit(self, exc_type, exc, tb)  # may switch: the time is read before
        tell(pool, "used", held)

    cls = type(
        f"Measured{base.__name__}",
        (base,),
        {
            "__slots__": (),
            "__module__": __name__,
            "__doc__": f"A {base.__name__} that tells its pool's observers how long it was held.",
            "__enter__": __enter__,
            "__exit__": __exit__,
        },
    )
    _MEASURED[base] = cls
    _PLAIN[cls] = base
    return cast("Type[Entry[C]]", cls)
