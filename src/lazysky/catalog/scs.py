"""An IVOA Simple Cone Search 1.03 service over the catalog (``lazysky serve``).

``GET /scs/coadd?RA=…&DEC=…&SR=…`` (also ``/scs/diff``, ``/scs/coadd_prod``,
``/scs/diff_prod``) answers with a VOTable whose id and position columns carry the UCD1
words the standard requires (``ID_MAIN``, ``POS_EQ_RA_MAIN``, ``POS_EQ_DEC_MAIN``), so
TOPCAT, pyvo and astroquery read it. ``VERB=1|2|3`` chooses few, the usual or all
columns. ``SR=0`` is a metadata query: the columns, no rows. Every error — a missing,
non-numeric, NaN or out-of-range parameter, a radius above the maximum, a database
timeout — is the standard's error VOTable (HTTP 200, ``<INFO name="Error" …>``), never a
stack trace. Parameters are parsed to floats and bound; nothing from the URL reaches the
SQL text. The service connects as the read-only role with a statement timeout and caps
the radius and the number of rows (an ``INFO name="QUERY_STATUS" value="OVERFLOW"``
says when the cap cut the answer). The root page links to the SCS URLs.

Examples
--------
>>> from lazysky.catalog.scs import make_server
>>> httpd = make_server(catalog, host="127.0.0.1", port=0)  # doctest: +SKIP
>>> httpd.serve_forever()  # doctest: +SKIP
"""

from __future__ import annotations

import html
import io
import logging
import math
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import sqlalchemy as sa
from astropy.io.votable.tree import Field, Info, Resource, TableElement, VOTableFile

from lazysky.catalog._errors import CatalogError
from lazysky.catalog.cone import cone_query
from lazysky.catalog.database import Catalog, get_engine
from lazysky.catalog.schema import INTERNAL_COLUMNS, SOURCE_TABLES
from lazysky.errors import ParameterError

__all__ = ["ServiceLimits", "error_votable", "make_server", "run_query"]

logger = logging.getLogger(__name__)

SERVICE_TABLES = ("coadd", "diff", "coadd_prod", "diff_prod")
_VERB_COLUMNS = {1: ["run_id", "tile_id", "number", "ra", "dec"]}
_VERB2_EXTRA = ["x", "y", "snr", "flux_aper", "fluxerr_aper", "flux_kron", "fluxerr_kron",
                "flux_psf", "fluxerr_psf", "sign", "flags"]
_UCD = {"ra": "POS_EQ_RA_MAIN", "dec": "POS_EQ_DEC_MAIN", "snr": "STAT_SIGNIFICANCE"}
_UNIT = {"ra": "deg", "dec": "deg", "x": "pix", "y": "pix", "a": "pix", "b": "pix",
         "theta": "rad", "distance": "arcsec"}


@dataclass(frozen=True)
class ServiceLimits:
    """Limits of the service: largest radius (deg), most rows, statement timeout (ms)."""

    max_radius_deg: float = 1.0
    max_rows: int = 10_000
    statement_timeout_ms: int = 5_000


def _votable_xml(votable: VOTableFile) -> bytes:
    buf = io.BytesIO()
    votable.to_xml(buf)
    return buf.getvalue()


def error_votable(message: str) -> bytes:
    """The SCS error response: a VOTable with ``<INFO name="Error" value=…>``."""
    text = html.escape(message, quote=True)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<VOTABLE version="1.3" xmlns="http://www.ivoa.net/xml/VOTable/v1.3">\n'
        "  <DESCRIPTION>lazysky Simple Cone Search</DESCRIPTION>\n"
        f'  <INFO ID="Error" name="Error" value="{text}"/>\n'
        "</VOTABLE>\n"
    ).encode()


def _columns_for(table: str, verb: int) -> list[str]:
    names = [c.name for c in SOURCE_TABLES[table].columns
             if c.name not in INTERNAL_COLUMNS]
    if verb == 1:
        return _VERB_COLUMNS[1]
    if verb == 2:
        return [c for c in names if c in _VERB_COLUMNS[1] or c in _VERB2_EXTRA]
    return names


def _field(votable: VOTableFile, name: str, values: np.ndarray) -> Field:
    kind = values.dtype.kind
    datatype = {"f": "double", "i": "long", "u": "long"}.get(kind, "char")
    kw: dict[str, Any] = {"name": name, "ID": name, "datatype": datatype}
    if datatype == "char":
        kw["arraysize"] = "*"
    if name in _UCD:
        kw["ucd"] = _UCD[name]
    if name in _UNIT:
        kw["unit"] = _UNIT[name]
    return Field(votable, **kw)


def _result_votable(columns: dict[str, np.ndarray], *, overflow: bool) -> bytes:
    votable = VOTableFile(version="1.3")
    resource = Resource(type="results")
    votable.resources.append(resource)
    resource.infos.append(Info(name="QUERY_STATUS", value="OVERFLOW" if overflow else "OK"))
    table = TableElement(votable, name="results")
    resource.tables.append(table)
    for name, values in columns.items():
        fld = _field(votable, name, values)
        if name == "id":
            fld.ucd = "ID_MAIN"
        table.fields.append(fld)
    n = len(next(iter(columns.values())))
    table.create_arrays(n)
    for name, values in columns.items():
        table.array[name] = values
    return _votable_xml(votable)


def _one(params: dict[str, list[str]], name: str, *, required: bool = True) -> str | None:
    values = params.get(name)
    if not values:
        if required:
            msg = f"missing parameter {name}: a cone search needs RA, DEC and SR in degrees"
            raise ParameterError(msg)
        return None
    if len(values) > 1:
        msg = f"parameter {name} given {len(values)} times; give it once"
        raise ParameterError(msg)
    return values[0]


