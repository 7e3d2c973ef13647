"""Typed lazysky settings: storage URL, catalog DSN, cluster, S3.

Settings come from, highest priority first:

1. keyword arguments to :func:`load_settings`;
2. environment variables ``LAZYSKY_*`` (nested fields with ``__``, for example
   ``LAZYSKY_CLUSTER__MAX_WORKERS=4`` or ``LAZYSKY_S3__ENDPOINT_URL=http://…``);
3. a YAML file, named by ``config_file=`` or the ``LAZYSKY_CONFIG`` variable;
4. the defaults below, which need no configuration at all (a local store, the embedded
   catalog server, a local adaptive cluster).

Library functions take a :class:`Settings` object or keywords; nothing reads these
globals behind the caller's back.

Examples
--------
>>> from lazysky.config import load_settings
>>> s = load_settings(store_url="s3://bucket/survey", cluster={"max_workers": 8})
>>> s.cluster.max_workers
8
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from lazysky.errors import ConfigError
from lazysky.retention import RetentionSettings

__all__ = ["ClusterSettings", "QaThresholds", "S3Settings", "Settings", "load_settings"]

ENV_PREFIX = "LAZYSKY_"
CONFIG_FILE_VAR = "LAZYSKY_CONFIG"


class S3Settings(BaseModel):
    """How to reach an S3-compatible object store (used for ``s3://`` URLs)."""

    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = Field(
        None, description="S3 endpoint, e.g. http://127.0.0.1:9000; None means AWS."
    )
    key: SecretStr | None = Field(None, description="Access key id (None: the AWS chain).")
    secret: SecretStr | None = Field(None, description="Secret access key.")
    region: str | None = Field(None, description="Region name, e.g. us-east-1.")
    anon: bool = Field(False, description="Anonymous (unsigned) access to public buckets.")
    retries: int = Field(
        5, ge=0, le=50, description="Attempts per request before an S3 error is raised."
    )

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem`` / fsspec ``storage_options``."""
        opts: dict[str, Any] = {"anon": self.anon}
        if self.key is not None:
            opts["key"] = self.key.get_secret_value()
        if self.secret is not None:
            opts["secret"] = self.secret.get_secret_value()
        client_kwargs: dict[str, Any] = {}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            client_kwargs["region_name"] = self.region
        if client_kwargs:
            opts["client_kwargs"] = client_kwargs
        opts["config_kwargs"] = {"retries": {"max_attempts": self.retries, "mode": "standard"}}
        return opts


class ClusterSettings(BaseModel):
    """Which Dask cluster to run on."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "address", "kube"] = Field(
        "local",
        description="local: an adaptive LocalCluster; address: an existing scheduler; "
        "kube: the dask-kubernetes operator.",
    )
    address: str | None = Field(None, description="Scheduler address for kind=address.")
    min_workers: int = Field(1, ge=0, description="Adaptive scaling: fewest workers.")
    max_workers: int | None = Field(
        None, ge=1, description="Adaptive scaling: most workers (None: one per core)."
    )
    threads_per_worker: int = Field(1, ge=1, description="Threads in each worker process.")
    memory_limit: str = Field(
        "auto", description="Memory per worker ('auto' shares the machine's memory)."
    )
    dashboard_address: str = Field(":8787", description="Where the Dask dashboard listens.")
    # kind=kube (the dask-kubernetes operator; issue 10)
    name: str = Field("lazysky", description="kind=kube: name of the DaskCluster.")
    namespace: str | None = Field(
        None, description="kind=kube: namespace (None: the kubeconfig's current one)."
    )
    attach: bool = Field(
        False, description="kind=kube: attach to the existing DaskCluster `name` instead "
        "of creating one (what the batch CronJob does)."
    )
    image: str | None = Field(
        None, description="kind=kube: pinned image of scheduler and workers (tag or digest)."
    )
    worker_cpu: str = Field("1", description="kind=kube: cpu of each worker pod (request = limit).")
    worker_memory: str = Field(
        "4Gi", description="kind=kube: memory of each worker pod; Dask's memory_limit stays "
        "at most 90 % of it ('auto': 85 %)."
    )
    worker_ephemeral_storage: str = Field(
        "10Gi", description="kind=kube: ephemeral storage of each worker (Dask's spill space)."
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="kind=kube: plain environment of the Dask pods "
        "(never secrets)."
    )
    secrets: dict[str, str] = Field(
        default_factory=dict, description="kind=kube: environment variables taken from "
        "Secrets, as {VAR: 'secret-name/key'}."
    )
    watch: bool = Field(
        True, description="Register lazysky's scheduler plugin (the /lazysky dashboard page, "
        "lazysky_* metrics on /metrics, per-stage progress bars) on the cluster a run uses."
    )

    @field_validator("address")
    @classmethod
    def _address_form(cls, v: str | None) -> str | None:
        if v is not None and "://" not in v:
            msg = f"cluster.address must look like tcp://host:8786, got {v!r}"
            raise ValueError(msg)
        return v


