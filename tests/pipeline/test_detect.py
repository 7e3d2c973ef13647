"""Detection: the SEP kernels against injected sources, SEP's limits and the worker plugin,
laziness, tiles of 64 px == the whole image, difference images and forced photometry."""

from __future__ import annotations

import gc
import math
from typing import Any

import dask.array as da
import numpy as np
import pytest
import sep
import xarray as xr
from astropy.coordinates import SkyCoord
from conftest import raise_if_dask_computes
from scipy.ndimage import gaussian_filter
from scipy.signal import fftconvolve

from lazysky.errors import ParameterError
from lazysky.pipeline import (
    MaskBit,
    SepSettings,
    SkyGrid,
    detect,
    detect_difference,
    forced_photometry,
)
from lazysky.pipeline._sep import (
    DEFAULT_PIXSTACK,
    DEFAULT_SUB_OBJECT_LIMIT,
    FLAGS,
    detect_pixels,
    detect_score_pixels,
    forced_pixels,
    sep_settings_for,
)

SIGMA = 1.3  # PSF sigma, pixels (FWHM 3.06 px)
TILE = 64


def _gauss(shape: tuple[int, int], x: float, y: float, flux: float, sigma: float = SIGMA) -> Any:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return flux / (2 * np.pi * sigma**2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))


def _scene(shape: tuple[int, int], n: int, seed: int, *, flux: tuple[float, float] = (300, 5000),
           noise: float = 2.0, extra: list[tuple[float, float, float]] = ()) -> tuple[Any, ...]:  # type: ignore[assignment]
    """Gaussian stars on white noise: (image, variance, truth x, y, flux)."""
    rng = np.random.default_rng(seed)
    xs = rng.uniform(3, shape[1] - 4, n)
    ys = rng.uniform(3, shape[0] - 4, n)
    fs = 10 ** rng.uniform(math.log10(flux[0]), math.log10(flux[1]), n)
    for x, y, f in extra:
        xs, ys, fs = np.append(xs, x), np.append(ys, y), np.append(fs, f)
    img = rng.normal(0.0, noise, shape)
    for x, y, f in zip(xs, ys, fs, strict=True):
        img += _gauss(shape, x, y, f)
    return img, np.full(shape, noise**2), xs, ys, fs


def _grid_ds(img: Any, var: Any, mask: Any = None, tile: int = TILE, **extra: Any) -> xr.Dataset:
    grid = SkyGrid(150.0, 2.0, 0.5, img.shape, tile)
    mask = np.zeros(img.shape, np.uint16) if mask is None else mask
    data = {"image": img.astype(np.float32), "variance": var.astype(np.float32), "mask": mask,
            **extra}  # fmt: skip
    return xr.Dataset({k: (("y", "x"), da.from_array(v, chunks=tile)) for k, v in data.items()},
                      attrs={"grid": grid.to_dict()})  # fmt: skip


def _match(cx: Any, cy: Any, tx: Any, ty: Any, r: float = 1.0) -> Any:
    """For each truth source, the index of the nearest detection within r px (or -1)."""
    out = np.full(len(tx), -1)
    for k in range(len(tx)):
        d = np.hypot(cx - tx[k], cy - ty[k])
        if len(d) and d.min() < r:
            out[k] = int(np.argmin(d))
    return out


