"""Artifact format: round-trips, integrity checks, refusal of broken models, MLflow registry
round-trip with a local copy that survives an unreachable registry."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import BaseModel

from models import artifacts as A
from models.base import IdMap


class _Cfg(BaseModel):
    dim: int = 3
    name: str = "x"


class _Servable:
    """A tiny real servable: scores = users' rows of a weight matrix."""

    def __init__(self, art: A.Artifact):
        self.w = art.state_dict["w"].numpy()
        self.users = art.users

    def predict(self, frame: pd.DataFrame, params=None) -> pd.DataFrame:
        rows = self.users.encode(frame["user_id"])
        return pd.DataFrame({"user_id": frame["user_id"], "score": self.w[rows].sum(axis=1)})


A.register_kind("test_dummy", config_cls=_Cfg, builder=_Servable)


def _artifact():
    import torch

    return A.Artifact(kind="test_dummy", config=_Cfg(dim=4), state_dict={"w": torch.arange(8.0).reshape(2, 4)},
                      users=IdMap(("u1", "u2")), items=IdMap(("i1", "i2", "i3")),
                      arrays={"pop": np.array([3.0, 2.0, 1.0])}, feature_service_version="fs-v7",
                      metadata={"recall@10": 0.5})


def test_save_load_round_trip(tmp_path):
    folder = A.save_artifact(tmp_path / "m", artifact=_artifact())
    art = A.load_artifact(folder)
    assert isinstance(art.config, _Cfg) and art.config.dim == 4
    assert art.users.ids == ("u1", "u2") and art.items.ids == ("i1", "i2", "i3")
    np.testing.assert_array_equal(art.arrays["pop"], [3.0, 2.0, 1.0])
    assert art.feature_service_version == "fs-v7" and art.metadata["recall@10"] == 0.5
    out = art.build().predict(pd.DataFrame({"user_id": ["u2", "u1"]}))
    assert out["score"].tolist() == [22.0, 6.0]


def test_corrupt_and_incomplete_artifacts_fail_clearly(tmp_path):
    folder = A.save_artifact(tmp_path / "m", artifact=_artifact())
    (folder / "items.json").write_text(json.dumps(["i1"]))
    with pytest.raises(A.ArtifactError, match="items.json does not match its checksum"):
        A.load_artifact(folder)
    folder = A.save_artifact(tmp_path / "m2", artifact=_artifact())
    (folder / "arrays.npz").unlink()
    with pytest.raises(A.ArtifactError, match="arrays.npz is missing"):
        A.load_artifact(folder)
    with pytest.raises(A.ArtifactError, match="not a model artifact"):
        A.load_artifact(tmp_path)
    with pytest.raises(A.ArtifactError, match="no such artifact folder"):
        A.load_artifact(tmp_path / "nope")


def test_nan_weights_are_never_saved(tmp_path):
    import torch

    art = _artifact()
    art.state_dict["w"][0, 0] = float("nan")
    with pytest.raises(A.ArtifactError, match="weight 'w' has NaN"):
        A.save_artifact(tmp_path / "m", artifact=art)
    assert not (tmp_path / "m").exists()
    art = _artifact()
    art.arrays["emb"] = np.array([np.inf])
    with pytest.raises(A.ArtifactError, match="array 'emb'"):
        A.save_artifact(tmp_path / "m", artifact=art)
    assert torch is not None


def test_unknown_kind_is_named(tmp_path):
    art = A.Artifact(kind="no_such_kind", config={"a": 1})
    A.save_artifact(tmp_path / "m", artifact=art)
    loaded = A.load_artifact(tmp_path / "m")
    assert loaded.config == {"a": 1}
    with pytest.raises(A.ArtifactError, match="unknown model kind 'no_such_kind'"):
        loaded.build()


