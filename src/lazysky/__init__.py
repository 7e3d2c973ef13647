"""lazysky: raw FITS mosaics to science catalogs at survey scale.

Heavy subpackages (``lazysky.simulator``, later the pipeline and catalog) are imported
on use, so ``import lazysky`` and ``lazysky --help`` stay instant.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from lazysky.errors import (
    ConfigError,
    FitsFormatError,
    LazySkyError,
    LazySkyWarning,
    OutputError,
    ParameterError,
)

try:
    __version__ = version("lazysky")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

_INTERACTIVE = ("compare_runs", "cutout", "open_run", "reprocess")


def __getattr__(name: str) -> object:
    """``lazysky.run`` and ``lazysky.connect``, imported on first use (they pull dask)."""
    if name == "run":
        from lazysky.runner import run

        return run
    if name == "connect":
        from lazysky.cluster import connect

        return connect
    if name in _INTERACTIVE:  # lazysky.open_run, .cutout, .reprocess, .compare_runs
        from lazysky import interactive

        return getattr(interactive, name)
    msg = f"module 'lazysky' has no attribute {name!r}"
    raise AttributeError(msg)


__all__ = [
    "ConfigError",
    "FitsFormatError",
    "LazySkyError",
    "LazySkyWarning",
    "OutputError",
    "ParameterError",
    "__version__",
    "compare_runs",
    "connect",
    "cutout",
    "open_run",
    "reprocess",
    "run",
]
