"""The Dask cluster lazysky runs on: :func:`connect` returns a ``distributed.Client``.

Three kinds, chosen by ``cluster.kind`` in the settings (or the ``kind=`` keyword):

* ``local`` (the default): a ``LocalCluster`` of worker *processes* with one thread each
  (astropy's WCS is not thread-safe and SEP holds the GIL), scaled adaptively between
  ``min_workers`` and ``max_workers`` (default: one per core); memory per worker
  ``"auto"`` shares the machine's memory between the most workers it can have.
* ``address``: an existing scheduler (``tcp://host:8786``).
* ``kube``: the dask-kubernetes operator (a later part of lazysky; the factory slots into
  :data:`FACTORIES`).

The client is a context manager; closing it closes a cluster :func:`connect` started, never
one it only attached to. Worker plugins (e.g. SEP's process-wide settings) are registered
once per worker, so every worker that joins later gets them too.

Examples
--------
>>> from lazysky.cluster import connect
>>> with connect(max_workers=2) as client:  # doctest: +SKIP
...     print(client.dashboard_link)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from lazysky.config import ClusterSettings, Settings, load_settings
from lazysky.errors import ConfigError

__all__ = ["FACTORIES", "connect", "dashboard_url"]

logger = logging.getLogger(__name__)


def _local(cfg: ClusterSettings) -> Any:
    from distributed import Client

    cores = os.cpu_count() or 1
    maximum = cfg.max_workers or max(1, cores // cfg.threads_per_worker)
    minimum = min(cfg.min_workers, maximum)
    memory: str | int = cfg.memory_limit
    if memory == "auto":
        # share the machine between the most workers adaptive scaling may start
        from distributed.system import MEMORY_LIMIT

        memory = int(MEMORY_LIMIT * 0.9 // maximum)
    # Client() without an address starts a LocalCluster it owns: closing the client
    # closes that cluster too, and never a cluster the client only attached to.
    client = Client(
        n_workers=minimum,
        threads_per_worker=cfg.threads_per_worker,
        processes=True,
        memory_limit=memory,
        dashboard_address=cfg.dashboard_address,
        set_as_default=True,
    )
    cluster: Any = client.cluster
    cluster.adapt(minimum=minimum, maximum=maximum)
    logger.info(
        "local cluster: %d..%d workers x %d thread(s), %s memory each; dashboard %s",
        minimum, maximum, cfg.threads_per_worker, memory, client.dashboard_link,
    )
    return client


def _address(cfg: ClusterSettings) -> Any:
    import dask
    from distributed import Client

    if not cfg.address:
        msg = "cluster.kind is 'address' but cluster.address is not set (tcp://host:8786)"
        raise ConfigError(msg)
    try:
        timeout = dask.config.get("distributed.comm.timeouts.connect")
        return Client(cfg.address, timeout=timeout, set_as_default=True)
    except OSError as exc:
        msg = f"cannot reach the Dask scheduler at cluster.address={cfg.address!r}: {exc}"
        raise ConfigError(msg) from exc


def _kube(cfg: ClusterSettings) -> Any:
    msg = (
        "cluster.kind 'kube' (the dask-kubernetes operator) is not available in this "
        "version of lazysky yet; use 'local', or 'address' with the scheduler of a cluster "
        "you started"
    )
    raise ConfigError(msg)


#: cluster kind → factory taking the cluster settings and returning a Client
FACTORIES: dict[str, Callable[[ClusterSettings], Any]] = {
    "local": _local,
    "address": _address,
    "kube": _kube,
}


def connect(
    settings: Settings | ClusterSettings | None = None,
    *,
    worker_plugins: Sequence[Any] = (),
    **overrides: Any,
) -> Any:
    """Connect to the cluster the settings name and return a ``distributed.Client``.

    Parameters
    ----------
    settings
        lazysky :class:`~lazysky.config.Settings` (its ``cluster`` part is used), the
        :class:`~lazysky.config.ClusterSettings` alone, or None for the settings in force
        (environment, ``LAZYSKY_CONFIG``).
    worker_plugins
        ``distributed.WorkerPlugin`` instances registered on every worker, present and
        future (for process-wide state such as SEP's buffer sizes).
    **overrides
        Any ``ClusterSettings`` field (``kind``, ``address``, ``min_workers``,
        ``max_workers``, ``threads_per_worker``, ``memory_limit``, ``dashboard_address``).

    Returns
    -------
    distributed.Client
        Use it as a context manager; leaving it closes the client and any cluster that
        :func:`connect` started. ``client.dashboard_link`` is the dashboard URL (also
        in the notebook repr).

    Raises
    ------
    ConfigError
        An unknown field or value, or an unreachable scheduler.

    Examples
    --------
    >>> with connect(kind="local", max_workers=2) as client:  # doctest: +SKIP
    ...     client.submit(sum, [1, 2]).result()
    3
    """
    if settings is None:
        cfg = load_settings().cluster
    elif isinstance(settings, Settings):
        cfg = settings.cluster
    elif isinstance(settings, ClusterSettings):
        cfg = settings
    else:
        msg = f"settings must be Settings, ClusterSettings or None, got {type(settings).__name__}"
        raise ConfigError(msg)
    if overrides:
        unknown = sorted(set(overrides) - set(ClusterSettings.model_fields))
        if unknown:
            msg = (
                f"unknown cluster setting(s) {unknown}; expected any of "
                f"{sorted(ClusterSettings.model_fields)}"
            )
            raise ConfigError(msg)
        try:
            cfg = ClusterSettings.model_validate({**cfg.model_dump(), **overrides})
        except ValueError as exc:
            msg = f"invalid cluster settings {overrides}: {exc}"
            raise ConfigError(msg) from exc
    client = FACTORIES[cfg.kind](cfg)
    try:
        for plugin in worker_plugins:
            client.register_plugin(plugin)
    except BaseException:
        client.close()
        raise
    return client


def dashboard_url(client: Any) -> str:
    """The dashboard URL of ``client``'s scheduler (``""`` when it serves none)."""
    link = getattr(client, "dashboard_link", "") or ""
    return str(link)
