"""FITS in and out of the pipeline: what ``lazysky calibrate`` and ``lazysky coadd`` call.

* :func:`read_raw` — a raw MEF exposure (bias, dark, flat or science) as the exposure
  Dataset the pipeline takes (``sci (detector, y, x)``, per-detector keywords).
* :func:`calibrate_files` — masters from calibration files, then calibrate raw files and
  write each as a calibrated MEF: PRIMARY (the raw primary header + one HISTORY line per
  step), then per detector ``<DET>`` (e⁻, float32, WCS), ``<DET>_VAR``, ``<DET>_MASK``.
* :func:`read_calibrated` — calibrated MEFs like those, or plain single-image FITS with a
  celestial WCS (variance estimated from the sky noise), as calibrated Datasets.
* :func:`coadd_files` — resample and stack calibrated files onto a covering
  :class:`~lazysky.pipeline.SkyGrid` and write the coadd FITS.

Outputs are written to a temporary name next to the target and renamed, so a failure
leaves no partial file.

Examples
--------
>>> from lazysky.pipeline.fitsio import calibrate_files, coadd_files
>>> calibrate_files(["raw/e0.fits"], "cal.fits", bias=["calib/b0.fits"])  # doctest: +SKIP
>>> coadd_files(["cal0.fits", "cal1.fits"], "coadd.fits")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning
from astropy.wcs import WCS, FITSFixedWarning
from dask.base import tokenize
from dask.delayed import delayed
from numpy.typing import NDArray

from lazysky.errors import FitsFormatError, OutputError, ParameterError
from lazysky.pipeline._fitsplanes import read_native
from lazysky.pipeline._mask import MASK_DTYPE, MaskBit
from lazysky.pipeline._sections import parse_section

__all__ = ["REGISTER", "calibrate_files", "coadd_files", "read_calibrated", "read_raw"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
METHODS = ("clipped-mean", "median")
REGISTER = (None, "stars")
MASK_MEANING = {
    "BAD": "defective pixel (hot or low response)",
    "SAT": "saturated in the raw frame",
    "CR": "cosmic ray",
    "EDGE": "near the detector edge",
    "NODATA": "no valid data",
    "HOT": "hot pixel (dark current)",
    "LOWRESP": "low response (flat)",
}
# structural and raw-only cards not carried into the calibrated detector HDUs
_DROP = {"SIMPLE", "XTENSION", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "PCOUNT", "GCOUNT",
         "EXTEND", "BZERO", "BSCALE", "EXTNAME", "DATASEC", "BIASSEC", "TRIMSEC", "SATURATE",
         "CHECKSUM", "DATASUM", "BUNIT", "GAIN"}  # fmt: skip
_WCS_KEY = re.compile(
    r"^(WCSAXES|WCSNAME|LONPOLE|LATPOLE|RADESYS|EQUINOX|(CD|PC|PV)\d+_\d+|"
    r"(CDELT|CRPIX|CRVAL|CTYPE|CUNIT|CROTA)\d+|(A|B|AP|BP)_(\d+_\d+|ORDER))$"
)


def _open(path: PathLike, what: str) -> fits.HDUList:
    """Open a FITS file, or a FitsFormatError naming it."""
    p = Path(path)
    if not p.is_file():
        msg = f"{what} {p}: no such file"
        raise FitsFormatError(msg)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fits.verify.VerifyWarning)
            hdul = fits.open(p, memmap=False)
            hdul.readall()  # every HDU's header now: a truncated file fails here
    except (OSError, ValueError, fits.VerifyError) as exc:
        msg = f"{what} {p} is not a readable FITS file ({exc})"
        raise FitsFormatError(msg) from None
    return hdul


def read_raw(path: PathLike, *, tile_px: int = 1024, what: str = "raw file") -> xr.Dataset:
    """A raw MEF file as an exposure Dataset, ``sci`` dask-chunked in ``tile_px`` tiles.

    Every image extension is a detector; each needs ``GAIN``, ``RDNOISE``, ``SATURATE``,
    ``DATASEC`` and the primary header ``EXPTIME``. The pixels are read into memory (the
    Zarr store is the lazy reader). Errors name the file.

    Examples
    --------
    >>> ds = read_raw("raw/tiny-r-e000.fits")  # doctest: +SKIP
    >>> ds.sci.dims  # doctest: +SKIP
    ('detector', 'y', 'x')
    """
    with _open(path, what) as hdul:
        primary = hdul[0].header
        hdus = [h for h in hdul[1:] if h.data is not None and h.data.ndim == 2]
        if not hdus:
            msg = f"{what} {path} has no image extensions (a raw MEF has one per detector)"
            raise FitsFormatError(msg)
        shapes = {h.data.shape for h in hdus}
        if len(shapes) > 1:
            msg = f"{what} {path}: detectors have different shapes {sorted(shapes)}"
            raise FitsFormatError(msg)
        try:
            det: dict[str, list[Any]] = {
                "gain": [float(h.header["GAIN"]) for h in hdus],
                "rdnoise": [float(h.header["RDNOISE"]) for h in hdus],
                "saturate": [float(h.header["SATURATE"]) for h in hdus],
                "datasec": [str(h.header["DATASEC"]) for h in hdus],
            }
            exptime = float(primary["EXPTIME"])
        except KeyError as exc:
            msg = f"{what} {path} lacks keyword {exc.args[0]} (not a raw lazysky/MEF frame?)"
            raise FitsFormatError(msg) from None
        det["header"] = [h.header.tostring(sep="\n") for h in hdus]
        if all("BIASSEC" in h.header for h in hdus):
            det["biassec"] = [str(h.header["BIASSEC"]) for h in hdus]
        stack = np.stack([np.asarray(h.data) for h in hdus])
        coords: dict[str, Any] = {"detector": [h.name for h in hdus]}
        coords.update({k: ("detector", np.asarray(v)) for k, v in det.items()})
        coords.update({
            "exptime": exptime,
            "filter": str(primary.get("FILTER", "")),
            "imagetyp": str(primary.get("IMAGETYP", "")),
            "mjd_obs": float(primary.get("MJD-OBS", np.nan)),
            "exposure": str(primary.get("EXPID", Path(path).stem)),
        })  # fmt: skip
        ds = xr.Dataset({"sci": (("detector", "y", "x"), da.from_array(
            stack, chunks=(1, tile_px, tile_px)))}, coords=coords)  # fmt: skip
        ds.attrs["path"] = str(path)
        ds.attrs["primary_header"] = primary.tostring(sep="\n")
    return ds


def _check_like(frame: xr.Dataset, raw: xr.Dataset, what: str) -> None:
    dets, want = list(map(str, frame.detector.values)), list(map(str, raw.detector.values))
    if dets != want or frame.sci.shape != raw.sci.shape:
        msg = (f"{what} {frame.attrs['path']} has detectors {dets} of shape "
               f"{frame.sci.shape[1:]}, but the raw file {raw.attrs['path']} has {want} of "
               f"shape {raw.sci.shape[1:]}: use calibration frames of the same instrument "
               "and readout")  # fmt: skip
        raise FitsFormatError(msg)


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path``, renamed to it when the block succeeds."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _outputs(raw: Sequence[PathLike], out: PathLike, overwrite: bool) -> list[Path]:
    out = Path(out)
    if len(raw) == 1 and not out.is_dir():
        targets = [out]
    else:
        if not out.is_dir():
            msg = f"--out {out} must be an existing directory when calibrating {len(raw)} files"
            raise OutputError(msg)
        targets = [out / f"{Path(p).name.removesuffix('.fits')}.cal.fits" for p in raw]
    return [check_output(t, overwrite=overwrite) for t in targets]


def check_output(path: PathLike, *, overwrite: bool) -> Path:
    """``path`` as a Path, after refusing an existing file (unless ``overwrite``) or a
    missing parent directory: before any work is done, nothing is touched."""
    target = Path(path)
    if target.exists() and not overwrite:
        msg = f"{target} exists: pass --overwrite (overwrite=True) to replace it"
        raise OutputError(msg)
    if not target.parent.is_dir():
        msg = f"cannot write {target}: directory {target.parent} does not exist"
        raise OutputError(msg)
    return target


def _history(steps: Sequence[dict[str, Any]]) -> list[str]:
    out = []
    for s in steps:
        params = {k: v for k, v in s.items() if k != "step"}
        out.append(f"lazysky {s.get('step', '?')}: {json.dumps(params, default=str)}")
    return out


def _celestial_header(raw_header: str, datasec: str, shape: tuple[int, int]) -> fits.Header:
    """The raw detector's WCS moved onto the DATASEC-trimmed pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        w = WCS(fits.Header.fromstring(raw_header, sep="\n"), naxis=2).celestial
    ys, xs = parse_section(datasec, shape=shape, name="DATASEC")
    if w.has_celestial:
        w.wcs.crpix = [w.wcs.crpix[0] - xs.start, w.wcs.crpix[1] - ys.start]
    return w.to_header(relax=True) if w.has_celestial else fits.Header()


