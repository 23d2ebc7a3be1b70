"""Smoke tests of the benchmark: ``python benchmarks/run.py --quick`` and ``--instructions --quick``
run and print every row, and ``--chart`` draws its SVG.

They assert that the benchmark ran and what it printed, never a speed or a count.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

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
        "geventconnpool fail_fast=True",
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
    "Readiness": ["wait(min_open=1)", "wait(), all 10", "polling every 10 ms (1.0's wait)"],
}
PEERS = ["SQLAlchemy", "gsocketpool", "socketpool", "generic-connection-pool"]
# The rows of --instructions; watch_idle's and the exporters' are "n/a" on a pool without them, but printed.
INSTRUCTION_ROWS = {
    "Instructions per checkout:": [
        "geventconnpool features off",
        "geventconnpool keepalive=60",
        "geventconnpool max_lifetime=3600",
        "geventconnpool check_after=60",
        "geventconnpool leak_warning=60",
        "geventconnpool fail_fast=True",
        "geventconnpool watch_idle on",
        "geventconnpool otel exporter on",
        "geventconnpool otel use_time on",
        "geventconnpool prometheus exporter on",
        "bare Queue get+put",
        "0.2.1 design",
        "with on a ready object",
        "the loop alone",
    ],
    "Instructions per contended request:": [
        "geventconnpool timeout=30 (default)",
        "geventconnpool timeout=None",
        "geventconnpool watch_idle on",
        "geventconnpool otel exporter on",
        "geventconnpool prometheus exporter on",
        "bare Queue as the pool",
        "0.2.1 design",
        "sleep(0) alone",
    ],
}
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


def run_benchmark(args, timeout, needs_redis=True):
    """Run benchmarks/run.py with ``args`` (outside GEVENTCONNPOOL_PATCH_ALL); its output, or a skip/fail."""
    if needs_redis and shutil.which("redis-server") is None and not os.path.exists("/usr/bin/redis-server"):
        pytest.skip("redis-server is not installed: the benchmark needs it as the remote end")
    env = {k: v for k, v in os.environ.items() if k != "GEVENTCONNPOOL_PATCH_ALL"}
    try:
        # A blocking call under plain gevent: the watchdog cannot interrupt it, the timeout here does.
        with starting_a_program():
            proc = subprocess.run(
                [sys.executable, str(RUN), *args],
                cwd=str(REPO),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
            )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"benchmarks/run.py {' '.join(args)} did not finish within {timeout} s:\n{e.output}")
    output = proc.stdout
    for cannot in ("could not install gevent and trustme", "could not install matplotlib"):
        if proc.returncode != 0 and cannot in output:
            pytest.skip(f"the benchmark's venv cannot be made here:\n{output[-2000:]}")
    assert proc.returncode == 0, output
    return output


@pytest.mark.slow  # a minute of benchmark: run once, by the tox env "soak", not in every env
@pytest.mark.redis
@pytest.mark.watchdog(240)
def test_quick_benchmark_prints_every_row():
    """`python benchmarks/run.py --quick` exits 0 and prints every scenario's table with all its rows."""
    output = run_benchmark(["--quick"], timeout=200)
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


@pytest.mark.slow  # a minute or two under valgrind: run by the tox env "soak"
@pytest.mark.watchdog(480)
def test_instruction_counts_print_every_row():
    """`python benchmarks/run.py --instructions --quick` exits 0 and prints every row and target."""
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed (apt-get install valgrind): --instructions runs under it")
    # No redis-server: the rows lend socket pairs.
    output = run_benchmark(["--instructions", "--quick"], timeout=450, needs_redis=False)
    found = tables(output)
    for prefix, names in INSTRUCTION_ROWS.items():
        rows = rows_of(found, prefix)
        for name in names:
            assert has_row(rows, name), f"{prefix}: no row {name!r} in\n" + "\n".join(rows)
    targets = rows_of(found, "Instruction targets")
    assert targets, "the table of instruction targets is empty"
    assert all(re.search(r"\s(met|NOT met|n/a)\s", r) for r in targets), "\n".join(targets)


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.watchdog(360)
def test_chart_draws_the_contended_percentiles(tmp_path):
    """`run.py --quick --only contended --chart FILE.svg` writes an SVG whose text names every row."""
    svg = tmp_path / "contended-latency.svg"
    output = run_benchmark(["--quick", "--only", "contended", "--chart", str(svg)], timeout=320)
    assert f"chart of the contended latency percentiles: {svg}" in output
    root = ElementTree.parse(svg).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    text = [t.strip() for t in root.itertext() if t.strip()]
    for label in ["p50", "p90", "p99", "p99.9", "200 greenlets", "1,000 greenlets"]:
        assert label in text, text
    for name in REFERENCE_ROWS["Contended"]:
        assert name in text, f"no line for {name!r} in the legend: {text}"
