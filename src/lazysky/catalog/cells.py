"""Sky cells: schema v14 splits each new month partition of ``coadd_sources`` by position.

Loading into one GiST index slows down as it grows (each insert walks a deeper, wider
tree; 2 M-row Dec bands instead of one 10 M-row month partition cost the server 18–19 %
less CPU per row, docs/catalog.md; ``benchmarks/bench_catalog.py --ab-cells`` compares
these cells with a plain month partition). So from v14 a month
partition of ``coadd_sources`` is ``PARTITION BY RANGE (dec)`` into **Dec bands** of
:data:`DEC_BAND_DEG`, each ``PARTITION BY RANGE (ra)`` into **RA slabs**:
:data:`SLABS_AT_EQUATOR` at the equator, fewer towards the poles (about equal areas), one
near them. A leaf (a *cell*) holds what one month of one run type put into ~170 deg²
(~4° × 60° at the equator).

Cells are made when the first tile lands in them (:func:`ensure_cells`, called by
:func:`lazysky.catalog.write_sources`): making every cell of the sky ahead would be
~170 leaves per month and type, and a query that cannot prune plans every leaf.

Queries prune to the cells a cone can touch by adding its bounding box on the plain
``ra``/``dec`` columns (:func:`cone_bounds`; :func:`lazysky.catalog.cone_search`, the
SCS service and :func:`lazysky.catalog.xmatch.crossmatch` do): PostgreSQL prunes
partitions on those at plan time, and for a prepared statement or per position of a
join at run time. The box is conservative (a margin above pgSphere's own tolerance), so
it never removes a source the circle holds.

Only ``coadd_sources``: ``diff_sources`` keeps its primary key, which PostgreSQL would
require to include ``ra`` and ``dec`` on a partition split by them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import psycopg

__all__ = [
    "CELL_FUNCTIONS_SQL",
    "DEC_BAND_DEG",
    "SLABS_AT_EQUATOR",
    "band_of",
    "cell_name",
    "cells_of",
    "cone_bounds",
    "cone_bounds_arrays",
    "ensure_cells",
    "slabs_in_band",
]

#: Height of a Dec band (degrees); bands start at Dec −90.
DEC_BAND_DEG = 4.0
#: RA slabs per band at the equator (60° each); ``round(n · cos(band centre))``, ≥ 1.
SLABS_AT_EQUATOR = 6
N_BANDS = round(180.0 / DEC_BAND_DEG)
#: Margin (degrees) added to a cone's box: pgSphere counts points within 1e-9 rad of
#: the circle as inside, and ``ra``/``dec`` are compared as stored.
_MARGIN_DEG = 1e-6
#: Advisory lock serialising the creation of partitions: months (schema.ensure_partitions)
#: and cells alike.
PARTITION_LOCK = 0x70617274  # 'part'

logger = logging.getLogger(__name__)


#: Each band's lower Dec bound, and per band each slab's lower RA bound: the very floats
#: the partitions' bounds are written with, so a row's cell computed here is the one
#: PostgreSQL routes it to, at a bound too (a float computed afresh could round across).
_BAND_LO = np.array([-90.0 + b * DEC_BAND_DEG for b in range(N_BANDS)])


def slabs_in_band(band: int) -> int:
    """How many RA slabs band ``band`` is split into."""
    centre = -90.0 + (band + 0.5) * DEC_BAND_DEG
    return max(1, round(SLABS_AT_EQUATOR * math.cos(math.radians(centre))))


_SLAB_LO = [np.array([s * (360.0 / slabs_in_band(b)) for s in range(slabs_in_band(b))])
            for b in range(N_BANDS)]


def band_of(dec: Any) -> np.ndarray:
    """The band index (0 … N_BANDS − 1) of each Dec."""
    band = np.searchsorted(_BAND_LO, np.asarray(dec, dtype=np.float64), side="right") - 1
    return np.maximum(band, 0)


def cells_of(ra: Any, dec: Any) -> list[tuple[int, int]]:
    """The (band, slab) cells the positions fall in, sorted (RA in [0, 360))."""
    ra = np.asarray(ra, dtype=np.float64)
    band = band_of(dec)
    out: list[tuple[int, int]] = []
    for b in np.unique(band):
        slab = np.searchsorted(_SLAB_LO[b], ra[band == b], side="right") - 1
        out += [(int(b), int(s)) for s in np.unique(np.maximum(slab, 0))]
    return out


def cell_name(month_partition: str, band: int, slab: int | None = None) -> str:
    """``coadd_sources__prod__2026_11__d22`` (a band) or ``…__d22r3`` (a cell)."""
    base = f"{month_partition}__d{band:02d}"
    return base if slab is None else f"{base}r{slab}"


#: Makes a cell (and its band) of a month partition: SECURITY DEFINER, so a writer role
#: with only SELECT, INSERT and DELETE on the source tables (PostgreSQL lets only a
#: table's owner add partitions) makes the cells its tiles land in. It checks its
#: arguments (a month partition of coadd_sources split into cells; a band and slab of the
#: grid) and computes the bounds itself, with the same float arithmetic as
#: :data:`_BAND_LO` and :data:`_SLAB_LO` (a test compares every cell), so at worst a
#: caller makes an empty cell of the grid early. Declared by schema v14.
_CELL_FUNCTIONS = ("""
CREATE OR REPLACE FUNCTION lazysky_cell_bounds(band int, slab int, OUT slabs int,
    OUT dec_lo float8, OUT dec_hi float8, OUT ra_lo float8, OUT ra_hi float8)
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog AS $f$
BEGIN
    -- NULL bound: the first band or slab starts at MINVALUE, the last ends at MAXVALUE
    IF band < 0 OR band >= {n_bands} THEN
        RAISE EXCEPTION 'sky cell band must be in [0, {n_bands}), got %', band;
    END IF;
    slabs := greatest(1, round({at_equator}::float8 * cos(radians(
        -90.0::float8 + (band::float8 + 0.5::float8) * {band_deg}::float8))))::int;
    IF slab < 0 OR slab >= slabs THEN
        RAISE EXCEPTION 'sky cell slab of band % must be in [0, %), got %', band, slabs, slab;
    END IF;
    dec_lo := CASE WHEN band > 0 THEN -90.0::float8 + band * {band_deg}::float8 END;
    dec_hi := CASE WHEN band < {n_bands} - 1
                   THEN -90.0::float8 + (band + 1) * {band_deg}::float8 END;
    ra_lo := CASE WHEN slab > 0 THEN slab * (360.0::float8 / slabs) END;
    ra_hi := CASE WHEN slab < slabs - 1 THEN (slab + 1) * (360.0::float8 / slabs) END;
