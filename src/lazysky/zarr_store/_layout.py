"""Where things live in a lazysky store, and the few store operations ingest relies on.

Layout (one Zarr v3 group per exposure, see DESIGN.md)::

    <root>/raw/<exposure_id>/zarr.json       group metadata + lazysky attributes: written
                                              LAST, with an exclusive create; its presence
                                              is what "complete" means
    <root>/raw/<exposure_id>/sci/zarr.json   array metadata (the template, written first)
    <root>/raw/<exposure_id>/sci/c/d/i/j     chunks (detector d, tile row i, tile column j)

A group without its ``zarr.json`` is not a Zarr group at all, so neither lazysky nor a
plain Zarr/xarray reader can mistake a half-written exposure (whose missing chunks would
read back as fill values) for a complete one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import fsspec

from lazysky.errors import ParameterError, StoreError

if TYPE_CHECKING:
    from lazysky.config import Settings

__all__ = ["RAW", "SCI", "StoreLike", "StoreRoot", "parse_store", "validate_exposure_id"]

logger = logging.getLogger(__name__)

RAW = "raw"
SCI = "sci"
GROUP_META = "zarr.json"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_REMOTE = ("s3", "s3a", "gs", "gcs", "az", "abfs", "memory", "http", "https")

ExposureState = Literal["absent", "incomplete", "complete"]


def validate_exposure_id(exposure_id: str, *, where: str = "") -> str:
    """Return ``exposure_id`` if it is a safe store key, else raise ``ParameterError``."""
    if not isinstance(exposure_id, str) or not _ID_RE.match(exposure_id):
        msg = (
            f"{where}exposure id {exposure_id!r} is not usable as a store key: expected 1-128 "
            "characters from A-Z a-z 0-9 . _ + - starting with a letter or digit"
        )
        raise ParameterError(msg)
    return exposure_id


def split_protocol(url: str) -> tuple[str, str]:
    """``("s3", "bucket/key")`` for a URL, ``("file", "/abs/path")`` for a local path."""
    if "://" in url:
        proto, rest = url.split("://", 1)
        proto = proto.lower()
        if proto == "file":
            return "file", str(Path(rest).expanduser().resolve())
        return ("s3" if proto == "s3a" else proto), rest.rstrip("/")
    return "file", str(Path(url).expanduser().resolve())


def filesystem(
    protocol: str, storage_options: dict[str, Any], *, asynchronous: bool = False
) -> fsspec.AbstractFileSystem:
    """An fsspec filesystem; S3 gets :class:`~lazysky.zarr_store._s3.LazySkyS3FileSystem`."""
    if protocol == "s3":
        from lazysky.zarr_store._s3 import make_s3_filesystem

        return make_s3_filesystem(storage_options, asynchronous=asynchronous)
    if protocol == "file":
        return fsspec.filesystem("file")
    return fsspec.filesystem(protocol, asynchronous=asynchronous, **storage_options)


@dataclass(frozen=True)
class StoreRoot:
    """The root of a lazysky store: a local directory or an fsspec URL, plus its options.

    Picklable and cheap: Dask tasks receive this, not open file systems or Zarr arrays.
    """

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def protocol(self) -> str:
        return split_protocol(self.url)[0]

    @property
    def root_path(self) -> str:
        return split_protocol(self.url)[1]

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    def fs(self) -> fsspec.AbstractFileSystem:
        """A synchronous fsspec filesystem for this store (cached by fsspec)."""
        return filesystem(self.protocol, self.storage_options)

    def path(self, *parts: str) -> str:
        """The filesystem path of ``parts`` below the root."""
        return "/".join([self.root_path.rstrip("/"), *parts])

    def zarr_store(self, *parts: str, read_only: bool = False) -> Any:
        """A Zarr store rooted at ``parts`` below the root (no parent metadata is written)."""
        from zarr.storage import FsspecStore, LocalStore

        target = self.path(*parts)
        if self.is_local:
            return LocalStore(target, read_only=read_only)
        afs = filesystem(self.protocol, self.storage_options, asynchronous=True)
        return FsspecStore(afs, path=target, read_only=read_only)

    # -- exposure groups --------------------------------------------------------------

    def exposure_state(self, exposure_id: str) -> ExposureState:
        """``complete`` (group metadata present), ``incomplete`` (something else) or ``absent``."""
        fs = self.fs()
        group = self.path(RAW, exposure_id)
        fs.invalidate_cache(group)
        if fs.exists(f"{group}/{GROUP_META}"):
            return "complete"
        return "incomplete" if fs.exists(group) else "absent"

    def read_group_attrs(self, exposure_id: str) -> dict[str, Any]:
        """The ``lazysky`` attributes of a complete group (raises ``StoreError`` if unreadable)."""
        meta_path = self.path(RAW, exposure_id, GROUP_META)
        try:
            meta = json.loads(self.fs().cat_file(meta_path))
        except FileNotFoundError:
            msg = f"no exposure {exposure_id!r} in the store {self.url!r} ({meta_path} missing)"
            raise StoreError(msg) from None
        attrs = meta.get("attributes", {}).get("lazysky")
        if not isinstance(attrs, dict):
            msg = f"{meta_path} is a Zarr group but not a lazysky exposure (no 'lazysky' attrs)"
            raise StoreError(msg)
        return attrs

    def put_exclusive(self, path: str, data: bytes) -> bool:
        """Write ``data`` at ``path`` only if nothing is there; atomic. False if it existed."""
        if self.is_local:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
            tmp.write_bytes(data)
            try:
                os.link(tmp, target)  # atomic and exclusive: fails if target exists
            except FileExistsError:
                return False
            finally:
                tmp.unlink(missing_ok=True)
            return True
        fs = self.fs()
        try:
            fs.pipe_file(path, data, mode="create")  # S3: PUT with If-None-Match: *
        except FileExistsError:
            return False
        return True

    def remove_group(self, exposure_id: str) -> None:
        """Delete an exposure group: its metadata first, so it is never seen half-deleted."""
        fs = self.fs()
        group = self.path(RAW, exposure_id)
        meta = f"{group}/{GROUP_META}"
        fs.invalidate_cache(group)
        if fs.exists(meta):
            fs.rm_file(meta)
        if fs.exists(group):
            fs.rm(group, recursive=True)
        fs.invalidate_cache(group)

    def list_groups(self) -> list[tuple[str, ExposureState]]:
        """Every exposure id under ``raw/`` with its state, sorted by id."""
        fs = self.fs()
        raw = self.path(RAW)
        fs.invalidate_cache(raw)
        try:
            entries = fs.ls(raw, detail=True)
        except FileNotFoundError:
            return []
        out: list[tuple[str, ExposureState]] = []
        for entry in entries:
            if entry.get("type") != "directory":
                continue
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if not _ID_RE.match(name):
                continue
            done = fs.exists(f"{raw}/{name}/{GROUP_META}")
            out.append((name, "complete" if done else "incomplete"))
        return sorted(out)


StoreLike = str | os.PathLike[str] | StoreRoot


def parse_store(
    store: StoreLike,
    *,
    storage_options: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> StoreRoot:
    """Turn a path, URL or :class:`StoreRoot` into a :class:`StoreRoot`.

    Parameters
    ----------
    store
        A local directory, an fsspec URL such as ``s3://bucket/survey``, or a StoreRoot.
    storage_options
        fsspec options for a URL. Default: from ``settings`` (its S3 section for ``s3://``).
    settings
        A :class:`lazysky.config.Settings`; used only when ``storage_options`` is None.
    """
    if isinstance(store, StoreRoot):
        return store
    if not isinstance(store, str | os.PathLike):
        msg = f"store must be a directory, an fsspec URL or a StoreRoot, got {type(store)!r}"
        raise ParameterError(msg)
    url = os.fspath(store)
    if not url.strip():
        msg = "store must not be empty: give a directory or a URL such as s3://bucket/prefix"
        raise ParameterError(msg)
    protocol, path = split_protocol(url)
    if protocol == "file":
        return StoreRoot(path, {})
    if protocol not in _REMOTE:
        logger.debug("store protocol %r is not one lazysky tests; trying fsspec", protocol)
    if storage_options is None:
        storage_options = settings.storage_options(url) if settings is not None else {}
    return StoreRoot(f"{protocol}://{path}", dict(storage_options))
