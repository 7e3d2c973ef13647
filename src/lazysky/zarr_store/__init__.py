"""FITS → Zarr ingest, and lazy access to the ingested exposures.

Layout: ``<store>/raw/<exposure_id>/`` is one Zarr v3 group per exposure, holding
``sci (detector, y, x)`` in the raw dtype, tiled per detector; the group metadata (with
headers, WCS, footprint and the source's SHA-256) is written last, when every chunk is
there. See ``docs/zarr_store.md``.

Examples
--------
>>> from lazysky.zarr_store import ingest, list_exposures, open_exposure, exposure_wcs
>>> report = ingest("raw-fits/", "lazysky-data")  # doctest: +SKIP
>>> ds = open_exposure("lazysky-data", list_exposures("lazysky-data")[0])  # doctest: +SKIP
"""

from lazysky.zarr_store._headers import cards_to_header, header_to_cards, parse_iraf_section
from lazysky.zarr_store._layout import StoreLike, StoreRoot, parse_store
from lazysky.zarr_store.ingest import IngestReport, IngestResult, expand_sources, ingest
from lazysky.zarr_store.open import (
    exposure_header,
    exposure_metadata,
    exposure_wcs,
    list_exposures,
    open_exposure,
    primary_header,
)
from lazysky.zarr_store.products import (
    complete_tiles,
    list_products,
    open_masters,
    open_product,
    product_grid,
    write_masters,
    write_product,
)
from lazysky.zarr_store.select import NoExposuresWarning, find_exposures, open_exposures

__all__ = [
    "IngestReport",
    "IngestResult",
    "NoExposuresWarning",
    "StoreLike",
    "StoreRoot",
    "cards_to_header",
    "complete_tiles",
    "expand_sources",
    "exposure_header",
    "exposure_metadata",
    "exposure_wcs",
    "find_exposures",
    "header_to_cards",
    "ingest",
    "list_exposures",
    "list_products",
    "open_exposure",
    "open_exposures",
    "open_masters",
    "open_product",
    "parse_iraf_section",
    "parse_store",
    "primary_header",
    "product_grid",
    "write_masters",
    "write_product",
]
