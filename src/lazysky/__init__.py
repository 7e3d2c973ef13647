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

__all__ = [
    "ConfigError",
    "FitsFormatError",
    "LazySkyError",
    "LazySkyWarning",
    "OutputError",
    "ParameterError",
    "__version__",
]