END
$f$
""", """
CREATE OR REPLACE FUNCTION lazysky_ensure_cell(month_partition text, band int, slab int)
RETURNS text LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public
SET extra_float_digits = 1 AS $f$
DECLARE
    b record;
    ns name;
    band_name text := format('%s__d%s', month_partition, lpad(band::text, 2, '0'));
    cell text := format('%s__d%sr%s', month_partition, lpad(band::text, 2, '0'), slab);
BEGIN
    IF month_partition !~ '^coadd_sources__[a-z]+__[0-9]{{4}}_[0-9]{{2}}$' OR NOT EXISTS (
            SELECT 1 FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid
            JOIN pg_inherits j ON j.inhrelid = i.inhparent
            WHERE c.oid = to_regclass(month_partition) AND c.relkind = 'p'
            AND j.inhparent = 'coadd_sources'::regclass) THEN
        RAISE EXCEPTION '% is not a month partition of coadd_sources split into sky cells',
            month_partition;
    END IF;
    SELECT * INTO b FROM lazysky_cell_bounds(band, slab);
    -- in the month partition's own schema (this function's search_path starts with
    -- pg_catalog, so that no one's objects stand in for the built-ins); the bounds as
    -- text are exact (extra_float_digits >= 1: the shortest text that reads back the same)
    SELECT n.nspname INTO ns FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = to_regclass(month_partition);
    EXECUTE format('CREATE TABLE IF NOT EXISTS %I.%I PARTITION OF %I.%I FOR VALUES FROM (%s) '
                   'TO (%s) PARTITION BY RANGE (ra)', ns, band_name, ns, month_partition,
                   coalesce(b.dec_lo::text, 'MINVALUE'), coalesce(b.dec_hi::text, 'MAXVALUE'));
    EXECUTE format('CREATE TABLE IF NOT EXISTS %I.%I PARTITION OF %I.%I FOR VALUES FROM (%s) '
                   'TO (%s)', ns, cell, ns, band_name,
                   coalesce(b.ra_lo::text, 'MINVALUE'), coalesce(b.ra_hi::text, 'MAXVALUE'));
    RETURN cell;
