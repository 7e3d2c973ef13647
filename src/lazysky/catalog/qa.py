"""Per-tile science QA in the catalog: write (idempotent upsert) and read.

:func:`write_qa` replaces the rows of the given (run, product, tile) keys in one
transaction (a re-run or a resumed run writes the same rows again, never twice);
:func:`read_qa` returns a run's rows as an astropy Table (what ``lazysky runs show``
prints the flagged tiles from) and :func:`qa_by_tile` as plain per-tile dicts (what the
dashboard receives).

Examples
--------
>>> from lazysky.catalog.qa import read_qa
>>> qa = read_qa("test-20260101-0123abcd")  # doctest: +SKIP
>>> qa[qa["flagged"]]["product", "tile_id", "reasons"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import sqlalchemy as sa
from astropy.table import Table
from sqlalchemy.dialects.postgresql import insert

from lazysky.catalog._errors import CatalogError
from lazysky.catalog.schema import tile_qa
from lazysky.runs import validate_run_id

if TYPE_CHECKING:
    from lazysky.catalog.database import Catalog

__all__ = ["QA_COLUMNS", "qa_by_tile", "read_qa", "write_qa"]

logger = logging.getLogger(__name__)

#: The columns of a QA row (all but run_id and computed_at), in table order.
QA_COLUMNS = tuple(c.name for c in tile_qa.columns if c.name not in ("run_id", "computed_at"))
_KEY = ("product", "tile_id")


def _clean(value: Any) -> Any:
    """SQL-ready: numpy scalars to Python, NaN to NULL."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_qa(run_id: str, rows: Iterable[Mapping[str, Any]], *,
             catalog: Catalog | None = None) -> int:
    """Insert or replace QA rows of ``run_id`` (keys product, tile_id); returns how many.

    Each row maps column names (:data:`QA_COLUMNS`) to values; NaN is stored as NULL and
    unknown keys are ignored. Idempotent: writing the same rows again changes nothing.

    Raises
    ------
    CatalogError
        The run is not registered, or a row breaks the table's constraints.
    """
    from lazysky.catalog.database import open_catalog

    validate_run_id(run_id)
    values = []
    for r in rows:
        missing = [k for k in (*_KEY, "kind") if k not in r]
        if missing:
            msg = f"a QA row of run {run_id} lacks {missing}; got keys {sorted(r)}"
            raise CatalogError(msg)
        row = {c: _clean(r[c]) for c in QA_COLUMNS if c in r}
        row["reasons"] = json.loads(json.dumps(list(r.get("reasons") or [])))
        row["flagged"] = bool(r.get("flagged", bool(row["reasons"])))
        values.append({"run_id": run_id, **row})
    if not values:
        return 0
    catalog = catalog if catalog is not None else open_catalog()
    stmt = insert(tile_qa)
    update = {c: stmt.excluded[c] for c in values[0] if c not in ("run_id", *_KEY)}
    stmt = stmt.on_conflict_do_update(index_elements=["run_id", *_KEY],
                                      set_={**update, "computed_at": sa.func.now()})
    try:
        with catalog.engine().begin() as conn:
            conn.execute(stmt, values)
    except (sa.exc.IntegrityError, sa.exc.DataError) as exc:
        msg = f"the catalog refused the QA rows of run {run_id}: {exc.orig}"
        raise CatalogError(msg) from None
    return len(values)


def read_qa(run_id: str, *, catalog: Catalog | None = None,
            flagged_only: bool = False) -> Table:
    """The QA rows of a run as an astropy Table (one row per product and tile, sorted).

    Columns: :data:`QA_COLUMNS` (NULL read as NaN for floats), ``reasons`` a list per
    row. Empty (with the columns) when the run has no QA.

    Examples
    --------
    >>> t = read_qa(run_id)  # doctest: +SKIP
    >>> t["product", "tile_id", "psf_fwhm_arcsec", "flagged"]  # doctest: +SKIP
    """
    from lazysky.catalog.database import open_catalog

    validate_run_id(run_id)
    catalog = catalog if catalog is not None else open_catalog()
    cols = [tile_qa.c[c] for c in QA_COLUMNS]
    query = sa.select(*cols).where(tile_qa.c.run_id == run_id)
    if flagged_only:
        query = query.where(tile_qa.c.flagged)
    with catalog.engine().connect() as conn:
        got = conn.execute(query.order_by(tile_qa.c.product, tile_qa.c.tile_id)).all()
    data: dict[str, Any] = {}
    for k, c in enumerate(QA_COLUMNS):
        vals = [r[k] for r in got]
        kind = tile_qa.c[c].type
        if isinstance(kind, sa.Float):
            data[c] = np.array([np.nan if v is None else v for v in vals], dtype=np.float64)
        elif isinstance(kind, sa.Integer):
            data[c] = np.array(vals, dtype=np.int64)
        elif isinstance(kind, sa.Boolean):
            data[c] = np.array(vals, dtype=bool)
        else:
            col = np.empty(len(vals), dtype=object)
            col[:] = vals
            data[c] = col
    table = Table(data)
    table.meta["run_id"] = run_id
    return table


def qa_by_tile(run_id: str, *, catalog: Catalog | None = None) -> dict[str, dict[str, Any]]:
    """A run's QA as ``{tile_id: {product: {metric: value, ...}}}`` (JSON-ready; NaN → None).

    What the dashboard is given (``lazysky.dashboard.publish_qa(client, run_id, tile_id,
    values)``), and what the products' ``qa`` attribute holds.
    """
    table = read_qa(run_id, catalog=catalog)
    return rows_by_tile(dict(zip(table.colnames, row, strict=True)) for row in table)


def rows_by_tile(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """QA rows grouped ``{tile_id: {product: {column: value}}}``, JSON-ready."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        values = {k: _clean(v) for k, v in r.items() if k not in _KEY and k != "stars"}
        values["reasons"] = list(r.get("reasons") or [])
        out.setdefault(str(r["tile_id"]), {})[str(r["product"])] = values
    return out
