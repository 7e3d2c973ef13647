"""Write a simulated survey: one Dask graph, one task per detector, files written whole.

Safety: the specification is validated and the output probed before any pixel is drawn;
every file is written whole (a temporary name then a rename on local disk, a single PUT
on object stores); ``survey.json`` is written last and marks the survey complete; if
anything fails, the files this call wrote are removed, so nothing partial is left.
"""

from __future__ import annotations

import io
import logging
import os
import uuid
from collections import Counter
from typing import Any

import dask
import fsspec
from astropy.table import vstack
from dask.base import tokenize
from fsspec.implementations.local import LocalFileSystem

from lazysky.errors import OutputError
from lazysky.simulator.exposure import DetectorResult, Pointing, exposure_hdul, render_detector
from lazysky.simulator.instruments import Instrument
from lazysky.simulator.scene import Scene
from lazysky.simulator.survey import (
    STREAM_CALIB,
    STREAM_EXPOSURE,
    ExposureInfo,
    SimulatedSurvey,
    SurveySpec,
    manifest_json,
    plan_exposures,
    sha256_bytes,
    survey_scene,
    table_bytes,
)

__all__ = ["calibration_pointings", "simulate_survey"]

logger = logging.getLogger(__name__)

MANIFEST = "survey.json"


class _Output:
    """A directory or fsspec URL that files are written into whole. Picklable."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None) -> None:
        self.url = url
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except (ValueError, ImportError) as exc:
            msg = f"cannot write the survey to {url!r}: {exc}"
            raise OutputError(msg) from None
        self.root = self.root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.path(rel)))

    def probe(self) -> None:
        """Create the root and check it takes a file, before any work is done."""
        probe = f".lazysky-probe-{uuid.uuid4().hex}"
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.put(probe, b"")
            self.fs.rm(self.path(probe))
        except OSError as exc:
            msg = f"cannot write the survey to {self.url!r}: {exc}"
            raise OutputError(msg) from None

    def put(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        if self.local:
            folder = os.path.dirname(target)
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".{os.path.basename(target)}.{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            self.fs.pipe_file(target, data)

    def remove(self, rels: list[str]) -> None:
        for rel in rels:
            try:
                if self.fs.isfile(self.path(rel)):
                    self.fs.rm(self.path(rel))
            except (OSError, ValueError):  # best effort: the original error is what matters
                logger.warning("could not remove %s", self.path(rel))


def calibration_pointings(spec: SurveySpec) -> list[Pointing]:
    """Biases, darks (at the science exposure time) and dome flats for the survey."""
    inst = spec.inst
    base = spec.start_mjd - 0.5
    out: list[Pointing] = []
    kinds: list[tuple[str, int, float, str]] = [
        ("bias", spec.n_bias, 0.0, f"{inst.name}-bias"),
        ("dark", spec.n_dark, spec.exposure_time, f"{inst.name}-dark"),
        ("flat", spec.n_flat, 10.0, f"{inst.name}-flat-{spec.band_name}"),
    ]
    for kind, count, exptime, prefix in kinds:
        for i in range(count):
            out.append(
                Pointing(
                    exposure_id=f"{prefix}-{i:03d}",
                    image_type=kind,  # type: ignore[arg-type]
                    mjd=round(base + len(out) * 120.0 / 86400.0, 8),
                    exptime_s=exptime,
                    filter=spec.band_name,
                    ra_deg=spec.ra_deg,
                    dec_deg=spec.dec_deg,
                    pa_deg=spec.position_angle_deg,
                    seeing_arcsec=inst.seeing_fwhm_arcsec,
                    sky_e_per_s_px=0.0,
                    flat_level_e=spec.flat_level_e if kind == "flat" else 0.0,
                )
            )
    return out


def _write_scene(out: _Output, scene: Scene) -> str:
    """Write ``truth/scene.ecsv``; return its SHA-256."""
    data = table_bytes(scene.table)
    out.put("truth/scene.ecsv", data)
    return sha256_bytes(data)


def _write_exposure(
    out: _Output,
    inst: Instrument,
    p: Pointing,
    detectors: list[DetectorResult],
    *,
    folder: str,
    seed: int,
    version: str,
) -> dict[str, Any]:
    """Write one exposure's FITS, truth and cosmic-ray tables; return names and SHA-256s."""
    hdul = exposure_hdul(inst, p, detectors, seed=seed, version=version)
    buf = io.BytesIO()
    hdul.writeto(buf)
    files = {"fits": f"{folder}/{p.exposure_id}.fits"}
    blobs = {files["fits"]: buf.getvalue()}
    cosmics = vstack([d.cosmic_rays for d in detectors]) if detectors else None
    if cosmics is not None and p.exptime_s > 0:
        cosmics.meta["EXPID"] = p.exposure_id
        files["cosmics"] = f"{folder}/{p.exposure_id}.cosmics.ecsv"
        blobs[files["cosmics"]] = table_bytes(cosmics)
    kinds: dict[str, int] = {}
    if p.image_type == "object":
        truth = vstack([d.truth for d in detectors])
        truth.meta.update(
            {
                "exposure_id": p.exposure_id,
                "mjd": p.mjd,
                "filter": p.filter,
                "flux_e": "electrons in the exposure for a flat field of 1",
            }
        )
        files["truth"] = f"{folder}/{p.exposure_id}.truth.ecsv"
        blobs[files["truth"]] = table_bytes(truth)
        kinds = dict(Counter(str(k) for k in truth["kind"]))
    for rel, data in blobs.items():
        out.put(rel, data)
    return {
        "id": p.exposure_id,
        "files": files,
        "sha256": {rel: sha256_bytes(data) for rel, data in blobs.items()},
        "kinds": kinds,
    }


