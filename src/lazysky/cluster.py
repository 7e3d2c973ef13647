"""The Dask cluster lazysky runs on: :func:`connect` returns a ``distributed.Client``.

Three kinds, chosen by ``cluster.kind`` in the settings (or the ``kind=`` keyword):

* ``local`` (the default): a ``LocalCluster`` of worker *processes* with one thread each
  (astropy's WCS is not thread-safe and SEP holds the GIL), scaled adaptively between
  ``min_workers`` and ``max_workers`` (default: one per core); memory per worker
  ``"auto"`` shares the machine's memory between the most workers it can have.
* ``address``: an existing scheduler (``tcp://host:8786``).
* ``kube``: the dask-kubernetes operator: a ``DaskCluster`` built by
  :func:`kube_cluster_spec` (hardened pods, one thread per worker) with adaptive scaling
  between ``min_workers`` and ``max_workers`` through a ``DaskAutoscaler``, or, with
  ``attach: true``, the existing DaskCluster ``name`` (see docs/kubernetes.md).

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

__all__ = ["FACTORIES", "connect", "dashboard_url", "kube_cluster_spec"]

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


def kube_cluster_spec(cfg: ClusterSettings) -> dict[str, Any]:
    """The ``DaskCluster`` that ``connect(kind="kube")`` sends to the operator.

    Pure: built by :func:`lazysky.kube.build_dask_cluster` from the settings (image,
    worker cpu/memory/storage, Dask's memory limit, env, Secret references); the
    initial worker count is ``min_workers``.

    Raises
    ------
    ConfigError
        A setting the spec cannot be built from (the message names the field).
    """
    from lazysky.errors import ParameterError
    from lazysky.kube import Resources, build_dask_cluster

    try:
        resources = Resources(cpu=cfg.worker_cpu, memory=cfg.worker_memory,
                              ephemeral_storage=cfg.worker_ephemeral_storage)
        return build_dask_cluster(
            name=cfg.name, namespace=cfg.namespace, image=cfg.image or "",
            worker_resources=resources, n_workers=cfg.min_workers,
            memory_limit=None if cfg.memory_limit == "auto" else cfg.memory_limit,
            env=cfg.env, secrets=cfg.secrets)
    except ParameterError as exc:
        msg = f"cluster settings for kind 'kube' (cluster.*): {exc}"
        raise ConfigError(msg) from None


def _kube(cfg: ClusterSettings) -> Any:
    from distributed import Client

    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError as exc:  # pragma: no cover - the 'kube' extra is missing
        msg = (
            f"cluster.kind 'kube' needs dask-kubernetes ({exc}); "
            f"install lazysky[kube]"
        )
        raise ConfigError(msg) from None
    if cfg.max_workers is not None and cfg.max_workers < cfg.min_workers:
        msg = (
            f"cluster.max_workers={cfg.max_workers} is below cluster.min_workers="
            f"{cfg.min_workers}; expected min_workers <= max_workers"
        )
        raise ConfigError(msg)
    if cfg.attach:
        logger.info("attaching to DaskCluster %r", cfg.name)
        cluster = KubeCluster.from_name(cfg.name, namespace=cfg.namespace, quiet=True)
    else:
        spec = kube_cluster_spec(cfg)  # validated before anything is sent
        logger.info("creating DaskCluster %r through the operator", cfg.name)
        cluster = KubeCluster(custom_cluster_spec=spec, namespace=cfg.namespace,
                              shutdown_on_close=True, quiet=True)
    try:
        if not cfg.attach:
            if cfg.max_workers is not None:
                cluster.adapt(minimum=cfg.min_workers, maximum=cfg.max_workers)
            else:
                cluster.scale(cfg.min_workers)
        client = (Client if cfg.attach else _owning_client_class())(
            cluster, set_as_default=True)
    except BaseException:
        if not cfg.attach:
            cluster.close()
        raise
    return client


def _owning_client_class() -> Any:
    """A Client that also closes (deletes) the KubeCluster it was given, when closed."""
    from distributed import Client

    class _OwningClient(Client):
        def close(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().close(*args, **kwargs)
            finally:
                if self.cluster is not None:
                    self.cluster.close()  # shutdown_on_close: deletes the DaskCluster

    return _OwningClient


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
