"""DLRM ranker: features, shapes, loss, a short train that beats random, calibration, artifacts, bad input."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.schemas import DataError
from models.base import IdMap, InteractionData


def _split(data: InteractionData, share: float, seed: int = 0) -> tuple[InteractionData, InteractionData]:
    held = np.random.default_rng(seed).random(len(data)) < share

    def sub(m):
        return InteractionData(data.users, data.items, data.user_idx[m], data.item_idx[m], data.values[m],
                               None if data.timestamps is None else data.timestamps[m])

    return sub(~held), sub(held)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(one_torch_thread):
    """Synthetic events (affinity-driven) -> history / labelled parts and rating-style examples."""
    from datetime import date

    from core.synthetic import generate
    from models.dlrm import RankingFeatures, examples_from_ratings

    ds = generate(n_users=300, n_items=200, n_events=30_000, n_days=10, shift_date=date(2024, 1, 20), seed=3)
    data = InteractionData.from_frame(ds.events.drop_duplicates(["user_id", "item_id"]))
    hist, lab = _split(data, 0.3)
    feats = RankingFeatures.build(hist, items_frame=ds.items, history_len=20)
    ex = examples_from_ratings(lab, positive_min_rating=None, negatives_per_positive=3, exclude=hist.csr(), seed=1)
    is_val = np.random.default_rng(2).random(len(ex)) < 0.25
    return ds, hist, feats, ex.subset(np.flatnonzero(~is_val)), ex.subset(np.flatnonzero(is_val))


@pytest.fixture(scope="module")
def trained(tiny):
    from models.dlrm import train_dlrm

    _, _, feats, train, valid = tiny
    return train_dlrm(feats, train, valid, embedding_dim=8, dense_arch=(16, 8), over_arch=(16, 1), epochs=2,
                      batch_size=128, learning_rate=1e-2, embedding_lr=0.1, seed=0, progress=False)


def test_features_tables_and_kjt(tiny):
    from models.dlrm import SPARSE_FEATURES

    _, hist, feats, _, _ = tiny
    assert feats.user_dense.shape == (hist.n_users + 1, 2)
    assert feats.item_dense.shape == (hist.n_items + 1, 4)
    assert np.diff(feats.hist_indptr).max() <= 20
    # history bags hold only items the user interacted with
    u = 0
    bag = set(feats.hist_indices[feats.hist_indptr[u]:feats.hist_indptr[u + 1]])
    assert bag <= set(hist.item_idx[hist.user_idx == u])
    users, items = np.array([0, 1, -1]), np.array([2, -1, 3])
    kjt = feats.kjt(users, items)
    assert kjt.keys() == list(SPARSE_FEATURES)
    lengths = kjt.lengths().numpy().reshape(len(SPARSE_FEATURES), 3)
    assert lengths[0].tolist() == [1, 1, 1] and lengths[1].tolist() == [1, 1, 1]
    assert lengths[2, 2] == 0, "an unknown user has an empty history bag"
    assert lengths[3, 1] == 0, "an unknown item has no categories"
    ids = kjt.to_dict()
    assert ids["user_id"].values().tolist() == [0, 1, hist.n_users], "unknown user -> OOV row"
    assert ids["item_id"].values().tolist() == [2, hist.n_items, 3]


def test_forward_shapes_and_bce_loss(tiny):
    import torch

    from models.dlrm import DLRMConfig, DLRMTrainWrapper, build_ranker

    _, _, feats, train, _ = tiny
    cfg = DLRMConfig(n_users=feats.n_users, n_items=feats.n_items, n_categories=len(feats.categories),
                     embedding_dim=8, dense_arch=(16, 8), over_arch=(16, 1))
    for kind in ("fused", "plain"):
        ranker = build_ranker(cfg, embeddings=kind, seed=0)
        rows = np.arange(32)
        dense = torch.from_numpy(feats.dense(train.user_idx[rows], train.item_idx[rows], None))
        logits = ranker(dense, feats.kjt(train.user_idx[rows], train.item_idx[rows]))
        assert logits.shape == (32,)
        labels = torch.from_numpy(train.labels[rows])
        loss, _ = DLRMTrainWrapper(ranker)(dense, feats.kjt(train.user_idx[rows], train.item_idx[rows]), labels)
        expected = torch.nn.functional.binary_cross_entropy(torch.sigmoid(logits), labels)
        assert loss.item() == pytest.approx(float(expected), rel=1e-4)


def test_fused_embeddings_update_in_backward(tiny):
    import torch

    from models.dlrm import DLRMConfig, DLRMTrainWrapper, build_ranker

    _, _, feats, train, _ = tiny
    cfg = DLRMConfig(n_users=feats.n_users, n_items=feats.n_items, n_categories=len(feats.categories),
                     embedding_dim=8, dense_arch=(16, 8), over_arch=(16, 1))
    ranker = build_ranker(cfg, embeddings="fused", embedding_lr=0.5)
    key = "dlrm.sparse_arch.embedding_bag_collection.embedding_bags.t_user.weight"
    before = ranker.state_dict()[key].clone()
    rows = np.arange(16)
    loss, _ = DLRMTrainWrapper(ranker)(torch.from_numpy(feats.dense(train.user_idx[rows], train.item_idx[rows], None)),
                                       feats.kjt(train.user_idx[rows], train.item_idx[rows]),
                                       torch.from_numpy(train.labels[rows]))
    loss.backward()  # no optimizer step: row-wise Adagrad is applied inside backward
    changed = (ranker.state_dict()[key] - before).abs().sum(1) > 0
    assert set(np.flatnonzero(changed.numpy())) == set(np.unique(train.user_idx[rows]))
    names = {id(p) for p in ranker.dense_parameters()}
    emb = [p for n, p in ranker.named_parameters() if ".embedding_bag_collection." in n]
    assert emb and not any(id(p) in names for p in emb), "fused tables must not be in the dense optimizer"


def test_two_epoch_train_beats_random_and_calibrates(tiny, trained):
    from models.dlrm import expected_calibration_error, roc_auc

    _, _, _, _, valid = tiny
    assert len(trained.history) == 2
    assert trained.metrics["valid_auc"] > 0.6  # random is 0.5
    probs = trained.scorer.score(valid.user_idx, valid.item_idx)
    assert roc_auc(valid.labels, probs) == pytest.approx(trained.metrics["valid_auc"], abs=1e-6)
    assert 0 < probs.min() and probs.max() < 1
    # Platt scaling brings the mean prediction to the observed rate and lowers the calibration error
    assert abs(probs.mean() - valid.labels.mean()) < 0.03
    raw = 1 / (1 + np.exp(-trained.scorer.logits(valid.user_idx, valid.item_idx)))
    assert expected_calibration_error(valid.labels, probs) <= expected_calibration_error(valid.labels, raw) + 1e-9
    assert set(trained.calibration_curve.columns) >= {"mean_pred", "observed", "count"}


def test_fast_path_matches_torchrec_forward_and_broadcast(tiny, trained):
    _, _, _, _, valid = tiny
    s = trained.scorer
    u, i = valid.user_idx[:50], valid.item_idx[:50]
    np.testing.assert_allclose(s.logits(u, i), s.reference_logits(u, i), rtol=1e-5, atol=1e-5)
    # one request, many candidates: user-side embeddings computed once and broadcast
    items = np.arange(20)
    per_row = s.logits(np.full(20, 3), items)
    broadcast = s.logits(np.full(20, 3), items, request_of_row=np.zeros(20, np.int64), request_users=np.array([3]))
    np.testing.assert_allclose(per_row, broadcast, rtol=1e-5, atol=1e-6)


def test_request_path_matches_torchrec_forward(tiny, trained, tmp_path):
    """The request path (user side once per request, item side from per-item tables, the
    interaction in one compiled pass) gives TorchRec's logits for every row, whatever the rows'
    order, unknown users and items included; with int8 tables it gives the per-row path's logits
    over the same dequantized rows."""
    from models.dlrm import DLRMScorer

    s = trained.scorer
    rng = np.random.default_rng(0)
    n_req, per = 9, 6
    req_users = rng.integers(-1, s.features.n_users, n_req)  # -1: a user the model never saw
    row_req = rng.permutation(np.repeat(np.arange(n_req), per))
    items = rng.integers(-1, s.features.n_items, n_req * per)
    got = s.logits(req_users[row_req], items, request_of_row=row_req, request_users=req_users)
    np.testing.assert_allclose(got, s.reference_logits(req_users[row_req], items), rtol=1e-5, atol=1e-5)
    # the compiled kernels read these unchecked: out-of-range requests are refused before them
    with pytest.raises(Exception, match="out of range"):
        s.logits(np.zeros(2, np.int64), np.zeros(2, np.int64), request_of_row=np.zeros(2, np.int64),
                 request_users=np.array([s.features.n_users + 10]))
    with pytest.raises(ValueError, match="request_of_row"):
        s.logits(np.zeros(2, np.int64), np.zeros(2, np.int64), request_of_row=np.array([0, 1]), request_users=np.array([0]))
    with pytest.raises(ValueError, match="equally long"):
        s.logits(np.zeros(1, np.int64), np.zeros(3, np.int64))
    q = DLRMScorer.load(s.save(tmp_path / "ranker"), quantize=True)
    np.testing.assert_allclose(q.logits(req_users[row_req], items, request_of_row=row_req, request_users=req_users),
                               q.logits(req_users[row_req], items), rtol=1e-5, atol=1e-5)


def test_artifact_round_trip_same_scores(tiny, trained, tmp_path):
    from models.artifacts import load_artifact
    from models.dlrm import DLRMScorer

    _, _, _, _, valid = tiny
    s = trained.scorer
    folder = s.save(tmp_path / "ranker", metadata={"auc": trained.metrics["valid_auc"]})
    loaded = DLRMScorer.load(folder)
    np.testing.assert_array_equal(loaded.score(valid.user_idx, valid.item_idx), s.score(valid.user_idx, valid.item_idx))
    assert loaded.calibration == s.calibration
    built = load_artifact(folder).build()  # through the generic artifact registry (no training code)
    frame = pd.DataFrame({"user_id": s.features.users.decode(valid.user_idx[:5]),
                          "item_id": s.features.items.decode(valid.item_idx[:5])})
    np.testing.assert_allclose(built.predict(frame)["score"].to_numpy(), s.score(valid.user_idx[:5], valid.item_idx[:5]))
    # int8 embeddings: close to float
    q = DLRMScorer.load(folder, quantize=True)
    np.testing.assert_allclose(q.logits(valid.user_idx, valid.item_idx), s.logits(valid.user_idx, valid.item_idx), atol=0.05)


def test_unknown_ids_score_through_oov_rows(trained):
    s = trained.scorer
    out = s.predict(pd.DataFrame({"user_id": ["nobody", s.features.users.ids[0]], "item_id": [s.features.items.ids[0], "nothing"]}), None)
    assert np.isfinite(out["score"]).all()
    with pytest.raises(DataError, match="out of range"):
        s.score(np.array([10_000]), np.array([0]))
    with pytest.raises(DataError, match="missing column"):
        s.predict(pd.DataFrame({"user_id": ["1"]}), None)


def test_bad_training_sets_are_refused(tiny):
    from models.dlrm import RankingExamples, RankingFeatures, train_dlrm

    _, hist, feats, train, valid = tiny
    with pytest.raises(DataError, match="empty history"):
        RankingFeatures.build(InteractionData(hist.users, hist.items, np.empty(0, np.int64), np.empty(0, np.int64),
                                              np.empty(0)))
    one_user = train.subset(np.flatnonzero(train.user_idx == train.user_idx[0]))
    with pytest.raises(DataError, match="1 user"):
        train_dlrm(feats, one_user, valid, epochs=1, progress=False)
    empty = train.subset(np.empty(0, np.int64))
    with pytest.raises(DataError, match="no ranking examples"):
        train_dlrm(feats, empty, valid, epochs=1, progress=False)
    all_neg = RankingExamples(train.user_idx, train.item_idx, np.zeros(len(train)), train.extra, ())
    with pytest.raises(DataError, match="all negative"):
        train_dlrm(feats, all_neg, valid, epochs=1, progress=False)


def test_nan_loss_raises_and_nothing_is_saved(tiny, tmp_path):
    from models.dlrm import TrainingError, train_dlrm

    _, _, feats, train, valid = tiny
    # an absurd learning rate blows the weights up to inf within a few steps -> NaN loss
    with pytest.raises(TrainingError, match="non-finite"):
        train_dlrm(feats, train, valid, epochs=2, progress=False, embedding_dim=8, dense_arch=(8,), over_arch=(8, 1),
                   learning_rate=1e30, embedding_lr=1e30)
    assert not any(tmp_path.iterdir())


def test_non_finite_source_features_are_refused(tiny):
    from models.dlrm import RankingExamples, train_dlrm

    _, _, feats, train, valid = tiny
    extra = np.ones((len(train), 1), np.float32)
    extra[0, 0] = np.nan
    bad = RankingExamples(train.user_idx, train.item_idx, train.labels, extra, ("src_x",))
    with pytest.raises(DataError, match="non-finite"):
        train_dlrm(feats, bad, valid, epochs=1, progress=False)
