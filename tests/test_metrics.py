"""Metric correctness against hand-computed cases and a per-user brute-force reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from models.metrics import (
    MetricsError,
    auc,
    evaluate_recommender,
    expected_calibration_error,
    gini_index,
    log_loss,
    ranker_metrics,
    ranking_metrics,
    top_k,
)

# 3 users x 6 items. User 2 has no test item and must not count.
SCORES = np.array(
    [
        [0.9, 0.8, 0.1, 0.7, 0.0, 0.2],   # train {0}; ranking after exclusion: 1, 3, 5, 2, 4
        [0.5, 0.9, 0.95, 0.1, 0.6, 0.3],  # train {2}; ranking: 1, 4, 0, 5, 3
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
    ]
)
TRAIN = sp.csr_matrix(np.array([[1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=np.float32))
TEST = sp.csr_matrix(np.array([[0, 1, 0, 0, 0, 1], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=np.float32))
POP = np.asarray(TRAIN.sum(axis=0)).ravel()  # [2, 1, 1, 0, 0, 0]


def _fn(scores: np.ndarray):
    return lambda users: scores[users]


def test_hand_computed_accuracy() -> None:
    m = ranking_metrics(_fn(SCORES), test=TEST, exclude=TRAIN, popularity=POP, ks=(1, 2, 3), n_train_users=3)
    l2, l3 = math.log2(3), math.log2(4)
    # user 0: test {1, 5} at ranks 1 and 3; user 1: test {4} at rank 2
    assert m["recall@1"] == pytest.approx((0.5 + 0) / 2)
    assert m["recall@2"] == pytest.approx((0.5 + 1) / 2)
    assert m["recall@3"] == pytest.approx((1 + 1) / 2)
    idcg2 = 1 + 1 / l2
    assert m["ndcg@1"] == pytest.approx((1 + 0) / 2)
    assert m["ndcg@2"] == pytest.approx((1 / idcg2 + 1 / l2) / 2)
    assert m["ndcg@3"] == pytest.approx(((1 + 1 / l3) / idcg2 + 1 / l2) / 2)
    assert m["hit@1"] == pytest.approx(0.5)
    assert m["hit@2"] == pytest.approx(1.0)
    assert m["mrr@1"] == pytest.approx(0.5)
    assert m["mrr@3"] == pytest.approx((1 + 0.5) / 2)
    assert m["precision@2"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert m["precision@3"] == pytest.approx((2 / 3 + 1 / 3) / 2)


def test_hand_computed_beyond_accuracy() -> None:
    m = ranking_metrics(_fn(SCORES), test=TEST, exclude=TRAIN, popularity=POP, ks=(1, 2), n_train_users=3)
    # top-1 lists: item 1 for both users; top-2: {1, 3} and {1, 4}
    assert m["coverage@1"] == pytest.approx(1 / 6)
    assert m["coverage@2"] == pytest.approx(3 / 6)
    assert m["arp@1"] == pytest.approx(1.0)
    assert m["arp@2"] == pytest.approx(0.5)
    # self-information -log2(pop / 3) with pop floored at 1: items 1, 3, 4 all -> log2(3)
    assert m["novelty@1"] == pytest.approx(math.log2(3))
    assert m["gini@1"] == pytest.approx(10 / 12)  # counts [0,0,0,0,0,2]: sum (2i-n-1)x / (n * total)


def test_without_exclusion_training_items_count() -> None:
    m = ranking_metrics(_fn(SCORES), test=TEST, exclude=None, ks=(1,))
    # user 0's top-1 becomes item 0 (a miss); user 1's becomes item 2 (a miss)
    assert m["recall@1"] == 0.0
    assert "novelty@1" not in m


def test_minus_inf_is_not_recommended() -> None:
    scores = np.full((3, 6), -np.inf)
    scores[:, 5] = 1.0  # one candidate per user
    m = ranking_metrics(_fn(scores), test=TEST, exclude=TRAIN, popularity=POP, ks=(3,))
    assert m["recall@3"] == pytest.approx((0.5 + 0) / 2)
    assert m["precision@3"] == pytest.approx((1 / 3 + 0) / 2)
    assert m["coverage@3"] == pytest.approx(1 / 6)
    assert m["arp@3"] == pytest.approx(0.0)


def _reference(scores, test, exclude, k):
    """Per-user loop straight from RecBole's definitions."""
    rec, nd = [], []
    for u in range(scores.shape[0]):
        rel = set(test[u].indices)
        if not rel:
            continue
        s = scores[u].copy()
        s[exclude[u].indices] = -np.inf
        order = sorted(range(len(s)), key=lambda i: (-s[i], i))[:k]
        hits = [1.0 if i in rel else 0.0 for i in order]
        rec.append(sum(hits) / len(rel))
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        idcg = sum(1 / math.log2(r + 2) for r in range(min(len(rel), k)))
        nd.append(dcg / idcg)
    return float(np.mean(rec)), float(np.mean(nd))


