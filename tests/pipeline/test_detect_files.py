"""Detection on a simulated coadd against the truth and against Source Extractor, and
``lazysky detect`` end to end (simulated coadd, a real 2MASS image, bad input)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
from astropy.io import fits
from astropy.table import Table, vstack
from astropy.wcs import WCS
from conftest import INST, Survey

from lazysky.cli import main
from lazysky.pipeline import (
    SkyGrid,
    detect,
    detector_footprints,
    resample_exposure,
    stack,
    write_coadd_fits,
)
from lazysky.pipeline._sep import FLAGS, detect_pixels
from lazysky.pipeline._sep_reference import (
    find_source_extractor,
    run_source_extractor,
    write_variance_for_sextractor,
)

# as tests/conftest.py REAL_DATA (that module is not importable from here)
REAL_DATA = Path(os.environ.get("LAZYSKY_REAL_DATA",
                                Path(__file__).parents[2] / ".." / "shared" / "data" / "real"))
MATCH_ARCSEC = 1.0


class Coadd:
    def __init__(self, ds: xr.Dataset, grid: SkyGrid, path: Path, truth: Table,
                 fwhm_px: float) -> None:  # fmt: skip
        self.ds, self.grid, self.path, self.truth = ds, grid, path, truth
        self.fwhm_px = fwhm_px


@pytest.fixture(scope="module")
def coadd(survey: Survey, calibrated: list[xr.Dataset],
          tmp_path_factory: pytest.TempPathFactory) -> Coadd:  # fmt: skip
    """The test survey's 3 exposures stacked on 128-px tiles, in memory and as FITS."""
    fps = [f for cal in calibrated for f in detector_footprints(cal)]
    grid = SkyGrid.covering(fps, pixel_scale_arcsec=INST.pixel_scale_arcsec, tile_px=128)
    ds = stack([p for c in calibrated for p in resample_exposure(c, grid)], grid).compute()
    ds = ds.assign({k: v.chunk({"y": 128, "x": 128}) for k, v in ds.data_vars.items()})
    path = tmp_path_factory.mktemp("detect") / "coadd.fits"
    write_coadd_fits(ds, path)
    tabs = [Table.read(survey.raw(k, ".truth.ecsv")) for k in range(len(survey.pointings))]
    t = vstack(tabs, metadata_conflicts="silent")
    _, first = np.unique(t["id"], return_index=True)
    t = t[np.sort(first)]
    t["gx"], t["gy"] = grid.wcs.world_to_pixel_values(t["ra"], t["dec"])
    fwhm = float(np.mean([p.seeing_arcsec for p in survey.pointings])) / grid.pixel_scale_arcsec
    return Coadd(ds, grid, path, t, fwhm)


def _good_area(c: Coadd, margin: int = 8) -> Any:
    """Pixels with every exposure, unmasked, at least ``margin`` px from the edge/any gap."""
    from scipy.ndimage import binary_erosion

    full = (c.ds["count"].values == int(c.ds["count"].values.max())) & (c.ds["mask"].values == 0)
    return binary_erosion(full, iterations=margin)


def _inside(good: Any, x: Any, y: Any) -> Any:
    px, py = np.floor(np.asarray(x) + 0.5).astype(int), np.floor(np.asarray(y) + 0.5).astype(int)
    ok = (px >= 0) & (px < good.shape[1]) & (py >= 0) & (py < good.shape[0])
    out = np.zeros(len(px), dtype=bool)
    out[ok] = good[py[ok], px[ok]]
    return out


def _matched(x: Any, y: Any, tx: Any, ty: Any, r_px: float) -> Any:
    """For each (tx, ty), whether a detection lies within r_px."""
    if len(x) == 0:
        return np.zeros(len(tx), dtype=bool)
    from scipy.spatial import cKDTree

    d, _ = cKDTree(np.column_stack([x, y])).query(np.column_stack([tx, ty]))
    return np.asarray(d < r_px)


def _truth_snr(c: Coadd) -> Any:
    """Expected S/N of each truth source: its flux over the noise of an optimal (PSF-weighted)
    measurement, σ_sky · sqrt(4π σ_psf²), σ_psf from the mean seeing of the frames."""
    sigma_psf = c.fwhm_px / 2.3548
    var = c.ds["variance"].values
    px = np.clip(np.floor(c.truth["gx"] + 0.5).astype(int), 0, var.shape[1] - 1)
    py = np.clip(np.floor(c.truth["gy"] + 0.5).astype(int), 0, var.shape[0] - 1)
    sky_var = np.median(var[np.isfinite(var)])
    local = np.where(np.isfinite(var[py, px]), np.minimum(var[py, px], 10 * sky_var), np.inf)
    return np.asarray(c.truth["flux_e"]) / np.sqrt(np.maximum(local, sky_var) * 4 * np.pi
                                                   * sigma_psf**2)  # fmt: skip