END
$f$
""")
CELL_FUNCTIONS_SQL = tuple(  # the grid's constants written in
    q.format(n_bands=N_BANDS, band_deg=DEC_BAND_DEG, at_equator=SLABS_AT_EQUATOR)
    for q in _CELL_FUNCTIONS)


def ensure_cells(conn: psycopg.Connection[Any], month_partition: str,
                 cells: Iterable[tuple[int, int]]) -> list[str] | None:
    """Create the cells of ``month_partition`` still missing; return all their names.

    None when the month partition is not split into cells (months made before v14).
    Takes no lock when they all exist. The cells are made by ``lazysky_ensure_cell``
    (:data:`CELL_FUNCTIONS_SQL`), so any role that may write rows may. Runs its own
    transaction: making a partition locks its parent exclusively for a moment, so it
    must not happen inside a write's transaction. Safe from many processes
    (:data:`PARTITION_LOCK` serialises creators).
    """
    wanted = {cell_name(month_partition, b, s): (b, s) for b, s in cells}
    query = ("SELECT (SELECT relkind::text FROM pg_class WHERE oid = to_regclass(%s)), "
             "ARRAY(SELECT relname::text FROM pg_class WHERE relname = ANY(%s))")
    with conn.transaction(), conn.cursor() as cur:
        got = cur.execute(query, (month_partition, list(wanted))).fetchone()
        assert got is not None
        if got[0] != "p":  # a plain month partition (made before v14), or none
            return None
        if len(got[1]) == len(wanted):
            return sorted(wanted)
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
        got = cur.execute(query, (month_partition, list(wanted))).fetchone()
        assert got is not None
        made = []
        for name, (band, slab) in sorted(wanted.items()):
            if name not in got[1]:  # made by the function, as the tables' owner
                cur.execute("SELECT lazysky_ensure_cell(%s, %s, %s)",
                            (month_partition, band, slab))
                made.append(name)
    if made:
        logger.info("catalog: created sky cell(s) %s", ", ".join(made))
    return sorted(wanted)


def cone_bounds_arrays(ra: Any, dec: Any, radius_deg: Any) -> dict[str, np.ndarray]:
    """The box around each cone on ``ra``/``dec``, conservatively: ``dec_lo``, ``dec_hi``
    and two RA ranges (``ra_lo1``…``ra_hi1`` OR ``ra_lo2``…``ra_hi2``; the second repeats
    the first unless the cone crosses RA = 0/360; both span [0, 360] when it holds a
    pole or reaches within the margin of one)."""
    ra = np.asarray(ra, dtype=np.float64)
    dec = np.asarray(dec, dtype=np.float64)
    r = np.asarray(radius_deg, dtype=np.float64) + _MARGIN_DEG
    dec_lo = np.maximum(dec - r, -90.0)
    dec_hi = np.minimum(dec + r, 90.0)
    polar = (dec_hi >= 90.0 - _MARGIN_DEG) | (dec_lo <= -90.0 + _MARGIN_DEG)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.sin(np.radians(np.minimum(r, 90.0))) / np.cos(np.radians(dec))
        half = np.degrees(np.arcsin(np.clip(ratio, -1.0, 1.0))) + _MARGIN_DEG
    full = polar | (ratio >= 1.0) | (half >= 180.0)
    lo, hi = ra - half, ra + half
    lo1 = np.where(lo < 0, lo + 360.0, lo)
    hi1 = np.where(lo < 0, 360.0, np.minimum(hi, 360.0))
    lo2 = np.where(lo < 0, 0.0, np.where(hi > 360.0, 0.0, lo))
    hi2 = np.where(lo < 0, hi, np.where(hi > 360.0, hi - 360.0, hi))
    lo1, hi1 = np.where(full, 0.0, lo1), np.where(full, 360.0, hi1)
    lo2, hi2 = np.where(full, 0.0, lo2), np.where(full, 360.0, hi2)
    return {"dec_lo": dec_lo, "dec_hi": dec_hi, "ra_lo1": lo1, "ra_hi1": hi1,
            "ra_lo2": lo2, "ra_hi2": hi2}


def cone_bounds(ra: float, dec: float, radius_deg: float) -> dict[str, float]:
    """:func:`cone_bounds_arrays` for one cone, as floats."""
    return {k: float(v) for k, v in cone_bounds_arrays(ra, dec, radius_deg).items()}
