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

def __getattr__(name: str) -> object:
    """``lazysky.run``, ``connect``, ``associate``, ``lightcurve``: imported on first use."""
    if name == "run":
        from lazysky.runner import run

        return run
    if name == "connect":
        from lazysky.cluster import connect

        return connect
    if name in ("associate", "lightcurve"):
        # the module lazysky.associate is callable: it is also the function
        import importlib

        module = importlib.import_module("lazysky.associate")
        return module if name == "associate" else module.lightcurve
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
    "associate",
    "connect",
    "lightcurve",
    "run",
]