def _scores(c: Coadd, cat_x: Any, cat_y: Any, good: Any) -> tuple[float, float, int, int]:
    r_px = MATCH_ARCSEC / c.grid.pixel_scale_arcsec
    t = c.truth
    snr = _truth_snr(c)
    stars = (t["kind"] == "star") & (snr >= 10) & _inside(good, t["gx"], t["gy"])
    found = _matched(cat_x, cat_y, np.asarray(t["gx"])[stars], np.asarray(t["gy"])[stars], r_px)
    inside = _inside(good, cat_x, cat_y)
    real = _matched(np.asarray(t["gx"]), np.asarray(t["gy"]), np.asarray(cat_x)[inside],
                    np.asarray(cat_y)[inside], r_px)  # fmt: skip
    return float(found.mean()), float(real.mean()), int(stars.sum()), int(inside.sum())


def test_completeness_and_purity_against_source_extractor(coadd: Coadd, tmp_path: Path) -> None:
    if find_source_extractor() is None:
        pytest.skip("Source Extractor (source-extractor) is not installed: no reference")
    good = _good_area(coadd)
    ours = detect(coadd.ds, threshold=5.0).to_table()
    var_path = write_variance_for_sextractor(coadd.ds["variance"].values, tmp_path / "var.fits")
    with fits.open(coadd.path) as hdul:  # Source Extractor reads every HDU: the image alone
        fits.PrimaryHDU(hdul[0].data, hdul[0].header).writeto(tmp_path / "image.fits")
    sex = run_source_extractor(tmp_path / "image.fits", variance=var_path, threshold=5.0,
                               min_area=5, workdir=tmp_path)  # fmt: skip
    c_ours, p_ours, n_stars, n_ours = _scores(coadd, ours["x"], ours["y"], good)
    c_sex, p_sex, _, n_sex = _scores(coadd, sex["x"], sex["y"], good)
    print(f"{n_stars} stars with S/N >= 10 in the good area: completeness lazysky "
          f"{c_ours:.3f} vs Source Extractor {c_sex:.3f}; purity lazysky {p_ours:.3f} "
          f"({n_ours} detections) vs Source Extractor {p_sex:.3f} ({n_sex})")
    assert n_stars >= 30
    assert c_ours >= c_sex
    assert c_ours >= 0.95
    assert p_ours >= 0.98
    # both see the same sky: positions of common detections agree to < 0.1 px median
    from scipy.spatial import cKDTree

    d, _ = cKDTree(np.column_stack([sex["x"], sex["y"]])).query(
        np.column_stack([ours["x"], ours["y"]]))
    assert np.median(d[d < 1.0]) < 0.1


def test_no_duplicates_at_tile_edges_and_tiles_equal_whole(coadd: Coadd) -> None:
    tiled = detect(coadd.ds, threshold=5.0).to_table()
    g = coadd.grid
    assert g.n_tiles[0] >= 3
    from scipy.spatial import cKDTree

    pairs = cKDTree(np.column_stack([tiled["x"], tiled["y"]])).query_pairs(0.5)
    assert not pairs  # no source reported twice
    whole = detect_pixels(coadd.ds.image.values, coadd.ds.variance.values, coadd.ds["mask"].values,
                          wcs=g.wcs, aperture_radius_px=2.0 / g.pixel_scale_arcsec)  # fmt: skip
    assert len(tiled) == len(whole)
    tiled.sort(["y", "x"])
    whole.sort(["y", "x"])
    for col in ("x", "y", "ra", "dec", "flux_aper", "fluxerr_aper"):
        np.testing.assert_allclose(tiled[col], whole[col], rtol=1e-7, atol=1e-7, err_msg=col)
    assert not np.any(tiled["flags"] & FLAGS["HALO"])