def _mask_header(h: fits.Header) -> None:
    for bit in MaskBit:
        n = int(bit).bit_length() - 1
        h[f"MASKBIT{n}"] = (str(bit.name), f"{int(bit)}: {MASK_MEANING.get(str(bit.name), '')}")
    h.add_comment(
        "Mask bits (uint16, OR-ed): "
        + ", ".join(f"{int(b)}={b.name} ({MASK_MEANING.get(str(b.name), '')})" for b in MaskBit)
    )


def _write_calibrated(cal: xr.Dataset, raw: xr.Dataset, path: Path) -> None:
    primary = fits.PrimaryHDU(header=fits.Header.fromstring(raw.attrs["primary_header"],
                                                             sep="\n"))  # fmt: skip
    primary.header["IMAGETYP"] = str(raw.imagetyp.values) or "object"
    primary.header["BUNIT"] = ("electron", "calibrated images")
    primary.header["CALFILE"] = (Path(raw.attrs["path"]).name, "raw input")
    for line in _history(cal.attrs.get("steps", [])):
        primary.header.add_history(line)
    hdus: list[Any] = [primary]
    for i, det in enumerate(map(str, cal.detector.values)):
        raw_text = str(raw.header.values[i])
        raw_h = fits.Header.fromstring(raw_text, sep="\n")
        wcs_h = _celestial_header(raw_text, str(raw.datasec.values[i]), raw.sci.shape[1:])
        h = fits.Header([c for c in raw_h.cards if c.keyword not in _DROP
                         and not _WCS_KEY.match(c.keyword)
                         and c.keyword not in ("COMMENT", "HISTORY")])  # fmt: skip
        h.extend(wcs_h, update=True)
        h["DETECTOR"] = det
        h["GAIN"] = (1.0, "e-/unit: the image is in electrons")
        h["BUNIT"] = "electron"
        h["RDNOISE"] = (float(raw.rdnoise.values[i]), "read noise, electrons")
        h["EXPTIME"] = float(raw.exptime.values)
        hdus.append(fits.ImageHDU(cal.image.values[i].astype(np.float32), h, name=det))
        hv = wcs_h.copy()
        hv["BUNIT"] = "electron**2"
        hdus.append(fits.ImageHDU(cal.variance.values[i].astype(np.float32), hv,
                                  name=f"{det}_VAR"))  # fmt: skip
        hm = wcs_h.copy()
        _mask_header(hm)
        hdus.append(fits.ImageHDU(cal.mask.values[i].astype(MASK_DTYPE), hm, name=f"{det}_MASK"))
    fits.HDUList(hdus).writeto(path, overwrite=True, checksum=True)


