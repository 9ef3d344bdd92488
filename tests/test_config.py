"""The layered configuration: defaults -> YAML -> env -> overrides, unknown keys rejected by name."""
from __future__ import annotations

from pathlib import Path

import pytest

from core.config import ConfigError, load_settings


def test_defaults_are_embedded_and_resolved_under_root(tmp_path: Path) -> None:
    s = load_settings(root=tmp_path, environ={})
    assert s.paths.lake_dir == tmp_path.resolve() / "var" / "lake"
    assert s.mlflow.tracking_uri == f"sqlite:///{tmp_path.resolve()}/var/mlflow.db"
    assert s.mlflow.artifact_root == tmp_path.resolve() / "var" / "mlartifacts"
    assert s.features.online_store == "sqlite"
    assert s.eventlog.backend == "local"


def test_yaml_then_env_then_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "local.yaml").write_text("serving:\n  port: 9001\n  max_k: 50\ndata:\n  seed: 3\n")
    s = load_settings(root=tmp_path, environ={"RECSYS_SERVING__PORT": "9002"}, overrides={"data": {"seed": 4}})
    assert s.serving.port == 9002  # env beats YAML
    assert s.serving.max_k == 50  # YAML beats default
    assert s.data.seed == 4  # overrides beat everything
    assert s.profile == "local"


def test_profile_selects_file(tmp_path: Path) -> None:
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "production.yaml").write_text("environment: production\nfeatures:\n  online_store: redis\n")
    s = load_settings(root=tmp_path, environ={"RECSYS_PROFILE": "production"})
    assert s.environment == "production" and s.features.online_store == "redis" and s.profile == "production"
    with pytest.raises(ConfigError, match="RECSYS_PROFILE=nope"):
        load_settings(root=tmp_path, environ={"RECSYS_PROFILE": "nope"})


def test_unknown_yaml_key_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("serving:\n  prot: 1\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(root=tmp_path, environ={}, config_file=path)
    assert str(path) in str(exc.value) and "'serving.prot'" in str(exc.value)


def test_unknown_top_level_and_env_keys_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("servng: {}\n")
    with pytest.raises(ConfigError, match="unknown key 'servng'"):
        load_settings(root=tmp_path, environ={}, config_file=path)
    with pytest.raises(ConfigError, match="RECSYS_SERVING__PROT"):
        load_settings(root=tmp_path, environ={"RECSYS_SERVING__PROT": "1"})


def test_invalid_value_is_reported_with_its_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="serving.port"):
        load_settings(root=tmp_path, environ={"RECSYS_SERVING__PORT": "not-a-port"})
    with pytest.raises(ConfigError, match="features.online_store"):
        load_settings(root=tmp_path, environ={"RECSYS_FEATURES__ONLINE_STORE": "memcached"})


def test_env_lists_parse_as_yaml(tmp_path: Path) -> None:
    s = load_settings(root=tmp_path, environ={"RECSYS_TRAINING__EVAL_KS": "[5, 10]"})
    assert s.training.eval_ks == [5, 10]


def test_repo_config_files_are_valid() -> None:
    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "config").glob("*.yaml")):
        s = load_settings(root=root, environ={}, config_file=path)
        assert s.profile == path.stem


def test_ranker_layer_sizes_reach_the_trainer_and_bad_ones_are_named(tmp_path: Path) -> None:
    from pipelines.train_ranker import ranker_params

    s = load_settings(root=tmp_path, environ={"RECSYS_TRAINING__RANKER__OVER_ARCH": "[64, 32, 1]",
                                              "RECSYS_TRAINING__RANKER__DENSE_ARCH": "[32, 16]"})
    params = ranker_params(s)
    assert params["over_arch"] == (64, 32, 1) and params["dense_arch"] == (32, 16)
    for bad in ("[64, 32]", "[1]"):  # no logit; no hidden layer (TorchRec's OverArch needs one)
        with pytest.raises(ConfigError, match="training.ranker.over_arch.*end with 1"):
            load_settings(root=tmp_path, environ={"RECSYS_TRAINING__RANKER__OVER_ARCH": bad})
    with pytest.raises(ConfigError, match="training.ranker.dense_arch"):
        load_settings(root=tmp_path, environ={"RECSYS_TRAINING__RANKER__DENSE_ARCH": "[]"})


def test_ranker_layer_defaults_agree_and_evaluation_uses_the_configured_sizes(tmp_path: Path) -> None:
    """One default for the ranker's layers (settings, the model config, the artifact schema and
    ``train_dlrm``), and offline evaluation trains the configured sizes, not a library default."""
    import dataclasses
    import inspect

    from models.dlrm import DLRMConfig, _artifact_config_cls, train_dlrm
    from models.settings import RankerSettings
    from pipelines.evaluate import TwoTowerPlusRanker

    want = tuple(RankerSettings().over_arch)
    fields = {f.name: f.default for f in dataclasses.fields(DLRMConfig)}
    assert fields["over_arch"] == want
    assert tuple(inspect.signature(train_dlrm).parameters["over_arch"].default) == want
    assert tuple(_artifact_config_cls().model_fields["over_arch"].default) == want
    s = load_settings(root=tmp_path, environ={"RECSYS_TRAINING__RANKER__OVER_ARCH": "[16, 1]"})
    model = TwoTowerPlusRanker(settings=s, prepared=None, params={"two_tower": {}})  # type: ignore[arg-type]
    assert model._ts_params["dlrm_params"]["over_arch"] == (16, 1)
    model = TwoTowerPlusRanker(settings=s, prepared=None, params={"dlrm_params": {"over_arch": (8, 1)}})  # type: ignore[arg-type]
    assert model._ts_params["dlrm_params"]["over_arch"] == (8, 1)  # an explicit override wins


def test_the_feature_cache_ttl_defaults_to_what_it_has_to_bound(tmp_path: Path) -> None:
    """``features.online_cache_ttl_s`` unset: with the change stamps, the TTL bounds only writes
    the stamps cannot see (none with SQLite, other hosts' with Redis); without them, every other
    process's writes. A value set is kept, 0 included (no cache)."""
    def ttl(**features) -> float:
        return load_settings(root=tmp_path, environ={}, overrides={"features": features}).features.cache_ttl_s()

    assert ttl() == 3600.0
    assert ttl(online_store="redis") == 60.0
    assert ttl(online_change_stamps=False) == 5.0 and ttl(online_store="redis", online_change_stamps=False) == 5.0
    assert ttl(online_cache_ttl_s=12.5) == 12.5 and ttl(online_cache_ttl_s=0) == 0.0
    assert load_settings(root=tmp_path, environ={"RECSYS_FEATURES__ONLINE_CACHE_TTL_S": "30"}).features.cache_ttl_s() == 30.0
