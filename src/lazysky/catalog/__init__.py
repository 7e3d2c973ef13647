"""The lazysky catalog: PostgreSQL with pgSphere, embedded by default.

- :func:`open_catalog` — the catalog of the settings in force (starts the embedded
  server when no DSN is configured; creates pgSphere and the schema);
- :func:`register_run`, :func:`finish_run`, :func:`write_exposures` — provenance;
- :func:`write_sources` — idempotent bulk write of one (run, tile);
- :func:`cone_search` — sources around a position, on the GiST index;
- :func:`crossmatch` — many positions against a source table;
- :mod:`lazysky.catalog.scs` — the IVOA Simple Cone Search service (``lazysky serve``).

Examples
--------
>>> from lazysky.catalog import cone_search
>>> cone_search(150.1, 2.2, "6arcmin")  # doctest: +SKIP
"""

from __future__ import annotations

from lazysky.catalog._errors import CatalogError, CatalogServerError, CatalogWriteError
from lazysky.catalog._parse import parse_angle, parse_position, parse_radius
from lazysky.catalog._types import SCircle, SCircleType, SPoint, SPointType, SPoly, SPolyType
from lazysky.catalog.cone import cone_query, cone_search
from lazysky.catalog.database import Catalog, get_engine, open_catalog
from lazysky.catalog.records import (
    Exposure,
    done_tiles,
    finish_run,
    mark_tile_done,
    register_run,
    write_exposures,
)
from lazysky.catalog.schema import coadd_sources, diff_sources, exposures, run_tiles, runs
from lazysky.catalog.write import WriteResult, write_sources
from lazysky.catalog.xmatch import crossmatch

__all__ = [
    "Catalog",
    "CatalogError",
    "CatalogServerError",
    "CatalogWriteError",
    "Exposure",
    "SCircle",
    "SCircleType",
    "SPoint",
    "SPointType",
    "SPoly",
    "SPolyType",
    "WriteResult",
    "coadd_sources",
    "cone_query",
    "cone_search",
    "crossmatch",
    "diff_sources",
    "done_tiles",
    "exposures",
    "finish_run",
    "get_engine",
    "mark_tile_done",
    "open_catalog",
    "parse_angle",
    "parse_position",
    "parse_radius",
    "register_run",
    "run_tiles",
    "runs",
    "write_exposures",
    "write_sources",
]