# --- the kernel --------------------------------------------------------------------------
def test_kernel_finds_and_measures_isolated_stars() -> None:
    shape = (120, 160)
    xs = np.array([30.3, 80.7, 130.1, 40.5, 110.9])
    ys = np.array([30.6, 25.2, 40.8, 90.4, 85.5])
    fs = np.array([2000.0, 5000.0, 1000.0, 20000.0, 3000.0])
    img, var, *_ = _scene(shape, 0, seed=1, extra=list(zip(xs, ys, fs, strict=True)))
    grid = SkyGrid(150.0, 2.0, 0.5, shape, 1024)
    cat = detect_pixels(img, var, wcs=grid.wcs, aperture_radius_px=4.0)
    assert len(cat) == 5  # no noise peak at 5 sigma
    m = _match(cat["x"], cat["y"], xs, ys, 0.2)
    assert np.all(m >= 0)
    c = cat[m]
    # positions: better than 0.1 px for these S/N
    assert np.max(np.hypot(c["x"] - xs, c["y"] - ys)) < 0.1
    ra, dec = grid.wcs.pixel_to_world_values(c["x"], c["y"])
    np.testing.assert_allclose(c["ra"], ra, atol=1e-9)
    np.testing.assert_allclose(c["dec"], dec, atol=1e-9)
    # circular aperture: the Gaussian's enclosed energy, within 4 sigma of the error plus
    # 0.5 % (the stars are point-sampled Gaussians, not pixel-integrated ones)
    expected = fs * (1 - np.exp(-(4.0**2) / (2 * SIGMA**2)))
    np.testing.assert_array_less(np.abs(c["flux_aper"] - expected),
                                 4 * c["fluxerr_aper"] + 0.005 * fs)  # fmt: skip
    np.testing.assert_allclose(c["fluxerr_aper"], 2.0 * math.sqrt(math.pi) * 4.0, rtol=1e-6)
    # Kron: most of the light (>= 94 % for a Gaussian in 2.5 Kron radii) and <= all of it
    ratio = np.asarray(c["flux_kron"] / fs)
    assert np.all(ratio > 0.93), ratio
    assert np.all(ratio < 1.02), ratio
    np.testing.assert_allclose(c["snr"], c["flux_aper"] / c["fluxerr_aper"])
    # a, b ~ sigma for a round Gaussian (isophotal moments of pixels: ~ sqrt(sigma² + 1/12)
    # and a little more for the brighter ones)
    np.testing.assert_allclose(c["a"], SIGMA, rtol=0.15)
    np.testing.assert_allclose(c["b"] / c["a"], 1.0, atol=0.1)
    assert list(cat["number"]) == [1, 2, 3, 4, 5]
    assert list(cat.colnames[:6]) == ["number", "tile_id", "x", "y", "ra", "dec"]
    assert np.all(cat["flags"] == 0)


def test_kernel_honours_the_mask_and_flags_apertures() -> None:
    shape = (80, 80)
    img, var, *_ = _scene(shape, 0, seed=2, extra=[(20.0, 20.0, 3000.0), (60.0, 55.0, 3000.0)])
    mask = np.zeros(shape, np.uint16)
    img[40, 10] = 1e5  # a hot pixel, masked: not detected
    mask[40, 10] = MaskBit.BAD | MaskBit.HOT
    mask[56, 61] = MaskBit.CR  # one pixel in the second star's aperture
    mask[5, 70] = MaskBit.EDGE  # EDGE is not a bad bit by default
    cat = detect_pixels(img, var, mask, aperture_radius_px=4.0)
    assert len(cat) == 2
    assert not np.any(np.hypot(cat["x"] - 10, cat["y"] - 40) < 3)
    flagged = cat[np.hypot(cat["x"] - 60, cat["y"] - 55) < 1]
    assert flagged["flags"][0] & FLAGS["APER_HASMASKED"]
    clean = cat[np.hypot(cat["x"] - 20, cat["y"] - 20) < 1]
    assert clean["flags"][0] == 0
    # without the mask, the hot pixel is a detection
    assert len(detect_pixels(img, var, None, aperture_radius_px=4.0)) == 3
    # a non-finite variance masks the pixel too
    v2 = var.copy()
    v2[40, 10] = np.inf
    assert len(detect_pixels(img, v2, None)) == 2


def test_kernel_estimates_variance_and_background_when_asked() -> None:
    shape = (256, 256)
    img, var, _xs, _ys, _ = _scene(shape, 6, seed=3, flux=(3000, 6000))
    sky = 100.0 + 0.01 * np.mgrid[:256, :256][1]  # a gentle gradient
    with_var = detect_pixels(img, var)
    no_var = detect_pixels(img + sky, None, subtract_background=True)
    assert len(with_var) == len(no_var) == 6
    m = _match(no_var["x"], no_var["y"], with_var["x"], with_var["y"], 0.1)
    assert np.all(m >= 0)
    # the SEP rms estimates the noise (2.0) to a few per cent
    np.testing.assert_allclose(no_var["fluxerr_aper"][m], with_var["fluxerr_aper"], rtol=0.1)
    np.testing.assert_allclose(no_var["flux_aper"][m], with_var["flux_aper"], rtol=0.05)


