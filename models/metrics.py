"""Offline metrics: full-ranking top-K over the whole catalog, and ranker (pointwise) metrics.

Why full ranking: sampled-negative metrics (rank the test item among 100 random ones) are
known to disagree with full ranking and to flatter weak models, so every number here ranks the
*whole* catalog for every test user, after removing what the user already interacted with in
training (and, for the test split, in validation), exactly as RecBole does for its published
tables. Definitions follow RecBole 1.2:

- ``recall@K``  = hits in top-K / |test items of the user|
- ``ndcg@K``    = DCG with binary relevance / ideal DCG over ``min(|test|, K)`` positions
- ``hit@K``     = 1 if any test item is in the top K
- ``mrr@K``     = 1 / rank of the first hit within the top K (0 if none)
- ``precision@K`` = hits / K

averaged over users with at least one test item. Beyond accuracy (recommended lists only):

- ``coverage@K`` = share of the catalog recommended to at least one user
- ``novelty@K``  = mean self-information ``-log2(pop(i) / n_users)`` of recommended items
  (``pop`` = training users who interacted with the item, floored at 1)
- ``arp@K``      = average recommendation popularity: mean training-interaction count of
  recommended items, averaged over users (Abdollahpouri et al.)
- ``gini@K``     = Gini index of how often each catalog item is recommended (0 = even)

An item scored ``-inf`` is "not a candidate" (a two-stage model that retrieved fewer than K
items): it never counts as recommended, so such a model is not credited for filler.

Computation is chunked over users so memory stays bounded (``max_chunk_bytes``) on any catalog,
and vectorised with ``np.argpartition``. Ranker metrics: :func:`auc`, :func:`log_loss`,
:func:`expected_calibration_error` (with :func:`reliability_bins` for plots).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np
import scipy.sparse as sp

from core.schemas import DataError

if TYPE_CHECKING:
    from models.base import InteractionData

DEFAULT_KS: tuple[int, ...] = (10, 20, 50)
ACCURACY = ("recall", "ndcg", "hit", "mrr", "precision")
BEYOND = ("coverage", "novelty", "arp", "gini")

ScoreFn = Callable[[np.ndarray], np.ndarray]


class MetricsError(DataError):
    """The inputs to a metric are inconsistent (shapes, unknown indices, empty test set)."""


# ---- top-K ranking ----------------------------------------------------------------------------
def _as_csr(matrix: sp.spmatrix | None, shape: tuple[int, int], what: str) -> sp.csr_matrix | None:
    if matrix is None:
        return None
    m = sp.csr_matrix(matrix)
    if m.shape != shape:
        raise MetricsError(f"{what} has shape {m.shape}, expected {shape} (users x items of the test matrix)")
    m.eliminate_zeros()
    return m


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores per row, best first (ties broken by lower index)."""
    n = scores.shape[1]
    k = min(k, n)
    if k <= 0:
        return np.empty((scores.shape[0], 0), dtype=np.int64)
    if k < n:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(n), scores.shape).copy()
    part_scores = np.take_along_axis(scores, part, axis=1)
    # lexsort: primary key descending score, secondary ascending index (deterministic ties)
    order = np.lexsort((part, -part_scores), axis=1)
    return np.take_along_axis(part, order, axis=1)


