"""Reprocess some tiles of a run as a new child run (:func:`lazysky.reprocess`).

Re-exported by :mod:`lazysky.interactive`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lazysky.errors import ParameterError
from lazysky.interactive import (
    PRODUCTS_FROM,
    REPROCESS_TYPES,
    STEPS,
    RunView,
    _catalog,
    _parse_sky,
    _run_row,
    _settings,
    open_run,
)

if TYPE_CHECKING:
    from lazysky.catalog import Catalog
    from lazysky.config import Settings
    from lazysky.pipeline.grid import SkyGrid

__all__ = ["reprocess"]


# -- reprocessing -------------------------------------------------------------------------


def _flatten_overrides(overrides: Mapping[str, Any] | None) -> dict[tuple[str, str], Any]:
    """``{(step, parameter): value}`` from nested or dotted overrides, validated by name."""
    from lazysky.runconfig import StepParameters

    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        msg = f"overrides must be a mapping like {{'detect.threshold': 3.0}}; got {overrides!r}"
        raise ParameterError(msg)
    flat: dict[tuple[str, str], Any] = {}
    for key, value in overrides.items():
        step, _, param = str(key).removeprefix("steps.").partition(".")
        if param:
            flat[(step, param)] = value
            continue
        if not isinstance(value, Mapping):
            msg = (f"override {key!r}: give 'step.parameter' (e.g. 'detect.threshold') or "
                   f"{{step: {{parameter: value}}}}; got {value!r}")
            raise ParameterError(msg)
        flat.update({(step, str(p)): v for p, v in value.items()})
    steps = StepParameters.model_fields
    for step, param in flat:
        if step not in steps:
            msg = (f"override names an unknown step {step!r}; the steps are "
                   f"{', '.join(steps)}")
            raise ParameterError(msg)
        model = steps[step].annotation
        params = getattr(model, "model_fields", {})
        if param not in params:
            msg = (f"override names an unknown parameter {param!r} of step {step!r}; its "
                   f"parameters are {', '.join(params)}")
            raise ParameterError(msg)
    return flat


def _child_config(parent: RunView, flat: Mapping[tuple[str, str], Any], run_type: str,
                  description: str) -> Any:
    from pydantic import ValidationError

    from lazysky.runconfig import RunConfig

    data = {k: v for k, v in parent.config.items() if k in RunConfig.model_fields}
    data.update(type=run_type, run_id=None, store=parent.store, description=description)
    # the parent's steps as it ran them (a run records its workflow version's steps),
    # plus the overrides, given explicitly: not re-resolved from the active version
    data.pop("workflow", None)
    data.pop("canary", None)
    steps = {k: dict(v) for k, v in dict(data.get("steps") or {}).items()}
    for (step, param), value in flat.items():
        steps.setdefault(step, {})[param] = value
    data["steps"] = steps
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in exc.errors())
        msg = f"the overrides make an invalid configuration: {problems}"
        raise ParameterError(msg) from None


def _region_tiles(grid: SkyGrid, region: Any) -> list[str]:
    """The tiles a region (centre and radius) touches; a region off the field: an error."""
    from lazysky.catalog import parse_radius

    if isinstance(region, Mapping):
        centre = region.get("center", region.get("centre"))
        radius = region.get("radius")
    elif isinstance(region, Sequence) and not isinstance(region, str) and len(region) == 2:
        centre, radius = region
    else:
        msg = (f"region must be (centre, radius) or {{'center': ..., 'radius': ...}}; "
               f"got {region!r}")
        raise ParameterError(msg)
    if centre is None or radius is None:
        msg = f"region needs a centre and a radius; got {region!r}"
        raise ParameterError(msg)
    ra, dec = _parse_sky(centre)
    r = parse_radius(radius)
    # the circle's outline (and centre) projected on the grid: the tiles its box touches
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    c = SkyCoord(ra, dec, unit="deg")
    ring = c.directional_offset_by(np.linspace(0.0, 360.0, 72, endpoint=False) * u.deg,
                                   r * u.deg)
    pts = np.column_stack([np.append(ring.ra.deg, ra), np.append(ring.dec.deg, dec)])
    x, y = grid.wcs.world_to_pixel_values(pts[:, 0], pts[:, 1])
    ny, nx = grid.shape
    # pixels of the box clipped to the grid; the circle must reach the grid's pixels
    near_x = np.clip(x, 0, nx - 1)
    near_y = np.clip(y, 0, ny - 1)
    inside = (x.min() <= nx - 0.5 and x.max() >= -0.5 and y.min() <= ny - 0.5
              and y.max() >= -0.5)
    if inside:
        # the nearest grid pixel to the centre must lie within the circle
        cx, cy = np.clip(x[-1], 0, nx - 1), np.clip(y[-1], 0, ny - 1)
        (ra_n, dec_n) = grid.wcs.pixel_to_world_values(cx, cy)
        inside = c.separation(SkyCoord(ra_n, dec_n, unit="deg")).deg <= r + \
            grid.pixel_scale_arcsec / 3600.0
    if not inside:
        msg = (f"region centre ({ra:.6f}, {dec:.6f}) radius {r * 3600:.1f} arcsec is outside "
               f"the field: the grid covers ({grid.ra_deg:.6f}, {grid.dec_deg:.6f}) ± "
               f"{grid.shape[1] * grid.pixel_scale_arcsec / 7200:.4f} x "
               f"{grid.shape[0] * grid.pixel_scale_arcsec / 7200:.4f} deg")
        raise ParameterError(msg)
    t = grid.tile_px
    return [grid.tile_id(iy, ix)
            for iy in range(int(near_y.min() + 0.5) // t, int(near_y.max() + 0.5) // t + 1)
            for ix in range(int(near_x.min() + 0.5) // t, int(near_x.max() + 0.5) // t + 1)]


def _first_step(flat: Mapping[tuple[str, str], Any], steps: Sequence[str] | None) -> str:
    """The earliest step to recompute: ``steps`` given, else the earliest overridden."""
    if steps is not None:
        if isinstance(steps, str):
            steps = [steps]
        bad = [s for s in steps if s not in STEPS]
        if bad or not steps:
            msg = f"steps must be some of {', '.join(STEPS)}; got {list(steps)!r}"
            raise ParameterError(msg)
        chosen = list(steps)
        changed = [s for s, _ in flat]
        early = [s for s in changed if STEPS.index(s) < min(STEPS.index(c) for c in chosen)]
        if early:
            msg = (f"overrides change {sorted(set(early))} but steps={chosen} starts later: "
                   "add those steps (a step's parameters only act when it runs)")
            raise ParameterError(msg)
        return min(chosen, key=STEPS.index)
    # the stack step also covers calibration's outputs: any earlier change reruns the chain
    changed = [s for s, _ in flat]
    return min(changed, key=STEPS.index) if changed else STEPS[0]


def reprocess(
    run: Any,
    *,
    tiles: Sequence[str] | None = None,
    region: Any = None,
    overrides: Mapping[str, Any] | None = None,
    type: str = "exp",
    steps: Sequence[str] | None = None,
    description: str | None = None,
    client: Any = None,
    settings: Settings | None = None,
    catalog: Catalog | None = None,
) -> RunView:
    """Reprocess some tiles of a run with changed parameters, as a new child run.

    The new run has the parent's configuration plus ``overrides``, the parent's sky grid
    (the same tile ids), and records the parent. Only the chosen tiles are catalogued.
    When every changed parameter belongs to ``detect`` (or ``steps=["detect"]``), the
    parent's images are reused and only detection and the catalog run; otherwise the
    chosen tiles (and their neighbours, for the halos) are processed from the raw
    exposures. Production is never touched: ``type="prod"`` is refused (promote an
    experiment instead).

    Parameters
    ----------
    run
        The parent: a run id, a RunView or a RunSummary.
    tiles, region
        The tiles (ids of the parent's grid), or a region ``(centre, radius)`` /
        ``{"center": ..., "radius": ...}`` whose tiles are taken. Default: every tile
        the parent catalogued.
    overrides
        Changed step parameters: ``{"detect.threshold": 3.0}`` or
        ``{"detect": {"threshold": 3.0}}``; steps and parameters of
        :class:`~lazysky.runconfig.StepParameters`.
    type
        The new run's type: ``exp`` (default), ``test``, ``val`` or ``repr``.
    steps
        The steps to rerun (some of ``calibrate``, ``stack``, ``difference``,
        ``detect``; everything after the earliest runs too). Default: from the earliest
        step whose parameters change.
    description
        Recorded with the run (default: says what was reprocessed).
    client
        A ``distributed.Client`` (default: the connected one, else a new local cluster).
    settings, catalog
        As for :func:`open_run`.

    Returns
    -------
    RunView
        The new run, opened.

    Raises
    ------
    ParameterError
        An unknown step or parameter (the message lists the valid ones), a bad value, a
        region outside the field, an unknown tile, ``type="prod"``. Nothing is written.
    CatalogError
        An unknown parent run.

    Examples
    --------
    >>> child = reprocess(run, tiles=["t001_002"],
    ...                   overrides={"detect.threshold": 3})  # doctest: +SKIP
    >>> child.parent_run_id == run.run_id  # doctest: +SKIP
    True
    """
    from lazysky.pipeline.grid import tiles_of

    if type == "prod":
        msg = ("reprocess never makes production runs (type='prod'): make an experiment "
               "(type='exp'), compare it, then promote it (lazysky.promote)")
        raise ParameterError(msg)
    if type not in REPROCESS_TYPES:
        msg = f"type must be one of {', '.join(REPROCESS_TYPES)}; got {type!r}"
        raise ParameterError(msg)
    if tiles is not None and region is not None:
        raise ParameterError("give tiles= or region=, not both")
    flat = _flatten_overrides(overrides)
    first = _first_step(flat, steps)
    settings = _settings(settings)
    catalog = _catalog(catalog, settings)
    parent = open_run(run, settings=settings, catalog=catalog)
    assert isinstance(parent, RunView)
    if parent.status not in ("done", "done_with_errors"):
        msg = f"run {parent.run_id} is {parent.status}: only a finished run can be reprocessed"
        raise ParameterError(msg)
    grid = parent.grid
    if region is not None:
        chosen = _region_tiles(grid, region)
    elif tiles is not None:
        if isinstance(tiles, str):
            tiles = [tiles]
        try:
            chosen = tiles_of(grid, list(tiles))
        except ParameterError as exc:
            msg = f"{exc}; the run's tiles are {', '.join(grid.tile_ids())}"
            raise ParameterError(msg) from None
    else:
        chosen = parent.tiles or grid.tile_ids()
    if not chosen:
        raise ParameterError("no tile to reprocess (tiles=[] given)")
    chosen = sorted(set(chosen))
    what = ", ".join(f"{s}.{p}={v!r}" for (s, p), v in flat.items()) or "no change"
    text = description if description is not None else (
        f"reprocess of {parent.run_id} from {first} on {len(chosen)} tile(s): {what}")
    cfg = _child_config(parent, flat, type, text)
    if first == "detect":
        missing = [t for t in chosen if t not in parent.tiles]
        if missing:
            msg = (f"tiles {missing} have no images in run {parent.run_id} (it covers "
                   f"{parent.tiles}): reprocess them with steps=['stack', ...]")
            raise ParameterError(msg)
        rid = _detect_only(parent, cfg, chosen, client=client, catalog=catalog)
    else:
        from lazysky.runner import run as run_pipeline

        summary = run_pipeline(cfg, settings=settings, client=_client(client), catalog=catalog,
                               tiles=chosen, grid=grid, parent_run_id=parent.run_id)
        rid = summary.run_id
    child = open_run(rid, settings=settings, catalog=catalog)
    assert isinstance(child, RunView)
    return child


def _client(client: Any) -> Any:
    """The given client, else the connected one, else None (the runner makes one)."""
    if client is not None:
        return client
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def _detect_only(parent: RunView, cfg: Any, tiles: Sequence[str], *, client: Any,
                 catalog: Catalog) -> str:
    """Detection and catalog of ``tiles`` on the parent's images, as a new child run."""
    import dask

    from lazysky.catalog import finish_run, register_run
    from lazysky.catalog.production import plan_run
    from lazysky.pipeline.detect import SepSettings, detect, detect_difference
    from lazysky.runner import _compute, _with_exposure, _write_catalog_tile
    from lazysky.runs import Run, new_run_id

    client = _client(client)
    own = client is None
    if own:
        from lazysky.cluster import connect

        client = connect(parent.settings, worker_plugins=[SepSettings()])
    else:
        client.register_plugin(SepSettings())
    rid = new_run_id(cfg.type)
    recorded = {**cfg.model_dump(mode="json", exclude={"run_id"}),
                PRODUCTS_FROM: parent.products_run_id}
    row = _run_row(parent.run_id, catalog)
    register_run(Run(rid, config=recorded, inputs=dict(row.get("inputs") or {}),
                     parent_run_id=parent.run_id, description=cfg.description),
                 catalog=catalog)
    timings: dict[str, float] = {}
    status = "failed"
    t0 = time.perf_counter()
    try:
        plan_run(rid, field=parent.field_name, tiles=tiles, catalog=catalog)
        det = cfg.steps.detect
        co = detect(parent.reference, threshold=det.threshold, tiles=list(tiles))
        diffs = parent.differences
        dia = {e: detect_difference(d, threshold=det.diff_threshold, tiles=list(tiles))
               for e, d in diffs.items()}
        write = dask.delayed(_write_catalog_tile, pure=True)
        tasks = []
        for tile, table in co.tiles.items():
            tasks.append(write([table], dsn=catalog.dsn, table="coadd", run_id=rid, tile=tile,
                               stage="detect-coadd",
                               dask_key_name=f"catalog-coadd-{tile}-{rid}"))
        for tile in tiles:
            parts = [dask.delayed(_with_exposure, pure=True)(
                dia[e].tiles[tile], str((diffs[e].attrs.get("exposures") or [e])[0]))
                for e in dia]
            tasks.append(write(parts, dsn=catalog.dsn, table="diff", run_id=rid, tile=tile,
                               stage="detect-diff", dask_key_name=f"catalog-diff-{tile}-{rid}"))
        _compute(client, tasks, label="detect + catalog", show=False)
        status = "done"
    finally:
        timings["detect"] = round(time.perf_counter() - t0, 3)
        finish_run(rid, status=status, timings=timings, catalog=catalog)
        if own:
            client.close()
    return rid
