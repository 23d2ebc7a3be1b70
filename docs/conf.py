"""Sphinx configuration for the geventconnpool documentation.

Build it with ``python3 -m tox -e docs`` (after ``python3 -m pip install tox``), or with
``sphinx-build -n -W --keep-going -b html docs /tmp/docs_html`` after ``python3 -m pip install -e '.[docs]'``.
Nothing is fetched from the network: there is no intersphinx mapping, and the
few references to other projects' objects are listed in ``nitpick_ignore``.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_version_file = (ROOT / "geventconnpool" / "_version.py").read_text()
release = re.search(r'^__version__ = "([^"]+)"$', _version_file, re.M).group(1)
version = ".".join(release.split(".")[:2])

project = "geventconnpool"
author = "The geventconnpool developers"
copyright = "the geventconnpool developers"

extensions = ["sphinx.ext.autodoc"]
html_theme = "furo"
html_title = f"geventconnpool {release}"
exclude_patterns = ["_build"]
default_role = "any"
nitpicky = True

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_type_aliases = {"ExcClasses": "ExcClasses"}

# Objects of the standard library and of gevent that the docs name: without
# intersphinx (no network at build time) they cannot be linked, only shown.
nitpick_ignore = [
    ("py:class", "gevent.Timeout"),
    ("py:class", "greenlet.GreenletExit"),
    ("py:exc", "greenlet.GreenletExit"),
    ("py:exc", "gevent.Timeout"),
    ("py:meth", "str.format"),
    ("py:func", "gevent.monkey.patch_all"),
    ("py:class", "ExcClasses"),
    # The metrics exporters' arguments, documented by OpenTelemetry and prometheus_client.
    ("py:class", "opentelemetry.metrics.MeterProvider"),
    ("py:class", "prometheus_client.registry.CollectorRegistry"),
    ("py:class", "prometheus_client.CollectorRegistry"),
]
nitpick_ignore_regex = [
    # The standard library, documented elsewhere.
    (
        r"py:(class|exc|func|meth|mod|data|obj)",
        r"(builtins\.)?(BaseException|Exception|TimeoutError|ConnectionError"
        r"|OSError|RuntimeError|TypeError|ValueError|KeyboardInterrupt|SystemExit|NotImplementedError|int|float|str"
        r"|bool|object|dict|tuple|type|bytes)",
    ),
    (
        r"py:(class|exc|func|meth|mod|data|obj)",
        r"(typing|types|logging|socket|ssl|http\.client|imaplib|os"
        r"|functools|weakref|collections\.abc)(\..*)?",
    ),
    (r"py:(class|obj)", r"(Dict|Tuple|Optional|Callable|Type|Union|Any|Generic|Protocol)(\[.*\])?"),
    # Type variables and private helper classes that appear in signatures.
    (r"py:(class|obj)", r"(geventconnpool\.(pool|retry|tcp_keepalive)\.)?(C|R|P|_P|_Entry|_SocketLike)"),
    (r"py:(class|obj)", r"P\.(args|kwargs)"),
]