def test_kernel_empty_and_bad_input() -> None:
    z = np.zeros((10, 14))
    empty = detect_pixels(z, z + 1)
    assert len(empty) == 0
    assert "flux_kron" in empty.colnames
    assert len(detect_pixels(z, z + 1, np.full(z.shape, 16, np.uint16))) == 0  # all NODATA
    with pytest.raises(ParameterError, match="variance has shape"):
        detect_pixels(z, np.ones((3, 3)))
    with pytest.raises(ParameterError, match="mask has shape"):
        detect_pixels(z, z + 1, np.zeros((3, 3)))
    with pytest.raises(ParameterError, match="threshold must be > 0"):
        detect_pixels(z, z + 1, threshold=0.0)
    with pytest.raises(ParameterError, match="min_area"):
        detect_pixels(z, z + 1, min_area=0)
    with pytest.raises(ParameterError, match="aperture_radius_px"):
        detect_pixels(z, z + 1, aperture_radius_px=-1)
    with pytest.raises(ParameterError, match="odd sides"):
        detect_pixels(z, z + 1, filter_kernel=np.ones((2, 2)))
    with pytest.raises(ParameterError, match=r"filter_type must be one of \['conv', 'matched'\]"):
        detect_pixels(z, z + 1, filter_type="gauss")
    with pytest.raises(ParameterError, match="2-d"):
        detect_pixels(np.zeros(5))


def _crowded() -> tuple[Any, Any]:
    """A cluster core: 20 000 faint stars merge into one ~360 000-pixel island."""
    rng = np.random.default_rng(1)
    shape = (700, 700)
    img = rng.normal(0, 1, shape)
    n = 20_000
    xs, ys = rng.uniform(50, 650, n), rng.uniform(50, 650, n)
    pts = np.zeros(shape)
    np.add.at(pts, (ys.astype(int), xs.astype(int)), 10 ** rng.uniform(1.5, 3, n))
    return img + gaussian_filter(pts, 1.5), np.ones(shape)


def test_crowded_field_never_overflows_sep() -> None:
    img, var = _crowded()
    before = (sep.get_extract_pixstack(), sep.get_sub_object_limit())
    try:
        sep.set_extract_pixstack(DEFAULT_PIXSTACK)
        sep.set_sub_object_limit(DEFAULT_SUB_OBJECT_LIMIT)
        with pytest.raises(Exception, match="pixel buffer full"):  # SEP alone, its defaults
            sep.extract(img, 5.0, var=var)
        cat = detect_pixels(img, var)  # grows the limits and retries, with a warning
        assert len(cat) > 0
        assert sep.get_extract_pixstack() > DEFAULT_PIXSTACK
        # sized up front (here for a 2048-px tile): no retry needed
        sep.set_extract_pixstack(DEFAULT_PIXSTACK)
        sep.set_sub_object_limit(DEFAULT_SUB_OBJECT_LIMIT)
        pixstack, limit = sep_settings_for((2048, 2048))
        assert pixstack == 2048 * 2048 // 8
        assert limit == 2048 * 2048 // 256
        SepSettings.for_shape((2048, 2048)).setup(worker=None)
        assert sep.get_extract_pixstack() == pixstack
        again = detect_pixels(img, var)
        assert len(again) == len(cat)
    finally:
        sep.set_extract_pixstack(max(before[0], sep.get_extract_pixstack()))
        sep.set_sub_object_limit(max(before[1], sep.get_sub_object_limit()))


@pytest.mark.parametrize("processes", [False, True])
def test_sep_settings_plugin_sets_the_worker_once(processes: bool) -> None:
    distributed = pytest.importorskip("distributed")
    plugin = SepSettings(pixstack=2_345_678, sub_object_limit=4321)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=processes,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:  # fmt: skip
        client.register_plugin(plugin)
        got = client.run(lambda: (sep.get_extract_pixstack(), sep.get_sub_object_limit()))
        assert list(got.values()) == [(2_345_678, 4321)] or (
            not processes and all(v[0] >= 2_345_678 and v[1] >= 4321 for v in got.values())
        )
        # and tasks run on that worker see it
        assert client.submit(sep.get_extract_pixstack, pure=False).result() >= 2_345_678
    gc.collect()  # anything the cluster leaked (sockets) is reported here, not later
    with pytest.raises(ParameterError, match=">= 1"):
        SepSettings(pixstack=0)


# --- lazy, tiled ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def field() -> tuple[xr.Dataset, Any, Any, Any]:
    """200 x 260 px, 64 px tiles, 70 stars, one straddling the corner of 4 tiles."""
    img, var, xs, ys, fs = _scene((200, 260), 70, seed=5, extra=[(63.5, 63.5, 4000.0)])
    return _grid_ds(img, var), xs, ys, fs


