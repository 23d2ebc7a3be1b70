"""The tests' own helpers: helpers.starting_a_program() silences Python 3.12+'s fork warning only for gevent's
thread-pool workers, whose threads a child that execs at once cannot trip on."""

from __future__ import annotations

import os
import re
import sys
import warnings
from typing import Callable, List

import gevent
import pytest
from gevent import subprocess
from gevent.monkey import get_original
from helpers import FORK_WARNING, starting_a_program, wait_until

pytestmark = pytest.mark.skipif(
    sys.version_info < (3, 12), reason="Python 3.11 and older say nothing when a process with threads forks"
)


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def fork_warnings_of(start: Callable[[], object]) -> List[str]:
    """The fork warnings that ``start()`` raised, whatever the filters of the run."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start()
    return [str(w.message) for w in caught if re.match(FORK_WARNING, str(w.message))]


def run_true() -> None:
    subprocess.run(["true"], check=True)


def run_true_as_the_tests_do() -> None:
    with starting_a_program():
        run_true()


def test_a_program_started_beside_gevents_pool_workers_does_not_warn():
    """With gevent's thread pool at work (as after a name lookup), starting a program in starting_a_program()
    says nothing, where the same start outside it warns."""
    gevent.get_hub().threadpool.apply(os.getpid)  # the pool runs it in a worker thread, which stays
    assert os_threads() > 1

    assert fork_warnings_of(run_true_as_the_tests_do) == []
    assert fork_warnings_of(run_true) != []


def test_a_program_started_beside_any_other_thread_still_warns():
    """A thread that is not gevent's (here one of the test's own, blocked on a lock) keeps the warning."""
    start_new_thread = get_original("_thread", "start_new_thread")
    lock = get_original("_thread", "allocate_lock")()
    lock.acquire()
    before = os_threads()
    start_new_thread(lock.acquire, ())  # a real OS thread, blocked until the lock is released
    try:
        wait_until(lambda: os_threads() == before + 1, timeout=5)
        assert fork_warnings_of(run_true_as_the_tests_do) != []
    finally:
        lock.release()
    wait_until(lambda: os_threads() == before, timeout=5)
