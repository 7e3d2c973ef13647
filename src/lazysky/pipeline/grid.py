"""The sky grid: a TAN projection with a pixel scale, cut into square tiles.

A :class:`SkyGrid` is pure metadata (a frozen dataclass, hashable, cheap to pickle): the
tangent point, the pixel scale, the shape and the tile size. The tangent point sits at
the grid's centre pixel, north is up and east left. Tiles are ``tile_px`` square (the last
row and column of tiles may be smaller) and have stable ids ``t{iy:03d}_{ix:03d}``, so
Zarr chunks, catalog rows and dashboard tasks speak of the same tile.

Examples
--------
>>> grid = SkyGrid(ra_deg=150.0, dec_deg=2.0, pixel_scale_arcsec=0.5, shape=(300, 500),
...                tile_px=128)
>>> grid.n_tiles, grid.tile_ids()[:2]
((3, 4), ['t000_000', 't000_001'])
>>> grid.tile_slices("t002_003")
(slice(256, 300, None), slice(384, 500, None))
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from astropy.coordinates import SkyCoord
from astropy.wcs import WCS
from numpy.typing import NDArray

from lazysky.errors import ParameterError

__all__ = ["SkyGrid", "footprint_of", "parse_tile"]

FootprintLike = Any  # WCS with pixel_shape, (WCS, (ny, nx)), SkyCoord, or (N, 2) degrees


def parse_tile(tile: str) -> tuple[int, int]:
    """``(iy, ix)`` of a tile id ``t{iy:03d}_{ix:03d}``."""
    try:
        iy, ix = tile[1:].split("_")
        if not tile.startswith("t"):
            raise ValueError(tile)
        return int(iy), int(ix)
    except (ValueError, TypeError):
        msg = f"tile id {tile!r} is not of the form 't<iy:03d>_<ix:03d>' (e.g. 't000_001')"
        raise ParameterError(msg) from None


def footprint_of(item: FootprintLike) -> NDArray[np.float64]:
    """Corners ``(N, 2)`` ``(ra, dec)`` in degrees of a footprint-like input.

    Accepts a WCS with ``pixel_shape`` set, a ``(WCS, (ny, nx))`` pair, a ``SkyCoord`` of
    the polygon's vertices, or an ``(N, 2)`` array of ``(ra, dec)`` degrees.
    """
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], WCS):
        wcs, (ny, nx) = item[0], item[1]
    elif isinstance(item, WCS):
        if item.pixel_shape is None:
            msg = "a WCS without pixel_shape has no footprint: pass (wcs, (ny, nx)) instead"
            raise ParameterError(msg)
        wcs, (nx, ny) = item, item.pixel_shape
    elif isinstance(item, SkyCoord):
        icrs = item.icrs
        return np.column_stack([icrs.ra.deg, icrs.dec.deg]).astype(float)
    else:
        arr = np.asarray(item, dtype=float)
        if arr.ndim != 2 or arr.shape[1] != 2 or len(arr) < 1:
            msg = f"a footprint must be (N, 2) (ra, dec) degrees, got shape {arr.shape}"
            raise ParameterError(msg)
        return arr
    # the outer edges of the pixels, a few points per side (distortion bends them)
    t = np.linspace(0.0, 1.0, 9)
    x = np.concatenate([t * nx, np.full(9, nx), (1 - t) * nx, np.zeros(9)]) - 0.5
    y = np.concatenate([np.zeros(9), t * ny, np.full(9, ny), (1 - t) * ny]) - 0.5
    ra, dec = wcs.celestial.pixel_to_world_values(x, y)
    return np.column_stack([ra, dec]).astype(float)


@dataclass(frozen=True)
class SkyGrid:
    """A TAN grid on the sky, cut into square tiles.

    Parameters
    ----------
    ra_deg, dec_deg
        The tangent point (ICRS), at the centre of the grid.
    pixel_scale_arcsec
        Pixel size (square pixels).
    shape
        ``(ny, nx)`` pixels.
    tile_px
        Side of a tile in pixels (default 2048; also the dask blocks and Zarr chunks).
    """

    ra_deg: float
    dec_deg: float
    pixel_scale_arcsec: float
    shape: tuple[int, int]
    tile_px: int = 2048

    def __post_init__(self) -> None:
        if not (math.isfinite(self.pixel_scale_arcsec) and self.pixel_scale_arcsec > 0):
            msg = f"pixel_scale_arcsec must be > 0, got {self.pixel_scale_arcsec}"
            raise ParameterError(msg)
        if not -90.0 <= self.dec_deg <= 90.0 or not math.isfinite(self.ra_deg):
            msg = f"the tangent point ({self.ra_deg}, {self.dec_deg}) is not a sky position"
            raise ParameterError(msg)
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 2 or min(shape) < 1:
            msg = f"shape must be (ny, nx) with both >= 1, got {self.shape}"
            raise ParameterError(msg)
        if int(self.tile_px) < 1:
            msg = f"tile_px must be >= 1, got {self.tile_px}"
            raise ParameterError(msg)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "tile_px", int(self.tile_px))
        object.__setattr__(self, "ra_deg", float(self.ra_deg) % 360.0)
        object.__setattr__(self, "dec_deg", float(self.dec_deg))
        object.__setattr__(self, "pixel_scale_arcsec", float(self.pixel_scale_arcsec))

    # --- the projection -----------------------------------------------------------
    @property
    def wcs(self) -> WCS:
        """The grid's WCS (a new object each call: astropy WCS is not thread-safe)."""
        ny, nx = self.shape
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [self.ra_deg, self.dec_deg]
        w.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]
        s = self.pixel_scale_arcsec / 3600.0
        w.wcs.cdelt = [-s, s]
        w.wcs.cunit = ["deg", "deg"]
        w.wcs.radesys = "ICRS"
        w.pixel_shape = (nx, ny)
        w.wcs.set()
        return w

    def to_dict(self) -> dict[str, Any]:
        """The parameters as plain values (for attributes), ``SkyGrid(**d)`` inverts it."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    # --- tiles --------------------------------------------------------------------
    @property
    def n_tiles(self) -> tuple[int, int]:
        """Tiles along ``(y, x)``."""
        ny, nx = self.shape
        return (-(-ny // self.tile_px), -(-nx // self.tile_px))

    @property
    def chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Dask chunks of a grid-shaped array, one block per tile."""
        return tuple(  # type: ignore[return-value]
            tuple(min(self.tile_px, n - i) for i in range(0, n, self.tile_px)) for n in self.shape
        )

    def tile_id(self, iy: int, ix: int) -> str:
        """Id of the tile at row ``iy``, column ``ix``."""
        nty, ntx = self.n_tiles
        if not (0 <= iy < nty and 0 <= ix < ntx):
            msg = f"tile ({iy}, {ix}) is outside the grid's {nty} x {ntx} tiles"
            raise ParameterError(msg)
        return f"t{iy:03d}_{ix:03d}"

    def tile_ids(self) -> list[str]:
        """Every tile id, row by row."""
        nty, ntx = self.n_tiles
        return [self.tile_id(iy, ix) for iy in range(nty) for ix in range(ntx)]

    def tile_slices(self, tile: str) -> tuple[slice, slice]:
        """``(y, x)`` slices of ``tile`` in the grid's pixels."""
        iy, ix = parse_tile(tile)
        self.tile_id(iy, ix)  # validates
        t, (ny, nx) = self.tile_px, self.shape
        return slice(iy * t, min((iy + 1) * t, ny)), slice(ix * t, min((ix + 1) * t, nx))

    def tile_window(self, tile: str, halo_px: int) -> tuple[slice, slice]:
        """``(y, x)`` slices of ``tile`` grown by ``halo_px`` on every side, clipped to the grid.

        Examples
        --------
        >>> g = SkyGrid(ra_deg=10.0, dec_deg=0.0, pixel_scale_arcsec=1.0, shape=(100, 100),
        ...             tile_px=50)
        >>> g.tile_window("t000_001", 8)
        (slice(0, 58, None), slice(42, 100, None))
        """
        sy, sx = self.tile_slices(tile)
        h, (ny, nx) = int(halo_px), self.shape
        return (slice(max(sy.start - h, 0), min(sy.stop + h, ny)),
                slice(max(sx.start - h, 0), min(sx.stop + h, nx)))

    def tile_shape(self, tile: str) -> tuple[int, int]:
        """``(ny, nx)`` of ``tile``."""
        sy, sx = self.tile_slices(tile)
        return sy.stop - sy.start, sx.stop - sx.start

    def tile_wcs(self, tile: str) -> WCS:
        """The WCS of one tile's pixels (a new object each call)."""
        sy, sx = self.tile_slices(tile)
        w = self.wcs
        w.wcs.crpix = [w.wcs.crpix[0] - sx.start, w.wcs.crpix[1] - sy.start]
        w.pixel_shape = (sx.stop - sx.start, sy.stop - sy.start)
        w.wcs.set()
        return w

    def tiles_overlapping(self, footprint: FootprintLike) -> list[str]:
        """Ids of the tiles that the bounding box of ``footprint`` (in grid pixels) touches.

        ``footprint`` is a WCS with ``pixel_shape``, ``(WCS, (ny, nx))``, a ``SkyCoord`` or
        ``(N, 2)`` ``(ra, dec)`` degrees of its outline. Vertices behind the tangent plane
        (more than 90° away) mean no overlap.
        """
        xy = self._project(footprint_of(footprint))
        if xy is None:
            return []
        x, y = xy
        t, (ny, nx) = self.tile_px, self.shape
        # the pixels holding the outline's extremes (pixel i spans [i - 0.5, i + 0.5))
        x0, x1 = max(math.floor(x.min() + 0.5), 0), min(math.floor(x.max() + 0.5) + 1, nx)
        y0, y1 = max(math.floor(y.min() + 0.5), 0), min(math.floor(y.max() + 0.5) + 1, ny)
        if x0 >= x1 or y0 >= y1:
            return []
        return [
            self.tile_id(iy, ix)
            for iy in range(y0 // t, (y1 - 1) // t + 1)
            for ix in range(x0 // t, (x1 - 1) // t + 1)
        ]

    def _project(
        self, radec: NDArray[np.float64]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]] | None:
        """Grid pixel coordinates of ``(ra, dec)`` points, or None if any is >= 90° away."""
        c0 = SkyCoord(self.ra_deg, self.dec_deg, unit="deg")
        sep = c0.separation(SkyCoord(radec[:, 0], radec[:, 1], unit="deg")).deg
        if np.any(sep >= 89.0):
            return None
        x, y = self.wcs.world_to_pixel_values(radec[:, 0], radec[:, 1])
        return np.asarray(x, dtype=float), np.asarray(y, dtype=float)

    # --- construction -------------------------------------------------------------
    @classmethod
    def covering(
        cls,
        footprints: Iterable[FootprintLike],
        *,
        pixel_scale_arcsec: float,
        tile_px: int = 2048,
        margin_px: int = 0,
    ) -> SkyGrid:
        """The smallest grid (tangent point at its centre) covering every footprint.

        Parameters
        ----------
        footprints
            WCSs with ``pixel_shape``, ``(WCS, (ny, nx))`` pairs, ``SkyCoord`` outlines or
            ``(N, 2)`` ``(ra, dec)`` degree arrays (e.g. every detector of every exposure).
        pixel_scale_arcsec
            The grid's pixel scale.
        tile_px
            Tile side in pixels.
        margin_px
            Extra pixels on every side.

        Examples
        --------
        >>> import numpy as np
        >>> g = SkyGrid.covering([np.array([[10.0, 0.0], [10.01, 0.01]])],
        ...                      pixel_scale_arcsec=1.0, tile_px=16)
        >>> g.shape, g.n_tiles
        ((39, 39), (3, 3))
        """
        corners = [footprint_of(f) for f in footprints]
        if not corners:
            msg = "SkyGrid.covering needs at least one footprint (got none)"
            raise ParameterError(msg)
        pts = np.concatenate(corners)
        if not np.all(np.isfinite(pts)):
            msg = "a footprint has non-finite (ra, dec) (a WCS that does not map its pixels?)"
            raise ParameterError(msg)
        ra, dec = np.radians(pts[:, 0]), np.radians(pts[:, 1])
        v = np.column_stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])
        m = v.mean(axis=0)
        centre = (
            math.degrees(math.atan2(m[1], m[0])),
            math.degrees(math.atan2(m[2], math.hypot(m[0], m[1]))),
        )
        for _ in range(2):  # re-centre on the middle of the projected bounding box
            probe = cls(centre[0], centre[1], pixel_scale_arcsec, (1, 1), tile_px)
            xy = probe._project(pts)
            if xy is None:
                msg = "the footprints span more than a hemisphere: no TAN grid covers them"
                raise ParameterError(msg)
            mx, my = (xy[0].min() + xy[0].max()) / 2, (xy[1].min() + xy[1].max()) / 2
            r, d = probe.wcs.pixel_to_world_values(mx, my)
            centre = (float(r), float(d))
        probe = cls(centre[0], centre[1], pixel_scale_arcsec, (1, 1), tile_px)
        xy = probe._project(pts)
        assert xy is not None
        half = [float(np.max(np.abs(c))) + 0.5 + margin_px for c in xy]
        nx, ny = (2 * math.ceil(h) + 1 for h in half)
        return cls(centre[0], centre[1], pixel_scale_arcsec, (ny, nx), tile_px)


def tiles_of(grid: SkyGrid, tiles: Sequence[str] | None) -> list[str]:
    """``tiles`` validated against ``grid`` (every tile when None)."""
    if tiles is None:
        return grid.tile_ids()
    for t in tiles:
        grid.tile_slices(t)
    return list(tiles)
