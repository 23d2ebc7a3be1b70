"""Instructions per operation, counted by valgrind's callgrind: ``python benchmarks/run.py --instructions``.

A wall-clock figure moves with whatever else the machine does; an
instruction count does not: the same code counts the same instructions run
after run.  So the per-operation costs are judged here, in instructions.

One valgrind process runs ``instruction_rows.py``, which forks a child per
row; each child counts a loop of ``low`` and a loop of ``high`` operations,
and the row's figure is the difference of the two counts divided by
``high - low``, so that start-up and warm-up cancel out.
"""

from __future__ import annotations

import argparse
import compileall
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from instruction_rows import (
    BARE_QUEUE,
    CONTENDED_DEFAULT,
    FEATURES_OFF,
    GREENLETS,
    LIB,
    MARK_FUNCTION,
    SIZE,
    SLEEP_ALONE,
    WATCH_IDLE,
    Row,
    counts,
    missing_options,
    references,
    rows,
)
from scenarios import Table

HERE = Path(__file__).resolve().parent
VALGRIND_MISSING = (
    "valgrind is not installed, and --instructions runs under it"
    " (Debian and Ubuntu: apt-get install valgrind)"
)

# The limits of the instruction targets.
CONTENDED_OVER_SLEEP = 1.5  # the pool's cost over a bare sleep(0), in sleep(0)s
CHECKOUT_OFF_X_QUEUE = 2.0  # a checkout with every feature off, in bare Queue get+puts
CHECKOUT_WATCH_IDLE_X_QUEUE = 2.5  # the same with watch_idle on
FEATURE_PLUS_X_QUEUE = 0.5  # what one feature adds, in bare Queue get+puts


@dataclass
class Counted:
    """A row's instructions per operation, one figure per repetition; ``why`` when it has none."""

    row: Row
    per_op: List[float] = field(default_factory=list)
    why: str = ""

    @property
    def value(self) -> Optional[float]:
        return statistics.median(self.per_op) if self.per_op else None


def select(only: Sequence[str]) -> List[Row]:
    """The rows whose key contains one of ``only`` (all when empty), and the rows their ratios need."""
    every = rows()
    if not only:
        return every
    wanted = {r.key for r in every if any(s.lower() in r.key.lower() for s in only)}
    if not wanted:
        listing = "\n  ".join(r.key for r in every)
        raise SystemExit(f"--only {','.join(only)} matches no row; the rows are:\n  {listing}")
    for r in every:
        if r.key in wanted:
            wanted.update(references(r))
    return [r for r in every if r.key in wanted]


def callgrind_total(path: Path) -> int:
    """The instructions (Ir) counted in one callgrind output file."""
    summary = None
    with open(path) as f:
        for line in f:
            if line.startswith("totals:"):
                return int(line.split()[1])
            if line.startswith("summary:"):
                summary = int(line.split()[1])
    if summary is None:
        raise ValueError(f"no totals in {path}")
    return summary


def fixed_addresses() -> List[str]:
    """``setarch ARCH -R``, turning address randomisation off, where it works; else nothing.

    Where objects land changes a few instructions per operation (pymalloc's free
    lists, hashes of objects): with the same addresses every run, the counts
    of two runs differ by a few instructions per checkout instead of dozens.
    """
    setarch = shutil.which("setarch")
    if setarch is None:
        return []
    prefix = [setarch, platform.machine(), "-R"]
    works = subprocess.run([*prefix, "true"], capture_output=True, check=False).returncode == 0
    return prefix if works else []


