"""The write side of ingest: template, chunk-aligned region writes, the completion marker.

These run inside Dask tasks; they take picklable plain data (:class:`StoreRoot`,
:class:`ExposureSource`) and open what they need themselves.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

import numpy as np

from lazysky.errors import StoreError
from lazysky.zarr_store._fits import ExposureSource, iter_bands
from lazysky.zarr_store._headers import bounding_circle, cards_to_header, footprint_deg
from lazysky.zarr_store._layout import GROUP_META, RAW, SCI, StoreRoot

__all__ = [
    "chunk_keys",
    "create_template",
    "finalize_group",
    "group_attrs",
    "template_matches",
    "write_detector",
]

logger = logging.getLogger(__name__)

FORMAT = "lazysky.exposure/1"

#: attributes queryable without reading pixels, and the keyword each comes from (primary
#: header first, then the first detector's)
_QUERYABLE = {
    "instrument": "INSTRUME",
    "telescope": "TELESCOP",
    "filter": "FILTER",
    "object": "OBJECT",
    "imagetyp": "IMAGETYP",
    "date_obs": "DATE-OBS",
    "mjd_obs": "MJD-OBS",
    "exptime": "EXPTIME",
    "ra": "RA",
    "dec": "DEC",
}


def group_attrs(plan: ExposureSource, chunks: tuple[int, int, int]) -> dict[str, Any]:
    """The lazysky attributes: everything queryable without reading a pixel."""
    from lazysky import __version__

    primary = cards_to_header(plan.primary_cards)
    headers = [cards_to_header(d.cards) for d in plan.detectors]
    polys = [footprint_deg(h, plan.shape) for h in headers]
    circle = bounding_circle([p for p in polys if p is not None])

    def value(key: str) -> Any:
        for h in (primary, headers[0]):
            v = h.get(key)
            if v is not None and not (isinstance(v, float) and v != v):
                return v if isinstance(v, str | int | float | bool) else str(v)
        return None

    return {
        "format": FORMAT,
        "exposure_id": plan.exposure_id,
        **{name: value(key) for name, key in _QUERYABLE.items()},
        "detectors": [d.name for d in plan.detectors],
        "hdu_index": [d.hdu_index for d in plan.detectors],
        "shape": list(plan.shape),
        "dtype": plan.dtype,
        "chunks": list(chunks),
        "source": {
            "name": plan.source.name,
            "url": plan.source.url,
            "sha256": plan.sha256,
            "size": plan.size,
            "checksums_verified": plan.checksums_verified,
        },
        "primary_header": list(plan.primary_cards),
        "detector_headers": [list(d.cards) for d in plan.detectors],
        "footprints": polys,
        "footprint_circle": list(circle) if circle else None,
        "ingested_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "lazysky_version": __version__,
    }


def chunk_shape_for(plan: ExposureSource, tile_shape: tuple[int, int]) -> tuple[int, int, int]:
    ny, nx = plan.shape
    return 1, min(tile_shape[0], ny), min(tile_shape[1], nx)


def expected_chunks(plan: ExposureSource, chunks: tuple[int, int, int]) -> set[str]:
    ny, nx = plan.shape
    n_i, n_j = -(-ny // chunks[1]), -(-nx // chunks[2])
    return {
        f"{d}/{i}/{j}" for d in range(len(plan.detectors)) for i in range(n_i) for j in range(n_j)
    }


def chunk_keys(root: StoreRoot, exposure_id: str, *parts: str) -> set[str]:
    """Chunk keys ``d/i/j`` present under ``sci/c/`` (in-flight ``.partial`` files excluded)."""
    fs = root.fs()
    prefix = root.path(RAW, exposure_id, SCI, "c", *parts)
    fs.invalidate_cache(prefix)
    base = root.path(RAW, exposure_id, SCI, "c")
    try:
        found = fs.find(prefix)
    except FileNotFoundError:
        return set()
    keys = set()
    for path in found:
        rel = path[len(base) + 1 :] if path.startswith(base + "/") else ""
        if rel and not rel.endswith(".partial") and not rel.rsplit("/", 1)[-1].startswith("."):
            keys.add(rel)
    return keys


def create_template(
    root: StoreRoot, plan: ExposureSource, chunks: tuple[int, int, int], *, clevel: int
) -> None:
    """Write the array metadata of ``raw/<id>/sci`` (no chunks, no group metadata)."""
    import zarr
    from zarr.codecs import BloscCodec

    dtype = np.dtype(plan.dtype)
    fill = np.nan if dtype.kind == "f" else 0
    zarr.create_array(
        root.zarr_store(RAW, plan.exposure_id, SCI),
        shape=(len(plan.detectors), *plan.shape),
        chunks=chunks,
        dtype=dtype,
        fill_value=fill,
        dimension_names=("detector", "y", "x"),
        compressors=BloscCodec(cname="zstd", clevel=clevel, shuffle="shuffle"),
        attributes={"lazysky_source_sha256": plan.sha256, "exposure_id": plan.exposure_id},
        overwrite=True,
        zarr_format=3,
    )


def template_matches(root: StoreRoot, plan: ExposureSource, chunks: tuple[int, ...]) -> bool:
    """Whether an existing ``sci`` template was made for these bytes with these chunks."""
    try:
        meta = json.loads(root.fs().cat_file(root.path(RAW, plan.exposure_id, SCI, GROUP_META)))
    except (FileNotFoundError, ValueError):
        return False
    return (
        meta.get("attributes", {}).get("lazysky_source_sha256") == plan.sha256
        and meta.get("shape") == [len(plan.detectors), *plan.shape]
        and meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape") == list(chunks)
        and np.dtype(plan.dtype) == np.dtype(_dtype_name(meta.get("data_type")))
    )


def _dtype_name(data_type: Any) -> str:
    return str(data_type) if isinstance(data_type, str) else "V"


def write_detector(
    root: StoreRoot,
    plan: ExposureSource,
    det: int,
    chunks: tuple[int, int, int],
    *,
    rows: list[int] | None = None,
) -> str | None:
    """Copy detector ``det`` into its chunks, one row band (= one chunk row) at a time.

    ``rows`` limits the work to the bands starting at those rows (default: all).
    Idempotent: rows whose chunks all exist already (a resumed ingest of the same bytes,
    written atomically by the store) are skipped. Returns None, or an error message: a
    failure here must not cancel the other exposures of the batch.
    """
    import zarr

    info = plan.detectors[det]
    try:
        arr = zarr.open_array(root.zarr_store(RAW, plan.exposure_id, SCI), mode="r+")
        arr = arr.with_config({"write_empty_chunks": True})
        ty, tx = chunks[1], chunks[2]
        ny, nx = plan.shape
        have = chunk_keys(root, plan.exposure_id, str(det))
        n_j = -(-nx // tx)
        todo = [
            y0
            for y0 in (range(0, ny, ty) if rows is None else rows)
            if not all(f"{det}/{y0 // ty}/{j}" in have for j in range(n_j))
        ]
        for y0, band in iter_bands(plan.source, info.hdu_index, ty, starts=todo):
            write_region(arr, det, y0, band, ty)
        logger.debug("%s %s: wrote %d row bands", plan.exposure_id, info.name, len(todo))
    except Exception as exc:  # reported per exposure, never raised into the batch
        where = f"{plan.source.name}: HDU {info.hdu_index} ({info.name})"
        return f"{where}: {type(exc).__name__}: {exc}"
    return None


def write_region(arr: Any, det: int, y0: int, band: np.ndarray[Any, Any], tile_rows: int) -> None:
    """Write full-width rows ``y0 : y0 + len(band)`` of detector ``det``; must be chunk-aligned."""
    ny = arr.shape[1]
    y1 = y0 + band.shape[0]
    if y0 % tile_rows or (y1 != ny and y1 % tile_rows) or band.shape[1] != arr.shape[2]:
        msg = (
            f"misaligned region write rows {y0}:{y1} of {band.shape[1]} columns into chunks "
            f"of {tile_rows} rows x {arr.shape[2]} columns: concurrent writers could clobber "
            "each other's chunks; write whole chunk rows (y0 a multiple of the tile height)"
        )
        raise StoreError(msg)
    arr[det, y0:y1, :] = band


def finalize_group(
    root: StoreRoot,
    plan: ExposureSource,
    chunks: tuple[int, int, int],
    attrs: dict[str, Any],
    errors: list[str | None],
) -> tuple[str, str | None]:
    """Mark the exposure complete if, and only if, every chunk is there.

    Returns ``(status, error)`` with status ``ingested`` or ``failed``. The group
    metadata (with the lazysky attributes) is written last, with an exclusive create;
    if another ingest of the same bytes won that race, that is success too.
    """
    real = [e for e in errors if e]
    if real:
        return "failed", "; ".join(real)
    try:
        missing = expected_chunks(plan, chunks) - chunk_keys(root, plan.exposure_id)
        if missing:
            msg = (
                f"{plan.source.name}: {len(missing)} chunk(s) of {plan.exposure_id!r} missing "
                f"after writing (e.g. {sorted(missing)[:3]}); not marked complete"
            )
            raise StoreError(msg)
        meta = {"zarr_format": 3, "node_type": "group", "attributes": {"lazysky": attrs}}
        arr_meta = json.loads(root.fs().cat_file(root.path(RAW, plan.exposure_id, SCI, GROUP_META)))
        meta["consolidated_metadata"] = {
            "kind": "inline",
            "must_understand": False,
            "metadata": {SCI: arr_meta},
        }
        body = json.dumps(meta, indent=1, allow_nan=False).encode()
        if not root.put_exclusive(root.path(RAW, plan.exposure_id, GROUP_META), body):
            other = root.read_group_attrs(plan.exposure_id)
            if other.get("source", {}).get("sha256") != plan.sha256:
                msg = (
                    f"{plan.source.name}: exposure {plan.exposure_id!r} was completed "
                    "meanwhile by another ingest of different bytes"
                )
                raise StoreError(msg)
    except Exception as exc:
        return "failed", f"{type(exc).__name__}: {exc}"
    return "ingested", None
