"""The examples in the pipeline's docstrings run (CI does not use --doctest-modules)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "lazysky.pipeline._mask",
    "lazysky.pipeline._sections",
    "lazysky.pipeline._combine",
    "lazysky.pipeline._isr",
    "lazysky.pipeline.masters",
    "lazysky.pipeline.calibrate",
    "lazysky.pipeline.cosmics",
    "lazysky.pipeline.background",
    "lazysky.pipeline.testing",
    "lazysky.pipeline.grid",
    "lazysky.pipeline._zogy",
    "lazysky.pipeline._alard",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
