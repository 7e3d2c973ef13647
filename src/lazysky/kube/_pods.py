"""Hardened pod templates, and the Dask scheduler and workers of the operator's CRDs.

``dask_kubernetes.operator.make_cluster_spec`` emits pods with no security context at
all; every pod template built here meets Pod Security "restricted": non-root (uid
:data:`RUN_AS_USER`), seccomp ``RuntimeDefault``, no privilege escalation, every
capability dropped, a read-only root filesystem with ``emptyDir`` volumes for ``/tmp``
and Dask's local directory, requests and limits for cpu, memory and ephemeral storage,
and no service-account token (Dask pods never talk to the Kubernetes API).

Examples
--------
>>> from lazysky.kube import Resources, build_dask_cluster
>>> spec = build_dask_cluster(name="lazysky", image="ghcr.io/lazysky/lazysky:0.1.0",
...                           worker_resources=Resources(memory="4Gi"))
>>> spec["kind"], spec["spec"]["worker"]["replicas"]
('DaskCluster', 1)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from lazysky.errors import ParameterError
from lazysky.kube._resources import Resources, dask_memory_limit, parse_quantity_bytes

__all__ = [
    "APP_LABEL",
    "CATALOG_CLIENT_LABEL",
    "DASK_API",
    "PORTS",
    "RUN_AS_USER",
    "SCHEDULER_ENV",
    "SCHEDULER_HTTP_ROUTES",
    "build_container",
    "build_dask_autoscaler",
    "build_dask_cluster",
    "build_pod_spec",
    "build_scheduler_spec",
    "build_worker_spec",
    "check_image",
    "check_name",
    "scratch_sizes",
]

#: uid and gid every container runs as (Pod Security "restricted" wants non-root;
#: >= 10000 stays clear of the host's system and login users)
RUN_AS_USER = 10001
DASK_API = "kubernetes.dask.org/v1"
#: the ports lazysky's pods listen on (the NetworkPolicies allow exactly these)
PORTS = {
    "scheduler": 8786, "dashboard": 8787, "worker-dashboard": 8788, "worker": 8789,
    "nanny": 8790, "postgres": 5432, "scs": 8000,
}
APP_LABEL = {"app.kubernetes.io/name": "lazysky", "app.kubernetes.io/part-of": "lazysky"}
#: pods carrying this label may reach the catalog database (NetworkPolicy)
CATALOG_CLIENT_LABEL = "lazysky.io/catalog-client"
#: writable places on a read-only root: HOME (astropy, matplotlib caches), Dask's scratch
SCRATCH_DIR = "/scratch"
#: the least ephemeral storage of a worker (1 GiB /tmp at most, the rest spill space)
MIN_WORKER_STORAGE = 2 * 2**30
_ENV_WRITABLE = {
    "HOME": "/tmp", "XDG_CACHE_HOME": "/tmp/.cache", "XDG_CONFIG_HOME": "/tmp/.config",
    "MPLCONFIGDIR": "/tmp/matplotlib", "DASK_TEMPORARY_DIRECTORY": SCRATCH_DIR,
}
#: the scheduler serves its HTTP API (``/api/v1/adaptive_target``, ``retire_workers``),
#: which the operator's autoscaler polls; without it the operator falls back to RPC.
#: The dashboard port is reachable only from the workers, Dask clients and the operator
#: (NetworkPolicy ``dask-scheduler``).
SCHEDULER_HTTP_ROUTES = [
    "distributed.http.scheduler.prometheus", "distributed.http.scheduler.info",
    "distributed.http.scheduler.json", "distributed.http.health", "distributed.http.proxy",
    "distributed.http.statics", "distributed.http.scheduler.api",
]
SCHEDULER_ENV = {"DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES": repr(SCHEDULER_HTTP_ROUTES)}
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET_LIKE = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|PRIVATE|CREDENTIAL|ACCESS_KEY",
                          re.IGNORECASE)


def check_name(name: str, *, field: str = "name", max_length: int = 63) -> str:
    """``name`` if it is a DNS-1123 label (what Kubernetes object names must be)."""
    if not isinstance(name, str) or len(name) > max_length or not _DNS_LABEL.match(name):
        msg = (
            f"{field}={name!r} is not a valid Kubernetes name; expected at most "
            f"{max_length} lower-case letters, digits and '-', starting and ending "
            f"with a letter or digit"
        )
        raise ParameterError(msg)
    return name


def check_image(image: str | None, *, field: str = "image") -> str:
    """``image`` if it names a pinned image (a tag other than ``latest``, or a digest)."""
    if not image or not isinstance(image, str) or not image.strip():
        msg = (
            f"{field} is not set; expected a container image such as "
            f"'ghcr.io/lazysky/lazysky:0.1.0' (build it from the Dockerfile)"
        )
        raise ParameterError(msg)
    if any(c.isspace() for c in image):
        msg = f"{field}={image!r} contains white space; expected an image reference"
        raise ParameterError(msg)
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    tag = last.partition(":")[2]
    if digest:
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            msg = f"{field}={image!r} has a malformed digest; expected @sha256:<64 hex digits>"
            raise ParameterError(msg)
    elif not tag or tag == "latest":
        msg = (
            f"{field}={image!r} is not pinned; expected a version tag (…:0.1.0) or a "
            f"digest (…@sha256:…), never ':latest' or no tag"
        )
        raise ParameterError(msg)
    return image


def _env(env: Mapping[str, str] | None, secrets: Mapping[str, str] | None,
         *, field: str = "env") -> list[dict[str, Any]]:
    """Plain variables (never secret-looking) then ``secretKeyRef``s, as container env."""
    out: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in _ENV_WRITABLE.items()]
    for key, value in (env or {}).items():
        if not _ENV_NAME.match(key):
            msg = f"{field} has an invalid variable name {key!r}; expected [A-Za-z_][A-Za-z0-9_]*"
            raise ParameterError(msg)
        if _SECRET_LIKE.search(key):
            msg = (
                f"{field}[{key!r}] looks like a secret; secret values never go into "
                f"manifests: reference a Secret instead (secrets={{{key!r}: 'secret/key'}})"
            )
            raise ParameterError(msg)
        out.append({"name": key, "value": str(value)})
    for key, ref in (secrets or {}).items():
        text = str(ref)
        optional = text.endswith("?")
        secret, _, item = text.removesuffix("?").partition("/")
        if not _ENV_NAME.match(key) or not item:
            msg = (
                f"secrets[{key!r}]={ref!r} is not a Secret reference; expected an env "
                f"variable name mapped to 'secret-name/key' ('…?' when optional)"
            )
            raise ParameterError(msg)
        check_name(secret, field=f"secrets[{key!r}] Secret name")
        selector: dict[str, Any] = {"name": secret, "key": item}
        if optional:
            selector["optional"] = True
        out.append({"name": key, "valueFrom": {"secretKeyRef": selector}})
    return out


def _security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER,
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
    }


def build_container(
    *, name: str, image: str, args: Sequence[str], resources: Resources,
    ports: Mapping[str, int] | None = None, env: Mapping[str, str] | None = None,
    secrets: Mapping[str, str] | None = None, config_map: str | None = None,
    probes: Mapping[str, Any] | None = None, scratch: bool = False,
    extra_mounts: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """One restricted container: read-only root, ``/tmp`` (and ``/scratch``) writable.

    Parameters
    ----------
    probes
        ``{"readinessProbe": …, "livenessProbe": …}`` as Kubernetes wants them.
    scratch
        Mount the ``scratch`` volume at ``/scratch`` (Dask's local directory).

    Examples
    --------
    >>> c = build_container(name="x", image="lazysky:0.1.0", args=["lazysky", "--help"],
    ...                     resources=Resources())
    >>> c["securityContext"]["readOnlyRootFilesystem"]
    True
    """
    check_name(name, field="container name")
    container: dict[str, Any] = {
        "name": name,
        "image": check_image(image),
        "imagePullPolicy": "Always",  # a re-pushed tag never runs stale code
        "args": list(args),
        "env": [e for e in _env(env, secrets)
                if scratch or e["name"] != "DASK_TEMPORARY_DIRECTORY"],
        "resources": resources.as_k8s(),
        "securityContext": _security_context(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]
        + ([{"name": "scratch", "mountPath": SCRATCH_DIR}] if scratch else [])
        + [dict(m) for m in extra_mounts],
    }
    if config_map:
        container["envFrom"] = [{"configMapRef": {"name": check_name(
            config_map, field="config_map")}}]
    if ports:
        container["ports"] = [{"name": k, "containerPort": v, "protocol": "TCP"}
                              for k, v in ports.items()]
    container.update(probes or {})
    return container


def _mebibytes(n: int) -> str:
    return f"{n // 2**20}Mi"


def scratch_sizes(resources: Resources, *, scratch: bool) -> tuple[int, int]:
    """Bytes of the ``/tmp`` and ``/scratch`` emptyDirs within the ephemeral-storage limit.

    ``/tmp`` gets at most 1 GiB (a quarter of the limit in a pod with ``/scratch``, half
    without); ``/scratch`` (Dask's spill space) gets 95 % of the rest, the remainder is left
    for the container's logs. Together they never exceed the limit, so a full disk is an
    emptyDir error for Dask rather than an eviction of the pod.

    Examples
    --------
    >>> scratch_sizes(Resources(ephemeral_storage="10Gi"), scratch=True)
    (1073741824, 9181164748)
    """
    storage = parse_quantity_bytes(resources.ephemeral_storage, field="ephemeral_storage")
    tmp = min(2**30, storage // (4 if scratch else 2))
    return tmp, int((storage - tmp) * 0.95) if scratch else 0


def build_pod_spec(
    containers: Sequence[Mapping[str, Any]], *, resources: Resources,
    scratch: bool = False, service_account: str | None = None,
    restart_policy: str | None = None, extra_volumes: Sequence[Mapping[str, Any]] = (),
    termination_grace_seconds: int = 30,
) -> dict[str, Any]:
    """A restricted pod: the containers, emptyDir volumes sized within the storage limit.

    ``service_account=None`` runs without any API token (``automountServiceAccountToken:
    false`` and the namespace's default account); name one only for pods that call the
    Kubernetes API.
    """
    tmp_bytes, scratch_bytes = scratch_sizes(resources, scratch=scratch)
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {
        "sizeLimit": _mebibytes(tmp_bytes)}}]
    if scratch:
        volumes.append({"name": "scratch", "emptyDir": {
            "sizeLimit": _mebibytes(scratch_bytes)}})
    spec: dict[str, Any] = {
        "automountServiceAccountToken": service_account is not None,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER, "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationGracePeriodSeconds": termination_grace_seconds,
        "containers": [dict(c) for c in containers],
        "volumes": volumes + [dict(v) for v in extra_volumes],
    }
    if service_account is not None:
        spec["serviceAccountName"] = check_name(service_account, field="service_account")
    if restart_policy is not None:
        spec["restartPolicy"] = restart_policy
    return spec


def _health_probes(port: str) -> dict[str, Any]:
    return {
        "readinessProbe": {"httpGet": {"port": port, "path": "/health"},
                           "periodSeconds": 5, "timeoutSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"port": port, "path": "/health"},
                          "initialDelaySeconds": 15, "periodSeconds": 20,
                          "timeoutSeconds": 10, "failureThreshold": 6},
    }


def build_scheduler_spec(
    *, cluster_name: str, image: str, resources: Resources | None = None,
    env: Mapping[str, str] | None = None, secrets: Mapping[str, str] | None = None,
    config_map: str | None = None,
) -> dict[str, Any]:
    """The ``scheduler`` part of a DaskCluster: pod spec and ClusterIP service.

    Probes on the scheduler's ``/health`` (the dashboard port, 8787).

    Examples
    --------
    >>> s = build_scheduler_spec(cluster_name="lazysky", image="lazysky:0.1.0")
    >>> s["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"]
    '/health'
    """
    check_name(cluster_name, field="cluster name", max_length=40)
    resources = resources or Resources(cpu="1", memory="2Gi", ephemeral_storage="2Gi")
    container = build_container(
        name="scheduler", image=image, resources=resources,
        env={**SCHEDULER_ENV, **(env or {})}, secrets=secrets, config_map=config_map,
        args=["dask", "scheduler", "--host", "0.0.0.0",
              "--port", str(PORTS["scheduler"]),
              "--dashboard-address", f":{PORTS['dashboard']}"],
        ports={"tcp-comm": PORTS["scheduler"], "http-dashboard": PORTS["dashboard"]},
        probes=_health_probes("http-dashboard"), scratch=True,
    )
    return {
        "metadata": {"labels": {**APP_LABEL, "app.kubernetes.io/component": "scheduler"}},
        "spec": build_pod_spec([container], resources=resources, scratch=True),
        "service": {
            "type": "ClusterIP",
            "selector": {"dask.org/cluster-name": cluster_name,
                         "dask.org/component": "scheduler"},
            "ports": [
                {"name": "tcp-comm", "protocol": "TCP", "port": PORTS["scheduler"],
                 "targetPort": "tcp-comm"},
                {"name": "http-dashboard", "protocol": "TCP", "port": PORTS["dashboard"],
                 "targetPort": "http-dashboard"},
            ],
        },
    }


def build_worker_spec(
    *, image: str, resources: Resources | None = None, n_workers: int = 1,
    memory_limit: str | int | None = None, env: Mapping[str, str] | None = None,
    secrets: Mapping[str, str] | None = None, config_map: str | None = None,
) -> dict[str, Any]:
    """The ``worker`` part of a DaskCluster: ``n_workers`` one-thread worker pods.

    Parameters
    ----------
    memory_limit
        Dask's ``--memory-limit`` (None: 85 % of the container's memory limit; at most
        90 % of it, see :func:`~lazysky.kube.dask_memory_limit`). Spilling to
        ``/scratch`` stops at 90 % of that volume (``max-spill``), so a worker pauses
        instead of being evicted for a full disk.

    Raises
    ------
    ParameterError
        A negative worker count, no or unpinned image, a memory limit too large for
        the container.

    Examples
    --------
    >>> w = build_worker_spec(image="lazysky:0.1.0", n_workers=3)
    >>> w["replicas"], "--nthreads" in w["spec"]["containers"][0]["args"]
    (3, True)
    """
    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 0:
        msg = f"n_workers={n_workers!r} must be a whole number >= 0"
        raise ParameterError(msg)
    resources = resources or Resources()
    limit = dask_memory_limit(resources, memory_limit)
    if parse_quantity_bytes(resources.ephemeral_storage) < MIN_WORKER_STORAGE:
        msg = (
            f"worker ephemeral_storage={resources.ephemeral_storage!r} is too small; "
            f"expected at least 2Gi for /tmp and Dask's spill space (/scratch)"
        )
        raise ParameterError(msg)
    spill = int(scratch_sizes(resources, scratch=True)[1] * 0.9)
    container = build_container(
        name="worker", image=image, resources=resources, secrets=secrets,
        env={"DASK_DISTRIBUTED__WORKER__MEMORY__MAX_SPILL": str(spill), **(env or {})},
        config_map=config_map,
        args=["dask", "worker", "--name", "$(DASK_WORKER_NAME)",
              "--nthreads", "1",  # astropy's WCS is not thread-safe, SEP holds the GIL
              "--memory-limit", str(limit),
              "--local-directory", SCRATCH_DIR,
              "--worker-port", str(PORTS["worker"]), "--nanny-port", str(PORTS["nanny"]),
              "--dashboard", "--dashboard-address", str(PORTS["worker-dashboard"])],
        ports={"http-dashboard": PORTS["worker-dashboard"], "tcp-worker": PORTS["worker"],
               "tcp-nanny": PORTS["nanny"]},
        probes={"readinessProbe": {
            "httpGet": {"port": "http-dashboard", "path": "/health"},
            "periodSeconds": 10, "timeoutSeconds": 5},
            "livenessProbe": {
            "httpGet": {"port": "http-dashboard", "path": "/health"},
            "initialDelaySeconds": 30, "periodSeconds": 30, "timeoutSeconds": 10,
            "failureThreshold": 6}},
        scratch=True,
    )
    return {
        "replicas": n_workers,
        "metadata": {"labels": {**APP_LABEL, "app.kubernetes.io/component": "worker",
                                CATALOG_CLIENT_LABEL: "true"}},
        "spec": build_pod_spec([container], resources=resources, scratch=True,
                               termination_grace_seconds=60),
    }


def build_dask_cluster(
    *, name: str, image: str, worker_resources: Resources | None = None,
    scheduler_resources: Resources | None = None, n_workers: int = 1,
    memory_limit: str | int | None = None, env: Mapping[str, str] | None = None,
    secrets: Mapping[str, str] | None = None, config_map: str | None = None,
    namespace: str | None = None, idle_timeout: int = 0,
) -> dict[str, Any]:
    """A ``DaskCluster`` (kubernetes.dask.org/v1) for the dask-kubernetes operator.

    The same dict goes to ``KubeCluster(custom_cluster_spec=…)`` and into ``kube/``.

    Examples
    --------
    >>> c = build_dask_cluster(name="lazysky", image="lazysky:0.1.0", n_workers=2)
    >>> c["apiVersion"], c["metadata"]["name"], c["spec"]["worker"]["replicas"]
    ('kubernetes.dask.org/v1', 'lazysky', 2)
    """
    check_name(name, field="cluster name", max_length=40)
    if isinstance(idle_timeout, bool) or not isinstance(idle_timeout, int) or idle_timeout < 0:
        msg = f"idle_timeout={idle_timeout!r} must be whole seconds >= 0 (0: never)"
        raise ParameterError(msg)
    metadata: dict[str, Any] = {"name": name,
                                "labels": {**APP_LABEL, "app.kubernetes.io/component": "dask"}}
    if namespace is not None:
        metadata["namespace"] = check_name(namespace, field="namespace")
    return {
        "apiVersion": DASK_API,
        "kind": "DaskCluster",
        "metadata": metadata,
        "spec": {
            "idleTimeout": idle_timeout,
            "worker": build_worker_spec(
                image=image, resources=worker_resources, n_workers=n_workers,
                memory_limit=memory_limit, env=env, secrets=secrets, config_map=config_map),
            # the scheduler runs no tasks: it gets the settings, never the credentials
            "scheduler": build_scheduler_spec(
                cluster_name=name, image=image, resources=scheduler_resources, env=env,
                config_map=config_map),
        },
    }


def build_dask_autoscaler(*, cluster: str, minimum: int, maximum: int,
                          namespace: str | None = None) -> dict[str, Any]:
    """A ``DaskAutoscaler``: the operator scales the default worker group in [min, max].

    Examples
    --------
    >>> build_dask_autoscaler(cluster="lazysky", minimum=2, maximum=200)["spec"]
    {'cluster': 'lazysky', 'minimum': 2, 'maximum': 200}
    """
    check_name(cluster, field="cluster name", max_length=40)
    for field, value in (("minimum", minimum), ("maximum", maximum)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            msg = f"autoscaler {field}={value!r} must be a whole number >= 0"
            raise ParameterError(msg)
    if maximum < 1 or minimum > maximum:
        msg = (
            f"autoscaler minimum={minimum} and maximum={maximum}: expected "
            f"0 <= minimum <= maximum and maximum >= 1"
        )
        raise ParameterError(msg)
    metadata: dict[str, Any] = {"name": cluster,
                                "labels": {**APP_LABEL, "app.kubernetes.io/component": "dask"}}
    if namespace is not None:
        metadata["namespace"] = check_name(namespace, field="namespace")
    return {
        "apiVersion": DASK_API,
        "kind": "DaskAutoscaler",
        "metadata": metadata,
        "spec": {"cluster": cluster, "minimum": minimum, "maximum": maximum},
    }