def calibrate_files(
    raw: Sequence[PathLike],
    out: PathLike,
    *,
    bias: Sequence[PathLike],
    dark: Sequence[PathLike] = (),
    flat: Sequence[PathLike] = (),
    cosmics: bool = True,
    background: bool = False,
    overwrite: bool = False,
    tile_px: int = 1024,
) -> list[Path]:
    """Calibrate raw MEF files with masters made from bias/dark/flat files; write MEFs.

    Every input is read and checked (exists, is FITS, same detectors and shapes as the
    first raw file) before anything is written. ``out`` is a file for one raw file, an
    existing directory (``<name>.cal.fits`` each) for several. Returns the paths written.

    Examples
    --------
    >>> calibrate_files(["e0.fits"], "e0.cal.fits", bias=["b0.fits", "b1.fits"])  # doctest: +SKIP
    [PosixPath('e0.cal.fits')]
    """
    from lazysky.pipeline import (
        calibrate_exposure,
        flag_cosmic_rays,
        make_masters,
        subtract_background,  # fmt: skip
    )

    if not raw:
        raise ParameterError("no raw files given")
    if not bias:
        raise ParameterError("--bias needs at least one bias frame")
    targets = _outputs(raw, out, overwrite)
    raws = [read_raw(p, tile_px=tile_px) for p in raw]
    frames = {
        kind: [read_raw(p, tile_px=tile_px, what=f"{kind} frame") for p in paths]
        for kind, paths in (("bias", bias), ("dark", dark), ("flat", flat))
        if paths
    }
    for r in raws[1:]:
        _check_like(r, raws[0], "raw file")
    for kind, fs in frames.items():
        for f in fs:
            _check_like(f, raws[0], f"{kind} frame")
    masters = make_masters(bias=frames["bias"], dark=frames.get("dark"),
                           flat=frames.get("flat")).compute()  # fmt: skip
    written = []
    for r, target in zip(raws, targets, strict=True):
        cal = calibrate_exposure(r, masters)
        if cosmics:
            cal = flag_cosmic_rays(cal)
        if background:
            cal = subtract_background(cal)
        cal = cal.compute()
        with _atomic(target) as tmp:
            _write_calibrated(cal, r, tmp)
        logger.info("calibrated %s -> %s", r.attrs["path"], target)
        written.append(target)
    return written