def count(valgrind: str, chosen: Sequence[Row], quick: bool, jobs: int, repeat: int) -> Dict[str, Counted]:
    """Run the rows under callgrind; each row's instructions per operation, by key."""
    every = rows()
    result: Dict[str, Counted] = {}
    runnable = []
    for row in chosen:
        missing = missing_options(row)
        result[row.key] = Counted(
            row, why=f"n/a (no {', '.join(missing)} in this version)" if missing else ""
        )
        if not missing:
            runnable.append(row)
    if not runnable:
        return result
    # Compiled here, not under valgrind: a process that compiles a module it imports ends up
    # with another heap than one that loads the .pyc, and counts a few instructions apart.
    compileall.compile_dir(str(HERE.parent / "geventconnpool"), quiet=1)
    compileall.compile_dir(str(HERE), maxlevels=0, quiet=1)
    with tempfile.TemporaryDirectory(prefix="geventconnpool-callgrind-") as tmp:
        manifest = Path(tmp) / "manifest"
        chosen_file = Path(tmp) / "chosen"
        chosen_file.write_text("".join("1" if r in runnable else "0" for r in every))
        log = Path(tmp) / "valgrind.log"
        command = [
            *fixed_addresses(),
            valgrind,
            "--tool=callgrind",
            f"--dump-before={MARK_FUNCTION}",
            f"--callgrind-out-file={tmp}/cg.%p",
            sys.executable,
            str(HERE / "instruction_rows.py"),
            "--chosen",
            str(chosen_file),
            "--jobs",
            str(jobs),
            "--repeat",
            str(repeat),
            "--manifest",
            str(manifest),
            *(["--quick"] if quick else []),
        ]
        # A fixed hash seed: the same dict and set layouts, so the same instructions, every run.
        env = dict(os.environ, PYTHONHASHSEED="0")
        env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), *filter(None, [env.get("PYTHONPATH")])])
        with open(log, "w") as err:
            proc = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, stderr=err, check=False)
        if proc.returncode != 0 or not manifest.exists():
            sys.stderr.write(log.read_text()[-4000:])
            raise SystemExit(f"valgrind exited with {proc.returncode}; its output is above")
        for line in manifest.read_text().splitlines():
            index, pid, status = line.split("\t")
            row = every[int(index)]
            if row not in runnable:
                continue
            counted = result[row.key]
            if status != "0":
                counted.why = f"failed (exit status {status}; see the traceback above)"
                continue
            parts = sorted(Path(tmp).glob(f"cg.{pid}.*"), key=lambda p: int(p.suffix[1:]))
            # One part up to the first mark, then the low loop, then the high loop.
            if len(parts) != 3:
                counted.why = (
                    f"failed ({len(parts)} callgrind parts, not 3: is {MARK_FUNCTION} called elsewhere?)"
                )
                continue
            _, low, high = counts(row.section, quick)
            counted.per_op.append((callgrind_total(parts[2]) - callgrind_total(parts[1])) / (high - low))
        if any(c.why.startswith("failed") for c in result.values()):
            sys.stderr.write(log.read_text()[-4000:])
    return result


# -- the tables --------------------------------------------------------------------------


def checkout_table(counted: Dict[str, Counted], spread: bool) -> Table:
    """Instructions per checkout, as ratios to a bare Queue get+put and differences to features off."""
    table = Table(
        "Instructions per checkout: one greenlet, pool of 10, `with pool.get() as c: pass`",
        [
            "row",
            "instructions",
            *(["spread"] * spread),
            "x bare Queue",
            "+ vs features off",
            "+ x bare Queue",
        ],
        left_columns=1,
    )
    queue = _value(counted, f"checkout: {BARE_QUEUE}")
    off = _value(counted, f"checkout: {FEATURES_OFF}")
    for c, v, cells in _rows(counted, "checkout", table, spread):
        cells.append(f"{v / queue:.2f}" if queue else "")
        cells += _over_features_off(c, v, off, queue)
        table.rows.append(cells)
        table.data[c.row.name] = {"instructions": v}
    return table


