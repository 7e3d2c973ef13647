"""The build_* functions: what they build from their inputs, and each bad input's error."""

from __future__ import annotations

import pytest

from lazysky.errors import ParameterError
from lazysky.kube import (
    MAX_MEMORY_FRACTION,
    Resources,
    build_batch_cronjob,
    build_dask_autoscaler,
    build_dask_cluster,
    build_manifests,
    build_overlay_patches,
    build_settings_configmap,
    build_worker_spec,
    check_cron,
    check_image,
    dask_memory_limit,
    parse_cpu,
    parse_quantity_bytes,
)

IMAGE = "ghcr.io/lazysky/lazysky:0.1.0"


def _arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_quantities() -> None:
    assert parse_quantity_bytes("4Gi") == 4 * 2**30
    assert parse_quantity_bytes("500M") == 500 * 10**6
    assert parse_quantity_bytes("1.5Ki") == 1536
    assert parse_quantity_bytes(1024) == 1024
    assert parse_cpu("250m") == 0.25
    assert parse_cpu("2") == 2.0


@pytest.mark.parametrize("bad", ["4 GB", "lots", "4Xi", "-1Gi", "0"])
def test_bad_memory_quantity(bad: str) -> None:
    with pytest.raises(ParameterError, match="memory"):
        Resources(memory=bad)


@pytest.mark.parametrize("bad", ["two", "0", "-1", "1.5 cores"])
def test_bad_cpu(bad: str) -> None:
    with pytest.raises(ParameterError, match="cpu"):
        Resources(cpu=bad)


def test_worker_memory_limit_sits_below_the_container_limit() -> None:
    resources = Resources(cpu="2", memory="8Gi", ephemeral_storage="20Gi")
    worker = build_worker_spec(image=IMAGE, resources=resources, n_workers=3)
    container = worker["spec"]["containers"][0]
    limit = int(_arg(container["args"], "--memory-limit"))
    container_limit = parse_quantity_bytes(container["resources"]["limits"]["memory"])
    assert container_limit == 8 * 2**30
    assert 0.80 * container_limit <= limit <= MAX_MEMORY_FRACTION * container_limit
    assert _arg(container["args"], "--nthreads") == "1"
    assert worker["replicas"] == 3
    # an explicit limit within the allowance is kept as given
    explicit = build_worker_spec(image=IMAGE, resources=resources, memory_limit="7GiB")
    assert _arg(explicit["spec"]["containers"][0]["args"], "--memory-limit") == str(7 * 2**30)


@pytest.mark.parametrize("too_big", ["4GiB", "3.7GiB", 4 * 2**30])
def test_dask_memory_limit_too_large_for_the_container(too_big: str | int) -> None:
    with pytest.raises(ParameterError, match=r"memory_limit=.*too large.*90%"):
        dask_memory_limit(Resources(memory="4Gi"), too_big)


def test_dask_memory_limit_not_a_size() -> None:
    with pytest.raises(ParameterError, match="memory_limit='a lot' is not a memory size"):
        dask_memory_limit(Resources(memory="4Gi"), "a lot")


@pytest.mark.parametrize(("image", "match"), [
    (None, "image is not set"), ("", "image is not set"),
    ("ghcr.io/lazysky/lazysky", "not pinned"), ("lazysky:latest", "not pinned"),
    ("lazysky@sha256:abc", "malformed digest"), ("lazy sky:1", "white space"),
])
def test_bad_image(image: str | None, match: str) -> None:
    with pytest.raises(ParameterError, match=match):
        check_image(image)
    with pytest.raises(ParameterError, match=match):
        build_dask_cluster(name="lazysky", image=image)  # type: ignore[arg-type]


def test_pinned_images_are_accepted() -> None:
    assert check_image("localhost:5000/lazysky:0.1.0") == "localhost:5000/lazysky:0.1.0"
    digest = "ghcr.io/lazysky/lazysky@sha256:" + "a" * 64
    assert check_image(digest) == digest


@pytest.mark.parametrize("name", ["Lazysky", "lazy_sky", "-x", "x" * 41, ""])
def test_bad_cluster_name(name: str) -> None:
    with pytest.raises(ParameterError, match="not a valid Kubernetes name"):
        build_dask_cluster(name=name, image=IMAGE)


def test_worker_storage_too_small() -> None:
    with pytest.raises(ParameterError, match=r"ephemeral_storage='1Gi' is too small.*2Gi"):
        build_worker_spec(image=IMAGE, resources=Resources(ephemeral_storage="1Gi"))


def test_bad_worker_count() -> None:
    with pytest.raises(ParameterError, match="n_workers=-1"):
        build_worker_spec(image=IMAGE, n_workers=-1)


@pytest.mark.parametrize(("lo", "hi"), [(5, 2), (0, 0), (-1, 3)])
def test_bad_autoscaler_bounds(lo: int, hi: int) -> None:
    with pytest.raises(ParameterError, match="minimum"):
        build_dask_autoscaler(cluster="lazysky", minimum=lo, maximum=hi)


