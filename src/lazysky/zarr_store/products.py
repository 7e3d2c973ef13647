"""Master calibrations and products (coadds, differences) in the Zarr store.

Layout (see ``docs/products.md``)::

    <root>/calib/<kind>/<detector>/zarr.json        master group: attrs + consolidated
                                                    array metadata, WRITTEN LAST
    <root>/calib/<kind>/<detector>/<kind>[_variance]/...   (y, x) arrays
    <root>/products/<run_id>/<kind>/<name>/zarr.json       product group (template)
    <root>/products/<run_id>/<kind>/<name>/<var>/...       (y, x) arrays, chunk == tile
    <root>/products/<run_id>/<kind>/<name>/.done/<tile>    per-tile completion marker

Masters are small and written whole: arrays first, the group metadata last, so a master is
complete or invisible. Products are written like an ingest: the template (array and group
metadata) first, then one chunk-aligned region write per grid tile, each followed by that
tile's completion marker; :func:`complete_tiles` lists them, so a resumed run writes only
the tiles still missing, and rewriting a tile is idempotent (same inputs, same bytes).

Examples
--------
>>> from lazysky.zarr_store.products import write_product, open_product
>>> write_product("lazysky-data", run_id, "coadd", "deep1-r", coadd)  # doctest: +SKIP
>>> open_product("lazysky-data", run_id, "coadd", "deep1-r").image  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from lazysky._dask import window_delayed
from lazysky.errors import ParameterError, StoreError
from lazysky.runs import validate_run_id
from lazysky.zarr_store._layout import GROUP_META, StoreLike, StoreRoot, parse_store

if TYPE_CHECKING:
    from lazysky.config import Settings
    from lazysky.pipeline.grid import SkyGrid

__all__ = [
    "MASTER_KINDS",
    "PRODUCT_KINDS",
    "annotate_products",
    "complete_tiles",
    "list_products",
    "open_masters",
    "open_product",
    "product_grid",
    "write_masters",
    "write_product",
]

logger = logging.getLogger(__name__)

CALIB = "calib"
PRODUCTS = "products"
DONE = ".done"
MASTER_KINDS = ("bias", "dark", "flat", "bpm")
PRODUCT_KINDS = ("coadd", "diff")
MASTER_FORMAT = "lazysky.master/1"
PRODUCT_FORMAT = "lazysky.product/1"
_BPM_FROM = ("dark", "flat")

InputsLike = Sequence[xr.Dataset] | Mapping[str, str]


# -- shared helpers ------------------------------------------------------------------


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _put(root: StoreRoot, path: str, body: bytes) -> None:
    """Replace ``path`` atomically (local: temp file + rename; S3: one PUT)."""
    if root.is_local:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
        tmp.write_bytes(body)
        os.replace(tmp, target)
        return
    root.fs().pipe_file(path, body)


def _read_json(root: StoreRoot, path: str) -> dict[str, Any] | None:
    fs = root.fs()
    fs.invalidate_cache(path.rsplit("/", 1)[0])
    try:
        out = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    return out if isinstance(out, dict) else None


def _remove(root: StoreRoot, *parts: str) -> None:
    """Delete a group: its metadata first, so it is never seen half-deleted."""
    fs = root.fs()
    group = root.path(*parts)
    fs.invalidate_cache(group)
    meta = f"{group}/{GROUP_META}"
    if fs.exists(meta):
        fs.rm_file(meta)
    if fs.exists(group):
        fs.rm(group, recursive=True)
    fs.invalidate_cache(group)


def _create_array(
    root: StoreRoot,
    parts: Sequence[str],
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: np.dtype[Any],
    dims: tuple[str, ...],
    attrs: dict[str, Any],
    fill: Any,
) -> dict[str, Any]:
    """Create an empty array (metadata only) and return its metadata document."""
    import zarr
    from zarr.codecs import BloscCodec

    zarr.create_array(
        root.zarr_store(*parts),
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        fill_value=fill,
        dimension_names=dims,
        compressors=BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
        attributes=_jsonable(attrs),
        overwrite=True,
        zarr_format=3,
    )
    meta = _read_json(root, root.path(*parts, GROUP_META))
    if meta is None:
        msg = f"{root.path(*parts)}: array metadata missing right after creating it"
        raise StoreError(msg)
    return meta


def _group_body(attrs: dict[str, Any], arrays: Mapping[str, dict[str, Any]]) -> bytes:
    meta = {
        "zarr_format": 3,
        "node_type": "group",
        "attributes": {"lazysky": _jsonable(attrs)},
        "consolidated_metadata": {
            "kind": "inline",
            "must_understand": False,
            "metadata": dict(arrays),
        },
    }
    return json.dumps(meta, indent=1).encode()


def _jsonable(value: Any) -> Any:
    """Attributes as plain JSON types (numpy scalars and arrays, tuples → lists)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _fill(name: str, dtype: np.dtype[Any]) -> Any:
    """What an unwritten chunk reads back as: NaN, or NODATA in a mask."""
    if dtype.kind == "f":
        return np.nan
    if name == "mask" or name == "bpm":
        from lazysky.pipeline._mask import MaskBit

        return int(MaskBit.NODATA)
    return 0


