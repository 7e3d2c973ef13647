"""One processing run, end to end, on a Dask cluster: what ``lazysky run CONFIG.yaml`` does.

ingest → masters → calibrate → reference coadd → difference of each science epoch →
detect on the coadd and the differences → catalog, under one processing run whose
configuration, inputs (SHA-256), software version, status, errors and per-stage timings
are recorded in the catalog and in the products' attributes.

* **Lazy per stage**, computed at the stage's edge with one ``client.compute`` (a progress
  bar per stage in the terminal); the reference coadd and the differences are persisted to
  Zarr (``products/<run_id>/{coadd,diff}/…``) and read back from there, the masters go to
  ``calib/``. Task names say stage and tile (``stack-t000_001-…``, ``detect-t000_001-…``).
* **Resumable and idempotent.** Every task that writes is idempotent: a product tile is a
  chunk-aligned region write (same bytes again), a catalog tile replaces that (run, tile)
  in one transaction and is then marked done (``run_tiles``). Re-running a run id skips
  the tiles already complete in Zarr and in the catalog, so a run killed half-way and
  started again — or a worker lost mid-run, whose finished tasks Dask recomputes — ends
  with exactly the rows of a clean run.
* **One bad exposure never sinks the run**: a file that fails to ingest, or an exposure
  whose metadata is unusable, is reported, recorded on the run and skipped; the run then
  ends ``done_with_errors`` and says which.

Examples
--------
>>> from lazysky.runner import run
>>> summary = run("run.yaml")  # doctest: +SKIP
>>> print(summary)  # doctest: +SKIP
"""

from __future__ import annotations

import fnmatch
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from astropy.table import Table, vstack

from lazysky import __version__
from lazysky.config import Settings, load_settings
from lazysky.errors import LazySkyError, ParameterError
from lazysky.runconfig import RunConfig, load_run_config

__all__ = ["RunSummary", "run"]

logger = logging.getLogger(__name__)

CAL_TYPES = {"bias": ("bias", "zero"), "dark": ("dark",), "flat": ("flat", "flatfield",
                                                                   "dome flat", "sky flat")}
SCIENCE_TYPES = ("object", "science", "light")
STAGES = ("ingest", "select", "masters", "reference", "difference", "detect", "catalog",
          "qa", "associate")


@dataclass(frozen=True)
class RunSummary:
    """What a run did: counts, per-stage seconds, errors, where the products are."""

    run_id: str
    status: str
    store: str
    field_name: str
    reference: tuple[str, ...]
    epochs: Mapping[str, tuple[str, ...]]
    tiles: int
    sources: int
    dia_sources: int
    timings: Mapping[str, float]
    errors: Mapping[str, str] = field(default_factory=dict)
    dashboard: str = ""

    @property
    def exposures(self) -> tuple[str, ...]:
        """Every exposure the run processed (reference and science)."""
        science = [e for ids in self.epochs.values() for e in ids]
        return tuple(dict.fromkeys([*self.reference, *science]))

    def __str__(self) -> str:
        lines = [
            f"run {self.run_id}: {self.status}",
            f"  exposures   {len(self.exposures)} ({len(self.reference)} in the reference, "
            f"{len(self.epochs)} science epoch(s))",
            f"  tiles       {self.tiles}",
            f"  sources     {self.sources} in the coadd, {self.dia_sources} in the "
            "differences",
            "  time        " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items()),
            f"  products    {self.store.rstrip('/')}/products/{self.run_id}/",
        ]
        if self.dashboard:
            lines.append(f"  dashboard   {self.dashboard}")
        if self.errors:
            lines.append(f"  skipped     {len(self.errors)}:")
            lines += [f"    {k}: {v}" for k, v in self.errors.items()]
        return "\n".join(lines)


@dataclass
class _Selection:
    bias: list[str]
    dark: list[str]
    flat: list[str]
    reference: list[str]
    epochs: dict[str, list[str]]
    meta: dict[str, dict[str, Any]]


def _header_value(meta: Mapping[str, Any], key: str) -> Any:
    from lazysky.zarr_store._headers import cards_to_header

    cards = meta.get("primary_header") or []
    try:
        return cards_to_header(cards).get(key)
    except (TypeError, ValueError):
        return None


