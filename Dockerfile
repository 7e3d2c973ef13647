# syntax=docker/dockerfile:1
# One image for the Dask scheduler, the workers, the batch CronJob, the catalog
# bootstrap Job and the SCS service (`lazysky serve`); a second target, catalog-db, is
# PostgreSQL 15 with pg_sphere for the catalog StatefulSet. See docs/kubernetes.md.
#
#   docker build -t ghcr.io/lazysky/lazysky:0.1.0 .
#   docker build --target catalog-db -t ghcr.io/lazysky/catalog-db:0.1.0 .
#
# Base images are pinned to exact releases; pin digests in your registry's overlay
# (kustomize `images:`) once built.

# --- build: lazysky and its dependencies in a virtual environment ----------------------
FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/lazysky
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# the same extras as the README's install (`all`: s3, catalog, kube, dashboard)
RUN /opt/lazysky/bin/pip install ".[all]"

# --- runtime: the venv only, as an unprivileged user -----------------------------------
FROM python:3.11.11-slim-bookworm AS runtime
RUN groupadd --gid 10001 lazysky \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
      --shell /usr/sbin/nologin lazysky
COPY --from=build /opt/lazysky /opt/lazysky
# read-only root filesystem in Kubernetes: HOME, caches and Dask's scratch live in
# emptyDir volumes mounted at /tmp and /scratch
ENV PATH=/opt/lazysky/bin:$PATH HOME=/tmp MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /tmp
# no ENTRYPOINT: Kubernetes `args` (dask scheduler, dask worker, lazysky …) are the command
CMD ["lazysky", "--help"]

# --- catalog-db: PostgreSQL 15 + pg_sphere for the catalog StatefulSet -----------------
# pgSphere is created by the catalog-bootstrap Job (lazysky kube bootstrap-catalog),
# which works around the packaged-extension trap of Debian's pgsphere 1.2.0.
FROM postgres:15.10-bookworm AS catalog-db
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15-pgsphere \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 lazysky \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/postgresql \
      --shell /usr/sbin/nologin lazysky
USER 10001:10001

# the default target is the lazysky image
FROM runtime