def _check_name(value: str, what: str) -> str:
    from lazysky.zarr_store._layout import validate_exposure_id

    try:
        return validate_exposure_id(value)
    except ParameterError:
        msg = (
            f"{what} {value!r} is not usable as a store key: expected 1-128 characters from "
            "A-Z a-z 0-9 . _ + - starting with a letter or digit"
        )
        raise ParameterError(msg) from None


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        msg = f"{name} must be one of {list(allowed)}, got {value!r}"
        raise ParameterError(msg)


# -- masters -------------------------------------------------------------------------


def _parse_inputs(kind: str, value: InputsLike) -> list[dict[str, str]]:
    """``[{exposure_id, sha256}]`` from ingested exposures or a ``{id: sha256}`` mapping."""
    if isinstance(value, Mapping):
        pairs = [(str(k), str(v)) for k, v in value.items()]
    elif isinstance(value, xr.Dataset | xr.DataArray | str):
        msg = f"inputs[{kind!r}] must be a sequence of exposures or a {{id: sha256}} mapping"
        raise ParameterError(msg)
    else:
        pairs = []
        for i, ds in enumerate(value):
            if "source_sha256" not in ds.coords or "exposure" not in ds.coords:
                msg = (
                    f"inputs[{kind!r}][{i}] has no 'exposure'/'source_sha256' coordinates: "
                    "pass exposures opened with lazysky.zarr_store.open_exposure, or a "
                    "{exposure_id: sha256} mapping"
                )
                raise ParameterError(msg)
            pairs.append(
                (str(ds.coords["exposure"].values), str(ds.coords["source_sha256"].values))
            )
    if not pairs:
        msg = f"inputs[{kind!r}] is empty: record the exposures the {kind} master was made from"
        raise ParameterError(msg)
    for eid, sha in pairs:
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            msg = f"inputs[{kind!r}]: {eid!r} needs a SHA-256 hex digest, got {sha!r}"
            raise ParameterError(msg)
    return [{"exposure_id": e, "sha256": s} for e, s in pairs]