def contended_table(counted: Dict[str, Counted], spread: bool) -> Table:
    """Instructions per contended request, and what each row adds to a bare sleep(0)."""
    table = Table(
        f"Instructions per contended request: {GREENLETS} greenlets, pool of {SIZE},"
        " `with pool.get() as c: gevent.sleep(0)`",
        ["row", "instructions", *(["spread"] * spread), "over sleep(0) alone", "x sleep(0) alone"],
        left_columns=1,
    )
    sleep = _value(counted, f"contended: {SLEEP_ALONE}")
    for c, v, cells in _rows(counted, "contended", table, spread):
        if c.row.name != SLEEP_ALONE and sleep:
            cells += [f"{v - sleep:+,.1f}", f"{(v - sleep) / sleep:.2f}"]
        else:
            cells += ["", ""]
        table.rows.append(cells)
        table.data[c.row.name] = {"instructions": v}
    return table


def turn_table(counted: Dict[str, Counted], spread: bool) -> Table:
    """Instructions per checkout followed by a turn of the hub: what watch_idle costs where it works."""
    table = Table(
        "Instructions per checkout followed by one turn of the hub: `with pool.get() as c: pass`,"
        " then `gevent.sleep(0)`",
        ["row", "instructions", *(["spread"] * spread), "over sleep(0) alone", "+ vs features off",
         "+ x bare Queue"],
        left_columns=1,
    )  # fmt: skip
    sleep = _value(counted, f"turn: {SLEEP_ALONE}")
    off = _value(counted, f"turn: {FEATURES_OFF}")
    queue = _value(counted, f"checkout: {BARE_QUEUE}")
    for c, v, cells in _rows(counted, "turn", table, spread):
        cells.append(f"{v - sleep:+,.1f}" if sleep and c.row.name != SLEEP_ALONE else "")
        cells += _over_features_off(c, v, off, queue)
        table.rows.append(cells)
        table.data[c.row.name] = {"instructions": v}
    return table


def _over_features_off(c: Counted, v: float, off: Optional[float], queue: Optional[float]) -> List[str]:
    """The cells "+ vs features off" and "+ x bare Queue" of a pool row with an option on; blank otherwise."""
    if c.row.is_pool and c.row.name != FEATURES_OFF and off is not None:
        return [f"{v - off:+,.1f}", f"{(v - off) / queue:+.2f}" if queue else ""]
    return ["", ""]


def _rows(
    counted: Dict[str, Counted], section: str, table: Table, spread: bool
) -> Iterator[Tuple[Counted, float, List[str]]]:
    """Each counted row of ``section``, its figure and its first cells; the others go in as n/a."""
    for c in counted.values():
        if c.row.section != section:
            continue
        v = c.value
        if v is None:
            table.rows.append([c.row.name] + ["n/a"] * (len(table.columns) - 1))
            table.notes.append(f"{c.row.name}: {c.why}")
            continue
        yield c, v, [c.row.name, f"{v:,.1f}", *([f"{max(c.per_op) - min(c.per_op):,.1f}"] * spread)]


def _value(counted: Dict[str, Counted], key: str) -> Optional[float]:
    c = counted.get(key)
    return c.value if c else None


