"""Runs and exposures in the catalog: register, finish, upsert.

Examples
--------
>>> from lazysky.runs import Run, new_run_id
>>> from lazysky.catalog import register_run, finish_run
>>> run = Run(new_run_id("exp"), config={"detect": {"threshold": 5}})
>>> register_run(run)  # doctest: +SKIP
>>> finish_run(run.run_id, status="done", timings={"detect": 12.5})  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from lazysky import __version__
from lazysky.catalog._errors import CatalogError
from lazysky.catalog._types import SPoly
from lazysky.catalog.database import Catalog, open_catalog
from lazysky.catalog.schema import ensure_partitions, exposures, run_tiles, runs
from lazysky.errors import ParameterError
from lazysky.runs import RUN_STATUSES, Run, parse_run_id, validate_run_id

__all__ = ["Exposure", "finish_run", "register_run", "write_exposures"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Exposure:
    """An exposure row: id, instrument, filter, MJD, exposure time (s), footprint."""

    exposure_id: str
    instrument: str
    filter: str
    mjd: float
    exptime: float
    footprint: SPoly | None = None


def register_run(run: Run, *, catalog: Catalog | None = None) -> None:
    """Record a run (status ``running``); registering the same run again is a no-op.

    Raises
    ------
    CatalogError
        When the parent run is not registered.
    """
    catalog = catalog if catalog is not None else open_catalog()
    stmt = insert(runs).values(
        run_id=run.run_id,
        config=dict(run.config),
        software_version=run.software_version or __version__,
        inputs=dict(run.inputs),
        parent_run_id=run.parent_run_id,
        description=run.description,
    ).on_conflict_do_nothing(index_elements=["run_id"])
    rid = parse_run_id(run.run_id)
    try:
        with catalog.engine().begin() as conn:
            conn.execute(stmt)
            # the month partitions its rows go to (the schema keeps the next few months
            # ready; a run dated in the past or far ahead needs its own)
            ensure_partitions(conn, [(rid.type, rid.date)])
    except sa.exc.IntegrityError as exc:
        msg = f"cannot register run {run.run_id}: {exc.orig}"
        raise CatalogError(msg) from None


def finish_run(run_id: str, *, status: str = "done", timings: Mapping[str, float] | None = None,
               errors: Mapping[str, str] | None = None,
               catalog: Catalog | None = None) -> None:
    """Mark a run ``done``, ``done_with_errors`` or ``failed``; record timings and errors.

    ``timings`` maps a step to seconds; ``errors`` maps what was skipped (an input file,
    an exposure, a tile) to the error text.
    """
    validate_run_id(run_id)
    if status not in RUN_STATUSES:
        msg = f"run status must be one of {', '.join(RUN_STATUSES)}; got {status!r}"
        raise ParameterError(msg)
    catalog = catalog if catalog is not None else open_catalog()
    with catalog.engine().begin() as conn:
        done = conn.execute(
            runs.update().where(runs.c.run_id == run_id).values(
                status=status, timings=dict(timings or {}), errors=dict(errors or {}),
                finished_at=sa.func.now() if status != "running" else None))
    if done.rowcount == 0:
        msg = f"run {run_id} is not registered in the catalog"
        raise CatalogError(msg)


def write_exposures(rows: Iterable[Exposure], *, catalog: Catalog | None = None) -> int:
    """Insert or update exposures (by id); returns how many rows were written."""
    values = [
        {"exposure_id": e.exposure_id, "instrument": e.instrument, "filter": e.filter,
         "mjd": e.mjd, "exptime": e.exptime, "footprint": e.footprint}
        for e in rows
    ]
    if not values:
        return 0
    catalog = catalog if catalog is not None else open_catalog()
    stmt = insert(exposures)
    stmt = stmt.on_conflict_do_update(
        index_elements=["exposure_id"],
        set_={c: stmt.excluded[c] for c in ("instrument", "filter", "mjd", "exptime",
                                            "footprint")})
    try:
        with catalog.engine().begin() as conn:
            conn.execute(stmt, values)
    except (sa.exc.IntegrityError, sa.exc.DataError) as exc:
        msg = f"the catalog refused the exposures: {exc.orig}"
        raise CatalogError(msg) from None
    return len(values)


def mark_tile_done(run_id: str, stage: str, tile_id: str, *, rows: int = 0,
                   catalog: Catalog | None = None) -> None:
    """Record that ``stage`` of ``run_id`` finished ``tile_id`` (idempotent).

    Call it after the tile's rows are written (:func:`~lazysky.catalog.write_sources`):
    a resumed run skips the tiles :func:`done_tiles` lists, and one killed between the
    write and the mark simply writes that tile again (the write replaces, never adds).
    """
    validate_run_id(run_id)
    catalog = catalog if catalog is not None else open_catalog()
    stmt = insert(run_tiles).values(run_id=run_id, stage=stage, tile_id=tile_id, rows=rows)
    stmt = stmt.on_conflict_do_update(
        index_elements=["run_id", "stage", "tile_id"],
        set_={"rows": stmt.excluded.rows, "finished_at": sa.func.now()})
    try:
        with catalog.engine().begin() as conn:
            conn.execute(stmt)
    except sa.exc.IntegrityError as exc:
        msg = f"cannot mark tile {tile_id} of run {run_id} done: {exc.orig}"
        raise CatalogError(msg) from None


def done_tiles(run_id: str, stage: str, *, catalog: Catalog | None = None) -> dict[str, int]:
    """The tiles ``stage`` of ``run_id`` finished, with the rows each wrote."""
    validate_run_id(run_id)
    catalog = catalog if catalog is not None else open_catalog()
    with catalog.engine().connect() as conn:
        got = conn.execute(sa.select(run_tiles.c.tile_id, run_tiles.c.rows).where(
            run_tiles.c.run_id == run_id, run_tiles.c.stage == stage))
        return {str(t): int(n) for t, n in got}
