"""One exposure: pointing, WCS per detector, rendering per detector, FITS headers, truth.

:func:`render_detector` is the unit of parallel work (one task per detector);
:func:`exposure_hdul` assembles the multi-extension FITS file from the detectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS
from numpy.typing import NDArray

from lazysky.simulator.detector import DetectorModel, detector_model, read_out
from lazysky.simulator.instruments import Instrument
from lazysky.simulator.render import add_point_sources, add_sersic_galaxies
from lazysky.simulator.scene import Scene

__all__ = [
    "DetectorResult",
    "Pointing",
    "detector_wcs",
    "exposure_hdul",
    "focal_plane_wcs",
    "render_detector",
]

ImageType = Literal["object", "bias", "dark", "flat"]
CHECKSUM_NOTE = "lazysky simulator"  # fixed CHECKSUM comment: same seed, same bytes


@dataclass(frozen=True)
class Pointing:
    """Everything that defines one exposure besides the scene."""

    exposure_id: str
    image_type: ImageType
    mjd: float
    exptime_s: float
    filter: str
    ra_deg: float
    dec_deg: float
    pa_deg: float
    seeing_arcsec: float
    sky_e_per_s_px: float
    epoch: int = -1
    dither: int = -1
    field: str = ""
    flat_level_e: float = 0.0


def focal_plane_wcs(inst: Instrument, ra_deg: float, dec_deg: float, pa_deg: float) -> WCS:
    """TAN WCS of the focal plane: pixel (0, 0) at the boresight, North rotated by PA."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra_deg, dec_deg]
    w.wcs.crpix = [1.0, 1.0]
    s = inst.pixel_scale_arcsec / 3600.0
    c, n = math.cos(math.radians(pa_deg)), math.sin(math.radians(pa_deg))
    w.wcs.cd = [[-s * c, s * n], [s * n, s * c]]
    w.wcs.radesys = "ICRS"
    return w


def detector_wcs(inst: Instrument, index: int, ra_deg: float, dec_deg: float, pa_deg: float) -> WCS:
    """TAN WCS of detector ``index``: the focal plane's, shifted to the detector's origin."""
    w = focal_plane_wcs(inst, ra_deg, dec_deg, pa_deg)
    det = inst.detectors[index]
    w.wcs.crpix = [1.0 - det.x0, 1.0 - det.y0]
    return w


def _wcs_cards(w: WCS) -> list[tuple[str, object, str]]:
    """WCS keywords written by hand (CD matrix), so headers are stable across versions."""
    cd = w.wcs.cd
    return [
        ("WCSAXES", 2, "number of WCS axes"),
        ("CTYPE1", "RA---TAN", "gnomonic projection"),
        ("CTYPE2", "DEC--TAN", "gnomonic projection"),
        ("CUNIT1", "deg", ""),
        ("CUNIT2", "deg", ""),
        ("CRVAL1", float(w.wcs.crval[0]), "[deg] RA of the tangent point"),
        ("CRVAL2", float(w.wcs.crval[1]), "[deg] Dec of the tangent point"),
        ("CRPIX1", float(w.wcs.crpix[0]), "tangent point, 1-based pixel x"),
        ("CRPIX2", float(w.wcs.crpix[1]), "tangent point, 1-based pixel y"),
        ("CD1_1", float(cd[0][0]), "[deg/px]"),
        ("CD1_2", float(cd[0][1]), "[deg/px]"),
        ("CD2_1", float(cd[1][0]), "[deg/px]"),
        ("CD2_2", float(cd[1][1]), "[deg/px]"),
        ("RADESYS", "ICRS", "reference frame"),
    ]


@dataclass(frozen=True)
class DetectorResult:
    """What one detector task returns: the raw array, its header cards, its truth."""

    index: int
    data: NDArray[np.uint16]
    cards: list[tuple[str, object, str]]
    truth: Table
    cosmic_rays: Table


