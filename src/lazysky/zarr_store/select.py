"""Find exposures by metadata (field, filter, time, footprint) and open them together."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import xarray as xr

from lazysky.errors import LazySkyWarning, ParameterError
from lazysky.zarr_store._layout import StoreLike, parse_store
from lazysky.zarr_store.open import _open_many, _root_checked, list_exposures

if TYPE_CHECKING:
    from lazysky.config import Settings

__all__ = ["NoExposuresWarning", "find_exposures", "open_exposures"]

logger = logging.getLogger(__name__)


class NoExposuresWarning(LazySkyWarning):
    """No exposure matched the filters (an expected empty result, not an error)."""


def _separation_deg(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    r1, d1, r2, d2 = map(math.radians, (ra1, dec1, ra2, dec2))
    c = math.sin(d1) * math.sin(d2) + math.cos(d1) * math.cos(d2) * math.cos(r1 - r2)
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def _matches(
    a: dict[str, Any],
    *,
    field: str | None,
    filter: str | None,
    imagetyp: str | None,
    mjd_range: tuple[float, float] | None,
    cone: tuple[float, float, float] | None,
) -> bool:
    if field is not None and a.get("object") != field:
        return False
    if filter is not None and a.get("filter") != filter:
        return False
    if imagetyp is not None and str(a.get("imagetyp") or "").lower() != imagetyp.lower():
        return False
    if mjd_range is not None:
        mjd = a.get("mjd_obs")
        if not isinstance(mjd, int | float) or not mjd_range[0] <= mjd < mjd_range[1]:
            return False
    if cone is not None:
        circle = a.get("footprint_circle")
        if not circle:
            return False
        if _separation_deg(cone[0], cone[1], circle[0], circle[1]) > cone[2] + circle[2]:
            return False
    return True


def _cone(footprint: Any) -> tuple[float, float, float] | None:
    if footprint is None:
        return None
    try:
        center, radius = footprint
        icrs = center.icrs
        return float(icrs.ra.deg), float(icrs.dec.deg), float(radius.to_value("deg"))
    except (AttributeError, TypeError, ValueError) as exc:
        msg = (
            f"footprint must be (SkyCoord, angular Quantity), e.g. "
            f"(SkyCoord(150, 2, unit='deg'), 0.5 * u.deg), got {footprint!r} ({exc})"
        )
        raise ParameterError(msg) from None


def find_exposures(
    store: StoreLike,
    *,
    field: str | None = None,
    filter: str | None = None,
    imagetyp: str | None = None,
    mjd_range: tuple[float, float] | None = None,
    footprint: Any = None,
    storage_options: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> list[str]:
    """Ids of complete exposures matching every given filter (reads metadata, no pixels).

    Parameters
    ----------
    field, filter, imagetyp
        Exact ``OBJECT``, ``FILTER`` and (case-insensitive) ``IMAGETYP`` values.
    mjd_range
        ``(start, stop)``: ``start <= MJD-OBS < stop``.
    footprint
        ``(SkyCoord, radius Quantity)``: exposures whose bounding circle meets that cone.
    """
    root = parse_store(store, storage_options=storage_options, settings=settings)
    cone = _cone(footprint)
    ids = []
    for exp in list_exposures(root):
        a = _root_checked(root, exp)
        if _matches(
            a, field=field, filter=filter, imagetyp=imagetyp, mjd_range=mjd_range, cone=cone
        ):
            ids.append(exp)
    return ids


def open_exposures(
    store: StoreLike,
    exposure_ids: Sequence[str] | None = None,
    *,
    field: str | None = None,
    filter: str | None = None,
    imagetyp: str | None = None,
    mjd_range: tuple[float, float] | None = None,
    footprint: Any = None,
    storage_options: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> xr.Dataset | None:
    """Open many exposures as one lazy Dataset along ``exposure`` (sorted by MJD, then id).

    Exposures are the given ids, or every complete exposure matching the filters of
    :func:`find_exposures`. They must share detectors and shape (one instrument).
    Returns None, with a :class:`NoExposuresWarning`, when nothing matches.

    Examples
    --------
    >>> ds = open_exposures("lazysky-data", field="deep1", filter="r")  # doctest: +SKIP
    >>> ds.sci.dims  # doctest: +SKIP
    ('exposure', 'detector', 'y', 'x')
    """
    import warnings

    root = parse_store(store, storage_options=storage_options, settings=settings)
    if exposure_ids is None:
        exposure_ids = find_exposures(
            root,
            field=field,
            filter=filter,
            imagetyp=imagetyp,
            mjd_range=mjd_range,
            footprint=footprint,
        )
    if not exposure_ids:
        warnings.warn(
            f"no exposure in {root.url!r} matches the filters", NoExposuresWarning, stacklevel=2
        )
        return None
    attrs = [_root_checked(root, e) for e in exposure_ids]
    attrs.sort(key=lambda a: (_mjd_key(a.get("mjd_obs")), a["exposure_id"]))
    return _open_many(root, [a["exposure_id"] for a in attrs], attrs)


def _mjd_key(mjd: Any) -> float:
    return float(mjd) if isinstance(mjd, int | float) else math.inf