def write_masters(
    store: StoreLike,
    masters: xr.Dataset,
    *,
    inputs: Mapping[str, InputsLike],
    chunk_px: int = 1024,
    storage_options: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> list[str]:
    """Write masters (as :func:`~lazysky.pipeline.make_masters` returns them) to the store.

    Each ``(kind, detector)`` becomes the group ``calib/<kind>/<detector>`` holding
    ``<kind>`` and (when present) ``<kind>_variance`` ``(y, x)``, chunked ``chunk_px``
    square. Its attributes record the kind, detector, units, steps, the detector's gain,
    read noise and saturation, and the inputs (exposure ids and SHA-256 of their source
    files). The arrays are written first and the group metadata last, so a master is
    complete or invisible; writing again replaces it (idempotent for the same masters).
    This computes the masters (it is an output).

    Parameters
    ----------
    store
        A directory, an fsspec URL (``s3://bucket/prefix``) or a StoreRoot.
    masters
        ``bias``, ``dark``, ``flat`` (each with ``<kind>_variance``) and ``bpm``
        ``(detector, y, x)``, any subset.
    inputs
        For each of ``bias``, ``dark``, ``flat`` present: the exposures it was made from,
        opened with :func:`~lazysky.zarr_store.open_exposure` (their ``exposure`` and
        ``source_sha256`` are recorded), or a ``{exposure_id: sha256}`` mapping. The bad
        pixel mask records the inputs of the dark and flat.
    chunk_px
        Side of the Zarr chunks.

    Returns
    -------
    list of str
        The groups written, ``calib/<kind>/<detector>``.

    Examples
    --------
    >>> masters = make_masters(bias=biases, flat=flats)  # doctest: +SKIP
    >>> write_masters("lazysky-data", masters,
    ...               inputs={"bias": biases, "flat": flats})  # doctest: +SKIP
    ['calib/bias/CCD01', 'calib/flat/CCD01', 'calib/bpm/CCD01']
    """
    root = parse_store(store, storage_options=storage_options, settings=settings)
    kinds = [k for k in MASTER_KINDS if k in masters.data_vars]
    if not kinds:
        msg = (
            f"no master in the Dataset (variables {sorted(map(str, masters.data_vars))}); "
            f"expected any of {list(MASTER_KINDS)}"
        )
        raise ParameterError(msg)
    if int(chunk_px) < 1:
        msg = f"chunk_px must be >= 1, got {chunk_px}"
        raise ParameterError(msg)
    unknown = sorted(set(inputs) - {"bias", "dark", "flat"})
    if unknown:
        msg = f"inputs has unknown kind(s) {unknown}; allowed: ['bias', 'dark', 'flat']"
        raise ParameterError(msg)
    recorded: dict[str, list[dict[str, str]]] = {}
    for kind in kinds:
        if kind == "bpm":
            continue
        if kind not in inputs:
            msg = f"inputs has no entry for the {kind} master: record what it was made from"
            raise ParameterError(msg)
        recorded[kind] = _parse_inputs(kind, inputs[kind])
    if "bpm" in kinds:
        recorded["bpm"] = [i for k in _BPM_FROM for i in recorded.get(k, [])]
    detectors = [str(d) for d in masters.detector.values]
    per_det = {
        k: [_num_or_none(masters.coords[k].values[i]) if k in masters.coords else None
            for i in range(len(detectors))]
        for k in ("gain", "rdnoise", "saturate")
    }  # fmt: skip
    stores: list[da.Array] = []
    targets: list[Any] = []
    groups: list[tuple[tuple[str, str, str], dict[str, Any], dict[str, dict[str, Any]]]] = []
    import zarr

    for kind in kinds:
        names = [n for n in (kind, f"{kind}_variance") if n in masters.data_vars]
        for i, det in enumerate(detectors):
            _check_name(det, "detector")
            parts = (CALIB, kind, det)
            _remove(root, *parts)  # metadata first: invisible until rewritten
            arrays = {}
            for n in names:
                var = masters[n]
                if var.dims != ("detector", "y", "x"):
                    msg = f"master {n!r} has dims {var.dims}, expected ('detector', 'y', 'x')"
                    raise ParameterError(msg)
                ny, nx = int(var.sizes["y"]), int(var.sizes["x"])
                chunks = (min(chunk_px, ny), min(chunk_px, nx))
                dtype = np.dtype(var.dtype)
                arrays[n] = _create_array(
                    root, (*parts, n), (ny, nx), chunks, dtype, ("y", "x"),
                    dict(var.attrs), _fill(n, dtype),
                )  # fmt: skip
                stores.append(da.asarray(var.data[i]).rechunk(chunks))
                targets.append(zarr.open_array(root.zarr_store(*parts, n), mode="r+"))
            attrs = {
                "format": MASTER_FORMAT,
                "kind": kind,
                "detector": det,
                "detector_index": i,
                "detectors": detectors,
                "units": str(masters[kind].attrs.get("units", "")),
                "steps": list(masters[kind].attrs.get("steps", [])),
                "inputs": recorded[kind],
                **{k: v[i] for k, v in per_det.items()},
                "written_at": _now(),
            }
            groups.append((parts, attrs, arrays))
    da.store(stores, targets, lock=False, compute=True)  # chunk-aligned: no lock needed
    for parts, attrs, arrays in groups:
        _put(root, root.path(*parts, GROUP_META), _group_body(attrs, arrays))
    logger.info("wrote %d master groups to %s", len(groups), root.url)
    return ["/".join(p) for p, _, _ in groups]


def _num_or_none(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def _list_dirs(root: StoreRoot, *parts: str) -> list[str]:
    fs = root.fs()
    base = root.path(*parts)
    fs.invalidate_cache(base)
    try:
        entries = fs.ls(base, detail=True)
    except FileNotFoundError:
        return []
    return sorted(
        e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"
    )


def _open_group(root: StoreRoot, parts: Sequence[str], what: str) -> dict[str, Any]:
    meta = _read_json(root, root.path(*parts, GROUP_META))
    if meta is None:
        state = "incomplete (being written, or a write died)" if root.fs().exists(
            root.path(*parts)) else "absent"  # fmt: skip
        msg = f"{what} {'/'.join(parts)!r} in the store {root.url!r} is {state}"
        raise StoreError(msg)
    attrs = meta.get("attributes", {}).get("lazysky")
    if not isinstance(attrs, dict):
        msg = f"{root.path(*parts, GROUP_META)} is a Zarr group but not a lazysky {what}"
        raise StoreError(msg)
    return attrs


def _lazy(root: StoreRoot, parts: Sequence[str], name: str, token: str) -> da.Array:
    import zarr

    arr = zarr.open_array(root.zarr_store(*parts, read_only=True), mode="r")
    return da.from_zarr(arr, name=f"{name}-{token}")


def open_masters(
    store: StoreLike,
    *,
    kinds: Sequence[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> xr.Dataset:
    """The masters in the store as one lazy Dataset, as :func:`make_masters` returns them.

    ``bias``, ``dark``, ``flat`` (with ``<kind>_variance``) and ``bpm`` ``(detector, y,
    x)`` over dask arrays (no pixel is read until computed), with ``gain``, ``rdnoise``
    and ``saturate`` along ``detector``; ``attrs["inputs"]`` maps each kind to its recorded
    inputs. ``kinds`` picks some (default: every kind present).

    Raises
    ------
    StoreError
        No masters, or a kind whose detectors are not all complete.

    Examples
    --------
    >>> masters = open_masters("lazysky-data")  # doctest: +SKIP
    >>> cal = calibrate_exposure(open_exposure("lazysky-data", eid), masters)  # doctest: +SKIP
    """
    root = parse_store(store, storage_options=storage_options, settings=settings)
    if kinds is not None:
        for k in kinds:
            _check_choice("kind", k, MASTER_KINDS)
    present = [k for k in MASTER_KINDS if k in _list_dirs(root, CALIB)]
    wanted = present if kinds is None else [k for k in kinds if k in present]
    missing = [] if kinds is None else [k for k in kinds if k not in present]
    if missing or not wanted:
        msg = (
            f"no {'/'.join(missing) or 'master'} calibration in the store {root.url!r} "
            f"(it has {present or 'none'}); write them with write_masters"
        )
        raise StoreError(msg)
    data: dict[str, Any] = {}
    inputs: dict[str, Any] = {}
    detectors: list[str] | None = None
    per_det: dict[str, list[Any]] = {}
    for kind in wanted:
        dets = _list_dirs(root, CALIB, kind)
        metas = {d: _open_group(root, (CALIB, kind, d), f"{kind} master") for d in dets}
        order = metas[dets[0]]["detectors"] if dets else []
        if sorted(order) != dets:
            msg = (
                f"the {kind} masters in {root.url!r} cover detectors {dets}, but were written "
                f"for {order}: a write was interrupted; write the masters again"
            )
            raise StoreError(msg)
        if detectors is None:
            detectors = list(order)
            per_det = {k: [metas[d].get(k) for d in order] for k in ("gain", "rdnoise", "saturate")}
        elif list(order) != detectors:
            msg = f"the {kind} masters are for detectors {order}, the others for {detectors}"
            raise StoreError(msg)
        first = metas[order[0]]
        names = [kind, f"{kind}_variance"]
        for n in names:
            if not root.fs().exists(root.path(CALIB, kind, order[0], n, GROUP_META)):
                continue
            token = tokenize(root.url, [metas[d]["written_at"] for d in order], n)
            arr = da.stack([_lazy(root, (CALIB, kind, d, n), f"open-master-{n}-{d}", token)
                            for d in order])  # fmt: skip
            attrs = _read_json(root, root.path(CALIB, kind, order[0], n, GROUP_META)) or {}
            data[n] = (("detector", "y", "x"), arr, attrs.get("attributes", {}))
        inputs[kind] = first["inputs"]
    coords: dict[str, Any] = {"detector": ("detector", np.array(detectors or [], dtype=str))}
    for k, vals in per_det.items():
        if all(v is not None for v in vals):
            coords[k] = ("detector", np.asarray(vals, dtype=float))
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update({"inputs": inputs, "store": root.url})
    return ds


# -- products ------------------------------------------------------------------------


def product_grid(ds: xr.Dataset) -> SkyGrid:
    """The :class:`~lazysky.pipeline.SkyGrid` of a product, rebuilt from ``attrs["grid"]``."""
    from lazysky.pipeline.grid import SkyGrid

    g = ds.attrs.get("grid")
    if not isinstance(g, Mapping):
        msg = (
            "the product has no 'grid' attribute (a dict of SkyGrid parameters): write a "
            "Dataset made by lazysky.pipeline.stack (or set attrs['grid'] = grid.to_dict())"
        )
        raise ParameterError(msg)
    try:
        return SkyGrid(**{**g, "shape": tuple(g["shape"])})
    except (TypeError, KeyError) as exc:
        msg = f"attrs['grid'] = {dict(g)!r} is not a SkyGrid ({exc})"
        raise ParameterError(msg) from None


def _product_parts(run_id: str, kind: str, name: str) -> tuple[str, str, str, str]:
    validate_run_id(run_id)
    _check_choice("kind", kind, PRODUCT_KINDS)
    _check_name(name, "product name")
    return PRODUCTS, run_id, kind, name


TILE_DIMS = ("tile_y", "tile_x")


def _per_tile(v: xr.DataArray) -> bool:
    """A per-tile variable (``(tile_y, tile_x, ...)``, e.g. a PSF stamp per tile)."""
    return tuple(v.dims[:2]) == TILE_DIMS


def _check_product(ds: xr.Dataset, grid: SkyGrid) -> list[str]:
    names = [str(n) for n in ds.data_vars]
    if not names:
        raise ParameterError("the product has no data variables")
    for n in names:
        v = ds[n]
        if _per_tile(v):
            if v.shape[:2] != grid.n_tiles:
                msg = (f"per-tile variable {n!r} has shape {v.shape}; its first two dims "
                       f"(tile_y, tile_x) must be the grid's {grid.n_tiles} tiles")  # fmt: skip
                raise ParameterError(msg)
            continue
        if v.dims != ("y", "x") or v.shape != grid.shape:
            msg = (
                f"product variable {n!r} has dims {v.dims} and shape {v.shape}; expected "
                f"('y', 'x') of the grid's shape {grid.shape}, or per-tile values "
                f"('tile_y', 'tile_x', ...) over its {grid.n_tiles} tiles"
            )
            raise ParameterError(msg)
        if v.chunks is not None and tuple(v.chunks) != grid.chunks:
            msg = (
                f"product variable {n!r} has dask chunks {tuple(v.chunks)}, which do not "
                f"match the grid's tiles of {grid.tile_px} px {grid.chunks}: a region write "
                "per tile would cross Zarr chunks (concurrent writers could clobber each "
                f"other). Rechunk first: ds.chunk({{'y': {grid.tile_px}, 'x': {grid.tile_px}}})"
            )
            raise StoreError(msg)
    return names


def _layout(v: xr.DataArray, grid: SkyGrid) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(shape, chunk shape)`` of a product variable in Zarr: one chunk per tile."""
    if _per_tile(v):
        return tuple(v.shape), (1, 1, *v.shape[2:])
    return grid.shape, (min(grid.tile_px, grid.shape[0]), min(grid.tile_px, grid.shape[1]))


def _template(
    root: StoreRoot,
    parts: Sequence[str],
    ds: xr.Dataset,
    names: list[str],
    grid: SkyGrid,
    attrs: dict[str, Any],
    *,
    overwrite: bool,
) -> None:
    """Create the product's arrays and group metadata, or check the existing ones match."""
    existing = _read_json(root, root.path(*parts, GROUP_META))
    if existing is not None and not overwrite:
        have = existing.get("consolidated_metadata", {}).get("metadata", {})
        old = existing.get("attributes", {}).get("lazysky", {})
        same = sorted(have) == sorted(names) and all(
            have[n].get("shape") == list(_layout(ds[n], grid)[0])
            and have[n].get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
            == list(_layout(ds[n], grid)[1])
            and str(np.dtype(ds[n].dtype)) == str(have[n].get("data_type"))
            for n in names
        )
        keys = ("grid", "inputs", "steps", "units")
        new = _jsonable(attrs)
        diff = [k for k in keys if old.get(k) != new.get(k)]
        if same and not diff:
            return
        why = f"attributes {diff} differ" if same else "its variables, shapes or dtypes differ"
        msg = (
            f"product {'/'.join(parts)!r} in {root.url!r} exists and {why}: a run's product "
            "has one provenance. Write it under a new run id, or pass overwrite=True to "
            "replace it"
        )
        raise StoreError(msg)
    _remove(root, *parts)
    attrs = {**attrs, "written_at": _now()}
    arrays = {}
    for n in names:
        dtype = np.dtype(ds[n].dtype)
        shape, chunks = _layout(ds[n], grid)
        dims = tuple(str(d) for d in ds[n].dims)
        arrays[n] = _create_array(
            root, (*parts, n), shape, chunks, dtype, dims, dict(ds[n].attrs), _fill(n, dtype),
        )  # fmt: skip
    _put(root, root.path(*parts, GROUP_META), _group_body(attrs, arrays))


def _write_tile(
    root: StoreRoot,
    parts: tuple[str, ...],
    tile: str,
    region: tuple[slice, slice],
    chunk: tuple[int, int],
    names: list[str],
    kinds: list[bool],
    *blocks: np.ndarray[Any, Any],
) -> str:
    """One tile of every variable (per-tile variables: the tile's entry), then the tile's
    completion marker (a Dask task)."""
    import zarr

    from lazysky.pipeline.grid import parse_tile

    sy, sx = region
    if sy.start % chunk[0] or sx.start % chunk[1]:
        msg = (
            f"misaligned region write {sy.start}:{sy.stop}, {sx.start}:{sx.stop} into "
            f"chunks of {chunk}: write whole tiles"
        )
        raise StoreError(msg)
    marker = root.path(*parts, DONE, tile)
    fs = root.fs()
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(marker)  # not complete while it is being rewritten
    iy, ix = parse_tile(tile)
    for n, block, per_tile in zip(names, blocks, kinds, strict=True):
        arr = zarr.open_array(root.zarr_store(*parts, n), mode="r+")
        where = (slice(iy, iy + 1), slice(ix, ix + 1)) if per_tile else (sy, sx)
        arr.with_config({"write_empty_chunks": True})[where] = np.asarray(block)
    body = json.dumps({"tile": tile, "written_at": _now(), "variables": names}).encode()
    _put(root, marker, body)
    return tile


def write_product(
    store: StoreLike,
    run_id: str,
    kind: str,
    name: str,
    ds: xr.Dataset,
    *,
    tiles: Sequence[str] | None = None,
    overwrite: bool = False,
    compute: bool = True,
    storage_options: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> list[str] | Any:
    """Write a grid product (a coadd, a difference) to ``products/<run_id>/<kind>/<name>``.

    The template (array metadata, one Zarr chunk per grid tile, and the group metadata
    with the attributes) is written first; then one ``write-product-<tile>`` task per tile
    computes that tile of every variable, writes it as a chunk-aligned region and then the
    tile's completion marker (:func:`complete_tiles`). Tiles are independent, so they run
    in parallel and a subset can be written (``tiles=``).

    **Idempotent:** writing a tile again writes the same bytes for the same inputs and
    touches no other tile, so a retried or resumed run (``tiles=`` the ones not in
    :func:`complete_tiles`) is safe. An existing product with other variables, grid,
    inputs, steps or units is refused unless ``overwrite=True``, which replaces it whole.

    Parameters
    ----------
    store
        A directory, an fsspec URL (``s3://bucket/prefix``) or a StoreRoot.
    run_id
        The processing run (:func:`lazysky.runs.new_run_id`).
    kind
        ``"coadd"`` or ``"diff"``.
    name
        The product's name (e.g. field and filter, ``deep1-r``).
    ds
        ``(y, x)`` variables on a :class:`~lazysky.pipeline.SkyGrid` (``attrs["grid"]``),
        dask-chunked one block per tile (as :func:`~lazysky.pipeline.stack` returns), or
        in memory. Its attributes (grid, inputs, steps, units …) are stored with the run id.
    tiles
        Only these tiles (default: all). The template is written either way.
    overwrite
        Replace an existing product that differs.
    compute
        False: return the Dask collection of the tile writes (the template is written
        already) to compute later, e.g. with other products.

    Returns
    -------
    list of str, or a Dask collection
        The tiles written (or, with ``compute=False``, a delayed list of them).

    Examples
    --------
    >>> coadd = stack(pieces, grid)  # doctest: +SKIP
    >>> write_product("s3://survey", run_id, "coadd", "deep1-r", coadd)  # doctest: +SKIP
    ['t000_000', 't000_001', 't001_000', 't001_001']
    """
    from lazysky.pipeline.grid import parse_tile, tiles_of

    root = parse_store(store, storage_options=storage_options, settings=settings)
    parts = _product_parts(run_id, kind, name)
    grid = product_grid(ds)
    names = _check_product(ds, grid)
    todo = tiles_of(grid, tiles)
    attrs = {
        **ds.attrs,
        "format": PRODUCT_FORMAT,
        "run_id": run_id,
        "kind": kind,
        "name": name,
        "grid": grid.to_dict(),
    }
    _template(root, parts, ds, names, grid, attrs, overwrite=overwrite)
    chunk = (min(grid.tile_px, grid.shape[0]), min(grid.tile_px, grid.shape[1]))
    tasks = []
    kinds = [_per_tile(ds[n]) for n in names]
    for tile in todo:
        sy, sx = grid.tile_slices(tile)
        iy, ix = parse_tile(tile)
        blocks = []
        for n, per_tile in zip(names, kinds, strict=True):
            where = (slice(iy, iy + 1), slice(ix, ix + 1)) if per_tile else (sy, sx)
            data = ds[n].data
            blocks.append(window_delayed(da.asarray(data)[where]) if ds[n].chunks is not None
                          else np.asarray(data)[where])  # fmt: skip
        token = tokenize(root.url, parts, tile, *blocks)
        tasks.append(
            dask.delayed(_write_tile, pure=True)(
                root,
                parts,
                tile,
                (sy, sx),
                chunk,
                names,
                kinds,
                *blocks,
                dask_key_name=f"write-product-{tile}-{token}",
            )
        )
    collected = dask.delayed(list, pure=True)(tasks)
    if not compute:
        return collected
    written: list[str] = collected.compute()
    logger.info("wrote %d tile(s) of %s to %s", len(written), "/".join(parts), root.url)
    return written


def complete_tiles(
    store: StoreLike,
    run_id: str,
    kind: str,
    name: str,
    *,
    storage_options: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> list[str]:
    """The tiles of a product whose write finished (sorted); ``[]`` if none or no product.

    Examples
    --------
    >>> done = set(complete_tiles("lazysky-data", run_id, "coadd", "deep1-r"))  # doctest: +SKIP
    >>> write_product("lazysky-data", run_id, "coadd", "deep1-r", coadd,
    ...               tiles=[t for t in grid.tile_ids() if t not in done])  # doctest: +SKIP
    """
    root = parse_store(store, storage_options=storage_options, settings=settings)
    parts = _product_parts(run_id, kind, name)
    fs = root.fs()
    base = root.path(*parts, DONE)
    fs.invalidate_cache(base)
    try:
        found = fs.ls(base, detail=False)
    except FileNotFoundError:
        return []
    names = (str(p).rstrip("/").rsplit("/", 1)[-1] for p in found)
    return sorted(n for n in names if n.startswith("t") and not n.endswith(".partial")
                  and not n.startswith("."))  # fmt: skip


def open_product(
    store: StoreLike,
    run_id: str,
    kind: str,
    name: str,
    *,
    storage_options: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> xr.Dataset:
    """A product as the lazy Dataset that was written (one dask block per tile).

    The attributes come back as written (``grid``, ``inputs``, ``steps``, ``units``) plus
    ``run_id``, ``kind``, ``name``; :func:`product_grid` rebuilds the SkyGrid. Tiles not
    written yet read as NaN (floats), 0 (counts) or NODATA (``mask``): see
    :func:`complete_tiles`.

    Raises
    ------
    StoreError
        No such product.

    Examples
    --------
    >>> coadd = open_product("lazysky-data", run_id, "coadd", "deep1-r")  # doctest: +SKIP
    >>> product_grid(coadd).tile_ids()[:2]  # doctest: +SKIP
    ['t000_000', 't000_001']
    """
    root = parse_store(store, storage_options=storage_options, settings=settings)
    parts = _product_parts(run_id, kind, name)
    meta = _read_json(root, root.path(*parts, GROUP_META))
    if meta is None:
        have = _list_dirs(root, PRODUCTS, run_id, kind)
        msg = (
            f"no {kind} product {name!r} of run {run_id} in the store {root.url!r} "
            f"(that run has {have or 'no ' + kind + ' products'}); see list_products()"
        )
        raise StoreError(msg)
    attrs = dict(meta.get("attributes", {}).get("lazysky", {}))
    arrays = meta.get("consolidated_metadata", {}).get("metadata", {})
    token = tokenize(root.url, parts, attrs.get("written_at"), sorted(arrays))
    data = {}
    for n in arrays:
        arr = _lazy(root, (*parts, n), f"open-product-{name}-{n}", token)
        dims = tuple(arrays[n].get("dimension_names") or ("y", "x"))
        data[n] = (dims, arr, dict(arrays[n].get("attributes", {})))
    ds = xr.Dataset(data)
    for k in ("format",):
        attrs.pop(k, None)
    ds.attrs.update(attrs)
    product_grid(ds)  # validates
    return ds


def list_products(
    store: StoreLike,
    run_id: str,
    *,
    kind: str | None = None,
    storage_options: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> list[tuple[str, str]]:
    """``(kind, name)`` of every product of a run (sorted)."""
    root = parse_store(store, storage_options=storage_options, settings=settings)
    validate_run_id(run_id)
    kinds = PRODUCT_KINDS if kind is None else (kind,)
    for k in kinds:
        _check_choice("kind", k, PRODUCT_KINDS)
    return [(k, n) for k in kinds for n in _list_dirs(root, PRODUCTS, run_id, k)]


def annotate_products(
    store: StoreLike,
    run_id: str,
    values: Mapping[str, Any],
    *,
    storage_options: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> list[tuple[str, str]]:
    """Record ``values`` (e.g. the run's final status and timings) in the attributes of
    every product of ``run_id``; each group's metadata is replaced in one atomic write, so
    a reader sees the old attributes or the new ones. Idempotent. Returns the products."""
    root = parse_store(store, storage_options=storage_options, settings=settings)
    done = []
    for kind, name in list_products(root, run_id):
        path = root.path(*_product_parts(run_id, kind, name), GROUP_META)
        meta = _read_json(root, path)
        if meta is None:
            continue
        meta.setdefault("attributes", {}).setdefault("lazysky", {}).update(_jsonable(values))
        _put(root, path, json.dumps(meta).encode())
        done.append((kind, name))
    return done