def _sources_on(
    scene: Scene, p: Pointing, inst: Instrument, index: int, margin: float
) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Rows of the scene near detector ``index``, their pixel x, y and magnitude."""
    ra, dec = scene.positions(p.mjd)
    w = detector_wcs(inst, index, p.ra_deg, p.dec_deg, p.pa_deg)
    # Drop what is far from the boresight before projecting (TAN misbehaves beyond 90°).
    cosd = math.cos(math.radians(p.dec_deg))
    near = np.hypot(((ra - p.ra_deg + 180) % 360 - 180) * cosd, dec - p.dec_deg) < 5.0
    rows = np.flatnonzero(near)
    x, y = w.wcs_world2pix(ra[rows], dec[rows], 0)
    ny, nx = inst.detector_shape
    ok = (x > -margin) & (x < nx - 1 + margin) & (y > -margin) & (y < ny - 1 + margin)
    mag = scene.magnitudes(p.mjd)[rows[ok]]
    return rows[ok], x[ok], y[ok], mag


def render_detector(
    inst: Instrument,
    scene: Scene | None,
    p: Pointing,
    index: int,
    seed: int,
    stream: tuple[int, ...],
) -> DetectorResult:
    """Render detector ``index`` of pointing ``p``: a pure function of its arguments.

    ``stream`` keys this detector's random numbers (with ``seed``), so the result does
    not depend on which worker runs it or in what order.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(*stream, index)))
    model = detector_model(inst, index)
    ny, nx = inst.detector_shape
    band = inst.band(p.filter)
    fwhm_px = p.seeing_arcsec / inst.pixel_scale_arcsec
    light: NDArray[np.float64] | None = None
    truth = Table(
        names=("id", "kind", "ra", "dec", "detector", "x", "y", "flux_e", "mag", "saturated"),
        dtype=(np.int64, "<U9", float, float, "<U16", float, float, float, float, bool),
    )
    if p.image_type == "flat":
        light = np.full((ny, nx), p.flat_level_e)
    elif p.image_type == "object":
        light = np.full((ny, nx), p.sky_e_per_s_px * p.exptime_s)
    if p.image_type == "object" and scene is not None and light is not None:
        rows, x, y, mag = _sources_on(scene, p, inst, index, margin=60.0)
        with np.errstate(over="ignore"):
            flux = (
                np.where(np.isfinite(mag), 10 ** (-0.4 * (mag - band.zeropoint_mag)), 0.0)
                * p.exptime_s
            )
        table = scene.table
        point = np.asarray(table["kind"][rows] != "galaxy") & (flux > 0)
        add_point_sources(
            light, x[point], y[point], flux[point], fwhm_px=fwhm_px, beta=inst.psf_beta
        )
        gal = ~point & (flux > 0)
        g = rows[gal]
        add_sersic_galaxies(
            light,
            x[gal],
            y[gal],
            flux[gal],
            r_eff_px=np.asarray(table["r_eff_arcsec"][g]) / inst.pixel_scale_arcsec,
            sersic_n=np.asarray(table["sersic_n"][g]),
            axis_ratio=np.asarray(table["axis_ratio"][g]),
            theta_rad=np.radians(np.asarray(table["pa_deg"][g]) + p.pa_deg),
            psf_fwhm_px=fwhm_px,
            psf_beta=inst.psf_beta,
        )
        on = (flux > 0) & (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
        ra, dec = scene.positions(p.mjd)
        truth = Table(
            {
                "id": np.asarray(table["id"][rows[on]]),
                "kind": np.asarray(table["kind"][rows[on]]),
                "ra": ra[rows[on]],
                "dec": dec[rows[on]],
                "detector": np.full(int(on.sum()), inst.detectors[index].name, dtype="<U16"),
                "x": x[on],
                "y": y[on],
                "flux_e": flux[on],
                "mag": mag[on],
                "saturated": np.zeros(int(on.sum()), dtype=bool),
            }
        )
    readout = read_out(
        inst, model, light, exptime_s=p.exptime_s, rng=rng, cosmic_rays=p.exptime_s > 0
    )
    if len(truth):
        iy = np.clip(np.floor(np.asarray(truth["y"]) + 0.5).astype(int), 0, ny - 1)
        ix = np.clip(np.floor(np.asarray(truth["x"]) + 0.5).astype(int), 0, nx - 1)
        truth["saturated"] = readout.saturated[iy, ix]
    cr = readout.cosmic_rays
    cosmics = Table(
        {
            "detector": np.full(cr.x.size, inst.detectors[index].name, dtype="<U16"),
            "x": cr.x.astype(np.int32),
            "y": cr.y.astype(np.int32),
            "electrons": cr.electrons.astype(np.float32),
        }
    )
    return DetectorResult(index, readout.data, _detector_cards(inst, model, p), truth, cosmics)


def _detector_cards(
    inst: Instrument, model: DetectorModel, p: Pointing
) -> list[tuple[str, object, str]]:
    ny, nx = inst.detector_shape
    cards: list[tuple[str, object, str]] = [
        ("EXTNAME", model.name, "detector name"),
        ("DETECTOR", model.name, "detector name"),
        ("CCDNUM", model.index + 1, "detector number"),
        ("IMAGETYP", p.image_type, "object, bias, dark or flat"),
        ("EXPTIME", float(p.exptime_s), "[s] exposure time"),
        ("FILTER", p.filter, "filter"),
        ("DATE-OBS", Time(p.mjd, format="mjd", scale="utc").isot, "UTC start of exposure"),
        ("MJD-OBS", float(p.mjd), "[d] MJD (UTC) start of exposure"),
        ("GAIN", round(model.gain, 5), "[e-/ADU] gain"),
        ("RDNOISE", round(model.read_noise_e, 4), "[e-] read noise"),
        ("SATURATE", float(model.saturate_adu), "[ADU] saturation level"),
        ("BUNIT", "ADU", "raw counts"),
        ("DATASEC", f"[1:{nx},1:{ny}]", "imaging area (1-based, inclusive)"),
    ]
    if inst.overscan_px:
        cards.append(("BIASSEC", f"[{nx + 1}:{nx + inst.overscan_px},1:{ny}]", "overscan strip"))
    w = detector_wcs(inst, model.index, p.ra_deg, p.dec_deg, p.pa_deg)
    return cards + _wcs_cards(w)


def _primary_header(inst: Instrument, p: Pointing, seed: int, version: str) -> fits.Header:
    h = fits.Header()
    for key, value, comment in [
        ("ORIGIN", "lazysky simulator", "made by"),
        ("LZSVERS", version, "lazysky version"),
        ("TELESCOP", inst.telescope, "telescope"),
        ("INSTRUME", inst.name, "instrument"),
        ("EXPID", p.exposure_id, "exposure id"),
        ("IMAGETYP", p.image_type, "object, bias, dark or flat"),
        ("OBJECT", p.field or p.image_type, "field name"),
        ("FILTER", p.filter, "filter"),
        ("EXPTIME", float(p.exptime_s), "[s] exposure time"),
        ("DATE-OBS", Time(p.mjd, format="mjd", scale="utc").isot, "UTC start of exposure"),
        ("MJD-OBS", float(p.mjd), "[d] MJD (UTC) start of exposure"),
        ("RA", float(p.ra_deg), "[deg] boresight RA (ICRS)"),
        ("DEC", float(p.dec_deg), "[deg] boresight Dec (ICRS)"),
        ("ROTANGLE", float(p.pa_deg), "[deg] position angle of the focal plane"),
        ("SEEING", round(float(p.seeing_arcsec), 4), "[arcsec] PSF FWHM"),
        ("VISIT", int(p.epoch), "epoch index in the survey (-1: calibration)"),
        ("DITHER", int(p.dither), "dither index within the epoch"),
        ("NDET", inst.n_detectors, "detectors in the instrument"),
        ("SIMSEED", int(seed), "simulator seed"),
    ]:
        h[key] = (value, comment)
    return h


def exposure_hdul(
    inst: Instrument, p: Pointing, detectors: list[DetectorResult], *, seed: int, version: str
) -> fits.HDUList:
    """The multi-extension FITS file of one exposure, with CHECKSUM/DATASUM on every HDU."""
    hdus: list[fits.PrimaryHDU | fits.ImageHDU] = [
        fits.PrimaryHDU(header=_primary_header(inst, p, seed, version))
    ]
    for det in sorted(detectors, key=lambda d: d.index):
        header = fits.Header()
        for key, value, comment in det.cards:
            header[key] = (value, comment)
        hdus.append(fits.ImageHDU(data=det.data, header=header, uint=True))
    hdul = fits.HDUList(hdus)
    hdul[0].header["NEXTEND"] = (len(hdus) - 1, "number of extensions")
    for hdu in hdul:
        hdu.add_checksum(when=CHECKSUM_NOTE)
    return hdul
