"""S3 through s3fs, with both of its retry layers under lazysky's control.

s3fs retries in two layers: botocore's retry configuration (``config_kwargs={"retries":
{"max_attempts": n, "mode": "standard"}}``, which the settings provide) and s3fs's own loop
around each call, whose count is the *class attribute* ``S3FileSystem.retries`` (not a
constructor argument). Changing that class attribute would be hidden global state, so
lazysky uses a subclass that accepts ``s3fs_retries=`` and sets it on the instance. By
default it equals botocore's ``max_attempts``, so "retries = 1" really means one attempt.
"""

from __future__ import annotations

import contextlib
from typing import Any

import s3fs

__all__ = ["LazySkyS3FileSystem", "close_s3_filesystems", "make_s3_filesystem"]


class LazySkyS3FileSystem(s3fs.S3FileSystem):
    """``s3fs.S3FileSystem`` whose own retry count is an instance option (``s3fs_retries``)."""

    protocol = ("s3", "s3a")

    def __init__(self, *args: Any, s3fs_retries: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if s3fs_retries is not None:
            self.retries = max(1, int(s3fs_retries))


def make_s3_filesystem(
    storage_options: dict[str, Any], *, asynchronous: bool = False
) -> LazySkyS3FileSystem:
    """An S3 filesystem from fsspec ``storage_options`` (as ``S3Settings.storage_options``)."""
    opts = dict(storage_options)
    if "s3fs_retries" not in opts:
        attempts = opts.get("config_kwargs", {}).get("retries", {}).get("max_attempts")
        if attempts is not None:
            opts["s3fs_retries"] = attempts
    return LazySkyS3FileSystem(asynchronous=asynchronous, **opts)


def close_s3_filesystems() -> None:
    """Close the HTTP sessions of every cached lazysky S3 filesystem, then forget them.

    Asynchronous instances (the ones Zarr uses) get no finalizer from s3fs, so their
    connections would otherwise stay open until interpreter exit. Call this when done
    with a store, e.g. at the end of a test session or before a process forks.
    """
    from zarr.core.sync import sync

    for fs in list(LazySkyS3FileSystem._cache.values()):
        creator = getattr(fs, "_s3creator", None)
        if fs.asynchronous and creator is not None:
            # already closed, or its loop is gone: then there is nothing left to release
            with contextlib.suppress(Exception):
                sync(creator.__aexit__(None, None, None))
    LazySkyS3FileSystem.clear_instance_cache()
