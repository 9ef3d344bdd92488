"""Baselines: each beats random on tiny structured data; EASE matches a direct solve; errors are clear."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.base import IdMap, InteractionData, Recommender
from models.baselines import ALS, EASE, BaselineError, ItemKNN, MostPopular, make_baseline
from models.metrics import evaluate_recommender


def _clustered(seed: int = 0, n_users: int = 120, n_items: int = 60, n_groups: int = 4, per_user: int = 12):
    """Users in taste groups, each consuming mostly its group's items (plus a popular head);
    split per user 8:2:2 at random. Collaborative structure a real baseline must find."""
    rng = np.random.default_rng(seed)
    group_items = np.array_split(rng.permutation(n_items), n_groups)
    zipf = 1.0 / np.arange(1, n_items + 1)
    rows = []
    for u in range(n_users):
        g = u % n_groups
        w = zipf[: len(group_items[g])]
        own = rng.choice(group_items[g], size=per_user - 2, replace=False, p=w / w.sum())
        head = rng.choice(n_items, size=2, replace=False, p=zipf / zipf.sum())
        for i in {*own.tolist(), *head.tolist()}:
            rows.append((f"u{u}", f"i{i}"))
    df = pd.DataFrame(rows, columns=["user_id", "item_id"]).sample(frac=1.0, random_state=seed)
    part = df.groupby("user_id").cumcount() % 6  # 4/6 train, 1/6 valid, 1/6 test
    users, items = IdMap.from_values(df["user_id"]), IdMap.from_values(df["item_id"])
    enc = lambda f: InteractionData.from_frame(f, users=users, items=items)  # noqa: E731
    return enc(df[part < 4]), enc(df[part == 4]), enc(df[part == 5])


class _Random:
    name = "random"

    def __init__(self, n_items: int, seed: int = 0):
        self.n_items, self.rng = n_items, np.random.default_rng(seed)

    def fit(self, train, *, valid=None):
        return self

    def score(self, user_idx):
        return self.rng.random((len(user_idx), self.n_items))


@pytest.fixture(scope="module")
def data():
    return _clustered()


@pytest.mark.parametrize("name", ["pop", "itemknn", "als", "ease"])
def test_each_baseline_beats_random(data, name: str) -> None:
    train, valid, test = data
    # tiny data: the MovieLens-scale ALS regularisation would flatten everything
    params = {"threads": 1, "iterations": 8, "regularization": 0.5, "factors": 16} if name == "als" else {}
    model = make_baseline(name, **params).fit(train)
    assert isinstance(model, Recommender)
    got = evaluate_recommender(model, train=train, test=test, valid=valid, ks=(10,))["ndcg@10"]
    rnd = evaluate_recommender(_Random(train.n_items), train=train, test=test, valid=valid, ks=(10,))["ndcg@10"]
    assert got > rnd
    if name != "pop":  # personalised models must also beat popularity on clustered tastes
        pop = evaluate_recommender(MostPopular().fit(train), train=train, test=test, valid=valid, ks=(10,))["ndcg@10"]
        assert got > pop


def test_ease_matches_direct_solve(data) -> None:
    train, _, _ = data
    lam = 7.0
    model = EASE(lam=lam).fit(train)
    x = train.csr().toarray().astype(np.float64)
    n = x.shape[1]
    g = x.T @ x + lam * np.eye(n)
    p = np.linalg.inv(g)
    b = np.eye(n) - p / np.diag(p)[None, :]
    users = np.arange(5)
    np.testing.assert_allclose(model.score(users), x[users] @ b, rtol=1e-4, atol=1e-5)
    # the defining constraint: zero diagonal, and B minimises ||X - XB||^2 + lam ||B||^2 column-wise
    np.testing.assert_allclose(np.diag(b), 0.0, atol=1e-12)


def test_itemknn_keeps_k_neighbours_and_cosine(data) -> None:
    train, _, _ = data
    model = ItemKNN(k=5, shrink=0.0, block=7).fit(train)  # odd block size exercises the chunking
    w = model._w.toarray()
    assert ((w > 0).sum(axis=0) <= 5).all()
    assert np.allclose(np.diag(w), 0.0)
    x = train.csr().toarray()
    norms = np.sqrt(x.sum(axis=0))
    i, j = np.argwhere(w > 0)[0]
    assert w[i, j] == pytest.approx((x[:, i] @ x[:, j]) / (norms[i] * norms[j]), rel=1e-5)


def test_popularity_scores_are_training_counts(data) -> None:
    train, _, _ = data
    s = MostPopular().fit(train).score(np.array([0, 1]))
    counts = np.bincount(train.item_idx, minlength=train.n_items)
    np.testing.assert_array_equal(s[0], counts)
    np.testing.assert_array_equal(s[0], s[1])


def test_validation_selects_and_never_sees_test(data) -> None:
    train, valid, _ = data
    model = EASE()
    model.search = {"lam": (1.0, 30.0, 3000.0)}
    model.fit(train, valid=valid)
    assert model.tuning is not None and len(model.tuning.trials) == 3
    best = max(model.tuning.trials, key=lambda t: t[1])
    assert model.lam == best[0]["lam"] and model.tuning.best["lam"] == model.lam


def test_als_is_seeded(data) -> None:
    train, _, _ = data
    a = ALS(factors=8, iterations=3, threads=1, seed=3).fit(train).score(np.arange(3))
    b = ALS(factors=8, iterations=3, threads=1, seed=3).fit(train).score(np.arange(3))
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_bad_use_raises_clear_errors(data) -> None:
    train, _, _ = data
    with pytest.raises(BaselineError, match="before fit"):
        EASE().score(np.array([0]))
    with pytest.raises(BaselineError, match="unknown user index 999"):
        MostPopular().fit(train).score(np.array([0, 999]))
    with pytest.raises(BaselineError, match="unknown baseline 'bpr'"):
        make_baseline("bpr")
    with pytest.raises(BaselineError, match="lambda must be > 0"):
        EASE(lam=0)
    empty = InteractionData(train.users, train.items, np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0))
    with pytest.raises(BaselineError, match="empty training set"):
        ItemKNN().fit(empty)
    with pytest.raises(BaselineError, match="max_items"):
        EASE(max_items=10).fit(train)
