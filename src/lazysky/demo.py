"""The main job (``lazysky demo``): a small simulated survey, end to end, scored against truth.

Simulate a survey with transients → ingest into a local Zarr store → masters, calibrate,
reference coadd, one difference per science epoch, detection → the embedded catalog, on a
local adaptive Dask cluster (its dashboard URL is printed while it runs). Then score the
difference-image sources against the simulator's truth (transients recovered vs injected,
false positives), run a cone search around a recovered transient, and write QA pictures:
the reference coadd with its detections marked, and reference / science / difference
cutouts of recovered transients.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DemoResult", "demo", "score_transients"]

logger = logging.getLogger(__name__)

MATCH_ARCSEC = 1.5
#: detection flags that say the measurement touches masked pixels (lazysky.pipeline.detect)
MASKED_FLAGS = 32 | 64 | 512 | 2048
SNR_RECOVER = 8.0


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured and wrote."""

    summary: Any
    injected: int
    recovered: int
    injected_bright: int
    recovered_bright: int
    false_positives: int
    false_positives_unflagged: int
    dia_sources: int
    cone: Any
    pictures: tuple[str, ...]

    def __str__(self) -> str:
        def pct(k: int, n: int) -> str:
            return f"{100.0 * k / n:.0f} %" if n else "n/a"

        lines = [
            str(self.summary),
            "",
            "transients against the simulator's truth (per science epoch):",
            f"  predicted S/N >= {SNR_RECOVER:g}: recovered {self.recovered_bright} of "
            f"{self.injected_bright} ({pct(self.recovered_bright, self.injected_bright)})",
            f"  all shining transients: recovered {self.recovered} of {self.injected} "
            f"({pct(self.recovered, self.injected)})",
            f"  false positives: {self.false_positives} of {self.dia_sources} difference "
            "sources match no transient, variable or mover "
            f"({self.false_positives_unflagged} without flags: the others touch masked "
            "pixels, e.g. a saturated star)",
        ]
        if self.cone is not None and len(self.cone):
            lines += ["", "cone search (3 arcsec) around a recovered transient:"]
            cols = [c for c in ("tile_id", "ra", "dec", "sign", "flux_aper", "snr",
                                "exposure_id", "distance") if c in self.cone.colnames]
            lines += ["  " + ln for ln in self.cone[cols].pformat(max_width=120)]
        if self.pictures:
            lines += ["", "QA pictures:"] + [f"  {p}" for p in self.pictures]
        return "\n".join(lines)


