"""What ``pip install geventconnpool`` brings: on every Python, a gevent that pip need not compile."""

from __future__ import annotations

import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement

# gevent 26 ships no wheels for Python 3.9: pip would compile its sdist (minutes, and a C compiler).
LAST_GEVENT_WITH_WHEELS_FOR_3_9 = "25.9.1"


def gevent_requirements(python_version: str) -> list:
    """geventconnpool's requirements on gevent that apply on ``python_version``, e.g. "3.9"."""
    requirements = [Requirement(line) for line in metadata.requires("geventconnpool") or []]
    return [
        r
        for r in requirements
        if r.name == "gevent"
        and (r.marker is None or r.marker.evaluate({"python_version": python_version, "extra": ""}))
    ]


def test_on_python_3_9_the_requirement_admits_no_gevent_newer_than_its_last_wheels_for_3_9():
    """On Python 3.9 the gevent requirement stops at 25.9.1, the last gevent with wheels for 3.9."""
    (requirement,) = gevent_requirements("3.9")
    assert requirement.specifier.contains(LAST_GEVENT_WITH_WHEELS_FOR_3_9)
    assert not requirement.specifier.contains("26.0"), requirement


@pytest.mark.parametrize("python_version", ["3.10", "3.11", "3.12", "3.13"])
def test_on_python_3_10_and_later_the_requirement_admits_the_newest_gevent(python_version):
    """From Python 3.10 on, any gevent from 21.1 is admitted, the newest included."""
    (requirement,) = gevent_requirements(python_version)
    assert requirement.specifier.contains("26.9.0") and requirement.specifier.contains("99.0")


@pytest.mark.skipif(
    sys.platform != "linux", reason="a wheel built here and a published one differ by tag on Linux"
)
def test_the_installed_gevent_is_a_published_wheel_not_one_compiled_here():
    """The gevent installed with the package came as a published (manylinux) wheel: pip compiled nothing."""
    wheel = metadata.distribution("gevent").read_text("WHEEL") or ""
    tags = [line.split(":", 1)[1].strip() for line in wheel.splitlines() if line.startswith("Tag:")]
    assert tags and all(t.split("-")[2].startswith(("manylinux", "musllinux")) for t in tags), wheel