def _sky_variance(image: np.ndarray) -> float:
    """The sky noise², from the robust σ of the pixels, clipped at 3σ (iterated)."""
    v = image[np.isfinite(image)].astype(float)
    for _ in range(5):
        med = np.median(v)
        sig = 1.4826 * np.median(np.abs(v - med))
        v = v[np.abs(v - med) < 3 * sig]
    return float(np.var(v))


def _open_headers(path: Path, what: str) -> fits.HDUList:
    """Open a FITS file reading its headers only (the data stay on disk until asked for).

    A file shorter than its headers describe is refused here, as :func:`_open` refuses it,
    so that a lazy read never meets a truncated file halfway through a graph.
    """
    if path.suffix.lower() in (".gz", ".fz", ".bz2", ".z"):
        return _open(path, what)  # compressed: sizes on disk say nothing; read it now
    if not path.is_file():
        msg = f"{what} {path}: no such file"
        raise FitsFormatError(msg)
    hdul = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fits.verify.VerifyWarning)
            warnings.simplefilter("ignore", AstropyUserWarning)  # truncation: decided below
            hdul = fits.open(path, memmap=False)
            n = len(hdul)  # every header read: a file cut inside a header fails here
            last = hdul.fileinfo(n - 1)
    except (OSError, ValueError, IndexError, fits.VerifyError) as exc:
        if hdul is not None:
            hdul.close()
        msg = f"{what} {path} is not a readable FITS file ({exc})"
        raise FitsFormatError(msg) from None
    need = int(last["datLoc"]) + int(last["datSpan"])  # the data with their padding
    size = path.stat().st_size
    if size < need:
        hdul.close()
        msg = (f"{what} {path} is not a readable FITS file (truncated: its headers describe "
               f"{need} bytes, the file has {size})")  # fmt: skip
        raise FitsFormatError(msg)
    return hdul


