"""Fixtures for the pipeline tests: one small simulated survey, its masters, its truth."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
import xarray as xr

from lazysky.pipeline import make_masters
from lazysky.pipeline.testing import exposure_from_fits
from lazysky.simulator import SurveySpec, load_instrument, plan_exposures, simulate_survey

INST = load_instrument("tiny")
TILE = 64  # small tiles, so every test crosses tile boundaries
WHOLE = 4096  # a tile larger than any detector of the tiny instrument: one chunk each


@dataclass
class Survey:
    root: Path
    spec: SurveySpec
    pointings: list[Any]

    def frames(self, kind: str, *, tile_px: int = TILE) -> list[xr.Dataset]:
        paths = sorted(self.root.glob(f"calib/tiny-{kind}-[0-9][0-9][0-9].fits"))
        return [exposure_from_fits(p, tile_px=tile_px) for p in paths]

    def exposure(self, k: int, *, tile_px: int = TILE) -> xr.Dataset:
        return exposure_from_fits(self.raw(k, ".fits"), tile_px=tile_px)

    def raw(self, k: int, suffix: str) -> Path:
        return self.root / "raw" / f"{self.pointings[k].exposure_id}{suffix}"


@pytest.fixture(scope="session")
def survey(tmp_path_factory: pytest.TempPathFactory) -> Survey:
    """Tiny instrument, 4 detectors: 3 exposures, 5 biases, 3 darks, 10 flats (~10 s)."""
    spec = SurveySpec(
        instrument="tiny",
        n_epochs=1,
        n_dithers=3,
        star_density_per_deg2=3.0e4,
        star_mag_range=(16.0, 21.0),
        galaxy_density_per_deg2=3e3,
        n_transients=0,
        n_variables=0,
        n_movers=0,
        seed=11,
        n_bias=5,
        n_dark=3,
        n_flat=10,
    )
    root = tmp_path_factory.mktemp("pipeline-survey")
    simulate_survey(spec, root)
    assert json.loads((root / "survey.json").read_text())["calibrations"]["flat"]
    return Survey(root, spec, plan_exposures(spec))


@pytest.fixture(scope="session")
def masters(survey: Survey) -> xr.Dataset:
    """The masters of the survey, computed once (in memory)."""
    return make_masters(
        bias=survey.frames("bias"), dark=survey.frames("dark"), flat=survey.frames("flat-r")
    ).compute()


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    """Bit-for-bit equality, NaN equal to NaN."""
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@contextmanager
def raise_if_dask_computes() -> Iterator[None]:
    """Fail if anything computes a dask graph inside the block (like xarray's helper).

    xarray.tests itself cannot be imported here: it registers a ``flaky`` marker that
    ``--strict-markers`` refuses.
    """

    def scheduler(dsk: Any, keys: Any, **kwargs: Any) -> Any:
        msg = f"a dask graph was computed inside a lazy API (keys {str(keys)[:200]})"
        raise RuntimeError(msg)

    with dask.config.set(scheduler=scheduler):
        yield


@pytest.fixture(scope="session")
def calibrated(survey: Survey, masters: Any) -> list[xr.Dataset]:
    """The survey's exposures calibrated, cosmic rays flagged, sky subtracted (in memory)."""
    return _calibrate_all(survey, masters)


@pytest.fixture(scope="session")
def bright_survey(tmp_path_factory: pytest.TempPathFactory) -> Survey:
    """3 dithered exposures of bright, unsaturated stars (17.5–20.5 mag): coadd vs truth.

    No calibration frames: the instrument's defects are fixed by its ``defect_seed``, so
    the masters of :func:`survey` calibrate these too.
    """
    spec = SurveySpec(
        instrument="tiny",
        n_epochs=1,
        n_dithers=3,
        star_density_per_deg2=4.0e4,
        star_mag_range=(17.5, 20.5),
        galaxy_density_per_deg2=2e3,
        n_transients=0,
        n_variables=0,
        n_movers=0,
        seed=23,
        n_bias=0,
        n_dark=0,
        n_flat=0,
    )
    root = tmp_path_factory.mktemp("coadd-survey")
    simulate_survey(spec, root)
    return Survey(root, spec, plan_exposures(spec))


def _calibrate_all(survey: Survey, masters: Any) -> list[xr.Dataset]:
    """Every exposure calibrated, cosmic rays flagged, sky subtracted, in memory, then
    chunked in TILE blocks again for the steps under test.

    Computed in whole-detector chunks: the pixels are the same bit for bit as in TILE
    chunks (the steps' halos make chunked equal in-memory, which
    tests/pipeline/test_calibrate.py and test_cosmics.py check), and the cosmic-ray
    finder's halos on 64 px tiles cost three times the CPU. One exposure at a time, so
    only one whole exposure's temporaries are in memory at once. (Computing several
    sky-subtracted Datasets together used to fail on a dask 2026.8 fusion bug; see
    ``estimate_background`` and ``test_subtracted_dataset_computes_whole``.)
    """
    from lazysky.pipeline import calibrate_exposure, flag_cosmic_rays, subtract_background

    out = []
    for k in range(len(survey.pointings)):
        exposure = survey.exposure(k, tile_px=WHOLE)
        cal = subtract_background(flag_cosmic_rays(calibrate_exposure(exposure, masters)))
        cal = cal.compute()  # data variables back to dask; coordinates stay metadata
        out.append(
            cal.assign({k: v.chunk({"y": TILE, "x": TILE}) for k, v in cal.data_vars.items()})
        )
    return out


@pytest.fixture(scope="session")
def bright_calibrated(bright_survey: Survey, masters: Any) -> list[xr.Dataset]:
    """The bright survey's exposures calibrated, cosmic rays flagged, sky subtracted."""
    return _calibrate_all(bright_survey, masters)