def test_detect_is_lazy_one_named_task_per_tile(field: tuple[xr.Dataset, Any, Any, Any]) -> None:
    ds = field[0]
    with raise_if_dask_computes():
        src = detect(ds, aperture_radius_px=4.0)
    grid = SkyGrid(**{**ds.attrs["grid"], "shape": tuple(ds.attrs["grid"]["shape"])})
    assert list(src.tiles) == grid.tile_ids()
    for tile, d in src.tiles.items():
        assert str(d.key).startswith(f"detect-{tile}-")
    assert src.kind == "coadd"
    assert src.halo_px == 32  # no PSF FWHM known: the default
    assert detect(ds.assign_attrs(psf_fwhm_px=3.06), aperture_radius_px=4.0).halo_px == 16
    assert detect(ds, halo_px=40).halo_px == 40


def test_tiled_catalogue_equals_the_whole_image(field: tuple[xr.Dataset, Any, Any, Any]) -> None:
    ds, _xs, _ys, _ = field
    src = detect(ds, aperture_radius_px=4.0, psf_fwhm_px=2.355 * SIGMA)
    tiled = src.to_table(scheduler="sync")
    grid = SkyGrid(**{**ds.attrs["grid"], "shape": tuple(ds.attrs["grid"]["shape"])})
    whole = detect_pixels(ds.image.values, ds.variance.values, ds["mask"].values, wcs=grid.wcs,
                          aperture_radius_px=4.0)  # fmt: skip
    assert len(tiled) == len(whole) >= 60
    # every source once: in the tile that holds its centroid's pixel
    for row in tiled:
        sy, sx = grid.tile_slices(str(row["tile_id"]))
        assert sy.start <= math.floor(row["y"] + 0.5) < sy.stop
        assert sx.start <= math.floor(row["x"] + 0.5) < sx.stop
    corner = np.hypot(tiled["x"] - 63.5, tiled["y"] - 63.5) < 0.3
    assert corner.sum() == 1
    assert np.all(tiled["flags"] & FLAGS["HALO"] == 0)
    tiled.sort(["y", "x"])
    whole.sort(["y", "x"])
    for col in ("x", "y", "ra", "dec", "flux_aper", "fluxerr_aper", "peak"):
        np.testing.assert_allclose(tiled[col], whole[col], rtol=1e-9, atol=1e-9, err_msg=col)
    # SEP hands a blend's faint pixels to its children at random (like Source Extractor),
    # so the shapes and Kron fluxes of deblended sources (flag 1) depend on what else is in
    # the image; every other source is identical
    alone = (whole["flags"] & FLAGS["OBJ_MERGED"]) == 0
    assert alone.sum() > 0.7 * len(whole)
    for col in ("a", "b", "theta", "flux_kron", "fluxerr_kron", "npix", "flags"):
        np.testing.assert_allclose(tiled[col][alone], whole[col][alone], rtol=1e-9, err_msg=col)
    # numbers are 1..n within each tile
    for tile in set(tiled["tile_id"]):
        nums = sorted(tiled["number"][tiled["tile_id"] == tile])
        assert nums == list(range(1, len(nums) + 1))


def test_a_thin_halo_flags_what_it_cuts(field: tuple[xr.Dataset, Any, Any, Any]) -> None:
    ds = field[0]
    cat = detect(ds, aperture_radius_px=4.0, halo_px=2).to_table(scheduler="sync")
    assert np.any(cat["flags"] & FLAGS["HALO"])


def test_detect_rejects_bad_input(field: tuple[xr.Dataset, Any, Any, Any]) -> None:
    ds = field[0]
    with pytest.raises(ParameterError, match="no 'grid' attribute"):
        detect(ds.drop_attrs())
    with pytest.raises(ParameterError, match="lacks variables"):
        detect(ds.drop_vars("variance"))
    with pytest.raises(ParameterError, match="not both"):
        detect(ds, aperture_radius_px=3.0, aperture_radius_arcsec=1.0)
    with pytest.raises(ParameterError, match="halo_px"):
        detect(ds, halo_px=-1)
    with pytest.raises(ParameterError, match="threshold"):
        detect(ds, threshold=-2.0)
    with pytest.raises(ParameterError, match="tile id"):
        detect(ds, tiles=["nope"])
    with pytest.raises(ParameterError, match=r"xarray\.Dataset"):
        detect(ds.image)  # type: ignore[arg-type]


