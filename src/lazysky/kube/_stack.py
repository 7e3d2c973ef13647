"""Everything around the Dask cluster: namespace, settings, RBAC, network, catalog, SCS, batch.

Each ``build_*`` is pure and returns plain dicts (or a list of them). Secrets are only
ever *referenced* (``secretKeyRef``); no Secret object and no secret value is built here.
The Secrets the stack expects (create them with ``kubectl create secret``):

* ``lazysky-db``: ``password`` (the catalog's owner role ``lazysky``) and
  ``reader-password`` (the read-only role ``lazysky_reader`` the SCS service uses);
* ``lazysky-s3``: ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY``.

Examples
--------
>>> from lazysky.kube import build_batch_cronjob
>>> job = build_batch_cronjob(namespace="lazysky", image="lazysky:0.1.0")
>>> job["spec"]["concurrencyPolicy"]
'Forbid'
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from typing import Any

from lazysky.errors import ParameterError
from lazysky.kube._pods import (
    APP_LABEL,
    CATALOG_CLIENT_LABEL,
    PORTS,
    build_container,
    build_pod_spec,
    check_image,
    check_name,
)
from lazysky.kube._resources import Resources, parse_quantity_bytes

__all__ = [
    "DASK_CLIENT_LABEL",
    "DB_SECRET",
    "S3_SECRET",
    "S3_SECRETS",
    "SETTINGS_CONFIGMAP",
    "build_batch_cronjob",
    "build_catalog_bootstrap_job",
    "build_catalog_db",
    "build_namespace",
    "build_network_policies",
    "build_serve",
    "build_settings_configmap",
    "build_submitter_rbac",
    "check_cron",
]

DB_SECRET = "lazysky-db"
S3_SECRET = "lazysky-s3"
SETTINGS_CONFIGMAP = "lazysky-settings"
#: S3 credentials, optional (a store on a filesystem or with node credentials needs none)
S3_SECRETS = {"AWS_ACCESS_KEY_ID": f"{S3_SECRET}/AWS_ACCESS_KEY_ID?",
              "AWS_SECRET_ACCESS_KEY": f"{S3_SECRET}/AWS_SECRET_ACCESS_KEY?"}
SUBMITTER = "lazysky-submitter"
CATALOG_DB = "catalog-db"
SERVE = "lazysky-scs"
#: pods with this label may talk to the Dask scheduler (batch jobs, labelled notebooks)
DASK_CLIENT_LABEL = "lazysky.io/dask-client"
#: the catalog role names (lazysky.catalog.database.READER_ROLE is the reader)
DB_OWNER, DB_READER, DB_NAME = "lazysky", "lazysky_reader", "lazysky"

_SECRET_KEY = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|PRIVATE|CREDENTIAL|ACCESS_KEY",
                         re.IGNORECASE)
_URL_PASSWORD = re.compile(r"://[^/@\s:]*:[^/@\s]+@")
_CRON_EPOCH = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
_CRON_MACROS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight",
                "@hourly"}


def _meta(name: str, namespace: str, component: str, **extra: Any) -> dict[str, Any]:
    return {"name": check_name(name), "namespace": check_name(namespace, field="namespace"),
            "labels": {**APP_LABEL, "app.kubernetes.io/component": component}, **extra}


def _labels(component: str, **more: str) -> dict[str, str]:
    return {**APP_LABEL, "app.kubernetes.io/component": component, **more}


def build_namespace(name: str = "lazysky") -> dict[str, Any]:
    """The namespace, with Pod Security "restricted" enforced by the admission controller.

    Examples
    --------
    >>> build_namespace()["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
    'restricted'
    """
    return {
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": check_name(name, field="namespace"), "labels": {
            **APP_LABEL,
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/enforce-version": "latest",
            "pod-security.kubernetes.io/warn": "restricted",
            "pod-security.kubernetes.io/audit": "restricted",
        }},
    }


def build_settings_configmap(settings: Mapping[str, str], *, namespace: str,
                             name: str = SETTINGS_CONFIGMAP) -> dict[str, Any]:
    """The ``LAZYSKY_*`` settings every lazysky pod loads (``envFrom``): never a secret.

    Raises
    ------
    ParameterError
        A key that looks like a secret (``…PASSWORD``, ``…SECRET…``, ``…TOKEN``) or a
        URL carrying a password (``postgresql://user:pw@host``): those belong in a Secret.

    Examples
    --------
    >>> cm = build_settings_configmap({"LAZYSKY_STORE_URL": "s3://survey"},
    ...                               namespace="lazysky")
    >>> cm["data"]
    {'LAZYSKY_STORE_URL': 's3://survey'}
    """
    data: dict[str, str] = {}
    for key, value in settings.items():
        if _SECRET_KEY.search(key):
            msg = (
                f"ConfigMap {name!r} key {key!r} looks like a secret; put it in a Secret "
                f"and reference it (secretKeyRef), never in a ConfigMap"
            )
            raise ParameterError(msg)
        if _URL_PASSWORD.search(str(value)):
            msg = (
                f"ConfigMap {name!r} key {key!r} holds a URL with a password; expected the "
                f"URL without it (libpq reads PGPASSWORD from the Secret)"
            )
            raise ParameterError(msg)
        data[key] = str(value)
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _meta(name, namespace, "settings"), "data": data}


def build_submitter_rbac(*, namespace: str, name: str = SUBMITTER) -> list[dict[str, Any]]:
    """ServiceAccount + Role + RoleBinding for the batch submitter: read-only, one namespace.

    ``KubeCluster.from_name`` needs to read the DaskCluster, its worker groups and
    autoscaler, and the scheduler's pods and service; it never creates or deletes.
    """
    read = ["get", "list", "watch"]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": _meta(name, namespace, "batch"), "automountServiceAccountToken": False},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": _meta(name, namespace, "batch"),
         "rules": [
             {"apiGroups": ["kubernetes.dask.org"],
              "resources": ["daskclusters", "daskworkergroups", "daskautoscalers"],
              "verbs": read},
             {"apiGroups": [""], "resources": ["pods", "services"], "verbs": read},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": _meta(name, namespace, "batch"),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]},
    ]


def _ports(*numbers: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": n} for n in numbers]


def build_network_policies(*, namespace: str, cluster: str = "lazysky",
                           operator_namespace: str = "dask-operator") -> list[dict[str, Any]]:
    """Default deny, then exactly the traffic lazysky needs.

    * DNS from every pod;
    * scheduler 8786/8787 from its workers, Dask clients (label
      ``lazysky.io/dask-client=true``) and the operator (the autoscaler polls 8787);
    * worker ↔ worker and scheduler → worker (8788–8790: dashboard, worker, nanny);
    * PostgreSQL 5432 from the workers and pods labelled ``lazysky.io/catalog-client``;
    * the SCS service 8000 from anywhere (it is the public endpoint);
    * HTTPS egress (S3) from workers and clients; the Kubernetes API (443/6443) from the
      batch submitter.
    """
    check_name(cluster, field="cluster name", max_length=40)
    scheduler = {"dask.org/cluster-name": cluster, "dask.org/component": "scheduler"}
    worker = {"dask.org/cluster-name": cluster, "dask.org/component": "worker"}
    dask_pods = {"dask.org/cluster-name": cluster}
    client = {DASK_CLIENT_LABEL: "true"}
    db = {"app.kubernetes.io/component": CATALOG_DB}
    anywhere = [{"ipBlock": {"cidr": "0.0.0.0/0"}}]
    operator = {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": operator_namespace}}}

    def policy(name: str, selector: dict[str, str], *, ingress: list[Any] | None = None,
               egress: list[Any] | None = None) -> dict[str, Any]:
        spec: dict[str, Any] = {"podSelector": {"matchLabels": selector} if selector else {},
                                "policyTypes": []}
        if ingress is not None:
            spec["policyTypes"].append("Ingress")
            spec["ingress"] = ingress
        if egress is not None:
            spec["policyTypes"].append("Egress")
            spec["egress"] = egress
        return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": _meta(name, namespace, "network"), "spec": spec}

    return [
        policy("default-deny-all", {}, ingress=[], egress=[]),
        policy("allow-dns", {}, egress=[{
            "to": [{"namespaceSelector": {"matchLabels": {
                "kubernetes.io/metadata.name": "kube-system"}},
                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]),
        policy("dask-scheduler", scheduler, ingress=[{
            "from": [{"podSelector": {"matchLabels": worker}},
                     {"podSelector": {"matchLabels": client}}, operator],
            "ports": _ports(PORTS["scheduler"], PORTS["dashboard"])}]),
        policy("dask-workers", worker, ingress=[{
            "from": [{"podSelector": {"matchLabels": dask_pods}},
                     {"podSelector": {"matchLabels": client}}],
            "ports": _ports(PORTS["worker-dashboard"], PORTS["worker"], PORTS["nanny"])}]),
        policy("dask-egress", dask_pods, egress=[
            {"to": [{"podSelector": {"matchLabels": dask_pods}}],
             "ports": _ports(PORTS["scheduler"], PORTS["worker-dashboard"], PORTS["worker"],
                             PORTS["nanny"])},
            {"to": [{"podSelector": {"matchLabels": db}}], "ports": _ports(PORTS["postgres"])},
            {"to": anywhere, "ports": _ports(443)},
        ]),
        policy("catalog-db", db, ingress=[{
            "from": [{"podSelector": {"matchLabels": worker}},
                     {"podSelector": {"matchLabels": {CATALOG_CLIENT_LABEL: "true"}}}],
            "ports": _ports(PORTS["postgres"])}]),
        policy("catalog-clients", {CATALOG_CLIENT_LABEL: "true"}, egress=[
            {"to": [{"podSelector": {"matchLabels": db}}], "ports": _ports(PORTS["postgres"])},
        ]),
        policy("dask-clients", client, egress=[
            {"to": [{"podSelector": {"matchLabels": scheduler}}],
             "ports": _ports(PORTS["scheduler"], PORTS["dashboard"])},
            {"to": [{"podSelector": {"matchLabels": worker}}], "ports": _ports(PORTS["worker"])},
            {"to": anywhere, "ports": _ports(443, 6443)},  # S3 and the Kubernetes API
        ]),
        policy("scs-ingress", {"app.kubernetes.io/component": "scs"}, ingress=[{
            "ports": _ports(PORTS["scs"])}]),
    ]


def _db_dsn(user: str, namespace: str) -> str:
    return f"postgresql://{user}@{CATALOG_DB}.{namespace}.svc.cluster.local:5432/{DB_NAME}"


def build_catalog_db(
    *, namespace: str, image: str, resources: Resources | None = None,
    storage: str = "50Gi", storage_class: str | None = None,
) -> list[dict[str, Any]]:
    """The catalog's PostgreSQL + pg_sphere: a one-replica StatefulSet, its PVC and Service.

    ``image`` is the ``catalog-db`` target of the Dockerfile (the official PostgreSQL 15
    image plus ``postgresql-15-pgsphere``). pgSphere itself is created by the
    ``catalog-bootstrap`` Job (:func:`build_catalog_bootstrap_job`) through
    :func:`lazysky.catalog._extension.ensure_pg_sphere`, which handles Debian's
    packaged-extension trap.
    """
    check_image(image, field="catalog image")
    parse_quantity_bytes(storage, field="storage")
    resources = resources or Resources(cpu="2", memory="4Gi", ephemeral_storage="2Gi")
    labels = _labels(CATALOG_DB)
    mounts = [{"name": "data", "mountPath": "/var/lib/postgresql/data"},
              {"name": "run", "mountPath": "/var/run/postgresql"},
              {"name": "shm", "mountPath": "/dev/shm"}]  # parallel query's shared memory
    isready = ["pg_isready", "-h", "127.0.0.1", "-U", DB_OWNER, "-d", DB_NAME]
    container = build_container(
        name="postgres", image=image, resources=resources, args=["postgres"],
        env={"POSTGRES_USER": DB_OWNER, "POSTGRES_DB": DB_NAME,
             "PGDATA": "/var/lib/postgresql/data/pgdata"},
        secrets={"POSTGRES_PASSWORD": f"{DB_SECRET}/password"},
        ports={"postgres": PORTS["postgres"]}, extra_mounts=mounts,
        probes={
            "readinessProbe": {"exec": {"command": isready}, "periodSeconds": 10,
                               "timeoutSeconds": 5},
            "livenessProbe": {"exec": {"command": isready}, "initialDelaySeconds": 30,
                              "periodSeconds": 30, "timeoutSeconds": 10,
                              "failureThreshold": 6},
        },
    )
    pvc_spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"],
                                "resources": {"requests": {"storage": storage}}}
    if storage_class:
        pvc_spec["storageClassName"] = storage_class
    return [
        {"apiVersion": "apps/v1", "kind": "StatefulSet",
         "metadata": _meta(CATALOG_DB, namespace, CATALOG_DB),
         "spec": {
             "serviceName": CATALOG_DB, "replicas": 1,
             "selector": {"matchLabels": labels},
             "template": {"metadata": {"labels": labels}, "spec": build_pod_spec(
                 [container], resources=resources, termination_grace_seconds=60,
                 extra_volumes=[{"name": "run", "emptyDir": {"sizeLimit": "16Mi"}},
                                {"name": "shm", "emptyDir": {"medium": "Memory",
                                                             "sizeLimit": "256Mi"}}])},
             "volumeClaimTemplates": [{"metadata": {"name": "data", "labels": labels},
                                       "spec": pvc_spec}],
         }},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": _meta(CATALOG_DB, namespace, CATALOG_DB),
         "spec": {"type": "ClusterIP", "selector": labels,
                  "ports": [{"name": "postgres", "port": PORTS["postgres"],
                             "targetPort": "postgres", "protocol": "TCP"}]}},
    ]


def build_catalog_bootstrap_job(*, namespace: str, image: str,
                                resources: Resources | None = None) -> dict[str, Any]:
    """A Job that prepares the catalog once: pgSphere, schema, the read-only role.

    Runs ``lazysky kube bootstrap-catalog`` (:func:`lazysky.kube.bootstrap_catalog`) as
    the owner role; idempotent, so re-applying the manifests is harmless.
    """
    resources = resources or Resources(cpu="500m", memory="512Mi", ephemeral_storage="1Gi")
    container = build_container(
        name="bootstrap", image=image, resources=resources,
        args=["lazysky", "kube", "bootstrap-catalog"], config_map=SETTINGS_CONFIGMAP,
        secrets={"PGPASSWORD": f"{DB_SECRET}/password",
                 "READER_PASSWORD": f"{DB_SECRET}/reader-password"},
    )
    labels = _labels("catalog-bootstrap", **{CATALOG_CLIENT_LABEL: "true"})
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": _meta("catalog-bootstrap", namespace, "catalog-bootstrap"),
        "spec": {
            "backoffLimit": 10,  # the database may still be starting
            "activeDeadlineSeconds": 1800,
            "ttlSecondsAfterFinished": 86400,
            "template": {"metadata": {"labels": labels}, "spec": build_pod_spec(
                [container], resources=resources, restart_policy="OnFailure")},
        },
    }


def build_serve(*, namespace: str, image: str, replicas: int = 1,
                resources: Resources | None = None, max_radius_deg: float = 1.0,
                max_rows: int = 10_000) -> list[dict[str, Any]]:
    """``lazysky serve`` (IVOA Simple Cone Search) as a Deployment + Service, read-only role.

    It connects as ``lazysky_reader`` (read-only transactions, statement timeout); its
    password is the ``reader-password`` of the ``lazysky-db`` Secret.
    """
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        msg = f"serve replicas={replicas!r} must be a whole number >= 1"
        raise ParameterError(msg)
    resources = resources or Resources(cpu="500m", memory="1Gi", ephemeral_storage="1Gi")
    labels = _labels("scs", **{CATALOG_CLIENT_LABEL: "true"})
    container = build_container(
        name="scs", image=image, resources=resources, config_map=SETTINGS_CONFIGMAP,
        args=["lazysky", "serve", "--host", "0.0.0.0", "--port", str(PORTS["scs"]),
              "--max-radius", str(max_radius_deg), "--max-rows", str(max_rows)],
        env={"LAZYSKY_CATALOG_DSN": _db_dsn(DB_READER, namespace)},
        secrets={"PGPASSWORD": f"{DB_SECRET}/reader-password"},
        ports={"http": PORTS["scs"]},
        probes={
            "readinessProbe": {"httpGet": {"port": "http", "path": "/"},
                               "periodSeconds": 10, "timeoutSeconds": 5},
            "livenessProbe": {"httpGet": {"port": "http", "path": "/"},
                              "initialDelaySeconds": 20, "periodSeconds": 30,
                              "timeoutSeconds": 10},
        },
    )
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": _meta(SERVE, namespace, "scs"),
         "spec": {"replicas": replicas,
                  "selector": {"matchLabels": _labels("scs")},
                  "template": {"metadata": {"labels": labels},
                               "spec": build_pod_spec([container], resources=resources)}}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": _meta(SERVE, namespace, "scs"),
         "spec": {"type": "ClusterIP", "selector": _labels("scs"),
                  "ports": [{"name": "http", "port": 80, "targetPort": "http",
                             "protocol": "TCP"}]}},
    ]


def check_cron(schedule: str, *, field: str = "schedule") -> str:
    """``schedule`` if it is a five-field cron expression or a macro such as ``@daily``.

    Examples
    --------
    >>> check_cron("*/5 * * * *")
    '*/5 * * * *'
    """
    from cronsim import CronSim, CronSimError

    if isinstance(schedule, str) and schedule.strip() in _CRON_MACROS:
        return schedule.strip()
    fields = schedule.split() if isinstance(schedule, str) else []
    try:  # the parser `lazysky batch` uses, so ranges are checked too (61 minutes is not)
        ok = len(fields) == 5 and CronSim(" ".join(fields), _CRON_EPOCH) is not None
    except CronSimError:
        ok = False
    if not ok:
        msg = (
            f"{field}={schedule!r} is not a cron expression; expected five fields "
            f"'minute hour day-of-month month day-of-week' (e.g. '*/5 * * * *') or one of "
            f"{sorted(_CRON_MACROS)}"
        )
        raise ParameterError(msg)
    return " ".join(fields)


def build_batch_cronjob(
    *, namespace: str, image: str, schedule: str = "*/5 * * * *",
    cluster: str = "lazysky", resources: Resources | None = None,
    starting_deadline_seconds: int = 300, backoff_limit: int = 2,
    active_deadline_seconds: int = 6 * 3600,
) -> dict[str, Any]:
    """The CronJob that runs ``lazysky batch run-due`` on the operator's Dask cluster.

    ``concurrencyPolicy: Forbid`` (a late run never overlaps the previous one; the
    database claim makes a manual run beside it safe too), a starting deadline, a
    retry budget and a hard run-time limit.
    """
    check_cron(schedule)
    for field, value in (("starting_deadline_seconds", starting_deadline_seconds),
                         ("backoff_limit", backoff_limit),
                         ("active_deadline_seconds", active_deadline_seconds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            msg = f"{field}={value!r} must be whole seconds/count >= 0"
            raise ParameterError(msg)
    resources = resources or Resources(cpu="1", memory="2Gi", ephemeral_storage="2Gi")
    container = build_container(
        name="run-due", image=image, resources=resources, config_map=SETTINGS_CONFIGMAP,
        args=["lazysky", "batch", "run-due"],
        env={"LAZYSKY_CLUSTER__KIND": "kube", "LAZYSKY_CLUSTER__ATTACH": "true",
             "LAZYSKY_CLUSTER__NAME": cluster, "LAZYSKY_CLUSTER__NAMESPACE": namespace},
        secrets={"PGPASSWORD": f"{DB_SECRET}/password",
                 **S3_SECRETS},
    )
    labels = _labels("batch", **{DASK_CLIENT_LABEL: "true", CATALOG_CLIENT_LABEL: "true"})
    return {
        "apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": _meta("lazysky-batch", namespace, "batch"),
        "spec": {
            "schedule": check_cron(schedule),
            "timeZone": "Etc/UTC",
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": starting_deadline_seconds,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 5,
            "jobTemplate": {"spec": {
                "backoffLimit": backoff_limit,
                "activeDeadlineSeconds": active_deadline_seconds,
                "ttlSecondsAfterFinished": 7 * 86400,
                "template": {"metadata": {"labels": labels}, "spec": build_pod_spec(
                    [container], resources=resources, service_account=SUBMITTER,
                    restart_policy="Never")},
            }},
        },
    }