def simulate_survey(
    spec: SurveySpec,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    calibrations: bool = True,
    storage_options: dict[str, Any] | None = None,
    scheduler: str | None = None,
) -> SimulatedSurvey:
    """Simulate ``spec`` and write it under ``out`` (a directory or an fsspec URL).

    Parameters
    ----------
    spec
        What to simulate; the seed makes the output byte-for-byte reproducible.
    out
        Output directory or URL (``s3://bucket/prefix``).
    overwrite
        Replace a survey already there (its files are removed first). Without it, an
        existing ``survey.json`` is an error.
    calibrations
        Also write biases, darks and flats.
    storage_options
        fsspec options for ``out`` (for S3: endpoint, credentials).
    scheduler
        A Dask scheduler name; default: the active one (a distributed client if any).

    Raises
    ------
    OutputError
        ``out`` cannot be written, or holds a survey and ``overwrite`` is false.

    Examples
    --------
    >>> import tempfile
    >>> spec = SurveySpec(instrument="tiny", n_epochs=1, n_dithers=1, n_bias=0, n_dark=0,
    ...                   n_flat=0, detectors=("CCD01",))
    >>> survey = simulate_survey(spec, tempfile.mkdtemp())
    >>> [e.exposure_id for e in survey.exposures]
    ['deep1-r-e000-d00']
    """
    from lazysky import __version__

    url = os.fspath(out)
    target = _Output(url, storage_options)
    if target.exists(MANIFEST):
        if not overwrite:
            msg = (
                f"{url!r} already holds a simulated survey ({MANIFEST}); "
                "pass overwrite=True (--overwrite) to replace it, or choose another output"
            )
            raise OutputError(msg)
        _remove_previous(target)
    target.probe()

    inst = spec.inst
    scene = survey_scene(spec)
    pointings = plan_exposures(spec)
    calib = calibration_pointings(spec) if calibrations else []
    token = tokenize(spec.model_dump_json())[:8]
    scene_d = dask.delayed(scene, name=f"scene-{token}")
    tasks = []
    for stream, folder, group in (
        (STREAM_EXPOSURE, "raw", pointings),
        (STREAM_CALIB, "calib", calib),
    ):
        for k, p in enumerate(group):
            dets = [
                dask.delayed(render_detector, pure=True)(
                    inst,
                    scene_d if p.image_type == "object" else None,
                    p,
                    i,
                    spec.seed,
                    (stream, k),
                    dask_key_name=f"simulate-{p.exposure_id}-{inst.detectors[i].name}-{token}",
                )
                for i in spec.detector_indices
            ]
            tasks.append(
                dask.delayed(_write_exposure, pure=True)(
                    target,
                    inst,
                    p,
                    dets,
                    folder=folder,
                    seed=spec.seed,
                    version=__version__,
                    dask_key_name=f"write-{p.exposure_id}-{token}",
                )
            )
    planned = _planned_files(pointings, calib)
    logger.info(
        "simulating %d exposures + %d calibration frames on %d detectors",
        len(pointings),
        len(calib),
        len(spec.detector_indices),
    )
    try:
        # the scene's truth table is written by a task of its own, beside the detectors
        scene_task = dask.delayed(_write_scene, pure=True)(
            target, scene_d, dask_key_name=f"write-scene-{token}"
        )
        *results, scene_sha = dask.compute(*tasks, scene_task, scheduler=scheduler)
        survey = _assemble(url, spec, scene, pointings, calib, tuple(results))
        survey.checksums["truth/scene.ecsv"] = scene_sha
        target.put(MANIFEST, manifest_json(survey, __version__))
    except BaseException:
        target.remove([*planned, MANIFEST])
        raise
    logger.info("wrote %s", survey.manifest)
    return survey


def _planned_files(pointings: list[Pointing], calib: list[Pointing]) -> list[str]:
    files = ["truth/scene.ecsv"]
    for p in pointings:
        files += [f"raw/{p.exposure_id}{s}" for s in (".fits", ".truth.ecsv", ".cosmics.ecsv")]
    for p in calib:
        files += [f"calib/{p.exposure_id}{s}" for s in (".fits", ".cosmics.ecsv")]
    return files


def _remove_previous(target: _Output) -> None:
    import json

    try:
        old = json.loads(target.fs.cat_file(target.path(MANIFEST)))
        listed = list(old.get("sha256", {}))
    except (OSError, ValueError):
        listed = []
    target.remove([MANIFEST, *listed])


def _assemble(
    url: str,
    spec: SurveySpec,
    scene: Scene,
    pointings: list[Pointing],
    calib: list[Pointing],
    results: tuple[dict[str, Any], ...],
) -> SimulatedSurvey:
    by_id = {r["id"]: r for r in results}
    checksums: dict[str, str] = {}
    for r in results:
        checksums.update(r["sha256"])
    exposures = [
        ExposureInfo(
            p.exposure_id,
            p.epoch,
            p.dither,
            p.mjd,
            p.ra_deg,
            p.dec_deg,
            p.seeing_arcsec,
            by_id[p.exposure_id]["files"],
        )
        for p in pointings
    ]
    calibrations: dict[str, list[str]] = {"bias": [], "dark": [], "flat": []}
    for p in calib:
        calibrations[p.image_type].append(by_id[p.exposure_id]["files"]["fits"])
    kinds = Counter(str(k) for k in scene.table["kind"])
    return SimulatedSurvey(
        root=url,
        spec=spec,
        exposures=exposures,
        calibrations=calibrations,
        n_sources={
            k: int(kinds.get(k, 0)) for k in ("star", "galaxy", "transient", "variable", "mover")
        },
        checksums=checksums,
    )
