"""The retention CronJob: ``lazysky gc`` once a night (docs/lifecycle.md).

It needs the catalog (PostgreSQL) and the store (S3, HTTPS), never the Dask cluster or
the Kubernetes API: no service-account token, and its own egress policy for the store
(:func:`build_store_client_policy`), so it is not a Dask client.

Examples
--------
>>> from lazysky.kube._gc import build_gc_cronjob
>>> job = build_gc_cronjob(namespace="lazysky", image="lazysky:0.1.0")
>>> job["spec"]["schedule"], job["spec"]["concurrencyPolicy"]
('30 4 * * *', 'Forbid')
"""

from __future__ import annotations

from typing import Any

from lazysky.errors import ParameterError
from lazysky.kube._pods import CATALOG_CLIENT_LABEL, build_container, build_pod_spec
from lazysky.kube._resources import Resources
from lazysky.kube._stack import (
    DB_SECRET,
    S3_SECRETS,
    SETTINGS_CONFIGMAP,
    _labels,
    _meta,
    check_cron,
)

__all__ = ["GC_CRONJOB", "STORE_CLIENT_LABEL", "build_gc_cronjob", "build_store_client_policy"]

GC_CRONJOB = "lazysky-gc"
#: pods with this label may reach the object store (HTTPS) without being Dask clients
STORE_CLIENT_LABEL = "lazysky.io/store-client"


def build_gc_cronjob(
    *, namespace: str, image: str, schedule: str = "30 4 * * *",
    resources: Resources | None = None, dry_run: bool = False,
    starting_deadline_seconds: int = 3600, backoff_limit: int = 1,
    active_deadline_seconds: int = 4 * 3600,
) -> dict[str, Any]:
    """The CronJob that runs ``lazysky gc`` (default: every night at 04:30 UTC).

    ``concurrencyPolicy: Forbid`` (and gc's own catalog lock) keeps two gcs apart; a gc
    killed by the deadline or an eviction is finished by the next one (gc is idempotent
    and resumes runs left half-collected). ``dry_run=True`` only reports, in the job's log.

    Raises
    ------
    ParameterError
        A schedule that is not a cron expression; negative counts or seconds.
    """
    check_cron(schedule)
    for field, value in (("starting_deadline_seconds", starting_deadline_seconds),
                         ("backoff_limit", backoff_limit),
                         ("active_deadline_seconds", active_deadline_seconds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            msg = f"{field}={value!r} must be whole seconds/count >= 0"
            raise ParameterError(msg)
    if not isinstance(dry_run, bool):
        msg = f"dry_run must be True or False, got {dry_run!r}"
        raise ParameterError(msg)
    resources = resources or Resources(cpu="500m", memory="1Gi", ephemeral_storage="1Gi")
    container = build_container(
        name="gc", image=image, resources=resources, config_map=SETTINGS_CONFIGMAP,
        args=["lazysky", "gc", *(["--dry-run"] if dry_run else [])],
        secrets={"PGPASSWORD": f"{DB_SECRET}/password", **S3_SECRETS},
    )
    labels = _labels("gc", **{CATALOG_CLIENT_LABEL: "true", STORE_CLIENT_LABEL: "true"})
    return {
        "apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": _meta(GC_CRONJOB, namespace, "gc"),
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
                    [container], resources=resources, restart_policy="Never")},
            }},
        },
    }


def build_store_client_policy(*, namespace: str) -> dict[str, Any]:
    """Egress to the object store (HTTPS, 443) for pods labelled ``lazysky.io/store-client``."""
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": _meta("store-clients", namespace, "network"),
        "spec": {"podSelector": {"matchLabels": {STORE_CLIENT_LABEL: "true"}},
                 "policyTypes": ["Egress"],
                 "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
                             "ports": [{"protocol": "TCP", "port": 443}]}]},
    }
