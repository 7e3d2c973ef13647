"""The ``lazysky`` command. Thin: it parses arguments, calls the library, prints.

Heavy imports (numpy, astropy, dask) happen inside the subcommands, so ``lazysky --help``
is instant. Only this module configures logging.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from lazysky.errors import LazySkyError

logger = logging.getLogger("lazysky")

Handler = Callable[[argparse.Namespace], int]


def _cmd_simulate(args: argparse.Namespace) -> int:
    from lazysky.simulator import SurveySpec, simulate_survey

    fields = {
        "instrument": args.instrument,
        "n_epochs": args.epochs,
        "n_dithers": args.dithers,
        "seed": args.seed,
    }
    if args.exptime is not None:
        fields["exptime_s"] = args.exptime
    if args.filter is not None:
        fields["filter"] = args.filter
    if args.detectors:
        fields["detectors"] = args.detectors.split(",")
    if args.transients is not None:
        fields["n_transients"] = args.transients
    spec = SurveySpec.from_yaml(args.config, **fields) if args.config else SurveySpec(**fields)
    result = simulate_survey(
        spec, args.out, overwrite=args.overwrite, calibrations=not args.no_calib
    )
    print(result.summary())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lazysky.demo import demo

    result = demo(args.out, seed=args.seed, echo=lambda line: print(line, flush=True))
    print()
    print(result)
    return 0 if result.summary.status == "done" else 3


def _cmd_instruments(args: argparse.Namespace) -> int:
    from lazysky.simulator import list_instruments, load_instrument

    for name in list_instruments():
        inst = load_instrument(name)
        print(f"{name:12s} {inst.describe()}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from lazysky.config import load_settings

    settings = load_settings(args.config)
    print(json.dumps(settings.model_dump(mode="json"), indent=2))
    return 0


# --- ingest (zarr_store) -------------------------------------------------------------
def _cmd_ingest(args: argparse.Namespace) -> int:
    from lazysky.config import load_settings
    from lazysky.errors import ParameterError
    from lazysky.zarr_store import ingest

    settings = load_settings(args.config)
    store = args.store or settings.store_url
    try:
        tile = tuple(int(v) for v in args.tile.split(","))
    except ValueError:
        msg = f"--tile must be 'y,x' or 'n' in pixels, e.g. 1024,1024; got {args.tile!r}"
        raise ParameterError(msg) from None
    report = ingest(
        args.sources,
        store,
        overwrite=args.overwrite,
        tile_shape=(tile[0], tile[-1]),
        require=[k for k in (args.require or "").split(",") if k],
        settings=settings,
    )
    print(report.summary())
    return 0 if report.ok else 1


def _add_ingest_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("ingest", help="ingest FITS exposures into the Zarr store")
    p.add_argument(
        "sources",
        nargs="+",
        metavar="PATH_OR_URL",
        help="FITS files, directories or glob patterns (local or s3://…)",
    )
    p.add_argument("--store", help="store root, directory or s3:// URL (default: settings)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an exposure id that holds a different file",
    )
    p.add_argument("--tile", default="1024,1024", help="chunk shape y,x (default 1024,1024)")
    p.add_argument("--require", help="comma-separated primary keywords every file must have")
    p.add_argument("--config", help="YAML settings file (default: $LAZYSKY_CONFIG)")
    p.set_defaults(handler=_cmd_ingest)


# --- end ingest ----------------------------------------------------------------------

# --- catalog commands (issue 7): catalog up|down|status|dsn, cone, serve ------------------


def _cmd_catalog(args: argparse.Namespace) -> int:
    from lazysky.catalog import server
    from lazysky.catalog.database import open_catalog
    from lazysky.config import load_settings

    settings = load_settings(args.config)
    if args.action == "dsn":
        print(open_catalog(settings).dsn if settings.catalog_dsn is None
              else settings.catalog_dsn)
        return 0
    if settings.catalog_dsn is not None:
        print(f"the catalog is the configured server {settings.catalog_dsn}; "
              f"'lazysky catalog {args.action}' manages the embedded server only")
        return 0 if args.action == "status" else 1
    if args.action == "up":
        print(open_catalog(settings).dsn)
    elif args.action == "down":
        was = server.stop(settings.catalog_dir)
        print("stopped" if was else "not running")
    else:
        state = server.status(settings.catalog_dir)
        print(state)
        return 0 if state.running else 3
    return 0


def _cmd_cone(args: argparse.Namespace) -> int:
    import io

    from lazysky.catalog import cone_search, open_catalog
    from lazysky.config import load_settings

    table = cone_search(args.ra, args.dec, args.radius, table=args.table, run=args.run,
                        columns=args.columns, limit=args.limit,
                        catalog=open_catalog(load_settings(args.config)))
    if args.format == "table":
        table.pprint_all()
    elif args.format == "json":
        rows = [{k: (v.item() if hasattr(v, "item") else v) for k, v in zip(
            table.colnames, row, strict=True)} for row in table.iterrows()]
        print(json.dumps(rows, indent=1))
    else:
        buf = io.BytesIO() if args.format == "votable" else io.StringIO()
        table.write(buf, format="votable" if args.format == "votable" else "ascii.csv")
        out = buf.getvalue()
        sys.stdout.write(out.decode() if isinstance(out, bytes) else out)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from lazysky.catalog import open_catalog
    from lazysky.catalog.scs import ServiceLimits, make_server
    from lazysky.config import load_settings

    catalog = open_catalog(load_settings(args.config))
    limits = ServiceLimits(max_radius_deg=args.max_radius, max_rows=args.max_rows)
    httpd = make_server(catalog, host=args.host, port=args.port, limits=limits)
    host, port = httpd.server_address[:2]
    print(f"Simple Cone Search: http://{host!s}:{port}/scs/coadd?", flush=True)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
    return 0


def _add_catalog_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("catalog", help="the embedded catalog server: up, down, status, dsn")
    p.add_argument("action", choices=["up", "down", "status", "dsn"])
    p.add_argument("--config", help="YAML settings file (default: $LAZYSKY_CONFIG)")
    p.set_defaults(handler=_cmd_catalog)

    p = sub.add_parser(
        "cone", help="cone search: sources around a position",
        epilog="A negative sexagesimal Dec needs '--' first: lazysky cone -- 10:00:00 "
        "-05:30:00 1arcmin (plain negative degrees such as -5.5 need nothing).")
    p.add_argument("ra", metavar="RA", help="degrees, hh:mm:ss or with a unit")
    p.add_argument("dec", metavar="DEC", help="degrees, dd:mm:ss or with a unit")
    p.add_argument("radius", metavar="RADIUS", help="degrees or with a unit (10arcsec)")
    p.add_argument("--table", default="coadd",
                   help="coadd, diff, coadd_prod or diff_prod (default coadd)")
    p.add_argument("--run", help="only this run id")
    p.add_argument("--columns", help="comma-separated columns (default all)")
    p.add_argument("--limit", type=int, default=100_000, help="most rows (nearest first)")
    p.add_argument("--format", choices=["table", "csv", "votable", "json"], default="table")
    p.add_argument("--config", help="YAML settings file (default: $LAZYSKY_CONFIG)")
    p.set_defaults(handler=_cmd_cone)

    p = sub.add_parser("serve", help="IVOA Simple Cone Search HTTP service")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port (0: a free one)")
    p.add_argument("--max-radius", type=float, default=1.0, help="largest SR, deg")
    p.add_argument("--max-rows", type=int, default=10_000, help="most rows per answer")
    p.add_argument("--config", help="YAML settings file (default: $LAZYSKY_CONFIG)")
    p.set_defaults(handler=_cmd_serve)


# --- end of catalog commands ------------------------------------------------------------


# --- pipeline commands (issue 5): calibrate, coadd --------------------------------------


def _in_process_dask() -> Any:
    """dask's settings for a command that computes in its own process (calibrate, coadd).

    The command's process has no dask.distributed client, so dask computes on its
    threads (``dask.threaded.get``, what ``scheduler="threads"`` names) and rechunks
    with tasks; but it imports dask.distributed (~0.1–0.2 s) to find that out, even for
    a scheduler given by name. Say so up front, with the function itself, unless the
    user's dask configuration already chose a scheduler or a rechunk method.
    """
    import dask
    import dask.threaded

    return dask.config.set({
        "scheduler": dask.config.get("scheduler", None) or dask.threaded.get,
        "array.rechunk.method": dask.config.get("array.rechunk.method", None) or "tasks",
    })  # fmt: skip


@contextlib.contextmanager
def _imports(args: argparse.Namespace) -> Iterator[None]:
    """Around a command's imports: in the command line's own process, no collections.

    Importing the pipeline's libraries makes ~220,000 objects that live until the process
    ends; the collector, triggered by their allocation, traversed them in several full
    collections (~0.2–0.3 s of a ~4 s ``lazysky coadd``). In the command line's own
    process (``args.one_shot``, set by :func:`main`) no collection is triggered during
    the imports (threshold 0), then the imported objects are frozen out of its sight
    (``gc.freeze``) and the thresholds are restored for the computation. Elsewhere
    (``main(argv)``) nothing changes. Not ``gc.disable()``: dask's ``disable_gc``
    decorator, applied at import, would take the collector's state then for good.
    """
    if not getattr(args, "one_shot", False):
        yield
        return
    thresholds = gc.get_threshold()
    gc.set_threshold(0)
    try:
        yield
    finally:
        gc.freeze()
        gc.set_threshold(*thresholds)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    with _imports(args):
        from lazysky.pipeline.fitsio import calibrate_files

    with _in_process_dask():
        written = calibrate_files(
            args.raw, args.out, bias=args.bias, dark=args.dark or (), flat=args.flat or (),
            cosmics=args.cosmics, background=args.subtract_background,
            overwrite=args.overwrite,
        )  # fmt: skip
    for path in written:
        print(path)
    return 0


def _cmd_coadd(args: argparse.Namespace) -> int:
    with _imports(args):
        from importlib import import_module

        from lazysky.pipeline.fitsio import coadd_files

        for module in ("background", "stack"):  # what coadd_files imports when called
            import_module(f"lazysky.pipeline.{module}")  # (stack: resample, grid, numba)

    with _in_process_dask():
        out = coadd_files(args.inputs, args.out, pixel_scale_arcsec=args.pixel_scale,
                          method=args.method, tile_px=args.tile_px, overwrite=args.overwrite,
                          subtract_background=args.subtract_background,
                          register=args.register)  # fmt: skip
    print(out)
    return 0


def _add_pipeline_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("calibrate", help="calibrate raw MEF FITS exposures (bias, dark, flat, "
                       "cosmic rays) into image/variance/mask MEF files")
    p.add_argument("raw", nargs="+", metavar="RAW.fits", help="raw exposures")
    p.add_argument("--bias", nargs="+", required=True, metavar="FITS", help="bias frames")
    p.add_argument("--dark", nargs="+", metavar="FITS", help="dark frames")
    p.add_argument("--flat", nargs="+", metavar="FITS", help="flat frames")
    p.add_argument("--out", required=True,
                   help="output file (one RAW) or existing directory (several: <name>.cal.fits)")
    p.add_argument("--no-cosmics", dest="cosmics", action="store_false",
                   help="do not flag cosmic rays (L.A.Cosmic)")
    p.add_argument("--subtract-background", action="store_true",
                   help="estimate and subtract the sky background")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(handler=_cmd_calibrate)

    p = sub.add_parser("coadd", help="resample and stack calibrated FITS frames (like SWarp)")
    p.add_argument("inputs", nargs="+", metavar="FITS",
                   help="calibrated frames: lazysky calibrate MEFs or single images with WCS")
    p.add_argument("--out", required=True, help="output coadd FITS file")
    p.add_argument("--pixel-scale", type=float, metavar="ARCSEC",
                   help="grid pixel scale (default: the inputs' median)")
    p.add_argument("--method", choices=["clipped-mean", "median"], default="clipped-mean",
                   help="combine method (default clipped-mean)")
    p.add_argument("--tile-px", type=int, default=2048, metavar="N",
                   help="grid tile size in pixels (default 2048)")
    p.add_argument("--no-subtract-background", dest="subtract_background",
                   action="store_false",
                   help="keep each input's sky (default: subtract it first, like SWarp)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--register", choices=["stars"], default=None,
                   help="register the frames to the first one by matching stars (frames "
                   "may then lack a WCS)")
    p.set_defaults(handler=_cmd_coadd)


# --- detect (issue 6) --------------------------------------------------------------------


def _cmd_detect(args: argparse.Namespace) -> int:
    from lazysky.pipeline.detect import detect_file

    table = detect_file(args.image, args.out, threshold=args.threshold,
                        min_area=args.min_area, aperture_radius_arcsec=args.aperture_arcsec,
                        background=args.background, overwrite=args.overwrite)  # fmt: skip
    print(f"{len(table)} sources -> {args.out}")
    return 0


def _add_detect_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("detect", help="detect and measure sources on a calibrated FITS image "
                       "(SEP): a catalogue in FITS, CSV, Parquet or ECSV")
    p.add_argument("image", metavar="IMAGE.fits",
                   help="a lazysky coadd or calibrated MEF, or any image with a celestial WCS")
    p.add_argument("--out", required=True, metavar="CAT.{fits,csv,parquet,ecsv}",
                   help="output catalogue; the format follows the extension")
    p.add_argument("--threshold", type=float, default=5.0, metavar="SIGMA",
                   help="detection threshold: S/N of the filtered image (default 5; "
                        "Source Extractor's DETECT_THRESH is 0.375 times this)")
    p.add_argument("--min-area", type=int, default=5, metavar="N",
                   help="minimum pixels above the threshold (default 5)")
    p.add_argument("--aperture-arcsec", type=float, default=2.0, metavar="R",
                   help="radius of the circular aperture flux (default 2 arcsec)")
    p.add_argument("--background", choices=["auto", "subtract", "keep"], default="auto",
                   help="subtract a SEP sky background: auto (unless the file says it is "
                        "already subtracted), subtract, keep (default auto)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(handler=_cmd_detect)


# --- end of pipeline commands ----------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    from lazysky.config import load_settings
    from lazysky.runconfig import load_run_config
    from lazysky.runner import run

    cfg = load_run_config(args.config)
    if args.run_id:
        cfg = cfg.model_copy(update={"run_id": args.run_id})
    settings = load_settings(args.settings) if args.settings else load_settings()

    def started(run_id: str, dashboard: str) -> None:
        print(f"run {run_id}" + (f"; dashboard {dashboard}" if dashboard else ""), flush=True)

    summary = run(cfg, settings=settings, show_progress=not args.no_progress,
                  on_start=started)
    print(summary)
    return 0 if summary.status == "done" else 3


def _add_run_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="one processing run end to end, from a YAML configuration")
    p.add_argument("config", help="run configuration (YAML; see docs/run.md)")
    p.add_argument("--run-id", help="resume this run (skips the tiles already complete)")
    p.add_argument("--settings", help="lazysky settings YAML (default: $LAZYSKY_CONFIG)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=_cmd_run)


# --- difference imaging (issue 6): diff ------------------------------------------------


def _cmd_diff(args: argparse.Namespace) -> int:
    from lazysky.errors import ParameterError
    from lazysky.pipeline.difference import difference_files

    text = args.astrometric_sigma.strip()
    astro: str | tuple[float, ...] = "auto"
    if text != "auto":
        try:
            astro = tuple(float(v) for v in text.split(","))
        except ValueError:
            astro = ()
        astro = astro * 2 if len(astro) == 1 else astro
        if len(astro) != 2:
            msg = f"--astrometric-sigma must be 'auto', SX or SX,SY in pixels; got {text!r}"
            raise ParameterError(msg)
    if args.sources:
        from pathlib import Path

        from lazysky.pipeline.detect import check_catalog_path

        check_catalog_path(Path(args.sources), overwrite=args.overwrite)  # before any work
    diff = difference_files(args.science, args.reference, args.out, overwrite=args.overwrite,
                            tile_px=args.tile_px, psf_size_px=args.psf_size,
                            flux_ratio=args.flux_ratio, astrometric_sigma_px=astro,
                            method=args.method, noise=args.noise)  # fmt: skip
    print(f"{args.out}: {args.method}, flux ratio {float(diff.flux_ratio):.4f}")
    if args.sources:
        from lazysky.pipeline.detect import detect_difference, write_catalog

        found = detect_difference(diff, threshold=args.threshold).to_table()
        write_catalog(found, args.sources, overwrite=args.overwrite)
        n_pos = int((found["sign"] > 0).sum()) if len(found) else 0
        print(f"{args.sources}: {len(found)} sources ({n_pos} brighter, "
              f"{len(found) - n_pos} fainter than the reference)")
    return 0


def _add_diff_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("diff", help="difference image (ZOGY or Alard & Lupton) of a science "
                       "and a reference FITS")
    p.add_argument("science", metavar="SCIENCE.fits", help="science image (e.g. lazysky coadd)")
    p.add_argument("reference", metavar="REFERENCE.fits",
                   help="reference image; the output is on its pixel grid")
    p.add_argument("--out", required=True, metavar="DIFF.fits",
                   help="output: D (primary, WCS), SCORR, VARIANCE, MASK")
    p.add_argument("--psf-size", type=int, default=25, metavar="N",
                   help="PSF stamp side in pixels, odd (default 25)")
    p.add_argument("--flux-ratio", type=float, metavar="R",
                   help="reference/science flux ratio (default: fitted on matched stars)")
    p.add_argument("--astrometric-sigma", default="0", metavar="SX[,SY]|auto",
                   help="registration noise in pixels, or 'auto' from matched stars "
                   "(default 0)")
    p.add_argument("--tile-px", type=int, default=2048, metavar="N",
                   help="tile size in pixels (default 2048)")
    p.add_argument("--method", choices=["zogy", "alard-lupton"], default="zogy",
                   help="ZOGY (default) or Alard & Lupton's kernel fit")
    p.add_argument("--noise", choices=["measured", "white"], default="measured",
                   help="measure each image's noise correlation (default; resampled "
                   "images) or assume white noise")
    p.add_argument("--sources", metavar="DIA.{csv,fits,parquet,ecsv}",
                   help="also detect the difference's sources (both signs) into this file")
    p.add_argument("--threshold", type=float, default=5.0, metavar="SIGMA",
                   help="detection threshold on S_corr for --sources (default 5)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(handler=_cmd_diff)


# --- end of difference imaging ------------------------------------------------------

# --- kubernetes (issue 10): kube render, kube bootstrap-catalog ------------------------


def _cmd_kube_render(args: argparse.Namespace) -> int:
    from lazysky.kube import build_manifests, dump_yaml, render_tree

    base = {k: v for k, v in (("image", args.image), ("db_image", args.db_image),
                              ("namespace", args.namespace), ("store_url", args.store_url))
            if v is not None}
    if args.out is not None:
        for path in render_tree(args.out, **base):
            print(path)
        return 0
    sys.stdout.write(dump_yaml(build_manifests(overlay=args.overlay, **base)))
    return 0


def _cmd_kube_bootstrap(args: argparse.Namespace) -> int:
    from lazysky.kube import bootstrap_catalog

    result = bootstrap_catalog(args.dsn)
    print(f"catalog ready: pgSphere {result.pg_sphere_version}, schema "
          f"v{result.schema_version}, read-only role {result.reader_role}")
    return 0


def _add_kube_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("kube", help="Kubernetes: render the manifests, bootstrap the catalog")
    ksub = p.add_subparsers(dest="kube_command", metavar="ACTION", required=True)
    r = ksub.add_parser("render", help="print an overlay's manifests, or write the "
                        "kustomize tree (base + overlays) with --out")
    r.add_argument("--overlay", help="dev or prod (default: the base)")
    r.add_argument("--out", help="write base/ and overlays/ under this directory")
    r.add_argument("--image", help="lazysky image (default ghcr.io/lazysky/lazysky:VERSION)")
    r.add_argument("--db-image", help="catalog PostgreSQL + pg_sphere image")
    r.add_argument("--namespace", help="namespace (default lazysky)")
    r.add_argument("--store-url", help="LAZYSKY_STORE_URL of the pods (default s3://…)")
    r.set_defaults(handler=_cmd_kube_render)
    b = ksub.add_parser("bootstrap-catalog", help="create pgSphere, the schema and the "
                        "read-only role in the catalog server (what the Job runs)")
    b.add_argument("--dsn", help="owner DSN (default: LAZYSKY_CATALOG_DSN; password from "
                   "PGPASSWORD)")
    b.set_defaults(handler=_cmd_kube_bootstrap)


# --- end of kubernetes ----------------------------------------------------------------


# --- batch submissions (issue 10) ------------------------------------------------------


def _cmd_batch_submit(args: argparse.Namespace) -> int:
    from lazysky.batch import submit
    from lazysky.config import load_settings

    sub = submit(args.config, at=args.at, cron=args.cron, run_type=args.type,
                 max_attempts=args.max_attempts, settings=load_settings(args.settings))
    print(sub)
    return 0


def _cmd_batch_list(args: argparse.Namespace) -> int:
    import datetime as dt

    from lazysky.batch import list_submissions
    from lazysky.config import load_settings

    states = args.state or (None if args.all else ["queued", "running"])
    subs = list_submissions(states=states, settings=load_settings(args.settings))
    print(f"{'ID':>6}  {'STATE':22s} {'TYPE':5s} {'DUE (UTC)':17s} {'TRY':>5}  "
          f"{'SCHEDULE':14s} RUN")
    for s in subs:
        print(f"{s.submission_id:>6}  {s.state:22s} {s.run_type:5s} "
              f"{s.due_at.astimezone(dt.UTC):%Y-%m-%d %H:%M} {s.attempts:>2}/{s.max_attempts:<2}  "
              f"{s.cron or 'once':14s} {s.run_id or '-'}")
    return 0


def _cmd_batch_show(args: argparse.Namespace) -> int:
    from lazysky.batch import get_submission
    from lazysky.config import load_settings

    print(get_submission(args.id, settings=load_settings(args.settings)))
    return 0


def _cmd_batch_cancel(args: argparse.Namespace) -> int:
    from lazysky.batch import cancel
    from lazysky.config import load_settings

    print(cancel(args.id, settings=load_settings(args.settings)))
    return 0


def _cmd_batch_run_due(args: argparse.Namespace) -> int:
    from lazysky.batch import run_due
    from lazysky.config import load_settings

    done = run_due(lease_seconds=args.lease_seconds, max_submissions=args.max,
                   settings=load_settings(args.settings),
                   show_progress=not args.no_progress)
    for e in done:
        print(f"submission {e.submission_id} attempt {e.attempt}: {e.state} (run {e.run_id})"
              + (f": {e.error}" if e.error else ""), flush=True)
    if not done:
        print("nothing due")
    return 0 if all(e.state.startswith("completed") for e in done) else 3


def _add_batch_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("batch", help="scheduled batch submissions: submit, list, show, "
                       "cancel, run-due")

    def usage(args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(handler=usage)
    bsub = p.add_subparsers(dest="batch_command", metavar="ACTION")
    q = bsub.add_parser("submit", help="queue a run configuration (validated now)")
    q.add_argument("config", help="run configuration (YAML; see docs/run.md)")
    when = q.add_mutually_exclusive_group()
    when.add_argument("--at", help="due once at this time (ISO 8601; no zone = UTC)")
    when.add_argument("--cron", help="recurring: 5-field cron expression in UTC, "
                      "e.g. '0 3 * * *'")
    q.add_argument("--type", choices=["prod", "exp"], help="run type (default: the "
                   "configuration's type)")
    q.add_argument("--max-attempts", type=int, default=3, help="attempts per due time "
                   "(default 3)")
    q.set_defaults(handler=_cmd_batch_submit)
    q = bsub.add_parser("list", help="submissions (default: queued and running)")
    q.add_argument("--state", action="append", help="only this state (repeatable)")
    q.add_argument("--all", action="store_true", help="every submission")
    q.set_defaults(handler=_cmd_batch_list)
    q = bsub.add_parser("show", help="one submission and its executions")
    q.add_argument("id", type=int, help="submission id")
    q.set_defaults(handler=_cmd_batch_show)
    q = bsub.add_parser("cancel", help="cancel a queued or running submission")
    q.add_argument("id", type=int, help="submission id")
    q.set_defaults(handler=_cmd_batch_cancel)
    q = bsub.add_parser("run-due", help="run every due submission (what the CronJob runs)")
    q.add_argument("--lease-seconds", type=float, default=300.0,
                   help="lease length; a dead run-due's submission is retaken after it "
                   "(default 300)")
    q.add_argument("--max", type=int, help="stop after this many submissions")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.set_defaults(handler=_cmd_batch_run_due)
    for action in bsub.choices.values():
        action.add_argument("--settings", help="lazysky settings YAML "
                            "(default: $LAZYSKY_CONFIG)")


# --- end of batch submissions -------------------------------------------------------------


# --- association across epochs (issue 11): lightcurve ------------------------------------


def _cmd_lightcurve(args: argparse.Namespace) -> int:
    import io

    from lazysky.associate import lightcurve
    from lazysky.catalog import open_catalog
    from lazysky.config import load_settings

    table = lightcurve(args.object_id, catalog=open_catalog(load_settings(args.config)))
    if args.format == "table":
        meta = table.meta
        print(f"object {meta['object_id']} of run {meta['run_id']}: RA {meta['ra']:.6f} "
              f"Dec {meta['dec']:.6f}, {meta['n_detections']} detection(s) in "
              f"{meta['n_epochs']} epoch(s)")
        table.pprint_all()
    elif args.format == "json":
        def plain(v: Any) -> Any:  # NaN (a masked epoch) is null in JSON
            v = v.item() if hasattr(v, "item") else v
            return None if isinstance(v, float) and v != v else v

        rows = [{k: plain(v) for k, v in zip(table.colnames, row, strict=True)}
                for row in table.iterrows()]
        print(json.dumps({"object": dict(table.meta), "lightcurve": rows}, indent=1))
    else:
        buf = io.BytesIO() if args.format == "votable" else io.StringIO()
        table.write(buf, format="votable" if args.format == "votable" else "ascii.csv")
        out = buf.getvalue()
        sys.stdout.write(out.decode() if isinstance(out, bytes) else out)
    return 0


def _add_lightcurve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lightcurve", help="an object's light curve (forced photometry on "
                       "every epoch's difference image)")
    p.add_argument("object_id", metavar="OBJECT_ID", type=int, help="objects.object_id")
    p.add_argument("--format", choices=["table", "csv", "votable", "json"], default="table")
    p.add_argument("--config", help="YAML settings file (default: $LAZYSKY_CONFIG)")
    p.set_defaults(handler=_cmd_lightcurve)


# --- end of association ----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lazysky`` command."""
    parser = argparse.ArgumentParser(
        prog="lazysky",
        description="Raw FITS mosaics to science catalogs at survey scale.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("simulate", help="simulate a survey: raw MEF FITS, calibrations, truth")
    p.add_argument("--out", required=True, help="output directory or fsspec URL (s3://…)")
    p.add_argument("--instrument", default="tiny", help="instrument name or YAML file")
    p.add_argument("--epochs", type=int, default=4, help="number of epochs (default 4)")
    p.add_argument("--dithers", type=int, default=2, help="exposures per epoch (default 2)")
    p.add_argument("--exptime", type=float, help="seconds per exposure (instrument default)")
    p.add_argument("--filter", help="filter name (instrument default)")
    p.add_argument("--detectors", help="comma-separated subset of detector names")
    p.add_argument("--transients", type=int, help="number of transients")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--config", help="YAML survey specification (options above override it)")
    p.add_argument("--no-calib", action="store_true", help="skip bias, dark and flat frames")
    p.add_argument("--overwrite", action="store_true", help="replace an existing survey there")
    p.set_defaults(handler=_cmd_simulate)

    p = sub.add_parser("demo", help="the main job: a small survey, end to end")
    p.add_argument("--out", default="demo-output", help="where to write (default demo-output)")
    p.add_argument("--seed", type=int, default=42, help="the survey's random seed")
    p.set_defaults(handler=_cmd_demo)

    p = sub.add_parser("instruments", help="list the simulator's instruments")
    p.set_defaults(handler=_cmd_instruments)

    _add_ingest_parser(sub)

    p = sub.add_parser("config", help="show the settings in force (JSON)")
    p.add_argument("--config", help="YAML settings file (default: $LAZYSKY_CONFIG)")
    p.set_defaults(handler=_cmd_config)

    _add_catalog_parsers(sub)  # catalog commands (issue 7)
    _add_pipeline_parsers(sub)  # pipeline commands (issue 5)
    _add_run_parser(sub)  # end to end (issue 8)
    _add_detect_parser(sub)  # detect (issue 6)
    _add_diff_parser(sub)  # difference imaging (issue 6)
    _add_kube_parser(sub)  # kubernetes (issue 10)
    _add_batch_parser(sub)  # batch submissions (issue 10)
    from lazysky.cli_runs import add_runs_parser

    add_runs_parser(sub)  # runs: list, show, promote, rollback (issue 11)
    from lazysky.cli_gc import add_gc_parser

    add_gc_parser(sub)  # gc: retention (issue 13)
    from lazysky.cli_workflows import add_workflows_parser

    add_workflows_parser(sub)  # workflow versions and canaries (issue 13)
    _add_lightcurve_parser(sub)  # association across epochs (issue 11)
    return parser


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("lazysky").setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lazysky`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from lazysky import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    _configure_logging(args.verbose, args.quiet)
    args.one_shot = argv is None  # the command line's own process (see _imports)
    handler: Handler = args.handler
    try:
        return handler(args)
    except LazySkyError as exc:
        print(f"lazysky {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lazysky {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if argv is None:  # the command line's own process, which ends now
            _before_exit()


def _before_exit() -> None:
    """Spare the ending process a garbage collection of everything it imported.

    At exit the interpreter runs full collections over every object still alive: with
    the pipeline's imports (~220,000 objects) that took ~0.5 s of a ~4 s
    ``lazysky coadd`` (docs/benchmarks/coadd.md). ``gc.freeze()`` moves them out of the
    collector's sight; they are freed with the process as before, and atexit handlers,
    logging's flush and the standard streams' flush run as before. Only for the command
    line's own process (``main()`` without ``argv``): a caller that goes on after
    ``main(argv)`` keeps its collector untouched.
    """
    gc.freeze()
