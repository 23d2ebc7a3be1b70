"""Smoke test of the benchmark: ``python benchmarks/run.py --quick`` runs and prints every row.

It asserts that the benchmark ran and what it printed, never a speed.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import starting_a_program

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "benchmarks" / "run.py"

# The rows every table must show; a peer may instead be dropped with a printed note saying why.
REFERENCE_ROWS = {
    "Checkout overhead": [
        "geventconnpool",
        "geventconnpool keepalive=60",
        "geventconnpool max_lifetime=3600",
        "geventconnpool check_after=60",
        "geventconnpool leak_warning=60",
        "bare Queue get+put",
        "with on a ready object",
        "0.2.1 design",
    ],
    "Contended": [
        "geventconnpool",
        "0.2.1 design",
        "bare Queue get+put",
        "dedicated connection",
        "fresh connection per request",
    ],
    "TLS": ["geventconnpool", "dedicated TLS connection", "fresh TLS connection per request"],
    "Recovery": ["geventconnpool", "0.2.1 design"],
    "Memory": ["geventconnpool", "dedicated connection", "0.2.1 design"],
}
PEERS = ["SQLAlchemy", "gsocketpool", "socketpool", "generic-connection-pool"]
PEER_TABLES = ["Checkout overhead", "Contended", "Recovery", "Memory"]


def tables(output):
    """Split the printed text report into {title: [row lines]}."""
    found = {}
    lines = output.splitlines()
    for i, line in enumerate(lines[:-1]):
        if lines[i + 1] and set(lines[i + 1]) == {"="} and len(lines[i + 1]) == len(line):
            rows = []
            for row in lines[i + 4 :]:  # title, ===, header, ---
                if not row.strip() or row.startswith("  - "):
                    break
                rows.append(row)
            found[line] = rows
    return found


def rows_of(found, prefix):
    titles = [t for t in found if t.startswith(prefix)]
    assert len(titles) == 1, f"expected one table starting with {prefix!r}, found {titles}"
    return found[titles[0]]


def has_row(rows, name):
    # The row's name is a column of its own: surrounded by two spaces or the line's ends.
    pattern = re.compile(r"(^|\s{2})" + re.escape(name) + r"(\s{2}|$)")
    return any(pattern.search(r) for r in rows)


@pytest.mark.slow  # a minute of benchmark: run once, by the tox env "soak", not in every env
@pytest.mark.redis
@pytest.mark.watchdog(240)
def test_quick_benchmark_prints_every_row():
    """`python benchmarks/run.py --quick` exits 0 and prints every scenario's table with all its rows."""
    if shutil.which("redis-server") is None and not os.path.exists("/usr/bin/redis-server"):
        pytest.skip("redis-server is not installed: the benchmark needs it as the remote end")
    env = {k: v for k, v in os.environ.items() if k != "GEVENTCONNPOOL_PATCH_ALL"}
    try:
        # A blocking call under plain gevent: the watchdog cannot interrupt it, the timeout here does.
        with starting_a_program():
            proc = subprocess.run(
                [sys.executable, str(RUN), "--quick"],
                cwd=str(REPO),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=200,
            )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"benchmarks/run.py --quick did not finish within 200 s:\n{e.output}")
    output = proc.stdout
    if proc.returncode != 0 and "could not install gevent and trustme" in output:
        pytest.skip(f"the benchmark's venv cannot be made here:\n{output[-2000:]}")
    assert proc.returncode == 0, output
    found = tables(output)
    for prefix, names in REFERENCE_ROWS.items():
        rows = rows_of(found, prefix)
        for name in names:
            assert has_row(rows, name), f"{prefix}: no row {name!r} in\n" + "\n".join(rows)
    for prefix in PEER_TABLES:
        rows = rows_of(found, prefix)
        for peer in PEERS:
            measured = any(re.search(r"(^|\s{2})" + re.escape(peer) + r"\b", r) for r in rows)
            assert measured or f"dropped {peer}" in output, (
                f"{prefix}: peer {peer} neither measured nor dropped with a note\n{output}"
            )
    targets = rows_of(found, "Targets")
    assert targets, "the table of targets is empty"
    assert all(re.search(r"\s(met|NOT met)\s", r) for r in targets), "\n".join(targets)
