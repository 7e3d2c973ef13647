"""The errors lazysky raises.

Every error derives from :class:`LazySkyError`, and each subclass also inherits the
builtin it means (``ParameterError`` is a ``ValueError``), so callers can catch either.
Messages say what is wrong, the offending value, what was expected and how to fix it.
All of them pickle (Dask ships exceptions between processes): keep constructors to a
single message argument.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "FitsCorruptError",
    "FitsFormatError",
    "IncompleteExposureError",
    "LazySkyError",
    "LazySkyWarning",
    "OutputError",
    "ParameterError",
    "StoreError",
]


class LazySkyError(Exception):
    """Base class of every error lazysky raises."""


class ParameterError(LazySkyError, ValueError):
    """A parameter has a value outside what is allowed (the message names it)."""


class ConfigError(LazySkyError, ValueError):
    """Settings (environment variables or the YAML file) are invalid."""


class FitsFormatError(LazySkyError, ValueError):
    """A FITS file, HDU or keyword is not what lazysky expects."""


class FitsCorruptError(FitsFormatError):
    """A FITS file is damaged: truncated, or its CHECKSUM/DATASUM do not match its bytes."""


class StoreError(LazySkyError, OSError):
    """A Zarr store cannot be read or written as lazysky expects (the message says where)."""


class IncompleteExposureError(StoreError):
    """An exposure group exists but was never marked complete (an ingest died or is running)."""


class OutputError(LazySkyError, OSError):
    """An output location cannot be written, or already holds something we must not clobber."""


class LazySkyWarning(UserWarning):
    """Base class of lazysky's warnings (an expected empty result is a warning)."""
