"""FITS headers as JSON-able data, WCS from them, footprints and IRAF sections.

Headers are stored as their 80-character card images, in order, so COMMENT, HISTORY,
blank and CONTINUE cards all survive and :func:`cards_to_header` rebuilds exactly the
header that was read.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from lazysky.errors import FitsFormatError

__all__ = [
    "cards_to_header",
    "header_to_cards",
    "parse_iraf_section",
    "wcs_from_header",
]

logger = logging.getLogger(__name__)

_SECTION_RE = re.compile(r"^\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]$")


def header_to_cards(header: fits.Header) -> list[str]:
    """The header's card images, 80 characters each (END and padding excluded)."""
    text = header.tostring(sep="", endcard=False, padding=False)
    return [text[i : i + 80] for i in range(0, len(text), 80)]


def cards_to_header(cards: list[str] | tuple[str, ...]) -> fits.Header:
    """Rebuild an :class:`astropy.io.fits.Header` from :func:`header_to_cards` output.

    Examples
    --------
    >>> from astropy.io import fits
    >>> h = fits.Header([("OBJECT", "M13")]); h.add_history("bias subtracted")
    >>> cards_to_header(header_to_cards(h))["HISTORY"][0]
    'bias subtracted'
    """
    return fits.Header.fromstring("".join(cards))


def wcs_from_header(header: fits.Header) -> WCS | None:
    """The celestial WCS of an image header, or None when the header has none.

    astropy "fixes" non-standard headers (DSS plates, old date keywords) with
    ``FITSFixedWarning``; those fixes are expected here and logged at debug level.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FITSFixedWarning)
        try:
            wcs = WCS(header, naxis=2)
        except Exception as exc:  # astropy raises several types for unusable WCS
            logger.debug("no usable WCS in header: %s", exc)
            return None
    for w in caught:
        logger.debug("WCS fix: %s", w.message)
    if not wcs.has_celestial:
        return None
    return wcs


def footprint_deg(header: fits.Header, shape: tuple[int, int]) -> list[list[float]] | None:
    """ICRS (RA, Dec) in degrees of the four outer pixel corners, or None without a WCS."""
    wcs = wcs_from_header(header)
    if wcs is None:
        return None
    ny, nx = shape
    x = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5])
    y = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])
    try:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            sky = wcs.pixel_to_world(x, y).icrs
    except Exception as exc:  # a WCS that cannot map its own corners
        logger.debug("cannot compute a footprint: %s", exc)
        return None
    ra, dec = sky.ra.deg, sky.dec.deg
    if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
        return None
    return [[float(r), float(d)] for r, d in zip(ra, dec, strict=True)]


def bounding_circle(polygons: list[list[list[float]]]) -> tuple[float, float, float] | None:
    """(ra, dec, radius) in degrees of a circle around every corner of ``polygons``."""
    pts = np.array([p for poly in polygons for p in poly], dtype=float)
    if pts.size == 0:
        return None
    ra, dec = np.radians(pts[:, 0]), np.radians(pts[:, 1])
    vec = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=1)
    center = vec.mean(axis=0)
    center /= np.linalg.norm(center)
    radius = np.degrees(np.arccos(np.clip(vec @ center, -1.0, 1.0))).max()
    c_ra = float(np.degrees(np.arctan2(center[1], center[0])) % 360.0)
    c_dec = float(np.degrees(np.arcsin(center[2])))
    return c_ra, c_dec, float(radius)


def parse_iraf_section(
    text: str, *, shape: tuple[int, int] | None = None, where: str = ""
) -> tuple[slice, slice]:
    """0-based ``(y, x)`` slices from an IRAF section ``[x1:x2,y1:y2]`` (1-based, inclusive).

    Parameters
    ----------
    text
        The keyword value, e.g. ``"[1:2048,1:4096]"``.
    shape
        The image shape ``(ny, nx)``; when given, the section must lie inside it.
    where
        Prefix for error messages (file, HDU and keyword).

    Examples
    --------
    >>> parse_iraf_section("[1:2048,1:4096]")
    (slice(0, 4096, None), slice(0, 2048, None))
    """
    m = _SECTION_RE.match(str(text).strip())
    if not m:
        msg = f"{where}{text!r} is not an IRAF section: expected '[x1:x2,y1:y2]' (1-based)"
        raise FitsFormatError(msg)
    x1, x2, y1, y2 = (int(v) for v in m.groups())
    if x1 < 1 or y1 < 1 or x2 < x1 or y2 < y1:
        msg = f"{where}{text!r} is not a valid section: need 1 <= x1 <= x2 and 1 <= y1 <= y2"
        raise FitsFormatError(msg)
    if shape is not None and (y2 > shape[0] or x2 > shape[1]):
        msg = (
            f"{where}{text!r} reaches beyond the image ({shape[1]} x {shape[0]} pixels, "
            "NAXIS1 x NAXIS2)"
        )
        raise FitsFormatError(msg)
    return slice(y1 - 1, y2), slice(x1 - 1, x2)


def header_float(header: fits.Header, key: str, *, where: str = "") -> float:
    """A numeric keyword as float (NaN when absent); a clear error when not a number.

    A string holding a number (``GAIN = '1.5'``, as some writers do) is accepted.
    """
    value: Any = header.get(key)
    if value is None:
        return float("nan")
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    elif not isinstance(value, bool) and isinstance(value, int | float | np.number):
        return float(value)
    msg = f"{where}keyword {key}={value!r} must be a number"
    raise FitsFormatError(msg)