def _number(params: dict[str, list[str]], name: str) -> float:
    text = _one(params, name)
    assert text is not None
    try:
        value = float(text)
    except ValueError:
        msg = f"{name} must be a number of degrees; got {text[:80]!r}"
        raise ParameterError(msg) from None
    if not math.isfinite(value):
        msg = f"{name} must be a finite number of degrees; got {text[:80]!r}"
        raise ParameterError(msg)
    return value


def run_query(catalog: Catalog, table: str, params: dict[str, list[str]],
              limits: ServiceLimits) -> bytes:
    """The VOTable answering SCS ``params`` (a parsed query string) on ``table``."""
    # SCS parameter names are case-insensitive in practice (clients send RA, ra, Ra)
    params = {k.upper(): v for k, v in params.items()}
    ra, dec, sr = (_number(params, n) for n in ("RA", "DEC", "SR"))
    verb_text = _one(params, "VERB", required=False) or "2"
    if verb_text not in ("1", "2", "3"):
        msg = f"VERB must be 1, 2 or 3; got {verb_text[:20]!r}"
        raise ParameterError(msg)
    columns = _columns_for(table, int(verb_text))
    if sr < 0:
        msg = f"SR must be a positive radius in degrees (0 for metadata); got {sr!r}"
        raise ParameterError(msg)
    metadata_only = sr == 0.0
    stmt = cone_query(ra, dec, 1.0 if metadata_only else sr, table=table, columns=columns,
                      limit=limits.max_rows + 1, max_radius_deg=max(limits.max_radius_deg,
                                                                    1.0 * metadata_only))
    if metadata_only:
        stmt = stmt.limit(0)
    engine = get_engine(catalog.reader_dsn, read_only=True,
                        statement_timeout_ms=limits.statement_timeout_ms)
    try:
        # autocommit: each SELECT is its own read-only transaction, no BEGIN/ROLLBACK trips
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            result = conn.execute(stmt)
            rows = result.fetchall()
    except sa.exc.OperationalError as exc:
        if "statement timeout" in str(exc.orig):
            msg = "the query took too long and was cancelled; use a smaller SR"
            raise CatalogError(msg) from None
        raise
    overflow = len(rows) > limits.max_rows
    rows = rows[: limits.max_rows]
    out: dict[str, np.ndarray] = {}
    sel = list(stmt.selected_columns)
    idx = {c.name: i for i, c in enumerate(sel)}
    out["id"] = np.array([f"{r[idx['run_id']]}/{r[idx['tile_id']]}/{r[idx['number']]}"
                          for r in rows], dtype=object)
    for i, col in enumerate(sel):
        values = [r[i] for r in rows]
        if isinstance(col.type, sa.Integer):
            out[col.name] = np.array(values, dtype=np.int64)
        elif isinstance(col.type, sa.Float) or col.name == "distance":
            out[col.name] = np.array([np.nan if v is None else v for v in values], np.float64)
        else:
            out[col.name] = np.array(values, dtype=object)
    return _result_votable(out, overflow=overflow)


def _root_page(host: str) -> bytes:
    links = "\n".join(
        f'<li><a href="/scs/{t}?RA=0&amp;DEC=0&amp;SR=0">/scs/{t}?</a> — {t} sources</li>'
        for t in SERVICE_TABLES)
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>lazysky catalog</title>"
        "</head><body><h1>lazysky catalog</h1>"
        "<p>IVOA Simple Cone Search 1.03 endpoints (parameters RA, DEC, SR in degrees; "
        f"VERB=1|2|3). Base URL for clients: http://{html.escape(host)}/scs/coadd?</p>"
        f"<ul>{links}</ul></body></html>"
    ).encode()


def make_server(catalog: Catalog, *, host: str = "127.0.0.1", port: int = 0,
                limits: ServiceLimits | None = None) -> ThreadingHTTPServer:
    """An HTTP server answering Simple Cone Search queries on ``catalog``.

    ``port=0`` picks a free port (read it from ``server.server_address``).
    """
    lim = limits if limits is not None else ServiceLimits()

    class Handler(BaseHTTPRequestHandler):
        server_version = "lazysky-scs/1.0"

        def log_message(self, format: str, *args: Any) -> None:
            logger.info("%s %s", self.address_string(), format % args)

        def _send(self, body: bytes, content_type: str, status: int = 200) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            path = url.path.rstrip("/")
            if path == "":
                self._send(_root_page(self.headers.get("Host", host)), "text/html; charset=utf-8")
                return
            table = path.removeprefix("/scs/") if path.startswith("/scs/") else None
            if path == "/scs":
                table = "coadd"
            if table not in SERVICE_TABLES:
                self._send(error_votable(f"no such service {url.path!r}; see /"),
                           "text/xml; charset=utf-8", 404)
                return
            try:
                try:
                    params = parse_qs(url.query, keep_blank_values=True, max_num_fields=50)
                except ValueError:
                    msg = "too many parameters; a cone search takes RA, DEC, SR and VERB"
                    raise ParameterError(msg) from None
                body = run_query(catalog, table, params, lim)
            except ParameterError as exc:
                body = error_votable(str(exc))
            except CatalogError as exc:
                body = error_votable(str(exc))
            except Exception:
                logger.exception("cone search failed: %s", self.path)
                body = error_votable("internal error while searching; the operator has "
                                     "the details in the service log")
            self._send(body, "text/xml; charset=utf-8")

    return ThreadingHTTPServer((host, port), Handler)