# --- difference images -------------------------------------------------------------------
def _psf_stamp(sigma: float = SIGMA, half: int = 7) -> Any:
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    p = np.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    return p / p.sum()


@pytest.fixture(scope="module")
def difference() -> tuple[xr.Dataset, Any, Any, Any, Any]:
    """D = noise + 6 brightening and 6 fading PSFs; S_corr = (P ⋆ D) / its sigma."""
    rng = np.random.default_rng(7)
    shape = (192, 192)
    noise = 3.0
    d = rng.normal(0, noise, shape)
    lattice = np.mgrid[0:3, 0:4].reshape(2, -1)  # 12 well separated positions, jittered
    ys = 25 + 60 * lattice[0] + rng.uniform(-8, 8, 12)
    xs = 20 + 48 * lattice[1] + rng.uniform(-8, 8, 12)
    xs[0], ys[0] = 63.7, 64.2  # on a tile corner
    fs = np.where(np.arange(12) % 2 == 0, 1.0, -1.0) * rng.uniform(800, 3000, 12)
    for x, y, f in zip(xs, ys, fs, strict=True):
        d += _gauss(shape, x, y, f)
    var = np.full(shape, noise**2)
    p = _psf_stamp()
    score = fftconvolve(d, p[::-1, ::-1], mode="same") / np.sqrt(noise**2 * (p**2).sum())
    ds = _grid_ds(d, var, score=score.astype(np.float32))
    return ds, xs, ys, fs, p


def test_detect_difference_finds_both_signs(difference: tuple[Any, ...]) -> None:
    ds, xs, ys, fs, psf = difference
    with raise_if_dask_computes():
        src = detect_difference(ds, psf=psf, aperture_radius_px=4.0)
    assert all(str(d.key).startswith(f"detect-{t}-") for t, d in src.tiles.items())
    cat = src.to_table(scheduler="sync")
    assert len(cat) == 12  # nothing else at 5 sigma
    m = _match(cat["x"], cat["y"], xs, ys, 0.3)
    assert np.all(m >= 0)
    assert len(set(m)) == 12
    c = cat[m]
    np.testing.assert_array_equal(c["sign"], np.sign(fs).astype(int))
    assert np.all(np.sign(c["snr"]) == np.sign(fs))
    # PSF flux: unbiased within 4 sigma; aperture flux: the enclosed energy
    np.testing.assert_array_less(np.abs(c["flux_psf"] - fs), 4 * c["fluxerr_psf"])
    ee = 1 - np.exp(-(4.0**2) / (2 * SIGMA**2))
    np.testing.assert_array_less(np.abs(c["flux_aper"] - fs * ee), 4 * c["fluxerr_aper"])
    # the PSF flux error is the optimal one: sigma / sqrt(sum P^2) (of the shifted stamp)
    np.testing.assert_allclose(c["fluxerr_psf"], 3.0 / np.sqrt((psf**2).sum()), rtol=0.01)
    for name in ("flux_aper", "fluxerr_aper", "flux_psf", "fluxerr_psf", "sign", "tile_id"):
        assert name in cat.colnames
    assert "flux_kron" not in cat.colnames


def test_detect_difference_tiled_equals_whole_and_no_psf_gives_nan(
    difference: tuple[Any, ...],
) -> None:
    ds, *_ = difference
    tiled = detect_difference(ds, aperture_radius_px=4.0).to_table(scheduler="sync")
    whole = detect_score_pixels(ds.image.values, ds.variance.values, ds.score.values,
                                ds["mask"].values, aperture_radius_px=4.0)  # fmt: skip
    assert np.all(np.isnan(tiled["flux_psf"]))
    tiled.sort(["y", "x"])
    whole.sort(["y", "x"])
    for col in ("x", "y", "flux_aper", "sign", "snr"):
        np.testing.assert_allclose(tiled[col], whole[col], rtol=1e-9, err_msg=col)
    # per-tile PSF stamps (tile_y, tile_x, v, u), lazy: the same as one fixed stamp
    psf = difference[4]
    nty, ntx = 3, 3
    stamps = xr.DataArray(da.from_array(np.broadcast_to(psf, (nty, ntx, *psf.shape)).copy(),
                                        chunks=(1, 1, *psf.shape)),
                          dims=("tile_y", "tile_x", "v", "u"))  # fmt: skip
    with raise_if_dask_computes():
        lazy = detect_difference(ds, psf=stamps, aperture_radius_px=4.0)
    a = lazy.to_table(scheduler="sync")
    b = detect_difference(ds, psf=psf, aperture_radius_px=4.0).to_table(scheduler="sync")
    np.testing.assert_allclose(a["flux_psf"], b["flux_psf"], rtol=1e-12)
    with pytest.raises(ParameterError, match="per-tile psf"):
        detect_difference(ds, psf=stamps[:2])
    with pytest.raises(ParameterError, match="lacks variables"):
        detect_difference(ds.drop_vars("score"))
    with pytest.raises(ParameterError, match="odd sides"):
        detect_difference(ds, psf=np.ones((4, 4)))