def _auto_chunk(n_items: int, max_chunk_bytes: int) -> int:
    # scores (8 B) + negated copy for argpartition (8 B) + argpartition indices (8 B) + dense test mask (1 B)
    per_row = max(1, n_items) * 25
    return max(1, int(max_chunk_bytes // per_row))


def ranking_metrics(
    score_fn: ScoreFn,
    *,
    test: sp.spmatrix,
    exclude: sp.spmatrix | None = None,
    popularity: np.ndarray | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    users: np.ndarray | None = None,
    max_chunk_bytes: int = 256 * 2**20,
    n_train_users: int | None = None,
) -> dict[str, float]:
    """Full-ranking top-K metrics of ``score_fn`` against a binary ``test`` user x item matrix.

    ``score_fn(user_idx) -> (len(user_idx), n_items)`` scores (a :class:`models.base.Recommender`'s
    ``score``). ``exclude`` (users x items) marks items never to recommend (training, and for
    test also validation interactions). ``popularity`` = training interaction count per item,
    needed for novelty/ARP (omitted -> only accuracy and coverage/gini). ``users`` restricts the
    evaluation to these rows (default: every user with a test item). Keys are ``name@K``.
    """
    test_csr = sp.csr_matrix(test)
    test_csr.eliminate_zeros()
    n_users, n_items = test_csr.shape
    excl = _as_csr(exclude, (n_users, n_items), "exclude")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] <= 0:
        raise MetricsError(f"ks must be positive integers, got {list(ks)}")
    if popularity is not None:
        popularity = np.asarray(popularity, dtype=np.float64)
        if popularity.shape != (n_items,):
            raise MetricsError(f"popularity has shape {popularity.shape}, expected ({n_items},)")
    n_test = np.diff(test_csr.indptr)
    if users is None:
        users = np.flatnonzero(n_test > 0)
    else:
        users = np.asarray(users, dtype=np.int64)
        if users.size and (users.min() < 0 or users.max() >= n_users):
            raise MetricsError(f"user index out of range [0, {n_users}) in users")
        users = users[n_test[users] > 0]
    if users.size == 0:
        raise MetricsError("empty test set: no user has a test interaction to evaluate")

    kmax = max(ks)
    discounts = 1.0 / np.log2(np.arange(2, kmax + 2))
    ideal_cum = np.cumsum(discounts)
    sums = {f"{m}@{k}": 0.0 for m in ("recall", "ndcg", "hit", "mrr", "precision", "arp") for k in ks}
    rec_counts = {k: np.zeros(n_items, dtype=np.int64) for k in ks}
    n_eval = 0
    if popularity is not None:
        n_pop_users = float(n_train_users or n_users)
        self_info = -np.log2(np.maximum(popularity, 1.0) / n_pop_users)
        novelty_sum = {k: 0.0 for k in ks}
    chunk = _auto_chunk(n_items, max_chunk_bytes)
    for start in range(0, len(users), chunk):
        rows = users[start : start + chunk]
        scores = np.array(score_fn(rows), dtype=np.float64, copy=True)
        if scores.shape != (len(rows), n_items):
            raise MetricsError(f"score() returned shape {scores.shape}, expected ({len(rows)}, {n_items})")
        if np.isnan(scores).any():
            raise MetricsError("score() returned NaN scores")
        if excl is not None:
            sub = excl[rows]
            r = np.repeat(np.arange(len(rows)), np.diff(sub.indptr))
            scores[r, sub.indices] = -np.inf
        top = top_k(scores, kmax)
        valid = np.take_along_axis(scores, top, axis=1) > -np.inf
        truth = test_csr[rows].toarray().astype(bool)
        hits = np.take_along_axis(truth, top, axis=1) & valid
        n_rel = n_test[rows].astype(np.float64)
        cum_hits = np.cumsum(hits, axis=1)
        dcg = np.cumsum(hits * discounts[: top.shape[1]], axis=1)
        first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1), kmax + 1)
        for k in ks:
            kk = min(k, top.shape[1])
            h = cum_hits[:, kk - 1] if kk else np.zeros(len(rows))
            sums[f"recall@{k}"] += float((h / n_rel).sum())
            sums[f"precision@{k}"] += float((h / k).sum())
            sums[f"hit@{k}"] += float((h > 0).sum())
            idcg = ideal_cum[np.minimum(n_rel, k).astype(np.int64) - 1]
            sums[f"ndcg@{k}"] += float(((dcg[:, kk - 1] if kk else 0.0) / idcg).sum())
            sums[f"mrr@{k}"] += float(np.where(first_hit < k, 1.0 / (first_hit + 1), 0.0).sum())
            v = valid[:, :kk]
            items_k = top[:, :kk][v]
            rec_counts[k] += np.bincount(items_k, minlength=n_items)
            if popularity is not None:
                n_valid = np.maximum(v.sum(axis=1), 1)
                pop_rows = np.where(v, popularity[top[:, :kk]], 0.0).sum(axis=1) / n_valid
                sums[f"arp@{k}"] += float(pop_rows.sum())
                novelty_sum[k] += float(self_info[items_k].sum())
        n_eval += len(rows)

    out: dict[str, float] = {}
    for k in ks:
        for m in ACCURACY:
            out[f"{m}@{k}"] = sums[f"{m}@{k}"] / n_eval
        counts = rec_counts[k]
        out[f"coverage@{k}"] = float((counts > 0).sum() / n_items)
        out[f"gini@{k}"] = gini_index(counts)
        if popularity is not None:
            total = counts.sum()
            out[f"novelty@{k}"] = novelty_sum[k] / total if total else 0.0
            out[f"arp@{k}"] = sums[f"arp@{k}"] / n_eval
    return out


