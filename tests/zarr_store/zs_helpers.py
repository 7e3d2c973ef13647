"""Helpers of the zarr_store tests (a module with a unique name, so that importing it
never picks up another directory's conftest)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask

REAL_DATA = Path(
    os.environ.get("LAZYSKY_REAL_DATA", Path(__file__).parents[2] / ".." / "shared/data/real")
)


class _Scheduler:
    def __init__(self, max_computes: int) -> None:
        self.max_computes, self.n = max_computes, 0

    def __call__(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        self.n += 1
        if self.n > self.max_computes:
            msg = f"too many dask computations: {self.n} > {self.max_computes}"
            raise RuntimeError(msg)
        return dask.get(dsk, keys, **kwargs)


@contextlib.contextmanager
def raise_if_dask_computes(max_computes: int = 0) -> Iterator[None]:
    """Fail if dask computes more than ``max_computes`` times (as xarray's tests do)."""
    with dask.config.set(scheduler=_Scheduler(max_computes)):
        yield


def s3_options(endpoint: str, *, retries: int = 5) -> dict[str, Any]:
    return {
        "key": "testing", "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "config_kwargs": {"retries": {"max_attempts": retries, "mode": "standard"}},
    }
