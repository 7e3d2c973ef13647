"""Start-up of a one-shot ``lazysky`` process: what it imports, and what it spares itself.

A ``lazysky coadd`` process is compared with SWarp's as a whole (docs/benchmarks/coadd.md),
so its imports count. These tests fail when the laziness breaks: the command line and
``import lazysky.pipeline`` import no heavy library, and a real coadd run through the
command line's own entry point imports neither the catalog, nor dask.distributed, nor
the difference imaging. They look at ``sys.modules`` in a fresh interpreter, never at
timings (those are the benchmark's).
"""

from __future__ import annotations

import gc
import json
import logging
import subprocess
import sys
import textwrap
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

import lazysky.pipeline
from lazysky.cli import main
from lazysky.pipeline import _coadd_jit

#: Libraries neither ``lazysky --help`` nor ``import lazysky.pipeline`` may import.
HEAVY = ("numpy", "dask", "distributed", "xarray", "astropy", "scipy", "numba", "zarr",
         "s3fs", "sqlalchemy", "psycopg", "bokeh", "pandas", "sep", "pydantic")  # fmt: skip
#: ... and what a coadd needs none of: the catalog, the cluster, difference imaging, SEP.
NOT_FOR_A_COADD = ("distributed", "zarr", "s3fs", "sqlalchemy", "psycopg", "bokeh", "sep",
                   "lazysky.catalog", "lazysky.cluster", "lazysky.zarr_store",
                   "lazysky.pipeline.difference", "lazysky.pipeline.psf",
                   "lazysky.pipeline.detect", "lazysky.pipeline.masters")  # fmt: skip

# Run in a fresh interpreter, in steps; after each, the modules loaded so far.
PROBE = textwrap.dedent(
    """
    import contextlib, gc, io, json, sys

    def loaded():
        return sorted(sys.modules)

    steps = {}
    from lazysky.cli import main
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(["--help"])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(["coadd", "--help"])
    steps["help"] = loaded()
    import lazysky.pipeline
    steps["import lazysky.pipeline"] = loaded()
    sys.argv = ["lazysky", "-q", "coadd", *sys.argv[1:]]
    rc = main()  # as the console script calls it
    steps["coadd"] = loaded()
    # frozen, and the collector on again with its thresholds
    frozen = gc.get_freeze_count() if gc.isenabled() and gc.get_threshold()[0] else -1
    # a submodule named like its function, imported first (the coadd did not import it)
    assert "lazysky.pipeline.detect" not in sys.modules
    import lazysky.pipeline.detect
    from lazysky.pipeline import detect
    shadowed = [callable(lazysky.pipeline.detect), detect is sys.modules[detect.__module__].detect]
    print(json.dumps({"steps": steps, "rc": rc, "frozen": frozen, "shadowed": shadowed}))
    """
)


