"""The sky grid: projection, tiles, overlaps, covering a set of footprints."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.wcs import WCS

from lazysky.errors import ParameterError
from lazysky.pipeline import SkyGrid


def _grid(**kw: object) -> SkyGrid:
    args: dict[str, object] = {"ra_deg": 150.0, "dec_deg": 2.0, "pixel_scale_arcsec": 0.5,
                               "shape": (300, 500), "tile_px": 128}  # fmt: skip
    args.update(kw)
    return SkyGrid(**args)  # type: ignore[arg-type]


def test_wcs_is_tan_centred_and_fresh() -> None:
    g = _grid()
    w1, w2 = g.wcs, g.wcs
    assert w1 is not w2
    assert list(w1.wcs.ctype) == ["RA---TAN", "DEC--TAN"]
    ra, dec = w1.pixel_to_world_values(249.5, 149.5)  # the centre of a 500 x 300 grid
    assert ra == pytest.approx(150.0)
    assert dec == pytest.approx(2.0)
    r2, d2 = w1.pixel_to_world_values(250.5, 149.5)
    sep = SkyCoord(ra, dec, unit="deg").separation(SkyCoord(r2, d2, unit="deg")).arcsec
    assert sep == pytest.approx(0.5, rel=1e-6)
    assert r2 < ra  # east is left
    assert pickle.loads(pickle.dumps(g)) == g
    assert hash(g) == hash(_grid())
    assert SkyGrid(**{**g.to_dict(), "shape": tuple(g.to_dict()["shape"])}) == g


def test_tiles_ids_slices_and_wcs() -> None:
    g = _grid()
    assert g.n_tiles == (3, 4)
    assert g.chunks == ((128, 128, 44), (128, 128, 128, 116))
    assert g.tile_ids()[5] == "t001_001"
    assert g.tile_slices("t001_003") == (slice(128, 256), slice(384, 500))
    assert g.tile_shape("t002_003") == (44, 116)
    # the halo window grows inside the grid and is clipped at its edges
    assert g.tile_window("t001_001", 10) == (slice(118, 266), slice(118, 266))
    assert g.tile_window("t002_003", 10) == (slice(246, 300), slice(374, 500))
    tw = g.tile_wcs("t001_002")
    np.testing.assert_allclose(tw.pixel_to_world_values(3.0, 7.0),
                               g.wcs.pixel_to_world_values(256 + 3.0, 128 + 7.0))  # fmt: skip
    assert tw.pixel_shape == (128, 128)


def test_tiles_overlapping_a_footprint() -> None:
    g = _grid()
    w = g.wcs
    corners = np.column_stack(w.pixel_to_world_values([10, 140, 140, 10], [10, 10, 20, 20]))
    assert g.tiles_overlapping(corners) == ["t000_000", "t000_001"]
    sub = WCS(naxis=2)
    sub.wcs.ctype, sub.wcs.crval = ["RA---TAN", "DEC--TAN"], [150.0, 2.0]
    sub.wcs.crpix, sub.wcs.cdelt = [5.5, 5.5], [-1 / 7200, 1 / 7200]
    assert g.tiles_overlapping((sub, (10, 10))) == ["t001_001"]
    far = np.array([[10.0, -40.0], [10.1, -40.1]])
    assert g.tiles_overlapping(far) == []
    assert g.tiles_overlapping(SkyCoord([150.0], [2.0], unit="deg")) == ["t001_001"]


def test_covering_contains_every_corner() -> None:
    fps = []
    for dra, ddec in [(0.0, 0.0), (0.02, 0.01), (-0.01, 0.03)]:
        w = WCS(naxis=2)
        w.wcs.ctype, w.wcs.crval = ["RA---TAN", "DEC--TAN"], [30.0 + dra, -20.0 + ddec]
        w.wcs.crpix, w.wcs.cdelt = [1.0, 1.0], [-0.3 / 3600, 0.3 / 3600]
        w.pixel_shape = (400, 300)
        fps.append(w)
    g = SkyGrid.covering(fps, pixel_scale_arcsec=0.4, tile_px=256, margin_px=3)
    for w in fps:
        x, y = g.wcs.world_to_pixel_values(*w.pixel_to_world_values([-0.5, 399.5], [-0.5, 299.5]))
        assert np.all((np.asarray(x) >= 2.5) & (np.asarray(x) <= g.shape[1] - 3.5))
        assert np.all((np.asarray(y) >= 2.5) & (np.asarray(y) <= g.shape[0] - 3.5))
    # and it is not much larger than needed
    assert g.shape[1] * 0.4 < (0.03 * 3600 * np.cos(np.radians(20)) + 400 * 0.3) + 10


def test_bad_parameters_say_what_is_wrong() -> None:
    with pytest.raises(ParameterError, match="pixel_scale_arcsec"):
        _grid(pixel_scale_arcsec=0)
    with pytest.raises(ParameterError, match="shape"):
        _grid(shape=(0, 10))
    with pytest.raises(ParameterError, match="tile_px"):
        _grid(tile_px=0)
    with pytest.raises(ParameterError, match="t<iy:03d>_<ix:03d>"):
        _grid().tile_slices("tile-3")
    with pytest.raises(ParameterError, match="outside the grid"):
        _grid().tile_slices("t009_000")
    with pytest.raises(ParameterError, match="at least one footprint"):
        SkyGrid.covering([], pixel_scale_arcsec=1.0)
    with pytest.raises(ParameterError, match="pixel_shape"):
        SkyGrid.covering([WCS(naxis=2)], pixel_scale_arcsec=1.0)
    with pytest.raises(ParameterError, match="hemisphere"):
        SkyGrid.covering([np.array([[0.0, 0.0], [180.0, 0.0]])], pixel_scale_arcsec=1.0)