def _read_planes(
    path: str, image: int, variance: int | None, mask: int | None
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.uint16]]:
    """One detector's ``(1, ny, nx)`` image, variance and mask from the file (a read task).

    Without a variance HDU the variance is the image's sky noise² (:func:`_sky_variance`);
    without a mask, zeros. Non-finite pixels become NODATA (image 0, variance ∞).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        warnings.simplefilter("ignore", AstropyUserWarning)  # truncation: the reads raise
        # lazily: only these HDUs' data; plain planes of an uncompressed file (it starts
        # with SIMPLE, not a gzip/bzip2 header) straight into native arrays
        with open(path, "rb", buffering=0) as f:
            raw = f.read(6) == b"SIMPLE"
            f.seek(0)
            src = f if raw else None
            with fits.open(f if raw else path, memmap=False) as hdul:
                len(hdul)  # every header read now, before the data reads move the file
                img = _plane(src, hdul, image, np.float32)
                if variance is not None:
                    var = _plane(src, hdul, variance, np.float32)
                else:
                    var = np.full(img.shape, _sky_variance(img), dtype=np.float32)
                if mask is not None:
                    msk = _plane(src, hdul, mask, MASK_DTYPE)
                else:
                    msk = np.zeros(img.shape, MASK_DTYPE)
    # a float64 sum is finite exactly when every value is (float32 values cannot
    # overflow it): the usual all-finite frame is checked without a boolean plane
    if np.isfinite(img.sum(dtype=np.float64)) and np.isfinite(var.sum(dtype=np.float64)):
        return img[None], var[None], msk[None]
    bad = ~np.isfinite(img) | ~np.isfinite(var)
    if bad.any():
        msk[bad] |= MASK_DTYPE.type(MaskBit.NODATA)
        img[bad], var[bad] = 0.0, np.inf
    return img[None], var[None], msk[None]


def _plane(f: Any, hdul: fits.HDUList, index: int, dtype: Any) -> NDArray[Any]:
    """HDU ``index`` as a native ``dtype`` array: read straight from the raw file ``f``
    when it is a plain plane (:func:`lazysky.pipeline._fitsplanes.read_native`), else
    (or without ``f``: a compressed file) through astropy."""
    try:
        got = None if f is None else read_native(f, hdul, index, dtype)
    except OSError as exc:
        msg = f"input {f.name} is not a readable FITS file ({exc})"
        raise FitsFormatError(msg) from None
    if got is not None:
        return got
    return np.asarray(hdul[index].data).astype(dtype)


def read_calibrated(
    path: PathLike, *, tile_px: int | None = 1024, require_wcs: bool = True
) -> list[xr.Dataset]:
    """A calibrated FITS file as calibrated Datasets (``image``, ``variance``, ``mask``), lazily.

    Image HDUs are the 2-d HDUs not named ``*_VAR``/``*_MASK``; ``<NAME>_VAR`` and
    ``<NAME>_MASK`` are their planes when present. Without a variance plane the variance
    is the image's sky noise² (uniform; ``attrs["variance_estimated"]`` says so); without
    a mask, non-finite pixels are NODATA. Every image needs a celestial WCS unless
    ``require_wcs=False`` (then an image without one gets an empty ``header``, for
    :func:`lazysky.pipeline.register.register_frames` to fill). One Dataset per set of
    same-shaped images. The planes are dask-chunked in ``tile_px`` tiles, or one chunk per
    detector with ``tile_px=None`` (what :func:`coadd_files` reads: the boxes it resamples
    are then views of the detector, not copies assembled from tiles).

    Only the headers are read here (a file shorter than they describe is refused now);
    each detector's pixels are read by one task, ``read-calibrated-<file>-<hdu>-…``, so
    reading overlaps the computation that follows.

    Examples
    --------
    >>> (cal,) = read_calibrated("e0.cal.fits")  # doctest: +SKIP
    >>> cal.image.data.dask  # doctest: +SKIP
    """
    p = Path(path)
    image_hdu = (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)
    with _open_headers(p, "input") as hdul:
        headers = [h.header for h in hdul]
        names = [h.name for h in hdul]
        is_image = [isinstance(h, image_hdu) for h in hdul]
    with_data: dict[str, int] = {}
    for i, (nm, h) in enumerate(zip(names, headers, strict=True)):
        if int(h.get("NAXIS", 0)) > 0:
            with_data[nm] = i  # the last of a name, as a dict of the HDUs keeps it
    images = [i for i, (nm, h) in enumerate(zip(names, headers, strict=True))
              if is_image[i] and int(h.get("NAXIS", 0)) == 2
              and not nm.endswith(("_VAR", "_MASK"))
              and nm not in ("VARIANCE", "WEIGHT", "MASK", "COUNT")]  # fmt: skip
    if not images:
        msg = f"input {p} has no 2-d image HDU"
        raise FitsFormatError(msg)
    exposure = str(headers[0].get("EXPID", p.stem))
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for i in images:
        h = headers[i]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            w = WCS(h, naxis=2)
        if not w.has_celestial and require_wcs:
            msg = (f"input {p}, HDU {names[i] or 'PRIMARY'}: no celestial WCS; frames "
                   "without one need registration (--register stars)")  # fmt: skip
            raise FitsFormatError(msg)
        shape = (int(h["NAXIS2"]), int(h["NAXIS1"]))
        var_i, msk_i = with_data.get(f"{names[i]}_VAR"), with_data.get(f"{names[i]}_MASK")
        for j, what in ((var_i, "variance"), (msk_i, "mask")):
            if j is None:
                continue
            got = (int(headers[j]["NAXIS2"]), int(headers[j]["NAXIS1"]))
            if got != shape:
                msg = f"input {p}: the {what} HDU {names[j]} is {got}, its image {shape}"
                raise FitsFormatError(msg)
        token = tokenize(str(p.resolve()), p.stat().st_mtime_ns, i, var_i, msk_i)
        key = f"read-calibrated-{p.name}-{names[i] or 'PRIMARY'}-{token}"
        read = delayed(_read_planes, pure=True)(str(p), i, var_i, msk_i, dask_key_name=key)
        groups.setdefault(shape, []).append({
            "name": names[i] or "PRIMARY", "read": read, "shape": shape,
            "header": (w.celestial.to_header(relax=True).tostring(sep="\n")
                       if w.has_celestial else ""),
            "units": str(h.get("BUNIT", "")).strip(),
            "estimated": var_i is None})  # fmt: skip
    out = []
    dtypes = {"image": np.float32, "variance": np.float32, "mask": MASK_DTYPE}
    for n, members in enumerate(groups.values()):
        chunks = (1, -1, -1) if tile_px is None else (1, tile_px, tile_px)
        data = {}
        for k, (plane, dtype) in enumerate(dtypes.items()):
            layers = [da.from_delayed(m["read"][k], (1, *m["shape"]), dtype=dtype,
                                      name=f"{plane}-{m['read'].key}")
                      for m in members]  # fmt: skip
            data[plane] = (("detector", "y", "x"), da.concatenate(layers).rechunk(chunks))
        ds = xr.Dataset(
            data,
            coords={
                "detector": [m["name"] for m in members],
                "header": ("detector", [m["header"] for m in members]),
                "exposure": exposure if n == 0 else f"{exposure}-{n}",
            },
        )
        units = sorted({m["units"] for m in members})
        if len(units) > 1:
            msg = f"input {p}: its images have different BUNIT {units}"
            raise FitsFormatError(msg)
        ds.image.attrs["units"] = units[0]
        ds.attrs["path"] = str(p)
        ds.attrs["variance_estimated"] = any(m["estimated"] for m in members)
        out.append(ds)
    return out


def coadd_files(
    inputs: Sequence[PathLike],
    out: PathLike,
    *,
    pixel_scale_arcsec: float | None = None,
    method: str = "clipped-mean",
    tile_px: int = 2048,
    overwrite: bool = False,
    subtract_background: bool = True,
    register: str | None = None,
    reference: int = 0,
) -> Path:
    """Resample calibrated FITS files onto a covering grid, stack them, write the coadd.

    The coadd is in the inputs' units per grid pixel, the mean of one frame (like SWarp);
    HDUs: PRIMARY (image, WCS), VARIANCE, WEIGHT, MASK, COUNT. ``pixel_scale_arcsec``
    defaults to the inputs' median pixel scale. Like SWarp (``SUBTRACT_BACK=Y``), each
    input's sky background is subtracted first unless ``subtract_background=False``:
    frames taken under different skies would otherwise leave steps wherever the set of
    contributing frames changes (dither edges, masked columns, cosmic rays).

    ``register="stars"`` registers every image to the reference (the first image of
    input ``reference``) by matching stars (:func:`lazysky.pipeline.register.register_frames`)
    and uses the resulting WCS instead of the headers': inputs may then lack a WCS. If the
    reference has a celestial WCS the coadd is on the sky; if not, on a pseudo-celestial
    TAN WCS of 1″ per reference pixel (relative positions only; ``WCSNAME`` says so).

    Examples
    --------
    >>> coadd_files(["a.cal.fits", "b.cal.fits"], "coadd.fits", method="median")  # doctest: +SKIP
    PosixPath('coadd.fits')
    """
    from astropy.wcs.utils import proj_plane_pixel_scales

    from lazysky.pipeline import SkyGrid, detector_footprints, resample_exposure, stack
    from lazysky.pipeline.stack import write_coadd_fits

    if method not in METHODS:
        msg = f"method must be one of {list(METHODS)}, got {method!r}"
        raise ParameterError(msg)
    if not inputs:
        raise ParameterError("no input files given")
    if register not in REGISTER:
        msg = f"register must be one of {list(REGISTER)}, got {register!r}"
        raise ParameterError(msg)
    if not 0 <= reference < len(inputs):
        msg = f"reference must index the {len(inputs)} inputs, got {reference}"
        raise ParameterError(msg)
    target = check_output(out, overwrite=overwrite)
    # whole detectors (one chunk each): a detector's box for a grid tile is then a view
    # of it, not a copy assembled from its tiles (the grid's tiles are the output's)
    per_input = [read_calibrated(p, tile_px=None, require_wcs=register is None)
                 for p in inputs]  # fmt: skip
    first_of_ref = sum(len(x) for x in per_input[:reference])
    cals = [ds for x in per_input for ds in x]
    if subtract_background:
        from lazysky.pipeline.background import subtract_background as _subtract

        cals = [c if "background" in c else _subtract(c) for c in cals]
    if register == "stars":
        cals = _register_stars(cals, first_of_ref)
    seen: dict[str, int] = {}
    for i, ds in enumerate(cals):  # one layer group per input file, even with equal EXPIDs
        name = str(ds.exposure.values)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            cals[i] = ds.assign_coords(exposure=f"{name}-{seen[name]}")
    if pixel_scale_arcsec is None:
        scales = [
            3600
            * float(np.mean(proj_plane_pixel_scales(WCS(fits.Header.fromstring(str(h), sep="\n")))))
            for c in cals
            for h in c.header.values
        ]
        pixel_scale_arcsec = float(np.median(scales))
    if not pixel_scale_arcsec > 0:
        msg = f"--pixel-scale must be > 0 arcsec, got {pixel_scale_arcsec}"
        raise ParameterError(msg)
    grid = SkyGrid.covering([f for c in cals for f in detector_footprints(c)],
                            pixel_scale_arcsec=pixel_scale_arcsec, tile_px=tile_px)  # fmt: skip
    coadd = stack([p for c in cals for p in resample_exposure(c, grid)], grid, method=method)
    estimated = [Path(c.attrs["path"]).name for c in cals if c.attrs["variance_estimated"]]
    # the primary's extra cards go in with the first write (updating the file afterwards
    # would rewrite all of it once they outgrow the header's last 2880-byte block)
    h = fits.Header()
    h["PIXSCALE"] = (pixel_scale_arcsec, "arcsec per pixel")
    for c in cals:
        h.add_history(f"lazysky coadd input: {Path(c.attrs['path']).name}")
    h.add_history(f"lazysky coadd: method={method} tile_px={tile_px}")
    if register is not None:
        h["REGISTER"] = (register, "inputs registered to the reference by stars")
        for c in cals:
            for r in c.attrs.get("registration", []):
                h.add_history(f"lazysky register: {Path(r['name']).name} "
                              f"n={r['n_matched']} rms={r['rms_px']:.3f}px")  # fmt: skip
        if not str(cals[first_of_ref].header.values[0]).strip() or any(
            "pseudo-celestial" in str(t) for c in cals for t in c.header.values
        ):
            h["WCSNAME"] = ("lazysky pseudo-celestial", "relative positions only")
    if estimated:
        h["VAREST"] = (True, "some input variances estimated from sky noise")
        for name in sorted(set(estimated)):
            h.add_comment(f"variance of {name} estimated from its sky noise (uniform)")
    with _atomic(target) as tmp:
        write_coadd_fits(coadd, tmp, overwrite=True, header=h)
    logger.info("coadd of %d inputs -> %s", len(inputs), target)
    return target


def _register_stars(cals: list[xr.Dataset], reference: int) -> list[xr.Dataset]:
    """Every image's WCS from matching its stars to the reference image (in memory)."""
    from lazysky.pipeline.register import register_frames

    images, masks, names, where = [], [], [], []
    for n, ds in enumerate(cals):
        for i, det in enumerate(map(str, ds.detector.values)):
            images.append(np.asarray(ds.image.values[i]))
            masks.append(np.asarray(ds.mask.values[i]) != 0)
            names.append(f"{ds.attrs['path']}[{det}]")
            where.append((n, i))
    ref_text = str(cals[reference].header.values[0])
    ref_wcs = None
    if ref_text:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            ref_wcs = WCS(fits.Header.fromstring(ref_text, sep="\n"), naxis=2).celestial
    k_ref = [w[0] for w in where].index(reference)
    regs = register_frames(images, reference=k_ref, reference_wcs=ref_wcs, names=names,
                           masks=masks)  # fmt: skip
    headers: dict[int, list[str]] = {}
    for (n, _i), reg in zip(where, regs, strict=True):
        headers.setdefault(n, []).append(reg.wcs.to_header(relax=True).tostring(sep="\n"))
    out = []
    for n, ds in enumerate(cals):
        ds = ds.assign_coords(header=("detector", headers[n]))
        ds.attrs["registration"] = [
            {"name": r.name, "n_matched": r.n_matched, "rms_px": r.rms_px,
             "centre_error_px": r.centre_error_px}
            for (m, _), r in zip(where, regs, strict=True) if m == n
        ]  # fmt: skip
        out.append(ds)
    return out
