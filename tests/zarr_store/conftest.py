"""Fixtures of the zarr_store tests: FITS files made with astropy, a moto S3 server on
127.0.0.1 (port 0) and a seeded fault-injecting HTTP proxy in front of it. Plain helpers
live in ``zs_helpers.py``."""

from __future__ import annotations

import http.client
import random
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits


def tan_header(crval: tuple[float, float], shape: tuple[int, int], *, rot_deg: float = 0.0,
               scale_deg: float = 0.2 / 3600) -> dict[str, Any]:
    c, s = np.cos(np.radians(rot_deg)), np.sin(np.radians(rot_deg))
    return {
        "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CUNIT1": "deg", "CUNIT2": "deg",
        "CRVAL1": crval[0], "CRVAL2": crval[1],
        "CRPIX1": shape[1] / 2 + 0.5, "CRPIX2": shape[0] / 2 + 0.5,
        "CD1_1": -scale_deg * c, "CD1_2": scale_deg * s,
        "CD2_1": scale_deg * s, "CD2_2": scale_deg * c,
    }


def random_image(rng: np.random.Generator, dtype: str, shape: tuple[int, int]) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt.kind in "ui":
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
    data = rng.normal(1000.0, 50.0, size=shape).astype(dt)
    data[rng.random(shape) < 0.01] = np.nan
    return data


@pytest.fixture
def make_fits(tmp_path: Path) -> Callable[..., Path]:
    """Factory: write a MEF exposure like the simulator's, return its path.

    Keywords: exposure id, detectors, shape, dtype, seed, checksum, single (data in the
    primary HDU), name, overscan (DATASEC/BIASSEC with 8 overscan columns).
    """

    def make(
        exposure_id: str | None = "deep1-r-e003-d01", *, detectors: int = 3,
        shape: tuple[int, int] = (100, 140), dtype: str = "uint16", seed: int = 0,
        checksum: bool = True, single: bool = False, name: str | None = None,
        filter: str = "r", mjd: float = 60310.25, field: str = "deep1",
        crval: tuple[float, float] = (150.0, 2.2),
    ) -> Path:
        rng = np.random.default_rng(seed)
        primary = {
            "INSTRUME": "tiny", "TELESCOP": "LZ1", "FILTER": filter, "DATE-OBS":
            "2024-01-01T06:00:00", "MJD-OBS": mjd, "EXPTIME": 30.0, "OBJECT": field,
            "RA": crval[0], "DEC": crval[1], "IMAGETYP": "object",
        }
        if exposure_id is not None:
            primary["EXPID"] = exposure_id
        hdus: list[Any] = []
        for k in range(detectors):
            data = random_image(rng, dtype, shape)
            hdr = {
                "DETECTOR": f"CCD{k + 1:02d}", "GAIN": 1.5 + 0.1 * k, "RDNOISE": 4.0,
                "SATURATE": 60000.0, "BUNIT": "ADU",
                "DATASEC": f"[1:{shape[1] - 8},1:{shape[0]}]",
                "BIASSEC": f"[{shape[1] - 7}:{shape[1]},1:{shape[0]}]",
                **tan_header((crval[0] + 0.01 * k, crval[1]), shape, rot_deg=3.0 * k),
            }
            if single:
                hdu = fits.PrimaryHDU(data)
                hdu.header.update(primary)
            else:
                hdu = fits.ImageHDU(data, name=f"CCD{k + 1:02d}")
            hdu.header.update(hdr)
            hdu.header.add_history(f"made by the lazysky tests, detector {k + 1}")
            hdu.header.add_comment("a COMMENT card that must survive")
            hdus.append(hdu)
        if not single:
            ph = fits.PrimaryHDU()
            ph.header.update(primary)
            ph.header.add_history("primary HISTORY card")
            hdus.insert(0, ph)
        path = tmp_path / (name or f"{exposure_id or 'noid'}-{uuid.uuid4().hex[:6]}.fits")
        fits.HDUList(hdus).writeto(path, checksum=checksum)
        return path

    return make


# -- S3: moto server and a fault-injecting proxy ------------------------------------------

@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    from lazysky.zarr_store._s3 import close_s3_filesystems

    close_s3_filesystems()
    import gc

    gc.collect()  # sync instances close their sessions in finalizers
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on the moto server; returns its name."""
    import boto3

    name = f"lz-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=name)
    return name


_FAULTS = ("503", "500", "drop", "drop_after")
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "host"}


class FaultProxy(ThreadingHTTPServer):
    """HTTP proxy on 127.0.0.1 that fails a seeded fraction of requests.

    Which requests fail is drawn from ``random.Random(seed)``; the kinds take turns: 503
    SlowDown, 500 InternalError, a connection dropped before forwarding, and
    one dropped *after* the upstream applied the request. ``only`` (a regex on
    ``"METHOD path"``) limits which requests may fail; ``max_consecutive`` bounds the
    faults in a row for one request (method and path), so enough retries always succeed.
    """

    daemon_threads = True

    def __init__(self, upstream: str, *, rate: float, seed: int, only: str = ".*",
                 max_consecutive: int = 2) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = upstream.split("://", 1)[1]
        self.rate, self.only, self.max_consecutive = rate, re.compile(only), max_consecutive
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.streak: dict[str, int] = {}
        self.n_faults = 0
        self.counts: dict[str, int] = {"ok": 0, "503": 0, "500": 0, "drop": 0, "drop_after": 0}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def decide(self, method: str, path: str) -> str:
        key = f"{method} {path}"
        with self.lock:
            fate = "ok"
            allowed = self.only.search(key) and self.streak.get(key, 0) < self.max_consecutive
            if allowed and self.rng.random() < self.rate:
                fate = _FAULTS[self.n_faults % len(_FAULTS)]  # each kind in turn
                self.n_faults += 1
            self.streak[key] = 0 if fate == "ok" else self.streak.get(key, 0) + 1
            self.counts[fate] += 1
            return fate


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultProxy

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self) -> None:
        body = self._body()
        fate = self.server.decide(self.command, self.path)
        if fate == "drop":
            self.close_connection = True
            return
        if fate in ("503", "500"):
            code, text = ("SlowDown", "Please reduce your request rate.") if fate == "503" \
                else ("InternalError", "We encountered an internal error. Please try again.")
            payload = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                       f"<Message>{text}</Message></Error>").encode()
            self.send_response(int(fate))
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(self.server.upstream, timeout=30)
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if fate == "drop_after":  # upstream applied it; the client never hears back
            self.close_connection = True
            return
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP and k.lower() != "content-length":
                self.send_header(k, v)
        length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length or "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    # BaseHTTPRequestHandler dispatches on these names
    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle  # noqa: N815


@pytest.fixture
def fault_proxy(s3_endpoint: str) -> Iterator[Callable[..., FaultProxy]]:
    started: list[FaultProxy] = []

    def start(**kwargs: Any) -> FaultProxy:
        proxy = FaultProxy(s3_endpoint, **kwargs)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.shutdown()
        proxy.server_close()
