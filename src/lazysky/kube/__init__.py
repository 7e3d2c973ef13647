"""lazysky on Kubernetes: manifests from pure ``build_*`` functions returning dicts.

* :mod:`._resources`: container resources, Dask's memory limit safely below them;
* :mod:`._pods`: restricted pod templates, the operator's ``DaskCluster`` and
  ``DaskAutoscaler`` (kubernetes.dask.org/v1);
* :mod:`._stack`: namespace, settings ConfigMap, submitter RBAC, NetworkPolicies, the
  catalog PostgreSQL + pg_sphere, the SCS service, the batch CronJob;
* :mod:`._gc`: the retention CronJob (``lazysky gc``) and the store clients' egress;
* :mod:`._render`: the whole deployment and the kustomize tree in ``kube/``;
* :mod:`.bootstrap`: what the catalog-bootstrap Job runs.

``lazysky kube render [--overlay dev|prod] [--out DIR]`` prints or writes the manifests;
:func:`lazysky.cluster.connect` with ``kind="kube"`` sends :func:`build_dask_cluster`'s
dict to the operator. See docs/kubernetes.md.

Examples
--------
>>> from lazysky.kube import build_manifests, dump_yaml
>>> text = dump_yaml(build_manifests(overlay="prod"))  # doctest: +SKIP
"""

from lazysky.kube._gc import (
    GC_CRONJOB,
    STORE_CLIENT_LABEL,
    build_gc_cronjob,
    build_store_client_policy,
)
from lazysky.kube._pods import (
    APP_LABEL,
    CATALOG_CLIENT_LABEL,
    DASK_API,
    PORTS,
    RUN_AS_USER,
    build_container,
    build_dask_autoscaler,
    build_dask_cluster,
    build_pod_spec,
    build_scheduler_spec,
    build_worker_spec,
    check_image,
    check_name,
    scratch_sizes,
)
from lazysky.kube._render import (
    OVERLAYS,
    Overlay,
    build_base,
    build_manifests,
    build_overlay_patches,
    default_image,
    dump_yaml,
    render_tree,
)
from lazysky.kube._resources import (
    DEFAULT_MEMORY_FRACTION,
    MAX_MEMORY_FRACTION,
    Resources,
    dask_memory_limit,
    parse_cpu,
    parse_quantity_bytes,
)
from lazysky.kube._stack import (
    DASK_CLIENT_LABEL,
    DB_SECRET,
    S3_SECRET,
    SETTINGS_CONFIGMAP,
    build_batch_cronjob,
    build_catalog_bootstrap_job,
    build_catalog_db,
    build_namespace,
    build_network_policies,
    build_serve,
    build_settings_configmap,
    build_submitter_rbac,
    check_cron,
)
from lazysky.kube.bootstrap import BootstrapResult, bootstrap_catalog

__all__ = [
    "APP_LABEL",
    "CATALOG_CLIENT_LABEL",
    "DASK_API",
    "DASK_CLIENT_LABEL",
    "DB_SECRET",
    "DEFAULT_MEMORY_FRACTION",
    "GC_CRONJOB",
    "MAX_MEMORY_FRACTION",
    "OVERLAYS",
    "PORTS",
    "RUN_AS_USER",
    "S3_SECRET",
    "SETTINGS_CONFIGMAP",
    "STORE_CLIENT_LABEL",
    "BootstrapResult",
    "Overlay",
    "Resources",
    "bootstrap_catalog",
    "build_base",
    "build_batch_cronjob",
    "build_catalog_bootstrap_job",
    "build_catalog_db",
    "build_container",
    "build_dask_autoscaler",
    "build_dask_cluster",
    "build_gc_cronjob",
    "build_manifests",
    "build_namespace",
    "build_network_policies",
    "build_overlay_patches",
    "build_pod_spec",
    "build_scheduler_spec",
    "build_serve",
    "build_settings_configmap",
    "build_store_client_policy",
    "build_submitter_rbac",
    "build_worker_spec",
    "check_cron",
    "check_image",
    "check_name",
    "dask_memory_limit",
    "default_image",
    "dump_yaml",
    "parse_cpu",
    "parse_quantity_bytes",
    "render_tree",
    "scratch_sizes",
]
