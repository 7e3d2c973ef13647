"""Compare the catalogs of two runs tile by tile (:func:`lazysky.compare_runs`).

Re-exported by :mod:`lazysky.interactive`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lazysky.errors import ParameterError
from lazysky.interactive import RunView, _catalog, _settings, _sources, _tiles_done, open_run

if TYPE_CHECKING:
    from astropy.table import Table

    from lazysky.catalog import Catalog
    from lazysky.config import Settings

__all__ = ["Comparison", "compare_runs"]


# -- comparing runs -----------------------------------------------------------------------


_FLUX = {"coadd": "flux_aper", "diff": "flux_aper"}
_STAGE = {"coadd": "detect-coadd", "diff": "detect-diff"}
_COLUMNS = ("tile_id", "n_a", "n_b", "matched", "only_a", "only_b", "flux_ratio_median",
            "offset_median_arcsec", "offset_rms_arcsec")


@dataclass(frozen=True)
class Comparison:
    """Per-tile differences between the catalogs of two runs (see :func:`compare_runs`).

    ``table`` has one row per tile both runs cover: sources in a and in b, matched,
    only in a, only in b, median flux ratio b/a, median and rms offset (arcsec) and, with
    truth, completeness and false positives of each run.
    """

    run_a: str
    run_b: str
    table_name: str
    radius_arcsec: float
    table: Table
    matches: Table = field(repr=False)

    @property
    def totals(self) -> dict[str, float]:
        """Sums over the tiles (counts), and overall completeness when truth was given."""
        t = self.table
        out: dict[str, float] = {c: int(np.sum(t[c])) for c in
                                 ("n_a", "n_b", "matched", "only_a", "only_b")}
        for run in ("a", "b"):
            if f"truth_found_{run}" in t.colnames:
                n = int(np.sum(t["n_truth"]))
                out[f"completeness_{run}"] = (float(np.sum(t[f"truth_found_{run}"])) / n
                                              if n else math.nan)
                out[f"false_positives_{run}"] = int(np.sum(t[f"false_positives_{run}"]))
        return out

    def figure(self) -> Any:
        """A matplotlib figure: counts per tile, and the offsets and flux ratios matched."""
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        t = self.table
        idx = np.arange(len(t))
        w = 0.27
        ax1.bar(idx - w, t["matched"], w, label="matched")
        ax1.bar(idx, t["only_a"], w, label="only in a")
        ax1.bar(idx + w, t["only_b"], w, label="only in b")
        ax1.set_xticks(idx, [str(s) for s in t["tile_id"]], rotation=60, fontsize=7)
        ax1.set_ylabel(f"{self.table_name} sources")
        ax1.legend(fontsize=8)
        ax1.set_title(f"a = {self.run_a[:13]}…, b = {self.run_b[:13]}…", fontsize=9)
        m = self.matches
        if len(m):
            ratio = np.asarray(m["flux_b"], float) / np.asarray(m["flux_a"], float)
            ax2.scatter(np.asarray(m["distance"], float), ratio, s=10)
        ax2.set_xlabel("offset b − a (arcsec)")
        ax2.set_ylabel("flux ratio b / a")
        ax2.axhline(1.0, color="grey", lw=0.5)
        fig.tight_layout()
        return fig

    def __repr__(self) -> str:
        tot = self.totals
        head = (f"Comparison of {self.table_name} sources, a = {self.run_a}, b = {self.run_b}"
                f" (match radius {self.radius_arcsec:g} arcsec, {len(self.table)} tile(s))")
        line = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in tot.items())
        return "\n".join([head, "  " + line, *self.table.pformat(max_width=140)])

    def _repr_html_(self) -> str:
        return (f"<p>Comparison of {self.table_name} sources: a = <code>{self.run_a}</code>, "
                f"b = <code>{self.run_b}</code>, radius {self.radius_arcsec:g}″</p>"
                + self.table._repr_html_())


def _truth_table(truth: Any, run: RunView, table: str) -> Table | None:
    """The truth as a Table (given, a path, or the survey's ``truth/scene.ecsv``)."""
    from astropy.table import Table

    if truth is False:
        return None
    if truth is None:
        for p in run.config.get("ingest") or []:
            for root in (Path(p), Path(p).parent):
                cand = root / "truth" / "scene.ecsv"
                if cand.is_file():
                    truth = cand
                    break
            if truth is not None:
                break
        if truth is None:
            return None
    if isinstance(truth, str | Path):
        path = Path(truth)
        if not path.is_file():
            msg = f"truth file {str(path)!r} does not exist"
            raise ParameterError(msg)
        truth = Table.read(path, format="ascii.ecsv")
    if not isinstance(truth, Table) or not {"ra", "dec"} <= set(truth.colnames):
        msg = "truth must be an astropy Table with ra and dec (degrees), or its ECSV file"
        raise ParameterError(msg)
    if table == "diff" and "kind" in truth.colnames:
        kinds = np.asarray(truth["kind"]).astype(str)
        truth = truth[np.isin(kinds, ("transient", "variable", "mover"))]
    return truth


def compare_runs(
    a: Any,
    b: Any,
    *,
    truth: Any = None,
    table: str = "coadd",
    radius: Any = "1arcsec",
    mag_limit: float | None = None,
    settings: Settings | None = None,
    catalog: Catalog | None = None,
) -> Comparison:
    """Compare the catalogs of two runs, tile by tile, on the tiles both cover.

    Sources of ``a`` are matched to those of ``b`` on the catalog (the spatial index,
    :func:`lazysky.catalog.crossmatch`) within ``radius``, each to its nearest.

    Parameters
    ----------
    a, b
        Run ids, RunViews or RunSummaries.
    truth
        The simulator's truth: an astropy Table with ``ra``/``dec`` (and ``kind``, ``mag``),
        or its ECSV file; default: ``truth/scene.ecsv`` of the survey that ``a``'s
        configuration ingests, when there is one (``False``: none).
    table
        ``"coadd"`` or ``"diff"`` (truth: transients, variables and movers).
    radius
        The match radius (``"1arcsec"``, a Quantity, or degrees).
    mag_limit
        Truth fainter than this magnitude does not count in completeness.
    settings, catalog
        As for :func:`open_run`.

    Returns
    -------
    Comparison
        ``.table`` (astropy Table per tile), ``.matches``, ``.totals``, ``.figure()``.

    Examples
    --------
    >>> cmp = compare_runs(parent, child)  # doctest: +SKIP
    >>> cmp.totals["only_b"]  # doctest: +SKIP
    7
    """
    from astropy.coordinates import SkyCoord
    from astropy.table import Table

    from lazysky.catalog import crossmatch, parse_radius

    if table not in _STAGE:
        msg = f"table must be one of {', '.join(_STAGE)}; got {table!r}"
        raise ParameterError(msg)
    r_deg = parse_radius(radius)
    settings = _settings(settings)
    catalog = _catalog(catalog, settings)
    va = open_run(a, settings=settings, catalog=catalog)
    vb = open_run(b, settings=settings, catalog=catalog)
    assert isinstance(va, RunView)
    assert isinstance(vb, RunView)
    ta = _tiles_done(va.run_id, _STAGE[table], catalog)
    tb = _tiles_done(vb.run_id, _STAGE[table], catalog)
    common = sorted(set(ta) & set(tb))
    if not common:
        msg = (f"runs {va.run_id} and {vb.run_id} have no {table} tile in common "
               f"(a: {sorted(ta)}, b: {sorted(tb)})")
        raise ParameterError(msg)
    sa_ = _sources(va.run_id, table, common, catalog)
    sb = _sources(vb.run_id, table, common, catalog)
    flux = _FLUX[table]
    keys_b = {(str(t), int(n)): i for i, (t, n) in enumerate(zip(sb["tile_id"], sb["number"],
                                                                 strict=True))}
    best: dict[int, tuple[int, float]] = {}
    if len(sa_) and len(sb):
        m = crossmatch(np.asarray(sa_["ra"], float), np.asarray(sa_["dec"], float), r_deg,
                       table=table, run=vb.run_id, catalog=catalog)
        for idx, tile, num, dist in zip(m["index"], m["tile_id"], m["number"],
                                        np.asarray(m["distance"], float), strict=True):
            j = keys_b.get((str(tile), int(num)))
            if j is not None and (int(idx) not in best or dist < best[int(idx)][1]):
                best[int(idx)] = (j, float(dist))
    ia = np.array(sorted(best), dtype=int)
    ib = np.array([best[i][0] for i in ia], dtype=int)
    dist = np.array([best[i][1] for i in ia], dtype=float)
    matches = Table({
        "tile_id": np.asarray(sa_["tile_id"], dtype=str)[ia] if len(ia) else np.array([], str),
        "index_a": ia, "index_b": ib, "distance": dist,
        "flux_a": np.asarray(sa_[flux], float)[ia] if len(ia) else np.array([]),
        "flux_b": np.asarray(sb[flux], float)[ib] if len(ib) else np.array([]),
    })
    truth_all = truth_t = _truth_table(truth, va, table)
    grid = va.grid if truth_t is not None else None
    if truth_t is not None and mag_limit is not None and "mag" in truth_t.colnames:
        truth_t = truth_t[np.asarray(truth_t["mag"], float) <= mag_limit]
    # completeness against the truth above the limit; false positives against all of it
    c_all = None if truth_all is None or not len(truth_all) else SkyCoord(
        np.asarray(truth_all["ra"], float), np.asarray(truth_all["dec"], float), unit="deg")
    truth_tile = None
    if truth_t is not None and grid is not None:
        x, y = grid.wcs.world_to_pixel_values(np.asarray(truth_t["ra"], float),
                                              np.asarray(truth_t["dec"], float))
        ix = np.floor(np.asarray(x) + 0.5).astype(int) // grid.tile_px
        iy = np.floor(np.asarray(y) + 0.5).astype(int) // grid.tile_px
        truth_tile = np.array([f"t{j:03d}_{i:03d}" for j, i in zip(iy, ix, strict=True)])
    rows = []
    tiles_a = np.asarray(sa_["tile_id"], dtype=str)
    tiles_b = np.asarray(sb["tile_id"], dtype=str)
    m_tiles = np.asarray(matches["tile_id"], dtype=str)
    for tile in common:
        sel = m_tiles == tile
        n_a, n_b = int(np.sum(tiles_a == tile)), int(np.sum(tiles_b == tile))
        n_m = int(np.sum(sel))
        ratio = np.asarray(matches["flux_b"], float)[sel] / np.asarray(matches["flux_a"],
                                                                       float)[sel]
        ratio = ratio[np.isfinite(ratio)]
        off = dist[sel]
        row: dict[str, Any] = {
            "tile_id": tile, "n_a": n_a, "n_b": n_b, "matched": n_m,
            "only_a": n_a - n_m, "only_b": n_b - len(set(ib[sel].tolist())),
            "flux_ratio_median": float(np.median(ratio)) if len(ratio) else math.nan,
            "offset_median_arcsec": float(np.median(off)) if len(off) else math.nan,
            "offset_rms_arcsec": float(np.sqrt(np.mean(off**2))) if len(off) else math.nan,
        }
        if truth_t is not None and truth_tile is not None:
            tt = truth_t[truth_tile == tile]
            row["n_truth"] = len(tt)
            for run, src, tiles_s in (("a", sa_, tiles_a), ("b", sb, tiles_b)):
                s = src[tiles_s == tile]
                found, false = 0, len(s)
                cs = SkyCoord(np.asarray(s["ra"], float), np.asarray(s["dec"], float),
                              unit="deg") if len(s) else None
                if len(tt) and cs is not None:
                    ct = SkyCoord(np.asarray(tt["ra"], float), np.asarray(tt["dec"], float),
                                  unit="deg")
                    _, sep_t, _ = ct.match_to_catalog_sky(cs)
                    found = int(np.sum(sep_t.arcsec <= r_deg * 3600))
                if c_all is not None and cs is not None:
                    _, sep_s, _ = cs.match_to_catalog_sky(c_all)
                    false = int(np.sum(sep_s.arcsec > r_deg * 3600))
                row[f"truth_found_{run}"] = found
                row[f"completeness_{run}"] = found / len(tt) if len(tt) else math.nan
                row[f"false_positives_{run}"] = false
        rows.append(row)
    out = Table(rows=rows, names=list(rows[0]))
    for c in ("offset_median_arcsec", "offset_rms_arcsec"):
        out[c].format = ".3f"
    out["flux_ratio_median"].format = ".4f"
    return Comparison(run_a=va.run_id, run_b=vb.run_id, table_name=table,
                      radius_arcsec=r_deg * 3600.0, table=out, matches=matches)