def gini_index(counts: np.ndarray) -> float:
    """Gini index of non-negative counts (0 = perfectly even, -> 1 = all mass on one item)."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n = len(x)
    total = x.sum()
    if n == 0 or total == 0:
        return 0.0
    idx = np.arange(1, n + 1)
    return float(((2 * idx - n - 1) * x).sum() / (n * total))


def evaluate_recommender(
    model: object,
    *,
    train: "InteractionData",
    test: "InteractionData",
    valid: "InteractionData | None" = None,
    ks: Sequence[int] = DEFAULT_KS,
    max_chunk_bytes: int = 256 * 2**20,
) -> dict[str, float]:
    """Evaluate a fitted :class:`models.base.Recommender` on ``test``, excluding its training
    items (and ``valid``'s, when given: RecBole's test protocol). Use ``test=valid`` and no
    ``valid`` for validation during training. All sets must share the model's id maps."""
    check_same_space(train, test, what="test")
    exclude = train.csr()
    if valid is not None:
        check_same_space(train, valid, what="valid")
        exclude = (exclude + valid.csr()).tocsr()
        exclude.data[:] = 1.0
    if len(test) == 0:
        raise MetricsError("empty test set: no interactions to evaluate")
    pop = item_popularity(train)
    return ranking_metrics(model.score, test=test.csr(), exclude=exclude, popularity=pop, ks=ks,  # type: ignore[attr-defined]
                           max_chunk_bytes=max_chunk_bytes, n_train_users=int(np.unique(train.user_idx).size))


def item_popularity(train: "InteractionData") -> np.ndarray:
    """Distinct training users per item (duplicates collapse)."""
    return np.asarray(train.csr().sum(axis=0)).ravel().astype(np.float64)


def check_same_space(train: "InteractionData", other: "InteractionData", *, what: str) -> None:
    """Raise unless ``other`` uses the same user/item id maps as ``train`` and valid indices."""
    if other.users.ids != train.users.ids or other.items.ids != train.items.ids:
        raise MetricsError(f"{what} set uses different user/item id maps than train; encode it with train's maps "
                           "(InteractionData.from_frame(frame, users=train.users, items=train.items))")
    for name, idx, n in (("user", other.user_idx, train.n_users), ("item", other.item_idx, train.n_items)):
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            bad = int(idx[(idx < 0) | (idx >= n)][0])
            raise MetricsError(f"{what} set has unknown {name} index {bad} (valid range 0..{n - 1})")


# ---- pointwise ranker metrics -----------------------------------------------------------------
def _labels_scores(labels: Iterable[float], scores: Iterable[float], what: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise MetricsError(f"{what}: {y.size} labels but {s.size} scores")
    if y.size == 0:
        raise MetricsError(f"{what}: no examples")
    if not np.isin(y, (0.0, 1.0)).all():
        raise MetricsError(f"{what}: labels must be 0 or 1")
    if not np.isfinite(s).all():
        raise MetricsError(f"{what}: scores contain NaN or infinity")
    return y, s


def auc(labels: Iterable[float], scores: Iterable[float]) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) statistic; ties count one half."""
    from scipy.stats import rankdata

    y, s = _labels_scores(labels, scores, "auc")
    n_pos = y.sum()
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise MetricsError("auc: needs both positive and negative labels")
    ranks = rankdata(s)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def log_loss(labels: Iterable[float], probs: Iterable[float], *, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities (clipped to ``[eps, 1 - eps]``)."""
    y, p = _labels_scores(labels, probs, "log_loss")
    if (p < 0).any() or (p > 1).any():
        raise MetricsError("log_loss: probabilities must lie in [0, 1]")
    p = np.clip(p, eps, 1 - eps)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def reliability_bins(labels: Iterable[float], probs: Iterable[float], *, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Equal-width probability bins: ``count``, ``mean_prob`` and ``frac_pos`` per bin (for
    calibration plots; empty bins have count 0 and NaN means)."""
    y, p = _labels_scores(labels, probs, "calibration")
    if (p < 0).any() or (p > 1).any():
        raise MetricsError("calibration: probabilities must lie in [0, 1]")
    if n_bins < 1:
        raise MetricsError("calibration: n_bins must be >= 1")
    b = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(b, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.bincount(b, weights=p, minlength=n_bins) / count
        frac_pos = np.bincount(b, weights=y, minlength=n_bins) / count
    return {"edges": np.linspace(0, 1, n_bins + 1), "count": count, "mean_prob": mean_prob, "frac_pos": frac_pos}


def expected_calibration_error(labels: Iterable[float], probs: Iterable[float], *, n_bins: int = 10) -> float:
    """ECE: sum over equal-width bins of (bin share) x |mean predicted - observed positive rate|."""
    bins = reliability_bins(labels, probs, n_bins=n_bins)
    count = bins["count"]
    nz = count > 0
    gap = np.abs(bins["mean_prob"][nz] - bins["frac_pos"][nz])
    return float((count[nz] / count.sum() * gap).sum())


def ranker_metrics(labels: Iterable[float], probs: Iterable[float], *, n_bins: int = 10) -> dict[str, float]:
    """``auc``, ``log_loss`` and ``ece`` of a ranker's probabilities on labelled examples."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    return {"auc": auc(y, p), "log_loss": log_loss(y, p), "ece": expected_calibration_error(y, p, n_bins=n_bins)}
