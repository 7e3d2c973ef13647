"""The errors of the catalog (all :class:`lazysky.errors.LazySkyError`)."""

from __future__ import annotations

from lazysky.errors import LazySkyError

__all__ = ["CatalogError", "CatalogServerError", "CatalogWriteError"]


class CatalogError(LazySkyError, RuntimeError):
    """The catalog database refused or failed an operation (the message says which)."""


class CatalogServerError(CatalogError):
    """The embedded catalog server cannot be initialised, started or stopped."""


class CatalogWriteError(CatalogError):
    """Rows could not be written; nothing of that (run, tile) was changed."""
