"""Shared fixtures: every async test runs on asyncio and on trio."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest

# ``engine.testing``: the project's own pytest plugin (its entry point is disabled in
# pyproject.toml's addopts, so that it is imported after coverage starts); ``pytester``
# runs it in a user's test suite.
pytest_plugins = ["engine.testing", "pytester"]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """A ``no_cover`` test runs untraced in a parallel worker too.

    pytest-cov pauses its own collector for such a test, but in an xdist worker that
    resumes the collector pytest-cov starts in every child process, and left on it
    makes the test several times slower. This wrapper runs inside pytest-cov's, after
    the pause, and puts the tracer back before the resume.
    """
    if item.get_closest_marker("no_cover") is None:
        return (yield)
    tracer = sys.gettrace()
    sys.settrace(None)
    try:
        return (yield)
    finally:
        sys.settrace(tracer)
