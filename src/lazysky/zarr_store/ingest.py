"""Ingest FITS exposures into Zarr: template → chunk-aligned region writes → marker.

The two Dask phases run on whatever scheduler is active (a distributed ``Client`` if one
exists, else threads): ``inspect-<file>`` tasks read headers and stream each file once
(SHA-256, CHECKSUM/DATASUM, truncation); then ``ingest-<exposure>-<detector>`` tasks copy
one detector each, row band by row band through ``ImageHDU.section``, and one
``finalize-<exposure>`` task per exposure marks it complete once every chunk is there.
Between the phases, at the edge, the templates are written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import dask
from dask.base import tokenize

from lazysky.errors import LazySkyError, OutputError, ParameterError
from lazysky.zarr_store._fits import FITS_SUFFIXES, ExposureSource, FitsSource, inspect_fits
from lazysky.zarr_store._layout import StoreLike, StoreRoot, parse_store, split_protocol
from lazysky.zarr_store._write import (
    chunk_shape_for,
    create_template,
    finalize_group,
    group_attrs,
    template_matches,
    write_detector,
)

if TYPE_CHECKING:
    from lazysky.config import Settings

__all__ = ["IngestReport", "IngestResult", "expand_sources", "ingest"]

logger = logging.getLogger(__name__)

Status = Literal["ingested", "unchanged", "failed"]


@dataclass(frozen=True)
class IngestResult:
    """What happened to one input file."""

    source: str
    status: Status
    exposure_id: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class IngestReport:
    """The outcome of :func:`ingest`: one :class:`IngestResult` per input file."""

    results: tuple[IngestResult, ...]

    @property
    def ingested(self) -> list[IngestResult]:
        return [r for r in self.results if r.status == "ingested"]

    @property
    def unchanged(self) -> list[IngestResult]:
        return [r for r in self.results if r.status == "unchanged"]

    @property
    def failed(self) -> list[IngestResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def ok(self) -> bool:
        """True when no file failed."""
        return not self.failed

    def summary(self) -> str:
        """A human-readable report: counts, then one line per failure."""
        lines = [
            f"ingested {len(self.ingested)}, unchanged {len(self.unchanged)}, "
            f"failed {len(self.failed)}"
        ]
        lines += [f"  ok      {r.exposure_id}  <- {r.source}" for r in self.ingested]
        lines += [f"  same    {r.exposure_id}  <- {r.source}" for r in self.unchanged]
        lines += [f"  FAILED  {r.source}: {r.error}" for r in self.failed]
        return "\n".join(lines)


def _source_options(url: str, storage_options: dict[str, Any] | None, settings: Any) -> dict:
    if split_protocol(url)[0] == "file":
        return {}
    if storage_options is not None:
        return dict(storage_options)
    return dict(settings.storage_options(url)) if settings is not None else {}


def expand_sources(
    sources: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    storage_options: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> list[FitsSource]:
    """Files from paths, URLs, directories (their FITS files) and glob patterns."""
    items = [sources] if isinstance(sources, str | os.PathLike) else list(sources)
    out: list[FitsSource] = []
    for item in items:
        url = os.fspath(item)
        opts = _source_options(url, storage_options, settings)
        protocol, path = split_protocol(url)
        from lazysky.zarr_store._layout import filesystem

        fs = filesystem(protocol, opts)
        prefix = "" if protocol == "file" else f"{protocol}://"
        if any(ch in path for ch in "*?["):
            matches = sorted(fs.glob(path))
        elif fs.isdir(path):
            matches = sorted(p for p in fs.find(path) if p.lower().endswith(FITS_SUFFIXES))
        else:
            matches = [path]
        if not matches:
            logger.warning("no FITS file matches %s", url)
        out += [FitsSource(prefix + m, opts) for m in matches]
    return out


def _inspect(src: FitsSource, require: tuple[str, ...]) -> ExposureSource | IngestResult:
    try:
        return inspect_fits(src, require=require)
    except LazySkyError as exc:
        return IngestResult(src.url, "failed", error=str(exc))
    except Exception as exc:  # one bad file never sinks a batch
        return IngestResult(src.url, "failed", error=f"{src.name}: {type(exc).__name__}: {exc}")


def _prepare(
    root: StoreRoot,
    plan: ExposureSource,
    chunks: tuple[int, int, int],
    *,
    overwrite: bool,
    clevel: int,
) -> Status | None:
    """At the edge: decide and write the template. None means "go and write the chunks"."""
    state = root.exposure_state(plan.exposure_id)
    if state == "complete":
        old = root.read_group_attrs(plan.exposure_id).get("source", {})
        if old.get("sha256") == plan.sha256:
            logger.info("%s: already ingested from the same bytes; nothing to do", plan.exposure_id)
            return "unchanged"
        if not overwrite:
            msg = (
                f"{plan.source.name}: exposure id {plan.exposure_id!r} already holds a "
                f"different file ({old.get('name')}, sha256 {str(old.get('sha256'))[:12]}…); "
                "pass overwrite=True (lazysky ingest --overwrite) to replace it"
            )
            raise OutputError(msg)
        logger.warning("%s: replacing the existing exposure (overwrite)", plan.exposure_id)
        root.remove_group(plan.exposure_id)
    elif state == "incomplete":
        if template_matches(root, plan, chunks):
            logger.info("%s: resuming an interrupted ingest of the same bytes", plan.exposure_id)
            _remove_partials(root, plan.exposure_id)
            return None
        logger.warning("%s: discarding an interrupted ingest of other bytes", plan.exposure_id)
        root.remove_group(plan.exposure_id)
    create_template(root, plan, chunks, clevel=clevel)
    return None


def _remove_partials(root: StoreRoot, exposure_id: str) -> None:
    if root.is_local:
        fs = root.fs()
        for path in fs.find(root.path("raw", exposure_id)):
            if path.endswith(".partial"):
                fs.rm_file(path)


def ingest(
    sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    store: StoreLike,
    *,
    overwrite: bool = False,
    tile_shape: tuple[int, int] = (1024, 1024),
    require: Sequence[str] = (),
    compression_level: int = 3,
    storage_options: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> IngestReport:
    """Ingest FITS exposures into ``<store>/raw/<exposure_id>/`` (computes; an edge).

    Parameters
    ----------
    sources
        FITS files (plain, ``.gz``, ``.fz``; MEF or single image), directories or glob
        patterns; local or fsspec URLs.
    store
        The store root: a directory, an ``s3://`` URL or a :class:`StoreRoot`.
    overwrite
        Replace an exposure id that already holds *different* bytes (else that file fails).
    tile_shape
        Chunk shape ``(y, x)`` per detector (clipped to the image).
    require
        Primary-header keywords every file must have (e.g. ``("INSTRUME", "FILTER")``).
    compression_level
        Blosc/zstd level, 1-9 (lossless at every level).
    storage_options, settings
        fsspec options for URLs, or the :class:`~lazysky.config.Settings` to take them from.

    Returns
    -------
    IngestReport
        Per-file results; ``report.ok`` is False if any file failed. Bad files are
        reported there, never raised, so one bad file never sinks the batch.

    Notes
    -----
    Idempotent: re-ingesting the same bytes is a no-op (status ``unchanged``). Atomic: an
    exposure becomes visible only when its group metadata is written, last, after every
    chunk was verified present. Resumable: an interrupted ingest of the same bytes is
    finished, skipping chunk rows already written.

    Examples
    --------
    >>> report = ingest("night1/", "s3://survey", settings=load_settings())  # doctest: +SKIP
    >>> print(report.summary())  # doctest: +SKIP
    """
    if len(tile_shape) != 2 or min(tile_shape) < 16:
        msg = f"tile_shape must be (y, x) with both >= 16 pixels, got {tile_shape!r}"
        raise ParameterError(msg)
    if not 1 <= compression_level <= 9:
        msg = f"compression_level must be 1-9, got {compression_level!r}"
        raise ParameterError(msg)
    root = parse_store(store, storage_options=storage_options, settings=settings)
    srcs = expand_sources(sources, storage_options=storage_options, settings=settings)
    req = tuple(require)
    inspected = dask.compute(
        *[
            dask.delayed(_inspect, pure=False)(
                s, req, dask_key_name=f"inspect-{s.stem()}-{tokenize(s.url)}"
            )
            for s in srcs
        ]
    )
    results: dict[str, IngestResult] = {}
    finals: list[Any] = []
    seen: dict[str, str] = {}
    for src, plan in zip(srcs, inspected, strict=True):
        if isinstance(plan, IngestResult):
            results[src.url] = plan
            continue
        try:
            if plan.exposure_id in seen:
                msg = (
                    f"{src.name}: exposure id {plan.exposure_id!r} also comes from "
                    f"{seen[plan.exposure_id]} in this batch; ingest one of them"
                )
                raise OutputError(msg)
            seen[plan.exposure_id] = src.name
            chunks = chunk_shape_for(plan, tile_shape)
            status = _prepare(root, plan, chunks, overwrite=overwrite, clevel=compression_level)
            attrs = group_attrs(plan, chunks)
        except LazySkyError as exc:
            results[src.url] = IngestResult(src.url, "failed", plan.exposure_id, str(exc))
            continue
        except Exception as exc:  # a store error for this exposure; others go on
            err = f"{src.name}: {type(exc).__name__}: {exc}"
            results[src.url] = IngestResult(src.url, "failed", plan.exposure_id, err)
            continue
        if status is not None:
            results[src.url] = IngestResult(src.url, status, plan.exposure_id)
            continue
        finals.append(_exposure_graph(root, plan, chunks, attrs))
    for src_url, exposure_id, (status, error) in dask.compute(*finals):
        results[src_url] = IngestResult(src_url, status, exposure_id, error)
        log = logger.info if status == "ingested" else logger.error
        log("%s: %s%s", exposure_id, status, f": {error}" if error else "")
    return IngestReport(tuple(results[s.url] for s in srcs))


#: a detector taller than this many tile rows is split over several tasks, so that one
#: huge single-image file still uses every core
BANDS_PER_TASK = 4


def _exposure_graph(
    root: StoreRoot, plan: ExposureSource, chunks: tuple[int, int, int], attrs: dict[str, Any]
) -> Any:
    token = tokenize(plan.sha256, root.url, chunks)
    exp = plan.exposure_id
    starts = list(range(0, plan.shape[0], chunks[1]))
    # (label, [(detector, rows or None for all)]) per task
    work: list[tuple[str, list[tuple[int, list[int] | None]]]] = []
    if plan.source.is_gzip:  # gzip cannot seek back: one pass over the file, in order
        work.append(("all", [(d, None) for d in range(len(plan.detectors))]))
    else:
        for d, info in enumerate(plan.detectors):
            if len(starts) <= BANDS_PER_TASK:
                work.append((info.name, [(d, None)]))
                continue
            for k in range(0, len(starts), BANDS_PER_TASK):
                rows = starts[k : k + BANDS_PER_TASK]
                work.append((f"{info.name}-y{rows[0]}", [(d, rows)]))
    writes = [
        dask.delayed(_write_detectors, pure=True)(
            root, plan, items, chunks, dask_key_name=f"ingest-{exp}-{label}-{token}"
        )
        for label, items in work
    ]

    def _finish(errors: list[str | None]) -> tuple[str, str, tuple[str, str | None]]:
        return plan.source.url, exp, finalize_group(root, plan, chunks, attrs, errors)

    return dask.delayed(_finish, pure=True)(writes, dask_key_name=f"finalize-{exp}-{token}")


def _write_detectors(
    root: StoreRoot,
    plan: ExposureSource,
    items: list[tuple[int, list[int] | None]],
    chunks: tuple[int, int, int],
) -> str | None:
    errors = [write_detector(root, plan, d, chunks, rows=rows) for d, rows in items]
    return "; ".join(e for e in errors if e) or None