@pytest.mark.slow
def test_mlflow_registry_round_trip_and_offline_copy(settings):
    import mlflow

    from core.tracking import configure_mlflow

    configure_mlflow(settings)
    with mlflow.start_run():
        info = A.log_artifact_model(_artifact(), name="model", registered_model_name="dummy", aliases=["champion"])
    assert str(info.registered_model_version) == "1"
    art = A.load_from_registry("models:/dummy@champion", settings)
    assert art.origin["version"] == "1" and not art.origin["cached"]
    cache = settings.paths.var_dir / "models" / "dummy" / "1"
    assert (cache / "manifest.json").is_file()
    frame = pd.DataFrame({"user_id": ["u1", "u2"]})
    assert art.build().predict(frame)["score"].tolist() == [6.0, 22.0]
    # the pyfunc flavour serves the same thing
    pyf = mlflow.pyfunc.load_model("models:/dummy@champion")
    assert pyf.predict(frame)["score"].tolist() == [6.0, 22.0]
    # the registry goes away: the alias resolves to the local copy
    broken = settings.model_copy(update={"mlflow": settings.mlflow.model_copy(
        update={"tracking_uri": "http://127.0.0.1:9/", "registry_uri": "http://127.0.0.1:9/"})})
    offline = A.load_from_registry("models:/dummy@champion", broken, offline=True)
    assert offline.origin["cached"] and offline.origin["version"] == "1"
    with pytest.raises(A.ArtifactError, match="no local copy"):
        A.load_from_registry("models:/other@champion", broken, offline=True)
    # a registry that fails on contact (here: a store that cannot be opened) falls back too
    dead = settings.model_copy(update={"mlflow": settings.mlflow.model_copy(
        update={"tracking_uri": "sqlite:////proc/no-such-dir/mlflow.db", "registry_uri": None})})
    fallback = A.load_from_registry("models:/dummy@champion", dead)
    assert fallback.origin["cached"] and fallback.build().predict(frame)["score"].tolist() == [6.0, 22.0]
    with pytest.raises(A.ArtifactError, match="registry unreachable"):
        A.load_from_registry("models:/other/3", dead)
    with pytest.raises(A.ArtifactError, match="has no alias 'nope'"):
        A.load_from_registry("models:/dummy@nope", settings)
    # server workers starting together all fetch the version at once: every one gets a loadable
    # copy (none deletes the copy another is reading); a damaged copy is replaced
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    for _ in range(3):
        shutil.rmtree(cache)
        with ThreadPoolExecutor(4) as ex:
            arts = list(ex.map(lambda _: A.load_from_registry("models:/dummy/1", settings), range(4)))
        assert all(a.build().predict(frame)["score"].tolist() == [6.0, 22.0] for a in arts)
    (cache / "manifest.json").write_text("{damaged")
    again = A.load_from_registry("models:/dummy/1", settings)
    assert not again.origin["cached"] and again.build().predict(frame)["score"].tolist() == [6.0, 22.0]


def _remember_aliases(root: str, worker: int, rounds: int) -> None:
    for r in range(rounds):
        A._remember_alias(Path(root), "ranker", "champion", str(r % 3 + 1))  # noqa: SLF001 - what every worker does at start
        A._remember_alias(Path(root), "ranker", f"worker{worker}", str(r))  # noqa: SLF001


def test_workers_recording_aliases_at_once_neither_fail_nor_lose_one(tmp_path):
    """Server workers start together and each records the alias it resolved. With one shared
    temporary file, one worker could fail (its file already moved by another) or publish a
    half-written map, and that worker served without its ranker (seen in a benchmark run)."""
    import multiprocessing

    (tmp_path / "ranker").mkdir()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_remember_aliases, args=(str(tmp_path), w, 60)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    data = json.loads((tmp_path / "ranker" / "aliases.json").read_text())
    assert {f"worker{w}": "59" for w in range(4)}.items() <= data.items() and data["champion"] in {"1", "2", "3"}
    assert not list((tmp_path / "ranker").glob("*.tmp"))
