"""Run the runnable code blocks of one documentation file, as a reader would: ``docs_runner.py FILE``.

The blocks run in order, in one namespace, in this fresh process, against the
docs' line server (tests/docs_server.py) on a free loopback port that takes the
place of 2485.  The server's throwaway CA is trusted through ``SSL_CERT_FILE``,
so that ``ssl.create_default_context()`` in the docs verifies the certificate
as it would for a real server.  The process is monkey-patched when the page
says ``.. docs-test: monkey-patch`` or GEVENTCONNPOOL_PATCH_ALL is set.
Afterwards every pool the blocks left open is closed, and the runner checks
that no pool greenlet is left.  It prints one line per block and exits 0 when
all of them ran.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_blocks import PLACEHOLDER_PORT, find_blocks, page_options

PATH = Path(sys.argv[1]).resolve()
PATCH = "monkey-patch" in page_options(PATH.read_text(encoding="utf-8")) or bool(
    os.environ.get("GEVENTCONNPOOL_PATCH_ALL")
)
if PATCH:
    from gevent import monkey

    monkey.patch_all()

import gc  # noqa: E402
import traceback  # noqa: E402

import gevent  # noqa: E402
from docs_server import DocServer  # noqa: E402
from helpers import pool_greenlets, wait_until  # noqa: E402

from geventconnpool import ConnectionPool  # noqa: E402


def main() -> int:
    blocks = [block for block in find_blocks(PATH) if block.runs_here]
    server = DocServer()
    server.start()
    os.environ["SSL_CERT_FILE"] = server.ca_file
    namespace = {"__name__": "__docs__"}
    pools = []
    status = 0
    print(f"{PATH.name}: {len(blocks)} runnable blocks, monkey-patched: {'yes' if PATCH else 'no'}")
    try:
        for block in blocks:
            code = block.code.replace(PLACEHOLDER_PORT, str(server.port))
            try:
                with gevent.Timeout(30, AssertionError(f"{block.where}: the block ran for more than 30 s")):
                    exec(compile(code, block.where, "exec"), namespace)
            except BaseException:
                print(f"FAILED {block.where}")
                traceback.print_exc()
                status = 1
                break
            finally:
                pools += [v for v in namespace.values() if isinstance(v, ConnectionPool) and v not in pools]
            print(f"ran {block.where}")
    finally:
        for pool in pools:
            pool.close()
        namespace.clear()
        pools.clear()
        gc.collect()
        server.stop()
    if status == 0:
        try:
            wait_until(lambda: not pool_greenlets(), timeout=10, message=lambda: f"left: {pool_greenlets()}")
        except AssertionError as error:
            print(f"FAILED: pool greenlets left running: {error}")
            return 1
        print(f"all {len(blocks)} blocks ran")
    return status


if __name__ == "__main__":
    sys.exit(main())