# --- forced photometry -------------------------------------------------------------------
def test_forced_photometry_at_sky_positions(field: tuple[xr.Dataset, Any, Any, Any]) -> None:
    ds, xs, ys, _fs = field
    grid = SkyGrid(**{**ds.attrs["grid"], "shape": tuple(ds.attrs["grid"]["shape"])})
    ra, dec = grid.wcs.pixel_to_world_values(xs[:5], ys[:5])
    ra = np.append(ra, [grid.ra_deg + 1.0, ra[0]])  # one far off the grid; one masked
    dec = np.append(dec, [grid.dec_deg, dec[0]])
    masked = ds.copy()
    m = np.zeros(grid.shape, np.uint16)
    m[round(ys[0]), round(xs[0])] = MaskBit.NODATA
    masked["mask"] = (("y", "x"), da.from_array(m, chunks=TILE))
    with raise_if_dask_computes():
        lc = forced_photometry(masked, ra, dec, radius_arcsec=2.0)
    assert all(str(d.key).startswith("forced-") for t, d in lc.tiles.items() if t != "off-grid")
    t = lc.to_table(scheduler="sync")
    assert list(t["index"]) == list(range(7))
    np.testing.assert_allclose(t["ra"], ra)
    img = ds.image.values.astype(float)
    var = ds.variance.values.astype(float)
    ref, referr, _ = sep.sum_circle(img, xs[1:5], ys[1:5], 4.0, var=var, subpix=0)
    np.testing.assert_allclose(t["flux"][1:5], ref, rtol=1e-6)
    np.testing.assert_allclose(t["fluxerr"][1:5], referr, rtol=1e-6)
    assert np.isnan(t["flux"][5])
    assert t["flags"][5] & FLAGS["OFF_IMAGE"]
    assert t["tile_id"][5] == ""
    assert np.isnan(t["flux"][0])
    assert t["flags"][0] & FLAGS["MASKED"]
    # a SkyCoord works the same
    t2 = forced_photometry(ds, SkyCoord(ra[1:3], dec[1:3], unit="deg")).to_table()
    np.testing.assert_allclose(t2["flux"], ref[:2], rtol=1e-6)


def test_forced_photometry_bad_input(field: tuple[xr.Dataset, Any, Any, Any]) -> None:
    ds = field[0]
    with pytest.raises(ParameterError, match="dec is required"):
        forced_photometry(ds, [150.0])
    with pytest.raises(ParameterError, match="one length"):
        forced_photometry(ds, [150.0, 150.1], [2.0])
    with pytest.raises(ParameterError, match="not valid"):
        forced_photometry(ds, [150.0], [95.0])
    with pytest.raises(ParameterError, match="> 0"):
        forced_photometry(ds, [150.0], [2.0], radius_arcsec=0.0)
    with pytest.raises(ParameterError, match="SkyCoord alone"):
        forced_photometry(ds, SkyCoord(150.0, 2.0, unit="deg"), [2.0])
    f, _e, fl = forced_pixels(np.ones((5, 5)), np.ones((5, 5)), None, [np.nan], [1.0],
                             radius_px=1.0)  # fmt: skip
    assert np.isnan(f[0])
    assert fl[0] == FLAGS["OFF_IMAGE"]


@pytest.mark.parametrize(
    "name", ["lazysky.pipeline._sep", "lazysky.pipeline.detect", "lazysky.pipeline._sep_reference"]
)
def test_docstring_examples_run(name: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