def _matching(ids: Sequence[str], patterns: Sequence[str] | None) -> list[str]:
    if patterns is None:
        return list(ids)
    return [i for i in ids if any(fnmatch.fnmatchcase(i, p) for p in patterns)]


def _select(cfg: RunConfig, store: str, settings: Settings, errors: dict[str, str]) -> _Selection:
    """Read every exposure's metadata (no pixels) and sort them into the run's sets."""
    from lazysky.zarr_store import exposure_metadata, list_exposures

    meta: dict[str, dict[str, Any]] = {}
    for eid in list_exposures(store, settings=settings):
        try:
            meta[eid] = exposure_metadata(store, eid, settings=settings)
        except LazySkyError as exc:
            errors[eid] = str(exc)
    kind = {e: str(m.get("imagetyp", "")).strip().lower() for e, m in meta.items()}
    filt = cfg.field.filter

    def of_type(types: Sequence[str], *, filtered: bool) -> list[str]:
        return sorted(e for e, k in kind.items() if k in types
                      and (not filtered or filt is None or meta[e].get("filter") == filt))

    sets = CAL_TYPES
    bias = _matching(of_type(sets["bias"], filtered=False), cfg.calibrations.bias)
    dark = _matching(of_type(sets["dark"], filtered=False), cfg.calibrations.dark)
    flat = _matching(of_type(sets["flat"], filtered=True), cfg.calibrations.flat)
    objects = [e for e in of_type(SCIENCE_TYPES, filtered=True)
               if _usable(e, meta[e], errors)]
    reference = _matching(objects, cfg.reference)
    if not reference:
        msg = (
            f"no exposure in {store!r} matches reference={cfg.reference}"
            + (f" in filter {filt!r}" if filt else "")
            + f"; the store holds {len(objects)} science exposure(s), e.g. {objects[:3]}"
        )
        raise ParameterError(msg)
    if not bias:
        msg = f"no bias frame in {store!r} (IMAGETYP bias) matches {cfg.calibrations.bias}"
        raise ParameterError(msg)
    science = [e for e in _matching(objects, cfg.science) if e not in reference] \
        if cfg.science else []
    if cfg.science_share is not None:  # one side of a canary split (lazysky.workflows)
        from lazysky.workflows import in_share

        science = [e for e in science if in_share(e, cfg.science_share)]
    epochs: dict[str, list[str]] = {}
    for eid in science:
        visit = _header_value(meta[eid], "VISIT")
        key = f"v{visit}" if visit not in (None, "") else eid
        epochs.setdefault(str(key), []).append(eid)
    return _Selection(bias, dark, flat, reference, epochs, meta)


def _usable(eid: str, meta: Mapping[str, Any], errors: dict[str, str]) -> bool:
    """Whether every detector of a science exposure has a celestial WCS (else recorded)."""
    from lazysky.zarr_store._headers import cards_to_header, wcs_from_header

    names = meta.get("detectors") or []
    for k, cards in enumerate(meta.get("detector_headers") or []):
        try:
            wcs = wcs_from_header(cards_to_header(cards))
        except (TypeError, ValueError):
            wcs = None
        if wcs is None or not wcs.has_celestial:
            det = names[k] if k < len(names) else str(k)
            errors[eid] = (f"skipped: detector {det} has no celestial WCS (register the "
                           "exposure by its stars, e.g. lazysky coadd --register stars, "
                           "or fix its header)")
            return False
    return True


@contextmanager
def _stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    logger.info("stage %s", name)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t0, 3)


def _compute(client: Any, collection: Any, *, label: str, show: bool, run_id: str = "",
             stage: str = "") -> Any:
    """Compute at a stage's edge on the cluster, with progress bars per stage in the terminal
    (its tasks are annotated with run and stage for the dashboard page: lazysky.dashboard)."""
    return _gather(client, _submit(client, collection, run_id=run_id, stage=stage),
                   label=label, show=show, run_id=run_id, stage=stage)


def _submit(client: Any, collection: Any, *, run_id: str, stage: str) -> Any:
    """Start computing ``collection`` on the cluster, its tasks annotated as ``stage``."""
    from lazysky.dashboard import annotate

    with annotate(run_id, stage):
        return client.compute(collection)