def targets_table(counted: Dict[str, Counted]) -> Table:
    """The instruction targets, each met, NOT met, or n/a (a row it needs has no figure)."""
    table = Table("Instruction targets, judged on this run", ["target", "result", "figure"])

    def judge(what: str, keys: Sequence[str], limit: float, ratio: Callable[..., Tuple[float, str]]) -> None:
        """Judge ``ratio(*values of keys)`` (the ratio and how to show it) against ``limit``."""
        values = [_value(counted, k) for k in keys]
        if any(v is None for v in values):
            key = keys[values.index(None)]
            why = counted[key].why if key in counted else ""
            table.rows.append([what, "n/a", why or f"{key} was not measured in this run"])
            return
        x, figure = ratio(*values)
        table.rows.append([what, "met" if x <= limit else "NOT met", figure])

    sleep, queue, off = f"contended: {SLEEP_ALONE}", f"checkout: {BARE_QUEUE}", f"checkout: {FEATURES_OFF}"
    judge(
        f"contended, default timeout: the pool's cost over sleep(0) <= {CONTENDED_OVER_SLEEP}x sleep(0)",
        [f"contended: {CONTENDED_DEFAULT}", sleep],
        CONTENDED_OVER_SLEEP,
        lambda v, s: ((v - s) / s, f"{(v - s) / s:.2f}x ({v - s:,.0f} over {s:,.0f})"),
    )
    for key, limit in ((off, CHECKOUT_OFF_X_QUEUE), (f"checkout: {WATCH_IDLE}", CHECKOUT_WATCH_IDLE_X_QUEUE)):
        judge(
            f"checkout, {key[len('checkout: ' + LIB) + 1 :]}: <= {limit}x a bare Queue get+put",
            [key, queue],
            limit,
            lambda v, q: (v / q, f"{v / q:.2f}x ({v:,.0f} vs {q:,.0f})"),
        )
    for c in counted.values():
        r = c.row
        if r.section == "checkout" and r.is_pool and r.name not in (FEATURES_OFF, WATCH_IDLE):
            feature = r.name[len(LIB) + 1 :]
            judge(
                f"checkout, {feature}: <= +{FEATURE_PLUS_X_QUEUE}x a bare Queue over features off",
                [r.key, off, queue],
                FEATURE_PLUS_X_QUEUE,
                lambda v, o, q: ((v - o) / q, f"{(v - o) / q:+.2f}x ({v - o:+,.0f})"),
            )
    return table


def notes(quick: bool, repeat: int) -> List[str]:
    """How the figures were made, printed under the tables."""
    c_warm, c_low, c_high = counts("checkout", quick)
    q_warm, q_low, q_high = counts("contended", quick)
    return [
        f"Each figure is (Ir(high) - Ir(low)) / (high - low), Ir counted by callgrind: checkouts"
        f" {c_low:,} and {c_high:,} after {c_warm:,} to warm up; contended requests {q_low:,} and {q_high:,}"
        f" ({q_low // GREENLETS} and {q_high // GREENLETS} per greenlet) after {q_warm:,}.",
        "Every row runs in a child forked from one process that imported everything under"
        " gevent.monkey.patch_all(), with PYTHONHASHSEED=0; the garbage collector is on, with what"
        " was made before the loops frozen (gc.freeze()); the loop itself (for _ in repeat(None, n))"
        " is in every figure, see `the loop alone`.",
        "The connections are socket.socketpair() ends that nothing writes to: no I/O is counted."
        f" {'Each row ran ' + str(repeat) + ' times; spread is max - min.' if repeat > 1 else ''}".rstrip(),
    ]


def run(args: argparse.Namespace) -> List[Table]:
    """Count the chosen rows and return the tables: checkout, contended, targets."""
    import gevent

    import geventconnpool

    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit(VALGRIND_MISSING)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    chosen = select(only)
    jobs = args.jobs or os.cpu_count() or 1
    version = subprocess.run([valgrind, "--version"], capture_output=True, text=True, check=False).stdout
    print("geventconnpool instruction counts (valgrind --tool=callgrind)", flush=True)
    python = sys.version.split()[0]
    print(f"  {version.strip()}; Python {python}; gevent {gevent.__version__}", flush=True)
    print(f"  geventconnpool {geventconnpool.__version__} from {Path(geventconnpool.__file__).parent}")
    randomised = "off (setarch -R)" if fixed_addresses() else "on (no setarch -R here)"
    print(f"  rows: {len(chosen)}; mode: {'quick' if args.quick else 'full'}; {jobs} at a time", flush=True)
    print(f"  address space randomisation: {randomised}", flush=True)
    started = time.monotonic()
    counted = count(valgrind, chosen, args.quick, jobs, args.repeat)
    print(f"\ncounted in {time.monotonic() - started:.0f} s\n", flush=True)
    spread = args.repeat > 1
    tables = (checkout_table(counted, spread), contended_table(counted, spread), turn_table(counted, spread))
    measured = [t for t in tables if t.rows]
    measured[-1].notes += notes(args.quick, args.repeat)
    return [*measured, targets_table(counted)]
