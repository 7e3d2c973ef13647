"""Settings: defaults, environment variables, YAML file, precedence and clear errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from lazysky.config import Settings, load_settings
from lazysky.errors import ConfigError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("LAZYSKY_"):
            monkeypatch.delenv(name)


def test_defaults_need_no_configuration() -> None:
    s = load_settings()
    assert s.catalog_dsn is None  # None means: start the embedded server
    assert s.cluster.kind == "local"
    assert s.storage_options() == {}


def test_precedence_keywords_over_env_over_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "lazysky.yaml"
    cfg.write_text(
        "store_url: /from/yaml\ncatalog_dsn: postgresql://yaml/db\n"
        "cluster:\n  max_workers: 2\n  min_workers: 1\n"
    )
    monkeypatch.setenv("LAZYSKY_CONFIG", str(cfg))
    monkeypatch.setenv("LAZYSKY_CLUSTER__MAX_WORKERS", "7")
    monkeypatch.setenv("LAZYSKY_CATALOG_DSN", "postgresql://env/db")
    s = load_settings(catalog_dsn="postgresql://kw/db")
    assert s.store_url == "/from/yaml"
    assert s.cluster.max_workers == 7
    assert s.cluster.min_workers == 1
    assert s.catalog_dsn == "postgresql://kw/db"
    # Settings travel to Dask workers: they must pickle as the public class.
    again = pickle.loads(pickle.dumps(s))
    assert type(again) is Settings
    assert again == s


def test_s3_storage_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAZYSKY_S3__ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("LAZYSKY_S3__KEY", "k")
    monkeypatch.setenv("LAZYSKY_S3__SECRET", "s")
    s = load_settings(store_url="s3://bucket/prefix")
    opts = s.storage_options()
    assert opts["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9000"
    assert (opts["key"], opts["secret"]) == ("k", "s")
    assert "secret='s'" not in repr(s.s3)
    assert "**" in repr(s.s3)
    assert s.storage_options("/local/dir") == {}


def test_bad_value_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAZYSKY_CLUSTER__MAX_WORKERS", "zero")
    with pytest.raises(ConfigError, match=r"cluster\.max_workers"):
        load_settings()


def test_unknown_key_in_yaml_names_file_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("store_ulr: /typo\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*store_ulr"):
        load_settings(cfg)


def test_malformed_and_missing_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("cluster: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(listy)


def test_cluster_address_form() -> None:
    with pytest.raises(ConfigError, match="tcp://"):
        load_settings(cluster={"kind": "address", "address": "scheduler:8786"})