def _gather(client: Any, futures: Any, *, label: str, show: bool, run_id: str,
            stage: str) -> Any:
    """Wait for what :func:`_submit` started (with progress bars) and gather it."""
    from lazysky.dashboard import show_progress

    if show:
        show_progress(client, futures, run_id=run_id, stage=stage, label=label)
    return client.gather(futures)


def _write_catalog_tile(parts: Sequence[Table], *, dsn: str, table: str, run_id: str,
                        tile: str, stage: str, extra: Mapping[str, Any] | None = None) -> int:
    """Write one tile's sources (all epochs for differences) and mark it done: idempotent."""
    from lazysky.catalog import Catalog, mark_tile_done, write_sources

    catalog = Catalog(dsn)
    tables = [t for t in parts if len(t)]
    rows = vstack(tables, metadata_conflicts="silent") if tables else Table()
    if len(rows):
        rows["number"] = np.arange(1, len(rows) + 1, dtype=np.int32)
    write_sources(table, run_id, tile, _catalog_columns(rows, table), catalog=catalog)
    mark_tile_done(run_id, stage, tile, rows=len(rows), catalog=catalog)
    from lazysky.dashboard import report_rows

    report_rows(run_id, table, tile, len(rows))  # the dashboard's live count
    return len(rows)


def _catalog_columns(rows: Table, table: str) -> dict[str, np.ndarray]:
    from lazysky.catalog.schema import SOURCE_TABLES

    allowed = {c.name for c in SOURCE_TABLES[table].columns} - {"run_id", "tile_id", "pos"}
    if not len(rows):
        need = ["x", "y", "ra", "dec"] + (["sign"] if table == "diff" else [])
        return {c: np.zeros(0) for c in need}
    return {c: np.asarray(rows[c]) for c in rows.colnames if c in allowed}


def _with_exposure(table: Any, exposure_id: str) -> Any:
    table = table.copy(copy_data=False)
    table["exposure_id"] = np.array([exposure_id] * len(table), dtype=object)
    return table


