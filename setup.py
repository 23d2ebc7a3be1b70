"""Packaging for geventconnpool; the version is read from geventconnpool/_version.py."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"$', (HERE / "geventconnpool" / "_version.py").read_text(), re.M
).group(1)

setup(
    name="geventconnpool",
    version=VERSION,
    description="A pool of open, initialised TCP connections for gevent programs",
    long_description=(HERE / "README.rst").read_text(encoding="utf-8"),
    long_description_content_type="text/x-rst",
    author="The geventconnpool developers",
    license="MIT",
    packages=find_packages(include=["geventconnpool", "geventconnpool.*"]),
    package_data={"geventconnpool": ["py.typed"]},
    include_package_data=True,
    zip_safe=False,
    python_requires=">=3.9",
    install_requires=[
        "gevent>=21.1; python_version >= '3.10'",
        # gevent 26 has no wheels for 3.9: without the cap pip would compile its sdist.
        "gevent>=21.1,<=25.9.1; python_version < '3.10'",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-cov",
            "hypothesis",
            "trustme",
            "gunicorn>=21",
            "redis>=4",
            "opentelemetry-sdk>=1.23",
            "prometheus_client>=0.17",
        ],
        # The metrics exporters: geventconnpool.otel and geventconnpool.prometheus.
        "otel": ["opentelemetry-api>=1.23"],
        "prometheus": ["prometheus_client>=0.17"],
        "docs": ["sphinx>=7", "furo"],
        "dev": ["ruff", "mypy", "build", "twine", "tox"],
    },
    classifiers=[
        "Development Status :: 5 - Production/Stable",
        "Framework :: gevent",
        "Intended Audience :: Developers",
        "Operating System :: POSIX",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.9",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Topic :: Internet",
        "Topic :: Software Development :: Libraries :: Python Modules",
        "Typing :: Typed",
    ],
)
