"""``lazysky diff``: two FITS images on different pixel grids -> DIFF.fits on the reference's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from scipy import ndimage

from lazysky.cli import main
from lazysky.pipeline import SkyGrid
from lazysky.pipeline.psf import _moffat

SHAPE = (256, 256)
SHIFT = (3.3, -2.6)  # science pixel = reference pixel + SHIFT (x, y)
TRANSIENT = (140.0, 101.0, 6000.0)  # reference pixel x, y; flux (e⁻)


def _render(positions: np.ndarray, fluxes: np.ndarray, fwhm: float, sigma: float,
            seed: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    rng = np.random.default_rng(seed)
    img = np.zeros(SHAPE)
    for (x, y), f in zip(positions, fluxes, strict=True):
        ix, iy = round(x), round(y)
        if 12 <= ix < SHAPE[1] - 12 and 12 <= iy < SHAPE[0] - 12:
            img[iy - 12 : iy + 13, ix - 12 : ix + 13] += f * _moffat(25, fwhm, 3.0, x - ix, y - iy)
    var = img + sigma**2
    return (img + rng.normal(0, 1, SHAPE) * np.sqrt(var)).astype(np.float32), var


def _write(path: Path, img: np.ndarray, var: np.ndarray, wcs: WCS) -> None:
    h = wcs.to_header()
    h["BUNIT"] = "electron"
    fits.HDUList([fits.PrimaryHDU(img, header=h),
                  fits.ImageHDU(var.astype(np.float32), header=wcs.to_header(),
                                name="VARIANCE")]).writeto(path)  # fmt: skip


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, WCS]:
    root = tmp_path_factory.mktemp("diff-cli")
    ref_wcs = SkyGrid(150.0, 2.0, 0.5, SHAPE).wcs
    sci_wcs = ref_wcs.deepcopy()
    sci_wcs.wcs.crpix = [sci_wcs.wcs.crpix[0] + SHIFT[0], sci_wcs.wcs.crpix[1] + SHIFT[1]]
    sci_wcs.wcs.set()
    rng = np.random.default_rng(4)
    pos = rng.uniform(15, 241, (40, 2))
    flux = 10 ** rng.uniform(3.5, 5.0, 40)
    ref_img, ref_var = _render(pos, 2.0 * flux, 3.2, 3.0, 1)  # deeper: twice the flux
    sci_pos = np.vstack([pos, TRANSIENT[:2]]) + SHIFT
    sci_img, sci_var = _render(sci_pos, np.append(flux, TRANSIENT[2]), 2.6, 5.0, 2)
    _write(root / "ref.fits", ref_img, ref_var, ref_wcs)
    _write(root / "sci.fits", sci_img, sci_var, sci_wcs)
    return root / "sci.fits", root / "ref.fits", ref_wcs


def test_lazysky_diff_writes_d_and_scorr_on_the_reference_grid(
    pair: tuple[Path, Path, WCS], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sci, ref, ref_wcs = pair
    out = tmp_path / "diff.fits"
    assert main(["diff", str(sci), str(ref), "--out", str(out), "--astrometric-sigma",
                 "auto"]) == 0  # fmt: skip
    assert "flux ratio" in capsys.readouterr().out
    with fits.open(out) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "SCORR", "VARIANCE", "MASK", "PSF",
                                          "PSF_SCI", "PSF_REF"]  # fmt: skip
        assert hdul[0].data.shape == SHAPE
        for name in ("PSF", "PSF_SCI", "PSF_REF"):  # one normalised stamp per tile
            cube = hdul[name].data
            assert cube.ndim == 4
            assert hdul[name].header["TILEPX"] > 0
            np.testing.assert_allclose(cube.sum(axis=(2, 3)), 1.0, atol=0.01)
        w = WCS(hdul[0].header)
        np.testing.assert_allclose(w.wcs.crpix, ref_wcs.wcs.crpix)
        np.testing.assert_allclose(w.wcs.crval, ref_wcs.wcs.crval)
        ratio = hdul[0].header["FLXRATIO"]
        score, d, mask = hdul["SCORR"].data, hdul[0].data, hdul["MASK"].data
    print(f"flux ratio {ratio:.4f}; max |S_corr| {np.abs(score).max():.1f}")
    assert ratio == pytest.approx(2.0, rel=0.03)
    x, y, f = TRANSIENT
    iy, ix = np.unravel_index(np.argmax(np.where(mask == 0, np.abs(score), 0)), SHAPE)
    assert (ix, iy) == (round(x), round(y))
    assert d[round(y) - 10 : round(y) + 11, round(x) - 10 : round(x) + 11].sum() == pytest.approx(
        f, rel=0.1
    )
    # only the transient stands out: the 40 stars subtract (the edges of the resampled
    # science image are flagged): one connected 5σ footprint of |S_corr|, the transient's
    labels, n = ndimage.label(np.where(mask == 0, np.abs(score), 0.0) >= 5)
    print(f"5σ footprints: {n}")
    assert n == 1
    assert labels[round(y), round(x)] == 1


def test_lazysky_diff_refuses_existing_output_and_names_missing_files(
    pair: tuple[Path, Path, WCS], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sci, ref, _ = pair
    out = tmp_path / "diff.fits"
    out.write_bytes(b"keep me")
    assert main(["diff", str(sci), str(ref), "--out", str(out)]) == 1
    assert "exists" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert main(["diff", str(tmp_path / "nope.fits"), str(ref), "--out",
                 str(tmp_path / "d.fits")]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "nope.fits" in err
    assert "no such file" in err
    assert main(["diff", str(sci), str(ref), "--out", str(tmp_path / "d.fits"),
                 "--astrometric-sigma", "x"]) == 1  # fmt: skip
    assert "--astrometric-sigma" in capsys.readouterr().err


def test_lazysky_diff_sources_lists_the_transient(
    pair: tuple[Path, Path, WCS], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from astropy.table import Table

    sci, ref, ref_wcs = pair
    out, cat = tmp_path / "diff.fits", tmp_path / "dia.csv"
    assert main(["diff", str(sci), str(ref), "--out", str(out), "--sources", str(cat),
                 "--astrometric-sigma", "auto"]) == 0  # fmt: skip
    assert "1 sources (1 brighter, 0 fainter" in capsys.readouterr().out
    found = Table.read(cat, format="ascii.csv")
    x, y, _ = TRANSIENT
    assert len(found) == 1
    assert int(found["sign"][0]) == 1
    assert (found["x"][0], found["y"][0]) == (pytest.approx(x, abs=0.3), pytest.approx(y, abs=0.3))
    ra, dec = ref_wcs.pixel_to_world_values(x, y)
    assert (found["ra"][0], found["dec"][0]) == (pytest.approx(ra, abs=1e-4),
                                                 pytest.approx(dec, abs=1e-4))  # fmt: skip
    # an unknown catalogue format is refused before any work, nothing written
    bad = tmp_path / "d2.fits"
    assert main(["diff", str(sci), str(ref), "--out", str(bad), "--sources",
                 str(tmp_path / "dia.txt")]) == 1  # fmt: skip
    assert "unknown catalogue format" in capsys.readouterr().err
    assert not bad.exists()


def test_lazysky_diff_alard_lupton_finds_the_transient(
    pair: tuple[Path, Path, WCS], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--method alard-lupton``: the kernel fit's D holds the transient with its flux."""
    sci, ref, _ = pair
    out = tmp_path / "diff-al.fits"
    assert main(["diff", str(sci), str(ref), "--out", str(out), "--method",
                 "alard-lupton"]) == 0  # fmt: skip
    assert "alard-lupton" in capsys.readouterr().out
    with fits.open(out) as hdul:
        assert hdul[0].header["DIFFMETH"] == "alard-lupton"
        score, d, mask = hdul["SCORR"].data, hdul[0].data, hdul["MASK"].data
    x, y, f = TRANSIENT
    iy, ix = np.unravel_index(np.argmax(np.where(mask == 0, np.abs(score), 0)), SHAPE)
    assert (ix, iy) == (round(x), round(y))
    assert d[round(y) - 10 : round(y) + 11, round(x) - 10 : round(x) + 11].sum() == pytest.approx(
        f, rel=0.1
    )