def run(
    config: RunConfig | str | os.PathLike[str] | dict[str, Any],
    *,
    settings: Settings | None = None,
    client: Any = None,
    catalog: Any = None,
    show_progress: bool = False,
    on_start: Callable[[str, str], None] | None = None,
    tiles: Sequence[str] | None = None,
    grid: Any = None,
    parent_run_id: str | None = None,
) -> RunSummary:
    """Run the whole pipeline for one configuration (see the module docstring).

    Parameters
    ----------
    config
        A :class:`~lazysky.runconfig.RunConfig`, a YAML file or a mapping.
    settings
        lazysky settings (store, catalog, cluster); default: those in force.
    client
        A ``distributed.Client`` to run on (default: :func:`lazysky.cluster.connect`
        with the settings, closed at the end).
    catalog
        An opened catalog (default: :func:`lazysky.catalog.open_catalog`).
    show_progress
        Print a progress bar per stage (the CLI does).
    on_start
        Called with ``(run_id, dashboard_url)`` once the run is registered.
    tiles, grid, parent_run_id
        Reprocessing (:func:`lazysky.reprocess`): only these tiles (default: every tile),
        on this :class:`~lazysky.pipeline.SkyGrid` (default: the grid covering the
        inputs; give the parent's so tile ids stay the same), recorded as a child of
        ``parent_run_id``.

    Returns
    -------
    RunSummary

    Raises
    ------
    ConfigError, ParameterError
        A configuration that cannot run (nothing matches the reference, no bias …).
    """
    from lazysky.catalog import (
        CatalogError,
        done_tiles,
        finish_run,
        open_catalog,
        register_run,
        write_exposures,
    )
    from lazysky.catalog.production import plan_run, publish
    from lazysky.cluster import connect
    from lazysky.pipeline import (
        SkyGrid,
        calibrate_exposure,
        detector_footprints,
        flag_cosmic_rays,
        make_masters,
        resample_exposure,
        stack,
        subtract_background,
    )
    from lazysky.pipeline.detect import SepSettings, detect, detect_difference
    from lazysky.pipeline.difference import difference
    from lazysky.pipeline.grid import tiles_of
    from lazysky.pipeline.psf import PSF_VARIABLES, psf_per_tile
    from lazysky.runs import Run, new_run_id, parse_run_id
    from lazysky.zarr_store import ingest, open_exposure
    from lazysky.zarr_store.products import (
        complete_tiles,
        open_masters,
        open_product,
        write_masters,
        write_product,
    )

    cfg = config if isinstance(config, RunConfig) else load_run_config(config)
    settings = settings if settings is not None else load_settings()
    store = cfg.store or settings.store_url
    run_id = cfg.run_id or new_run_id(cfg.type)
    if parse_run_id(run_id).type != cfg.type:
        msg = f"run_id {run_id} is of type {parse_run_id(run_id).type}, the config says {cfg.type}"
        raise ParameterError(msg)
    catalog = catalog if catalog is not None else open_catalog(settings)
    from lazysky.workflows import resolve_run_config  # workflow versions (issue 13)

    cfg = resolve_run_config(cfg, catalog=catalog)
    own_client = client is None
    if own_client:
        client = connect(settings, worker_plugins=[SepSettings()])
    else:
        client.register_plugin(SepSettings())
    timings: dict[str, float] = {}
    errors: dict[str, str] = {}
    steps = cfg.steps
    status = "failed"
    if settings.cluster.watch:  # the dashboard page, /metrics, progress bars: from the
        from lazysky.dashboard import watch  # start, so the page follows every stage

        watch(client)
    try:
        with _stage("ingest", timings):
            if cfg.ingest:
                report = ingest(cfg.ingest, store, settings=settings)
                errors.update({str(r.source): str(r.error) for r in report.failed})
        with _stage("select", timings):
            sel = _select(cfg, store, settings, errors)
        science_ids = [e for ids in sel.epochs.values() for e in ids]
        used = [*sel.bias, *sel.dark, *sel.flat, *sel.reference, *science_ids]
        inputs = {e: str(_sha(sel.meta[e])) for e in used if _sha(sel.meta[e])}
        recorded = cfg.model_dump(mode="json", exclude={"run_id"})
        register_run(Run(run_id, config=recorded, inputs=inputs, parent_run_id=parent_run_id,
                         description=cfg.description), catalog=catalog)
        write_exposures([_exposure_row(e, sel.meta[e])
                         for e in [*sel.reference, *science_ids]], catalog=catalog)
        # what every product records of its run (status and timings: the catalog's runs row)
        provenance = {"run_id": run_id, "run_config": recorded,
                      "software_version": __version__, "input_sha256": inputs}
        dashboard = str(getattr(client, "dashboard_link", "") or "")
        if on_start is not None:
            on_start(run_id, dashboard)

        with _stage("masters", timings):
            opened = {k: [open_exposure(store, e, settings=settings) for e in ids]
                      for k, ids in (("bias", sel.bias), ("dark", sel.dark),
                                     ("flat", sel.flat)) if ids}
            masters = make_masters(bias=opened["bias"], dark=opened.get("dark"),
                                   flat=opened.get("flat"))
            with dask.config.set(scheduler=client):
                write_masters(store, masters, inputs=opened, settings=settings)
            masters = open_masters(store, settings=settings)

        cal_opts = steps.calibrate

        def calibrated(eid: str) -> xr.Dataset:
            cal = calibrate_exposure(open_exposure(store, eid, settings=settings), masters,
                                     edge_px=cal_opts.edge_px)
            cal = flag_cosmic_rays(cal, sigclip=cal_opts.cosmic_sigclip,
                                   objlim=cal_opts.cosmic_objlim)
            return subtract_background(cal, box_px=cal_opts.background_box_px)

        cals = {e: calibrated(e) for e in [*sel.reference, *science_ids]}
        footprints = [fp for c in cals.values() for fp in detector_footprints(c)]
        scale = cfg.field.pixel_scale_arcsec or _pixel_scale(sel.meta[sel.reference[0]])
        grid = grid if grid is not None else SkyGrid.covering(
            footprints, pixel_scale_arcsec=scale, tile_px=cfg.field.tile_px)
        # reprocessing a subset (``tiles=``): products on those tiles and their neighbours
        # (whose pixels the difference's and detection's halos read back), catalog on those
        det_tiles = tiles_of(grid, tiles)
        tiles = grid.tile_ids() if tiles is None else _with_neighbours(grid, det_tiles)
        name = cfg.field.name
        plan_run(run_id, field=name, tiles=det_tiles, catalog=catalog)  # catalogued ones
        if settings.cluster.watch:  # the run's tiles and exposures for the page
            from lazysky.dashboard import announce_run

            announce_run(client, run_id, field=name, grid=grid, exposures=list(cals))

        def coadd_of(ids: Sequence[str]) -> xr.Dataset:
            """The coadd of ``ids`` with its PSF per tile (stored with it: the difference
            and later photometry read it back instead of estimating it again)."""
            pieces = [p for e in ids for p in resample_exposure(cals[e], grid)]
            co = stack(pieces, grid, method=steps.stack.method, sigma=steps.stack.sigma)
            psf = psf_per_tile(co)
            co = co.assign({k: psf[k] for k in PSF_VARIABLES})
            co.attrs.update(provenance)
            return co

        with _stage("reference", timings):
            todo = [t for t in tiles
                    if t not in set(complete_tiles(store, run_id, "coadd", name,
                                                   settings=settings))]
            if todo:
                ref_writes = write_product(store, run_id, "coadd", name,
                                           coadd_of(sel.reference), tiles=todo, compute=False,
                                           settings=settings)
                _compute(client, ref_writes, label="reference coadd", show=show_progress,
                         run_id=run_id, stage="reference")
            reference = open_product(store, run_id, "coadd", name, settings=settings)

        diff_names = {epoch: f"{name}-{epoch}" for epoch in sel.epochs}
        qa_args = {"reference": name, "reference_ids": sel.reference,
                   "epochs": {diff_names[e]: ids for e, ids in sel.epochs.items()},
                   "meta": sel.meta, "catalog": catalog, "settings": settings}
        qa_plans: list[Any] = []  # QA computed beside the writes, then the rest (after detect)
        qa_futures: list[Any] = []
        with _stage("difference", timings):
            writes: list[Any] = []
            graphs: dict[str, tuple[xr.Dataset, xr.Dataset]] = {}  # epoch name: (sci, diff)
            epoch_todo: list[set[str]] = []
            for epoch, ids in sel.epochs.items():
                # a tile is done when both its science coadd and its difference are (the two
                # writes of one tile may finish in either order before an interruption)
                have = set(complete_tiles(store, run_id, "diff", diff_names[epoch],
                                          settings=settings)) & set(complete_tiles(
                    store, run_id, "coadd", diff_names[epoch], settings=settings))
                todo = [t for t in tiles if t not in have]
                if not todo:
                    continue
                # the epoch's coadd is kept too (cutouts, reprocessing); one graph feeds
                # both writes, so it is computed once
                science = coadd_of(ids)
                science.attrs.update(epoch=epoch)
                writes.append(write_product(store, run_id, "coadd", diff_names[epoch], science,
                                            tiles=todo, compute=False, settings=settings))
                sigma = steps.difference.astrometric_sigma_px
                diff = difference(science, reference, method=steps.difference.method,
                                  astrometric_sigma_px=sigma if sigma == "auto"
                                  else (float(sigma), float(sigma)),
                                  psf_science=science[list(PSF_VARIABLES)],
                                  psf_reference=reference[list(PSF_VARIABLES)])
                keep = diff[["image", "variance", "score", "mask", "psf"]]
                keep = keep.assign(flux_ratio=(("tile_y", "tile_x"), da.broadcast_to(
                    diff.flux_ratio.data, grid.n_tiles).rechunk(1)))
                keep.attrs.update(provenance)
                keep.attrs.update(epoch=epoch, exposures=list(ids))
                writes.append(write_product(store, run_id, "diff", diff_names[epoch], keep,
                                            tiles=todo, compute=False, settings=settings))
                graphs[diff_names[epoch]] = (science, keep)
                epoch_todo.append(set(todo))
            if writes:
                # science QA of the tiles every epoch writes now, from the graphs being
                # written: it shares their tiles in the workers' memory and reads nothing
                # back (docs/qa.md); only its recording waits for the catalog's rows. One
                # submission with the writes (two would optimise the shared graph apart);
                # its tasks keep their own stage, "qa" (a layer's annotation wins)
                both = set.intersection(*epoch_todo) if epoch_todo else set()
                qa_tiles = [t for t in det_tiles if t in both]
                early: list[Any] = []
                if settings.qa_enabled and len(graphs) == len(sel.epochs) and qa_tiles:
                    from lazysky.dashboard import annotate
                    from lazysky.pipeline.qa import plan_qa

                    with annotate(run_id, "qa"):
                        qa_plans.append(plan_qa(store, run_id, **qa_args, tiles=qa_tiles,
                                                products=graphs))
                    early = qa_plans[-1].tasks
                futures = _submit(client, [*writes, *early], run_id=run_id,
                                  stage="difference")
                qa_futures += futures[len(writes):]
                _gather(client, futures[:len(writes)], label="differences",
                        show=show_progress, run_id=run_id, stage="difference")
                del graphs
            diffs = {epoch: open_product(store, run_id, "diff", n, settings=settings)
                     for epoch, n in diff_names.items()}

        with _stage("detect", timings):
            dsn = catalog.dsn
            done_co = done_tiles(run_id, "detect-coadd", catalog=catalog)
            done_dia = done_tiles(run_id, "detect-diff", catalog=catalog)
            co_src = detect(reference, threshold=steps.detect.threshold,
                            tiles=[t for t in det_tiles if t not in done_co])
            dia_todo = [t for t in det_tiles if t not in done_dia]
            dia = {epoch: detect_difference(d, threshold=steps.detect.diff_threshold,
                                            tiles=dia_todo) for epoch, d in diffs.items()}
            write = dask.delayed(_write_catalog_tile, pure=True)
            tasks = {}
            for tile, table in co_src.tiles.items():
                tasks[("coadd", tile)] = write(
                    [table], dsn=dsn, table="coadd", run_id=run_id, tile=tile,
                    stage="detect-coadd", dask_key_name=f"catalog-coadd-{tile}-{run_id}")
            for tile in dia_todo:
                parts = [dask.delayed(_with_exposure, pure=True)(
                    dia[epoch].tiles[tile], sel.epochs[epoch][0]) for epoch in dia]
                tasks[("diff", tile)] = write(
                    parts, dsn=dsn, table="diff", run_id=run_id, tile=tile,
                    stage="detect-diff", dask_key_name=f"catalog-diff-{tile}-{run_id}")
            det_futures = _submit(client, list(tasks.values()), run_id=run_id,
                                  stage="detect") if tasks else []
            # the QA the difference stage did not compute (a resumed run, a run without
            # epochs) reads the written products: submitted behind detection, its tasks
            # fill the workers' gaps (a catalog write waits on PostgreSQL)
            if settings.qa_enabled:
                from lazysky.pipeline.qa import plan_qa

                measured = {t for p in qa_plans for _, t in p.keys}
                rest = [t for t in det_tiles if t not in measured]
                if rest or not qa_plans:
                    qa_plans.append(plan_qa(store, run_id, **qa_args, tiles=rest))
                    qa_futures += _submit(client, qa_plans[-1].tasks, run_id=run_id,
                                          stage="qa")
            if det_futures:
                _gather(client, det_futures, label="detect + catalog", show=show_progress,
                        run_id=run_id, stage="detect")
        if qa_plans:
            with _stage("qa", timings):
                from lazysky.pipeline.qa import merge_plans, record_qa

                values = _gather(client, qa_futures, label="qa", show=show_progress,
                                 run_id=run_id, stage="qa") if qa_futures else []
                qa = record_qa(store, merge_plans(qa_plans), values, catalog=catalog,
                               thresholds=settings.qa_thresholds, settings=settings)
                if settings.cluster.watch:  # the page colours tiles by QA, /metrics too
                    from lazysky.dashboard import publish_run_qa

                    publish_run_qa(client, run_id, qa)
        if diffs:  # association across epochs: replaces the run's objects (idempotent)
            with _stage("associate", timings):
                from lazysky.associate import associate

                associate(run_id, catalog=catalog, store=str(store), settings=settings,
                          client=client)
        done_co = done_tiles(run_id, "detect-coadd", catalog=catalog)
        done_dia = done_tiles(run_id, "detect-diff", catalog=catalog)
        status = "done_with_errors" if errors else "done"
        return RunSummary(
            run_id=run_id, status=status, store=str(store), field_name=name,
            reference=tuple(sel.reference),
            epochs={k: tuple(v) for k, v in sel.epochs.items()}, tiles=len(det_tiles),
            sources=sum(done_co.values()), dia_sources=sum(done_dia.values()),
            timings=dict(timings), errors=dict(errors), dashboard=dashboard,
        )
    finally:
        if settings.cluster.watch:
            from lazysky.dashboard import announce_end

            announce_end(client, run_id, status=status, timings=timings, errors=errors)
        with suppress(LazySkyError, OSError):  # a run never registered (bad config)
            finish_run(run_id, status=status, timings=timings, errors=errors, catalog=catalog)
            # the products say how their run ended, too
            from lazysky.zarr_store.products import annotate_products

            annotate_products(store, run_id, {"run_status": status, "run_timings": timings,
                                              "run_errors": errors}, settings=settings)
        if cfg.type == "prod" and status in ("done", "done_with_errors"):
            try:  # a finished production run becomes the production of its tiles
                publish(run_id, catalog=catalog)
            except CatalogError as exc:
                logger.warning("run %s finished but was not published: %s", run_id, exc)
        if own_client:
            client.close()