# --- the CLI ------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".fits", ".csv", ".parquet", ".ecsv"])
def test_cli_detect_writes_every_format(coadd: Coadd, tmp_path: Path, ext: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / f"cat{ext}"
    assert main(["detect", str(coadd.path), "--out", str(out), "--threshold", "5",
                 "--aperture-arcsec", "2.0"]) == 0  # fmt: skip
    assert "sources ->" in capsys.readouterr().out
    cat = Table.read(out)
    ref = detect(coadd.ds, threshold=5.0, aperture_radius_arcsec=2.0).to_table()
    assert len(cat) == len(ref)
    cat.sort(["y", "x"])
    ref.sort(["y", "x"])
    np.testing.assert_allclose(cat["x"], ref["x"], atol=1e-6)
    np.testing.assert_allclose(cat["flux_aper"], ref["flux_aper"], rtol=1e-6)
    for col in ("ra", "dec", "flux_kron", "fluxerr_kron", "snr", "a", "b", "theta", "flags"):
        assert col in cat.colnames
    # sky positions: the file's WCS of the pixel positions
    with fits.open(coadd.path) as hdul:
        ra, dec = WCS(hdul[0].header).pixel_to_world_values(cat["x"], cat["y"])
    np.testing.assert_allclose(cat["ra"], ra, atol=1e-9)
    np.testing.assert_allclose(cat["dec"], dec, atol=1e-9)


def test_cli_detect_on_a_calibrated_mef_finds_the_truth(survey: Survey, calibrated: list[Any],
                                                        tmp_path: Path) -> None:  # fmt: skip
    from lazysky.pipeline.fitsio import _write_calibrated, read_raw

    raw = read_raw(survey.raw(0, ".fits"))
    cal_path = tmp_path / "e0.cal.fits"
    _write_calibrated(calibrated[0].compute(), raw, cal_path)
    out = tmp_path / "e0.ecsv"
    assert main(["detect", str(cal_path), "--out", str(out)]) == 0
    cat = Table.read(out)
    assert set(cat["tile_id"]) == {str(d) for d in calibrated[0].detector.values}
    truth = Table.read(survey.raw(0, ".truth.ecsv"))
    bright = truth[(truth["kind"] == "star") & (truth["mag"] < 19.5) & ~truth["saturated"]]
    from astropy.coordinates import SkyCoord

    _, sep2d, _ = SkyCoord(bright["ra"], bright["dec"], unit="deg").match_to_catalog_sky(
        SkyCoord(cat["ra"], cat["dec"], unit="deg"))
    assert np.mean(sep2d.arcsec < MATCH_ARCSEC) > 0.9


@pytest.mark.realdata
def test_cli_detect_on_a_real_2mass_image(tmp_path: Path) -> None:
    path = REAL_DATA / "gc_2mass_k.fits"
    if not path.is_file():
        pytest.skip(f"real data not present ({path})")
    out = tmp_path / "k.fits"
    assert main(["detect", str(path), "--out", str(out)]) == 0
    cat = Table.read(out)
    with fits.open(path) as hdul:
        wcs = WCS(hdul[0].header)
        ny, nx = hdul[0].data.shape
    assert len(cat) > 300  # the Galactic Centre in K: crowded
    assert np.all((cat["x"] > -0.5) & (cat["x"] < nx - 0.5) & (cat["y"] > -0.5)
                  & (cat["y"] < ny - 0.5))  # fmt: skip
    ra, dec = wcs.pixel_to_world_values(cat["x"], cat["y"])
    np.testing.assert_allclose(cat["ra"], np.mod(ra, 360), atol=1e-9)
    np.testing.assert_allclose(cat["dec"], dec, atol=1e-9)
    # the estimated noise is the image's: the faintest detections sit near the threshold
    good = (cat["flags"] == 0) & (cat["snr"] > 0)
    assert np.percentile(cat["snr"][good], 5) < 15
    # Source Extractor on the same image (its own 64-px background and noise estimate,
    # which differ a little from SEP's in this crowded, nebulous field) finds most of them
    if find_source_extractor() is not None:
        sex = run_source_extractor(path, threshold=5.0, subtract_background=True,
                                   workdir=tmp_path)  # fmt: skip
        from scipy.spatial import cKDTree

        d, _ = cKDTree(np.column_stack([sex["x"], sex["y"]])).query(
            np.column_stack([cat["x"], cat["y"]]))
        print(f"2MASS K: lazysky {len(cat)}, Source Extractor {len(sex)}, "
              f"lazysky's with a Source Extractor counterpart within 1 px {(d < 1).sum()}")
        assert (d < 1).mean() > 0.6


def test_cli_detect_bad_input(coadd: Coadd, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "cat.txt"
    assert main(["detect", str(coadd.path), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "unknown catalogue format '.txt'" in err
    assert ".parquet" in err
    assert not out.exists()
    out = tmp_path / "cat.fits"
    out.write_text("keep me")
    assert main(["detect", str(coadd.path), "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_text() == "keep me"
    assert main(["detect", str(coadd.path), "--out", str(out), "--overwrite"]) == 0
    assert len(Table.read(out)) > 0
    assert main(["detect", str(tmp_path / "missing.fits"), "--out", str(tmp_path / "a.csv")]) == 1
    assert "no such file" in capsys.readouterr().err
    nowcs = tmp_path / "nowcs.fits"
    fits.PrimaryHDU(np.zeros((20, 20), np.float32)).writeto(nowcs)
    assert main(["detect", str(nowcs), "--out", str(tmp_path / "b.csv")]) == 1
    assert "no celestial WCS" in capsys.readouterr().err
    assert main(["detect", str(coadd.path), "--out", str(tmp_path / "c.csv"),
                 "--aperture-arcsec", "0"]) == 1  # fmt: skip
    assert "aperture radius must be > 0" in capsys.readouterr().err
    assert main(["detect", str(coadd.path), "--out", str(tmp_path / "c.csv"),
                 "--threshold", "-1"]) == 1  # fmt: skip
    assert "threshold must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "c.csv").exists()