def test_env_and_secret_references() -> None:
    cluster = build_dask_cluster(
        name="lazysky", image=IMAGE, env={"LAZYSKY_STORE_URL": "s3://x"},
        secrets={"PGPASSWORD": "lazysky-db/password", "AWS_ACCESS_KEY_ID": "s3/id?"})
    env = {e["name"]: e for e in cluster["spec"]["worker"]["spec"]["containers"][0]["env"]}
    assert env["LAZYSKY_STORE_URL"]["value"] == "s3://x"
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "lazysky-db", "key": "password"}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert "value" not in env["PGPASSWORD"]


@pytest.mark.parametrize("key", ["PGPASSWORD", "AWS_SECRET_ACCESS_KEY", "API_TOKEN"])
def test_secret_values_are_refused_as_plain_env(key: str) -> None:
    with pytest.raises(ParameterError, match="looks like a secret"):
        build_dask_cluster(name="lazysky", image=IMAGE, env={key: "hunter2"})


@pytest.mark.parametrize("ref", ["lazysky-db", "Bad_Name/key", "/key"])
def test_bad_secret_reference(ref: str) -> None:
    with pytest.raises(ParameterError, match="secrets"):
        build_dask_cluster(name="lazysky", image=IMAGE, secrets={"PGPASSWORD": ref})


@pytest.mark.parametrize(("data", "match"), [
    ({"DB_PASSWORD": "x"}, "looks like a secret"),
    ({"LAZYSKY_CATALOG_DSN": "postgresql://lazysky:hunter2@db/lazysky"}, "password"),
])
def test_configmap_refuses_secrets(data: dict[str, str], match: str) -> None:
    with pytest.raises(ParameterError, match=match):
        build_settings_configmap(data, namespace="lazysky")


def test_configmap_accepts_a_dsn_without_password() -> None:
    dsn = "postgresql://lazysky@catalog-db:5432/lazysky"
    cm = build_settings_configmap({"LAZYSKY_CATALOG_DSN": dsn}, namespace="lazysky")
    assert cm["data"] == {"LAZYSKY_CATALOG_DSN": dsn}


@pytest.mark.parametrize("good", ["*/5 * * * *", "0 3 * * 1-5", "15,45 2 1 JAN MON", "@daily"])
def test_cron_accepted(good: str) -> None:
    assert check_cron(good) == good


@pytest.mark.parametrize("bad", ["every night", "* * * *", "61 * * * * *", "*/x * * * *", "",
                                 "61 * * * *", "0 25 * * *", "0 3 32 * *"])
def test_bad_cron(bad: str) -> None:
    with pytest.raises(ParameterError, match=r"schedule=.*not a cron expression"):
        build_batch_cronjob(namespace="lazysky", image=IMAGE, schedule=bad)


def test_cronjob_guards() -> None:
    job = build_batch_cronjob(namespace="lazysky", image=IMAGE, schedule="0 3 * * *",
                              starting_deadline_seconds=120, backoff_limit=1,
                              active_deadline_seconds=3600)
    spec = job["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] == 120
    assert spec["jobTemplate"]["spec"]["backoffLimit"] == 1
    assert spec["jobTemplate"]["spec"]["activeDeadlineSeconds"] == 3600
    container = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["lazysky", "batch", "run-due"]
    with pytest.raises(ParameterError, match="backoff_limit"):
        build_batch_cronjob(namespace="lazysky", image=IMAGE, backoff_limit=-1)


def test_unknown_overlay() -> None:
    with pytest.raises(ParameterError, match=r"unknown overlay 'staging'.*\['dev', 'prod'\]"):
        build_manifests(overlay="staging")
    with pytest.raises(ParameterError, match="unknown overlay"):
        build_overlay_patches("staging")


@pytest.mark.parametrize(("overlay", "lo", "hi"), [("dev", 1, 4), ("prod", 2, 200)])
def test_overlay_worker_counts(overlay: str, lo: int, hi: int) -> None:
    objs = {o["kind"]: o for o in build_manifests(overlay=overlay)}
    assert objs["DaskAutoscaler"]["spec"] == {"cluster": "lazysky", "minimum": lo,
                                              "maximum": hi}
    assert objs["DaskCluster"]["spec"]["worker"]["replicas"] == lo


def test_build_options_reach_the_manifests() -> None:
    objs = build_manifests(overlay="prod", image="registry.example/lazysky:9.9",
                           namespace="survey", store_url="s3://nightly")
    assert {o["metadata"].get("namespace", o["metadata"]["name"]) for o in objs} == {"survey"}
    cm = next(o for o in objs if o["kind"] == "ConfigMap")
    assert cm["data"]["LAZYSKY_STORE_URL"] == "s3://nightly"
    assert "catalog-db.survey.svc" in cm["data"]["LAZYSKY_CATALOG_DSN"]
    dask = next(o for o in objs if o["kind"] == "DaskCluster")
    image = dask["spec"]["worker"]["spec"]["containers"][0]["image"]
    assert image == "registry.example/lazysky:9.9"