def _frames(tmp_path: Path) -> list[Path]:
    """Two small dithered images with a TAN WCS (plain images: lazysky coadd takes them)."""
    rng = np.random.default_rng(5)
    paths = []
    for i, (dx, dy) in enumerate([(0.0, 0.0), (3.4, -2.2)]):
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [150.0, 2.0]
        w.wcs.crpix = [48.5 + dx, 40.5 + dy]
        w.wcs.cdelt = [-0.5 / 3600, 0.5 / 3600]
        image = rng.normal(100.0, 5.0, (80, 96)).astype(np.float32)
        path = tmp_path / f"frame{i}.fits"
        fits.PrimaryHDU(image, w.to_header()).writeto(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One fresh interpreter: the help, ``import lazysky.pipeline``, then a real coadd."""
    tmp = tmp_path_factory.mktemp("imports")
    frames = _frames(tmp)
    out = tmp / "coadd.fits"
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, frames), "--out", str(out)],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["out"] = out
    return result


def _of(modules: list[str], names: tuple[str, ...]) -> list[str]:
    return sorted({n for n in names for m in modules if m == n or m.startswith(n + ".")})


def test_help_imports_no_heavy_library(probe: dict) -> None:
    """``lazysky --help`` and ``lazysky coadd --help`` stay instant."""
    assert _of(probe["steps"]["help"], HEAVY) == []
    assert _of(probe["steps"]["help"], ("lazysky.pipeline", "lazysky.catalog")) == []
    assert "importlib.metadata" not in probe["steps"]["help"]  # __version__: on first use


def test_import_pipeline_imports_no_heavy_library(probe: dict) -> None:
    """The package's names are imported on first use (PEP 562), not with the package."""
    modules = probe["steps"]["import lazysky.pipeline"]
    assert _of(modules, HEAVY) == []
    assert [m for m in modules if m.startswith("lazysky.pipeline.")] == []


def test_a_coadd_imports_only_what_it_uses(probe: dict) -> None:
    """A real ``lazysky coadd``: no catalog, cluster, difference imaging or SEP."""
    assert probe["rc"] == 0
    modules = probe["steps"]["coadd"]
    assert _of(modules, NOT_FOR_A_COADD) == []
    # what it does need was imported (the probe saw a real coadd, not a no-op)
    assert _of(modules, ("dask", "numba", "lazysky.pipeline.stack")) == [
        "dask", "lazysky.pipeline.stack", "numba"]  # fmt: skip
    with fits.open(probe["out"]) as hdul:
        assert np.nanmax(hdul["COUNT"].data) == 2


def test_the_command_lines_process_freezes_the_collector_before_exit(probe: dict) -> None:
    """``main()`` of the console script leaves the imported objects to the process's end."""
    assert probe["frozen"] > 10_000


def test_a_submodule_imported_first_does_not_replace_its_function(probe: dict) -> None:
    """``import lazysky.pipeline.detect`` then ``lazysky.pipeline.detect`` is the function."""
    assert probe["shadowed"] == [True, True]


def test_main_with_argv_leaves_the_collector_alone(capsys: pytest.CaptureFixture[str]) -> None:
    before = gc.get_freeze_count()
    assert main(["config"]) == 0
    assert gc.get_freeze_count() == before
    assert json.loads(capsys.readouterr().out)  # the command did run


@pytest.mark.parametrize("name", lazysky.pipeline.__all__)
def test_public_names_are_those_of_their_modules(name: str) -> None:
    """Each public name is the object its submodule defines, whatever was imported first.

    ``stack``, ``difference`` and ``detect`` are also submodules' names: importing the
    submodule must not replace the function on the package.
    """
    module = import_module(f"lazysky.pipeline.{lazysky.pipeline._LAZY[name]}")
    value = getattr(lazysky.pipeline, name)
    assert value is getattr(module, name)
    from lazysky import pipeline as again

    assert getattr(again, name) is value


def test_submodules_are_attributes_and_unknown_names_are_errors() -> None:
    assert lazysky.pipeline.fitsio is import_module("lazysky.pipeline.fitsio")
    assert callable(lazysky.pipeline.stack)
    assert set(lazysky.pipeline.__all__) <= set(dir(lazysky.pipeline))
    with pytest.raises(AttributeError, match="no attribute 'no_such_step'"):
        _ = lazysky.pipeline.no_such_step


def test_kernels_compile_uncached_where_numba_cannot_cache(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A read-only install with no writable home: numba's ``cache=True`` raises at import.

    numba then finds no cache locator; here only its zip-import locator is allowed, which
    matches no file on disk: the same error. The kernels must still compile (uncached),
    with one warning that names the fix.
    """
    numba_config = pytest.importorskip("numba.core.config")
    monkeypatch.setattr(numba_config, "CACHE_LOCATOR_CLASSES", "ZipCacheLocator")
    _coadd_jit._warn_uncached.cache_clear()

    def halve(x: np.ndarray) -> np.ndarray:
        return x / 2

    with caplog.at_level(logging.WARNING, logger="lazysky.pipeline._coadd_jit"):
        first, second = _coadd_jit._jit(halve), _coadd_jit._jit(halve)
    np.testing.assert_array_equal(first(np.arange(4.0)), [0.0, 0.5, 1.0, 1.5])
    assert type(first._cache).__name__ == "NullCache"  # compiled, not cached
    assert second is not first
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1  # once per process
    assert "NUMBA_CACHE_DIR" in warned[0]
    assert "__pycache__" in warned[0]
    _coadd_jit._warn_uncached.cache_clear()