class QaThresholds(BaseModel):
    """Limits of the per-tile science QA (docs/qa.md): a tile beyond one is flagged.

    None switches a test off. A metric a tile cannot measure (NaN) never flags it.
    """

    model_config = ConfigDict(extra="forbid")

    psf_fwhm_arcsec_max: float | None = Field(
        3.0, gt=0, description="Flag a tile whose PSF FWHM (arcsec) is larger.")
    psf_min_stars: int = Field(
        1, ge=0, description="Flag a tile with fewer stars fitted for its PSF by QA.")
    background_rms_max: float | None = Field(
        None, gt=0, description="Flag a tile whose source-free background rms (image "
        "units, e.g. electrons) is larger.")
    astrometric_offset_px_max: float | None = Field(
        0.1, gt=0, description="Flag an epoch tile whose stars sit further (pixels, mean "
        "offset) from the reference's.")
    score_std_tolerance: float | None = Field(
        0.25, gt=0, description="Flag an epoch tile whose S_corr std in source-free pixels "
        "is further than this from 1.")
    limiting_mag_min: float | None = Field(
        None, description="Flag a tile whose 5-sigma point-source limiting magnitude is "
        "brighter (smaller).")

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                msg = (f"unknown QA threshold(s) {unknown}; allowed: "
                       f"{', '.join(cls.model_fields)}")
                raise ValueError(msg)
        return data


def default_catalog_dir() -> Path:
    """Where the embedded catalog lives when ``catalog_dir`` is not set."""
    if os.geteuid() == 0:
        return Path("/var/lib/lazysky/catalog")
    return Path("~/.local/share/lazysky/catalog")


class Settings(BaseSettings):
    """All lazysky settings. Build one with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    store_url: str = Field(
        "./lazysky-data",
        description="Where Zarr products live: a local directory or an fsspec URL (s3://…).",
    )
    catalog_dsn: str | None = Field(
        None,
        description="PostgreSQL DSN of the catalog; None starts the embedded private server.",
    )
    catalog_dir: Path = Field(
        default_factory=default_catalog_dir,
        description="Data directory of the embedded catalog server. Default "
        "~/.local/share/lazysky/catalog; as root /var/lib/lazysky/catalog, because the "
        "server then runs as the postgres user, which cannot enter a 0700 home.",
    )
    s3: S3Settings = Field(default_factory=S3Settings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    retention: RetentionSettings = Field(
        default_factory=RetentionSettings,
        description="How long runs' products, master calibrations and raw exposures are "
        "kept, per processing type (lazysky gc; docs/lifecycle.md).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level of the lazysky command."
    )
    qa_enabled: bool = Field(
        True, description="Compute the per-tile science QA in every run (stage qa).")
    qa_thresholds: QaThresholds = Field(
        default_factory=QaThresholds, description="Limits that flag a tile (docs/qa.md).")

    @field_validator("store_url")
    @classmethod
    def _store_url_nonempty(cls, v: str) -> str:
        if not v.strip():
            msg = "store_url must be a directory or a URL such as s3://bucket/prefix"
            raise ValueError(msg)
        return v

    def storage_options(self, url: str | None = None) -> dict[str, Any]:
        """fsspec ``storage_options`` for ``url`` (default: the store URL)."""
        target = self.store_url if url is None else url
        if target.startswith(("s3://", "s3a://")):
            return self.s3.storage_options()
        return {}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        msg = f"cannot read the lazysky config file {str(path)!r}: {exc.strerror}"
        raise ConfigError(msg) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        msg = f"the lazysky config file {str(path)!r} is not valid YAML: {exc}"
        raise ConfigError(msg) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        msg = (
            f"the lazysky config file {str(path)!r} must hold a mapping of settings "
            f"(store_url: …, cluster: …), got a {type(data).__name__}"
        )
        raise ConfigError(msg)
    return data


def load_settings(config_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Build the settings from keywords, ``LAZYSKY_*`` variables and a YAML file.

    Parameters
    ----------
    config_file
        A YAML file of settings. Default: the file named by ``LAZYSKY_CONFIG``, if set.
    **overrides
        Settings that win over everything else (``store_url=…``, ``cluster={…}``).

    Raises
    ------
    ConfigError
        When a value is invalid; the message names the setting, where it came from and
        what was expected.

    Examples
    --------
    >>> load_settings(catalog_dsn="postgresql://localhost/lazysky").catalog_dsn
    'postgresql://localhost/lazysky'
    """
    path_str = config_file if config_file is not None else os.environ.get(CONFIG_FILE_VAR)
    path = Path(path_str).expanduser() if path_str else None
    if path is not None:
        _read_yaml(path)  # clear errors for unreadable or malformed files

    class _FromSources(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if path is not None:
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
            return tuple(sources)

    try:
        built = _FromSources(**overrides)
    except ValidationError as exc:
        where = (
            f" (config file {str(path)!r}, LAZYSKY_* variables or arguments)"
            if path
            else (" (LAZYSKY_* variables or arguments)")
        )
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            f" (got {err.get('input')!r})"
            for err in exc.errors()
        )
        msg = f"invalid lazysky settings{where}: {problems}"
        raise ConfigError(msg) from None
    return Settings.model_validate(built.model_dump())