def _truth_per_epoch(survey_root: Path, epochs: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """For each science epoch: every source's mean flux (e⁻ per frame) over its exposures."""
    from astropy.table import Table, vstack

    out = {}
    for epoch, ids in epochs.items():
        tabs = [Table.read(survey_root / "raw" / f"{e}.truth.ecsv", format="ascii.ecsv")
                for e in ids]
        t = vstack(tabs, metadata_conflicts="silent")
        # one row per source: mean flux over the epoch's frames (0 where not on a detector)
        ids_u, inverse = np.unique(np.asarray(t["id"]), return_inverse=True)
        flux = np.bincount(inverse, weights=np.asarray(t["flux_e"], float)) / len(ids)
        first = np.unique(inverse, return_index=True)[1]
        rows = t[first]
        rows["flux_e"] = flux
        rows["id"] = ids_u
        out[epoch] = rows
    return out


def score_transients(
    dia: Any,
    truth: dict[str, Any],
    epoch_exposure: dict[str, str],
    noise_e: dict[str, float],
) -> dict[str, int]:
    """Match difference sources to truth: recovered transients and false positives.

    ``dia`` has ``ra``, ``dec``, ``sign``, ``exposure_id``; ``truth`` per epoch has ``id``,
    ``kind``, ``ra``, ``dec``, ``flux_e``; ``noise_e`` per epoch is the 1σ noise of a
    point source's flux (e⁻), for the predicted S/N.
    """
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    counts = dict.fromkeys(("injected", "recovered", "injected_bright", "recovered_bright",
                            "false_positives", "false_positives_unflagged"), 0)
    for epoch, t in truth.items():
        sel = np.asarray(dia["exposure_id"]) == epoch_exposure[epoch]
        d = dia[sel]
        kinds = np.asarray(t["kind"]).astype(str)
        tr = t[(kinds == "transient") & (np.asarray(t["flux_e"]) > 0)]
        real = t[np.isin(kinds, ("transient", "variable", "mover"))]
        snr = np.asarray(tr["flux_e"], float) / noise_e[epoch]
        pos = d[np.asarray(d["sign"]) > 0] if len(d) else d
        found = np.zeros(len(tr), bool)
        if len(tr) and len(pos):
            c_t = SkyCoord(tr["ra"], tr["dec"], unit="deg")
            c_d = SkyCoord(pos["ra"], pos["dec"], unit="deg")
            _, sep, _ = c_t.match_to_catalog_sky(c_d)
            found = sep < MATCH_ARCSEC * u.arcsec
        counts["injected"] += len(tr)
        counts["recovered"] += int(found.sum())
        counts["injected_bright"] += int((snr >= SNR_RECOVER).sum())
        counts["recovered_bright"] += int((found & (snr >= SNR_RECOVER)).sum())
        if len(d):
            c_d = SkyCoord(d["ra"], d["dec"], unit="deg")
            if len(real):
                _, sep, _ = c_d.match_to_catalog_sky(SkyCoord(real["ra"], real["dec"],
                                                              unit="deg"))
                false = np.asarray(sep >= MATCH_ARCSEC * u.arcsec)
            else:
                false = np.ones(len(d), bool)
            flagged = (np.asarray(d["flags"], dtype=np.int64) & MASKED_FLAGS) != 0 \
                if "flags" in d.colnames else np.zeros(len(d), bool)
            counts["false_positives"] += int(false.sum())
            counts["false_positives_unflagged"] += int((false & ~flagged).sum())
    return counts


def demo(
    out: str | os.PathLike[str] = "demo-output",
    *,
    seed: int = 42,
    echo: Callable[[str], None] = print,
    settings: Any = None,
    client: Any = None,
) -> DemoResult:
    """Run the main job into ``out`` (see the module docstring); returns what it measured."""
    import sqlalchemy as sa

    from lazysky.catalog import cone_search, diff_sources, open_catalog
    from lazysky.config import load_settings
    from lazysky.runconfig import RunConfig
    from lazysky.runner import run
    from lazysky.simulator import SurveySpec, simulate_survey

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = SurveySpec(instrument="tiny", n_epochs=4, n_dithers=2, n_transients=24,
                      seed=seed)
    echo(f"simulating a survey into {out / 'survey'} ...")
    survey = simulate_survey(spec, out / "survey", overwrite=True)
    echo(survey.summary())
    n_ref = spec.n_reference_epochs if spec.n_reference_epochs is not None \
        else min(2, spec.n_epochs - 1)
    prefix = f"{spec.field_name}-{survey.exposures[0].exposure_id.split('-')[1]}"
    cfg = RunConfig.model_validate({
        "type": "test",
        "description": "lazysky demo",
        "store": str(out / "store"),
        "ingest": [str(out / "survey" / "raw"), str(out / "survey" / "calib")],
        "field": {"name": spec.field_name, "tile_px": 256},
        "reference": [f"{prefix}-e{e:03d}-*" for e in range(n_ref)],
        "science": [f"{prefix}-e{e:03d}-*" for e in range(n_ref, spec.n_epochs)],
    })
    settings = settings if settings is not None else load_settings()
    catalog = open_catalog(settings)

    def started(run_id: str, dashboard: str) -> None:
        echo(f"run {run_id} started" + (f"; watch it on the Dask dashboard: {dashboard}"
                                        if dashboard else ""))

    summary = run(cfg, settings=settings, client=client, catalog=catalog,
                  show_progress=True, on_start=started)
    with catalog.engine().connect() as conn:
        rows = conn.execute(sa.select(diff_sources).where(
            diff_sources.c.run_id == summary.run_id)).mappings().all()
    from astropy.table import Table

    cols = ("ra", "dec", "sign", "exposure_id", "snr", "flux_aper", "tile_id", "flags")
    dia = Table({c: [r[c] for r in rows] for c in cols}) if rows else Table(
        {c: [] for c in cols})
    truth = _truth_per_epoch(out / "survey", dict(summary.epochs))
    noise = _point_noise(out, summary)
    counts = score_transients(dia, truth, {e: ids[0] for e, ids in summary.epochs.items()},
                              noise)
    cone = None
    if len(dia):
        best = int(np.argmax(np.asarray(dia["snr"], float) * (np.asarray(dia["sign"]) > 0)))
        cone = cone_search(float(dia["ra"][best]), float(dia["dec"][best]), "3arcsec",
                           table="diff", run=summary.run_id, catalog=catalog)
    pictures = _pictures(out, summary, dia, settings)
    if settings.qa_enabled:  # the run's QA figures: tile maps, histograms, transients
        from lazysky.figures import qa_figures

        pictures += qa_figures(summary.run_id, store=summary.store, out_dir=out / "qa",
                               catalog=catalog, settings=settings)
    return DemoResult(summary=summary, dia_sources=len(dia), cone=cone,
                      pictures=tuple(str(p) for p in pictures), **counts)


def _point_noise(out: Path, summary: Any) -> dict[str, float]:
    """1σ flux noise of a point source in each epoch's difference (e⁻ per frame).

    ``sqrt(var_D · N_eff)`` with the median predicted variance of D and the
    noise-equivalent area ``4π σ²`` of a Gaussian of the epoch's mean seeing (the
    simulator's SEEING keyword).
    """
    from astropy.io import fits

    from lazysky.zarr_store.products import open_product

    noise = {}
    for epoch, ids in summary.epochs.items():
        diff = open_product(summary.store, summary.run_id, "diff",
                            f"{_field(summary)}-{epoch}")
        var = float(np.nanmedian(diff["variance"].values))
        scale = float(diff.attrs["grid"]["pixel_scale_arcsec"])
        seeing = np.mean([float(fits.getheader(out / "survey" / "raw" / f"{e}.fits")["SEEING"])
                          for e in ids])
        sigma = seeing / scale / 2.3548
        noise[epoch] = float(np.sqrt(var * 4.0 * np.pi * sigma**2))
    return noise


def _field(summary: Any) -> str:
    return str(summary.field_name)


def _pictures(out: Path, summary: Any, dia: Any, settings: Any) -> list[Path]:
    """The QA pictures: the coadd with its detections, and transient cutouts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import sqlalchemy as sa
    from astropy.visualization import ImageNormalize, ZScaleInterval

    from lazysky.catalog import coadd_sources, open_catalog
    from lazysky.pipeline.grid import SkyGrid
    from lazysky.zarr_store.products import open_product

    qa = out / "qa"
    qa.mkdir(exist_ok=True)
    field = _field(summary)
    ref = open_product(summary.store, summary.run_id, "coadd", field)
    g = dict(ref.attrs["grid"])
    grid = SkyGrid(**{**g, "shape": tuple(g["shape"])})
    image = ref["image"].values
    catalog = open_catalog(settings)
    with catalog.engine().connect() as conn:
        src = conn.execute(sa.select(coadd_sources.c.x, coadd_sources.c.y).where(
            coadd_sources.c.run_id == summary.run_id)).all()
    norm = ImageNormalize(np.nan_to_num(image), interval=ZScaleInterval())
    fig, ax = plt.subplots(figsize=(8, 8))
    ax.imshow(np.nan_to_num(image), origin="lower", cmap="gray", norm=norm)
    if src:
        xy = np.array(src, dtype=float)
        ax.scatter(xy[:, 0], xy[:, 1], s=40, facecolors="none", edgecolors="tab:green",
                   linewidths=0.7, label=f"{len(xy)} coadd sources")
    if len(dia):
        x, y = grid.wcs.world_to_pixel_values(np.asarray(dia["ra"], float),
                                              np.asarray(dia["dec"], float))
        pos = np.asarray(dia["sign"]) > 0
        ax.scatter(x[pos], y[pos], s=90, marker="s", facecolors="none",
                   edgecolors="tab:red", label="difference sources (+)")
        ax.scatter(x[~pos], y[~pos], s=90, marker="D", facecolors="none",
                   edgecolors="tab:blue", label="difference sources (−)")
    ny, nx = grid.n_tiles
    for k in range(1, nx):
        ax.axvline(k * grid.tile_px - 0.5, color="tab:orange", lw=0.5, alpha=0.6)
    for k in range(1, ny):
        ax.axhline(k * grid.tile_px - 0.5, color="tab:orange", lw=0.5, alpha=0.6)
    ax.set_title(f"reference coadd, {summary.run_id}")
    ax.legend(loc="upper right", fontsize=8)
    coadd_png = qa / "coadd_detections.png"
    fig.savefig(coadd_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    pictures = [coadd_png]
    if not len(dia):
        return pictures
    best = np.argsort(-np.asarray(dia["snr"], float) * (np.asarray(dia["sign"]) > 0))[:6]
    fig, axes = plt.subplots(len(best), 3, figsize=(6, 2 * len(best)), squeeze=False)
    half = 12
    for row, i in enumerate(best):
        epoch = next(e for e, ids in summary.epochs.items() if ids[0] == dia["exposure_id"][i])
        sci = open_product(summary.store, summary.run_id, "coadd", f"{field}-{epoch}")
        diff = open_product(summary.store, summary.run_id, "diff", f"{field}-{epoch}")
        x, y = grid.wcs.world_to_pixel_values(float(dia["ra"][i]), float(dia["dec"][i]))
        cy, cx = round(float(y)), round(float(x))
        win = (slice(max(cy - half, 0), cy + half + 1), slice(max(cx - half, 0), cx + half + 1))
        for col, (label, data) in enumerate((("reference", ref["image"]),
                                             ("science", sci["image"]),
                                             ("difference", diff["image"]))):
            cut = np.nan_to_num(data[win].values)
            axes[row, col].imshow(cut, origin="lower", cmap="gray",
                                  norm=ImageNormalize(cut, interval=ZScaleInterval()))
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            if row == 0:
                axes[row, col].set_title(label, fontsize=9)
        axes[row, 0].set_ylabel(f"{epoch}\nS/N {float(dia['snr'][i]):.0f}", fontsize=8)
    cut_png = qa / "transient_cutouts.png"
    fig.savefig(cut_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    pictures.append(cut_png)
    return pictures
