"""molting's pytest plugin (entry point ``pytest11``): one option and one marker, no fixtures."""

from __future__ import annotations


def pytest_addoption(parser) -> None:
    group = parser.getgroup("molting")
    group.addoption(
        "--molting-skip-slow",
        action="store_true",
        default=False,
        dest="molting_skip_slow",
        help="molting conformance suite: leave out the checks that train a model.",
    )


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "molting_conformance: a molting plugin conformance test")