def _with_neighbours(grid: Any, tiles: Sequence[str]) -> list[str]:
    """``tiles`` and the tiles around them, in the grid's order."""
    from lazysky.pipeline.grid import parse_tile

    nty, ntx = grid.n_tiles
    near = {(iy + dy, ix + dx) for iy, ix in map(parse_tile, tiles)
            for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    return [grid.tile_id(iy, ix) for iy in range(nty) for ix in range(ntx) if (iy, ix) in near]


def _sha(meta: Mapping[str, Any]) -> str | None:
    src = meta.get("source")
    if isinstance(src, Mapping):
        sha = src.get("sha256")
        return str(sha) if sha else None
    return None


def _pixel_scale(meta: Mapping[str, Any]) -> float:
    """The pixel scale (arcsec) of the first detector's WCS of an exposure."""
    from astropy.wcs.utils import proj_plane_pixel_scales

    from lazysky.zarr_store._headers import cards_to_header, wcs_from_header

    headers = meta.get("detector_headers") or []
    wcs = wcs_from_header(cards_to_header(headers[0])) if headers else None
    if wcs is None:
        msg = (f"exposure {meta.get('exposure_id')} has no celestial WCS to take a pixel "
               "scale from: set field.pixel_scale_arcsec in the run configuration")
        raise ParameterError(msg)
    return float(np.mean(proj_plane_pixel_scales(wcs.celestial)) * 3600.0)


def _exposure_row(eid: str, meta: Mapping[str, Any]) -> Any:
    """The catalog row of an exposure; its footprint the convex hull of its detectors."""
    from scipy.spatial import ConvexHull, QhullError

    from lazysky.catalog import Exposure, SPoly

    corners = np.array([p for fp in (meta.get("footprints") or []) for p in fp], dtype=float)
    poly = None
    if len(corners) >= 3:
        ra0, dec0 = corners[0]
        # a local tangent-plane view (RA unwrapped around the first corner) for the hull
        dra = (corners[:, 0] - ra0 + 180.0) % 360.0 - 180.0
        xy = np.column_stack([dra * np.cos(np.radians(dec0)), corners[:, 1]])
        try:
            hull = ConvexHull(xy).vertices
            poly = SPoly.from_degrees([(float((ra0 + dra[i]) % 360.0), float(corners[i, 1]))
                                       for i in hull])
        except QhullError:
            poly = None
    return Exposure(exposure_id=eid, instrument=str(meta.get("instrument", "")),
                    filter=str(meta.get("filter", "")), mjd=float(meta.get("mjd_obs", 0.0)),
                    exptime=float(meta.get("exptime", 0.0)), footprint=poly)
