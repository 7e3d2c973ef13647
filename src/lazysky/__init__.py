"""lazysky: raw FITS mosaics to science catalogs at survey scale.

Heavy subpackages (``lazysky.simulator``, later the pipeline and catalog) are imported
on use, so ``import lazysky`` and ``lazysky --help`` stay instant.
"""

from __future__ import annotations

from lazysky.errors import (
    ConfigError,
    FitsFormatError,
    LazySkyError,
    LazySkyWarning,
    OutputError,
    ParameterError,
)

#: Names at the top of ``lazysky`` imported on first use (they pull dask, the catalog, …).
_LAZY: dict[str, str] = {
    "run": "lazysky.runner",
    "connect": "lazysky.cluster",
    "promote": "lazysky.catalog.production",
    "rollback": "lazysky.catalog.production",
    "list_runs": "lazysky.catalog.production",
    "open_run": "lazysky.interactive",
    "cutout": "lazysky.interactive",
    "reprocess": "lazysky._reprocess",
    "compare_runs": "lazysky._compare",
    "register_workflow": "lazysky.workflows",
    "activate_workflow": "lazysky.workflows",
    "promote_workflow": "lazysky.workflows",
    "rollback_workflow": "lazysky.workflows",
    "list_workflows": "lazysky.workflows",
    "active_workflow": "lazysky.workflows",
    "associate": "lazysky.associate",
    "lightcurve": "lazysky.associate",
}


__version__: str  # the installed version, read on first use (see __getattr__)


def _version() -> str:
    """The installed distribution's version (importlib.metadata: ~50 ms, so on first use)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lazysky")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


def __getattr__(name: str) -> object:
    """The names of :data:`_LAZY`, imported on first use (``import lazysky`` stays instant)."""
    if name == "__version__":
        globals()["__version__"] = value = _version()
        return value
    if name in _LAZY:
        from importlib import import_module

        module = import_module(_LAZY[name])
        # lazysky.associate is a module and, callable, its own function (see there)
        return module if name == "associate" else getattr(module, name)
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
    "activate_workflow",
    "active_workflow",
    "associate",
    "compare_runs",
    "connect",
    "cutout",
    "lightcurve",
    "list_runs",
    "list_workflows",
    "open_run",
    "promote",
    "promote_workflow",
    "register_workflow",
    "reprocess",
    "rollback",
    "rollback_workflow",
    "run",
]
