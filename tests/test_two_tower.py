"""Two-tower model: loss and shapes, feature construction without target leakage, a short
training run that beats random, artifact round-trip, reproducibility and bad input."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchrec")

from core.schemas import DataError  # noqa: E402
from models import two_tower as T  # noqa: E402
from models.artifacts import load_artifact, save_artifact  # noqa: E402
from models.base import InteractionData  # noqa: E402

SMALL = {"embedding_dim": 16, "feature_dim": 4, "tower_hidden": [32], "output_dim": 16, "batch_size": 128,
         "random_negatives": 32, "history_len": 10, "max_history": 20, "epochs": 2, "temperature": 0.1,
         "patience": 0, "seed": 3}


@pytest.fixture(scope="module")
def data(tiny_dataset):
    ev = tiny_dataset.events
    rng = np.random.default_rng(0)
    held = rng.random(len(ev)) < 0.2
    train = InteractionData.from_frame(ev[~held])
    test = InteractionData.from_frame(ev[held], users=train.users, items=train.items, drop_unknown=True)
    return tiny_dataset, train, test


def _fit(data, **over):
    ds, train, _ = data
    return T.TwoTowerRecommender({**SMALL, **over}, items_frame=ds.items, users_frame=ds.users, progress=False).fit(train)


def test_features_and_history_never_contain_the_target(data):
    ds, train, _ = data
    for ts in (train.timestamps, None):  # sequential and leave-one-out history
        tr = InteractionData(train.users, train.items, train.user_idx, train.item_idx, train.values, ts)
        feats, implied = T.build_features(tr, items_frame=ds.items, users_frame=ds.users)
        assert implied["sequential"] is (ts is not None)
        cfg = T.TwoTowerConfig(**{**SMALL, **implied, "n_users": tr.n_users, "n_items": tr.n_items})
        fb = T.FeatureBuilder(cfg, feats)
        users = np.repeat(np.arange(tr.n_users), np.diff(feats.hist_indptr))
        pos = np.arange(len(users)) - feats.hist_indptr[users]
        ln, val = fb.sample_history(users, pos, np.random.default_rng(0))
        starts = np.r_[0, np.cumsum(ln)]
        for j in range(0, len(users), 97):
            own = feats.hist_items[feats.hist_indptr[users[j]]:feats.hist_indptr[users[j] + 1]]
            hist = val[starts[j]:starts[j + 1]]
            others = np.delete(own, pos[j])
            assert set(hist) <= set(others)  # drawn from the user's *other* items only
            assert len(hist) <= cfg.history_len
            if ts is not None:  # the items right before the target, in time order
                np.testing.assert_array_equal(hist, own[max(0, pos[j] - cfg.history_len):pos[j]])
    assert "item_cat" in implied["item_features"] and implied["user_features"]


def test_loss_shapes_and_masking(data):
    ds, train, _ = data
    rec = T.TwoTowerRecommender(SMALL, items_frame=ds.items, users_frame=ds.users, progress=False)
    feats, implied = T.build_features(train, items_frame=ds.items, users_frame=ds.users)
    cfg = T.TwoTowerConfig(**{**SMALL, **implied, "n_users": train.n_users, "n_items": train.n_items})
    rec.config, rec.features, rec.builder = cfg, feats, T.FeatureBuilder(cfg, feats)
    model = T.TwoTower(cfg)
    users = np.array([0, 1, 2, 3])
    items = np.array([5, 5, 7, 9])  # item 5 twice: an accidental hit for rows 0 and 1
    batch = rec._batch(users, items, np.zeros(4, dtype=np.int64), np.random.default_rng(0),
                       np.zeros(cfg.n_items), 0.0)
    loss, logits = T.TwoTowerTrainTask(model)(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert logits.shape == (4, 4 + cfg.random_negatives)
    assert logits[0, 1] == float("-inf") and logits[1, 0] == float("-inf")
    assert torch.isfinite(logits.diagonal()).all()
    u, v = model(batch.kjt, n_user_rows=4)
    assert u.shape == (4, cfg.output_dim) and v.shape == (4 + cfg.random_negatives, cfg.output_dim)
    np.testing.assert_allclose(u.norm(dim=1).detach().numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(v.norm(dim=1).detach().numpy(), 1.0, atol=1e-5)


def test_logq_correction_lowers_popular_items_logits(data):
    ds, train, _ = data
    feats, implied = T.build_features(train, items_frame=ds.items, users_frame=ds.users)
    base = {**SMALL, **implied, "n_users": train.n_users, "n_items": train.n_items, "random_negatives": 0}
    batch_q = torch.tensor([np.log(0.5), np.log(0.01)], dtype=torch.float32)
    out = {}
    for w in (0.0, 1.0):
        cfg = T.TwoTowerConfig(**{**base, "logq_weight": w})
        torch.manual_seed(0)
        model = T.TwoTower(cfg)
        fb = T.FeatureBuilder(cfg, feats)
        items = np.array([1, 2])
        parts = {**fb.user_parts(np.array([0, 1])), **fb.item_parts(items)}
        b = T.Batch(fb.kjt(parts, 2), 2, torch.from_numpy(items), batch_q)
        out[w] = T.TwoTowerTrainTask(model)(b)[1]
    diff = (out[1.0] - out[0.0])[0]
    assert torch.allclose(diff, -batch_q)  # logit - log q: the popular item is pushed down most


@pytest.mark.slow
def test_two_epoch_training_beats_random_and_is_reproducible(data):
    from models.metrics import evaluate_recommender

    ds, train, test = data
    a = _fit(data)
    metrics = evaluate_recommender(a, train=train, test=test, ks=[10])
    rng = np.random.default_rng(0)

    class Random:
        def score(self, u):
            return rng.random((len(u), train.n_items))

    rand = evaluate_recommender(Random(), train=train, test=test, ks=[10])
    assert metrics["recall@10"] > 1.5 * rand["recall@10"]
    assert a.history[1].loss < a.history[0].loss
    b = _fit(data)  # same seed -> same model
    np.testing.assert_array_equal(a.item_vectors, b.item_vectors)
    assert [h.loss for h in a.history] == [h.loss for h in b.history]


@pytest.mark.slow
def test_artifact_round_trip_same_scores_and_serving(data, tmp_path):
    ds, train, _ = data
    rec = _fit(data, epochs=1)
    art = rec.to_artifact(feature_service_version="fs-1", metadata={"note": "test"})
    folder = save_artifact(tmp_path / "tt", artifact=art)
    loaded = load_artifact(folder)
    back = T.TwoTowerRecommender.from_artifact(loaded)
    users = np.arange(train.n_users)
    np.testing.assert_allclose(back.score(users), rec.score(users), rtol=1e-5, atol=1e-6)
    serving = loaded.build()
    assert isinstance(serving, T.TwoTowerRetrieval) and serving.feature_service_version == "fs-1"
    uid = train.users.ids[0]
    out = serving.predict(pd.DataFrame({"user_id": [uid]}), {"k": 5})
    assert out["rank"].tolist() == [1, 2, 3, 4, 5]
    # FAISS top-k == exact ranking of score() with the user's training items removed
    s = rec.score(np.array([0]))[0]
    seen = set(train.item_idx[train.user_idx == 0])
    expected = [i for i in np.argsort(-s, kind="stable") if i not in seen][:5]
    assert out["item_id"].tolist() == train.items.decode(expected)
    np.testing.assert_allclose(out["score"].to_numpy(), s[expected], rtol=1e-4)
    # the serving user tower (direct bag pooling + fused MLP) == the module's KJT forward, for known,
    # unknown (-1) and history-overridden users, including an empty history
    idx = np.array([0, 1, -1, 2, -1])
    for hist in (None, (np.array([2, 0, 1, 3, 0]), np.array([1, 2, 5, 0, 1, 2]))):
        np.testing.assert_allclose(T.UserTower(serving.model, serving.builder)(idx, hist),
                                   T.user_vectors(serving.model, serving.builder, idx, hist=hist), rtol=1e-5, atol=1e-6)
    # a cold user with a real-time history gets recommendations; an unknown one without fails
    cold = serving.recommend(["new-user"], k=3, histories=[list(train.items.ids[:3])])
    assert len(cold[0][0]) == 3 and not set(cold[0][0]) & set(train.items.ids[:3])
    with pytest.raises(DataError, match="unknown user_id 'nobody'"):
        serving.predict(pd.DataFrame({"user_id": ["nobody"]}))


def test_plain_and_fused_backends_agree_on_forward(data):
    ds, train, _ = data
    feats, implied = T.build_features(train, items_frame=ds.items, users_frame=ds.users)
    cfg = T.TwoTowerConfig(**{**SMALL, **implied, "n_users": train.n_users, "n_items": train.n_items})
    torch.manual_seed(0)
    fused = T.TwoTower(cfg)
    fused.ebc = T._fused_or_plain(fused.ebc, cfg)
    plain = T.TwoTower(cfg)
    plain.load_state_dict(fused.state_dict())
    fb = T.FeatureBuilder(cfg, feats)
    users, items = np.arange(10), np.arange(10)
    kjt = fb.kjt({**fb.user_parts(users), **fb.item_parts(items)}, 10)
    for x, y in zip(fused(kjt, n_user_rows=10), plain(kjt, n_user_rows=10)):
        torch.testing.assert_close(x, y)


@pytest.mark.slow
def test_bad_input_is_refused(data):
    ds, train, _ = data
    one = InteractionData(train.users, train.items, np.zeros(5, dtype=np.int64), np.arange(5), np.ones(5))
    with pytest.raises(DataError, match="1 user"):
        T.TwoTowerRecommender(SMALL, progress=False).fit(one)
    empty = InteractionData(train.users, train.items, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0))
    with pytest.raises(DataError, match="empty"):
        T.TwoTowerRecommender(SMALL, progress=False).fit(empty)
    with pytest.raises(T.TrainingError, match="non-finite loss"):
        _fit(data, temperature=1e-45, epochs=1)  # 1/t overflows float32: inf logits
    rec = _fit(data, epochs=1)
    with pytest.raises(DataError, match="user index"):
        rec.score(np.array([train.n_users + 5]))