@pytest.mark.parametrize("chunk_bytes", [1, 10_000, 256 * 2**20])
def test_matches_bruteforce_reference_any_chunking(chunk_bytes: int) -> None:
    rng = np.random.default_rng(0)
    n_u, n_i = 40, 30
    scores = rng.normal(size=(n_u, n_i))
    train = sp.csr_matrix((rng.random((n_u, n_i)) < 0.2).astype(np.float32))
    test = sp.csr_matrix(((rng.random((n_u, n_i)) < 0.15) & (train.toarray() == 0)).astype(np.float32))
    m = ranking_metrics(_fn(scores), test=test, exclude=train, ks=(5, 10), max_chunk_bytes=chunk_bytes)
    for k in (5, 10):
        r, n = _reference(scores, test, train, k)
        assert m[f"recall@{k}"] == pytest.approx(r)
        assert m[f"ndcg@{k}"] == pytest.approx(n)


def test_top_k_order_and_ties() -> None:
    s = np.array([[0.1, 0.5, 0.5, 0.9, 0.0]])
    assert top_k(s, 3).tolist() == [[3, 1, 2]]
    assert top_k(s, 10).tolist() == [[3, 1, 2, 0, 4]]


def test_gini_extremes() -> None:
    assert gini_index(np.array([3, 3, 3])) == pytest.approx(0.0)
    assert gini_index(np.array([0, 0, 0])) == 0.0


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(MetricsError, match="empty test set"):
        ranking_metrics(_fn(SCORES), test=sp.csr_matrix((3, 6)), ks=(1,))
    with pytest.raises(MetricsError, match="shape"):
        ranking_metrics(lambda u: SCORES[u][:, :4], test=TEST, ks=(1,))
    with pytest.raises(MetricsError, match="NaN"):
        ranking_metrics(lambda u: np.full((len(u), 6), np.nan), test=TEST, ks=(1,))
    with pytest.raises(MetricsError, match="exclude has shape"):
        ranking_metrics(_fn(SCORES), test=TEST, exclude=sp.csr_matrix((2, 6)), ks=(1,))
    with pytest.raises(MetricsError, match="ks must be positive"):
        ranking_metrics(_fn(SCORES), test=TEST, ks=(0,))


def test_evaluate_recommender_checks_id_space() -> None:
    import pandas as pd

    from models.base import InteractionData

    train = InteractionData.from_frame(pd.DataFrame({"user_id": ["a", "a", "b"], "item_id": ["x", "y", "z"]}))
    other = InteractionData.from_frame(pd.DataFrame({"user_id": ["a"], "item_id": ["q"]}))

    class Const:
        name = "const"

        def score(self, users):
            return np.tile(np.arange(train.n_items, dtype=float), (len(users), 1))

    with pytest.raises(MetricsError, match="different user/item id maps"):
        evaluate_recommender(Const(), train=train, test=other)
    test = InteractionData.from_frame(pd.DataFrame({"user_id": ["b"], "item_id": ["y"]}), users=train.users, items=train.items)
    m = evaluate_recommender(Const(), train=train, test=test, ks=(1,))
    # user b: train {z} excluded; remaining scores x=0, y=1 -> y first: a hit
    assert m["recall@1"] == 1.0


def test_ranker_metrics_hand_computed() -> None:
    assert auc([1, 0, 1, 0], [0.9, 0.8, 0.3, 0.1]) == pytest.approx(0.75)
    assert auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert log_loss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert expected_calibration_error([0, 1, 1, 1], [0.1, 0.15, 0.9, 0.95]) == pytest.approx(0.5 * 0.375 + 0.5 * 0.075)
    m = ranker_metrics([0, 1, 1, 1], [0.1, 0.15, 0.9, 0.95])
    assert set(m) == {"auc", "log_loss", "ece"} and m["auc"] == pytest.approx(1.0)


def test_ranker_metrics_bad_input() -> None:
    with pytest.raises(MetricsError, match="both positive and negative"):
        auc([1, 1], [0.2, 0.3])
    with pytest.raises(MetricsError, match="labels must be 0 or 1"):
        auc([2, 0], [0.2, 0.3])
    with pytest.raises(MetricsError, match="2 labels but 3 scores"):
        log_loss([1, 0], [0.1, 0.2, 0.3])
    with pytest.raises(MetricsError, match=r"\[0, 1\]"):
        log_loss([1, 0], [1.5, 0.2])
