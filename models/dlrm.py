"""DLRM ranking model on TorchRec: features, architecture, training wrapper, serving module.

The pieces are separate classes, as TorchRec's own ``dlrm.py`` keeps ``DLRM`` and ``DLRMTrain``
apart, so serving rebuilds a scorer from an artifact without any training code:

- :class:`RankingFeatures` turns (user, item, candidate-source features) rows into DLRM inputs:
  sparse ``user_id``, ``item_id`` (shared item table with the user's recent ``user_hist`` bag,
  so the interaction arch's dot products become item-to-history similarities), ``item_cats``;
  dense user/item statistics (counts, mean rating, popularity, age) plus the candidate-source
  scores the two-stage pipeline supplies. All gathers are vectorised numpy (CSR tables).
- :class:`DLRMRanker`: ``torchrec.models.dlrm.DLRM`` over a ``FusedEmbeddingBagCollection``
  (fbgemm TBE, row-wise Adagrad applied inside backward: ~4x the throughput of plain
  ``nn.EmbeddingBag`` on CPU) or, for comparison and inference, a plain ``EmbeddingBagCollection``.
- :class:`DLRMTrain`: BCE-with-logits loss around the ranker.
- :class:`DLRMScorer`: the serving module: plain (or int8-quantized) embeddings, the fast
  candidate path (user-side embeddings computed once per request, broadcast over candidates),
  and Platt calibration fitted on validation data.
- :func:`train_dlrm`: the seeded training loop with early stopping on validation AUC, a NaN
  guard, and calibration; used by ``pipelines/train_ranker.py`` and ``models/two_stage.py``.

torch / torchrec are imported inside functions so importing this module stays cheap.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd

from core.schemas import DataError
from models.base import IdMap, InteractionData
from models.kernels import grouped_interaction, ranker_dense_input, user_side_vectors

if TYPE_CHECKING:  # pragma: no cover
    import torch

SPARSE_FEATURES = ("user_id", "item_id", "user_hist", "item_cats")
USER_DENSE = ("user_log_count", "user_mean_rating")
ITEM_DENSE = ("item_log_count", "item_mean_rating", "item_pop_pct", "item_age_years")


class TrainingError(RuntimeError):
    """Training cannot produce a usable model (NaN loss, no signal); nothing is saved."""


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class DLRMConfig:
    """Everything needed to rebuild the architecture (saved with every artifact)."""

    n_users: int
    n_items: int
    n_categories: int
    extra_dense: tuple[str, ...] = ()
    embedding_dim: int = 64
    dense_arch: tuple[int, ...] = (128, 64)
    over_arch: tuple[int, ...] = (128, 64, 1)  # benchmarks/ranker_arch.py: no significant loss vs (256, 128, 1), 1.8-2.8x cheaper
    history_len: int = 50

    def __post_init__(self) -> None:
        self.extra_dense = tuple(self.extra_dense)
        self.dense_arch = tuple(int(x) for x in self.dense_arch)
        self.over_arch = tuple(int(x) for x in self.over_arch)
        if self.n_users < 1 or self.n_items < 1:
            raise ValueError(f"DLRM needs at least one user and one item (got {self.n_users} users, {self.n_items} items)")
        if self.dense_arch[-1] != self.embedding_dim:
            # DLRM's interaction arch dots the dense output with every embedding: dims must match.
            self.dense_arch = (*self.dense_arch[:-1], self.embedding_dim)
        if self.over_arch[-1] != 1:
            raise ValueError(f"over_arch must end with 1 output (a logit), got {self.over_arch}")

    @property
    def dense_names(self) -> tuple[str, ...]:
        return USER_DENSE + ITEM_DENSE + self.extra_dense

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DLRMConfig":
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------
def _csr_gather(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ``indices`` of CSR ``rows`` and their lengths, with no Python loop."""
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64), lengths.astype(np.int64)
    offs = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return indices[offs + np.arange(total)].astype(np.int64), lengths.astype(np.int64)


@dataclass
class RankingFeatures:
    """Per-user and per-item feature tables in index space (saved with the model).

    ``hist_*`` is a CSR of each user's most recent ``history_len`` items (random order when
    there are no timestamps); ``cat_*`` a CSR of item -> category indices. Row ``n`` of the
    user/item embedding tables is the out-of-vocabulary row, trained by id dropout."""

    users: IdMap
    items: IdMap
    categories: IdMap
    hist_indptr: np.ndarray
    hist_indices: np.ndarray
    cat_indptr: np.ndarray
    cat_indices: np.ndarray
    user_dense: np.ndarray  # (n_users + 1, len(USER_DENSE)); last row = unknown user
    item_dense: np.ndarray  # (n_items + 1, len(ITEM_DENSE)); last row = unknown item
    primary_category: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.primary_category is None:
            first = np.full(len(self.items), -1, dtype=np.int64)
            has = np.diff(self.cat_indptr) > 0
            first[has] = self.cat_indices[self.cat_indptr[:-1][has]]
            self.primary_category = first

    @classmethod
    def build(
        cls,
        history: InteractionData,
        *,
        items_frame: pd.DataFrame | None = None,
        history_len: int = 50,
        seed: int = 0,
        now: pd.Timestamp | None = None,
    ) -> "RankingFeatures":
        """Tables from the interactions the model may see (never the label interactions)."""
        if len(history) == 0:
            raise DataError("cannot build ranking features from an empty history")
        n_u, n_i = history.n_users, history.n_items
        u, i, v = history.user_idx, history.item_idx, history.values.astype(np.float64)
        # recent history: newest first when timestamps exist, else a seeded shuffle
        rng = np.random.default_rng(seed)
        key = -history.timestamps.astype(np.float64) if history.timestamps is not None else rng.random(len(u))
        order = np.lexsort((key, u))
        su, si = u[order], i[order]
        counts = np.bincount(su, minlength=n_u)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        rank = np.arange(len(su)) - np.repeat(starts, counts)
        keep = rank < history_len
        kept_counts = np.bincount(su[keep], minlength=n_u)
        hist_indptr = np.concatenate(([0], np.cumsum(kept_counts))).astype(np.int64)
        hist_indices = si[keep].astype(np.int64)

        ucnt = np.bincount(u, minlength=n_u).astype(np.float64)
        icnt = np.bincount(i, minlength=n_i).astype(np.float64)
        global_mean = float(v.mean())
        umean = np.where(ucnt > 0, np.bincount(u, weights=v, minlength=n_u) / np.maximum(ucnt, 1), global_mean)
        imean_raw = np.bincount(i, weights=v, minlength=n_i)
        imean = (imean_raw + 5 * global_mean) / (icnt + 5)  # shrunk towards the global mean
        pop_pct = (np.argsort(np.argsort(icnt, kind="stable"), kind="stable") / max(n_i - 1, 1)).astype(np.float64)

        cats_list: list[list[str]] = [[] for _ in range(n_i)]
        age = np.zeros(n_i)
        if items_frame is not None and len(items_frame):
            frame = items_frame.drop_duplicates("item_id").set_index(items_frame.drop_duplicates("item_id")["item_id"].astype(str))
            idx = history.items.encode(frame.index, unknown="minus_one")
            ok = idx >= 0
            if "categories" in frame.columns:
                for row, cats in zip(idx[ok], frame["categories"].to_numpy()[ok]):
                    cats_list[row] = [str(c) for c in (cats if cats is not None else []) if str(c)]
            if "created_at" in frame.columns:
                created = pd.Series(pd.to_datetime(frame["created_at"], utc=True).to_numpy()[ok])
                ref = pd.Timestamp(now) if now is not None else created.max()
                years = ((ref - created).dt.total_seconds() / (365.25 * 86400)).to_numpy(dtype=np.float64) \
                    if created.notna().any() else np.full(len(created), np.nan)
                fill = np.nanmedian(years) if np.isfinite(years).any() else 0.0
                age[idx[ok]] = np.clip(np.nan_to_num(years, nan=fill), 0, None)
        categories = IdMap.from_values(c for cs in cats_list for c in cs)
        cat_idx = categories.index
        cat_indptr = np.concatenate(([0], np.cumsum([len(cs) for cs in cats_list]))).astype(np.int64)
        cat_indices = np.array([cat_idx[c] for cs in cats_list for c in cs], dtype=np.int64)

        user_dense = np.column_stack([np.log1p(ucnt), umean - global_mean])
        item_dense = np.column_stack([np.log1p(icnt), imean - global_mean, pop_pct, np.log1p(age)])
        user_dense = np.vstack([user_dense, [0.0, 0.0]]).astype(np.float32)
        item_dense = np.vstack([item_dense, [0.0, 0.0, 0.0, float(np.log1p(np.median(age)))]]).astype(np.float32)
        return cls(history.users, history.items, categories, hist_indptr, hist_indices, cat_indptr, cat_indices,
                   user_dense, item_dense)

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def with_history(self, history: InteractionData, *, history_len: int = 50, seed: int = 0) -> "RankingFeatures":
        """Same item tables, users' history bags and stats recomputed from ``history`` (e.g. train + valid at
        test time). Users and items must be in this object's index space."""
        if history.users != self.users or history.items != self.items:
            raise DataError("with_history: the history must use the same user and item id maps")
        fresh = RankingFeatures.build(history, history_len=history_len, seed=seed)
        return RankingFeatures(self.users, self.items, self.categories, fresh.hist_indptr, fresh.hist_indices,
                               self.cat_indptr, self.cat_indices, fresh.user_dense, self.item_dense,
                               self.primary_category)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in ("hist_indptr", "hist_indices", "cat_indptr", "cat_indices",
                                              "user_dense", "item_dense", "primary_category")}

    def meta(self) -> dict[str, Any]:
        return {"users": self.users.to_list(), "items": self.items.to_list(), "categories": self.categories.to_list()}

    @classmethod
    def from_parts(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> "RankingFeatures":
        return cls(IdMap(tuple(meta["users"])), IdMap(tuple(meta["items"])), IdMap(tuple(meta["categories"])),
                   **{k: np.asarray(arrays[k]) for k in ("hist_indptr", "hist_indices", "cat_indptr", "cat_indices",
                                                         "user_dense", "item_dense", "primary_category")})

    # -- batches -----------------------------------------------------------------------------
    def check_indices(self, user_idx: np.ndarray, item_idx: np.ndarray) -> None:
        """Indices must be ``-1`` (unknown) or inside the tables; anything else is a caller bug."""
        for name, arr, n in (("user", user_idx, self.n_users), ("item", item_idx, self.n_items)):
            if len(arr) and (arr.min() < -1 or arr.max() >= n):
                raise DataError(f"{name} index out of range [-1, {n}): min {arr.min()}, max {arr.max()}")

    def dense(self, user_idx: np.ndarray, item_idx: np.ndarray, extra: np.ndarray | None) -> np.ndarray:
        u = np.where(user_idx < 0, self.n_users, user_idx)
        i = np.where(item_idx < 0, self.n_items, item_idx)
        parts = [self.user_dense[u], self.item_dense[i]]
        if extra is not None and extra.shape[1]:
            parts.append(np.asarray(extra, dtype=np.float32))
        return np.concatenate(parts, axis=1).astype(np.float32, copy=False)

    def user_parts(self, user_idx: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The user-side sparse features (``user_id``, ``user_hist``) as ``{feature: (values, lengths)}``;
        unknown users map to the OOV row and have no history."""
        u_known = user_idx >= 0
        hist_v, hist_l = _csr_gather(self.hist_indptr, self.hist_indices, np.where(u_known, user_idx, 0))
        if not u_known.all():  # unknown users have no history
            keep = np.repeat(u_known, hist_l)
            hist_v, hist_l = hist_v[keep], np.where(u_known, hist_l, 0)
        return {"user_id": (np.where(u_known, user_idx, self.n_users).astype(np.int64), np.ones(len(user_idx), np.int64)),
                "user_hist": (hist_v, hist_l)}

    def sparse_parts(self, user_idx: np.ndarray, item_idx: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{feature: (values, lengths)}`` in index space; unknown ids map to the OOV row."""
        i_known = item_idx >= 0
        i = np.where(i_known, item_idx, self.n_items)
        cat_v, cat_l = _csr_gather(self.cat_indptr, self.cat_indices, np.where(i_known, item_idx, 0))
        if not i_known.all():
            keep = np.repeat(i_known, cat_l)
            cat_v, cat_l = cat_v[keep], np.where(i_known, cat_l, 0)
        return {**self.user_parts(user_idx), "item_id": (i.astype(np.int64), np.ones(len(item_idx), dtype=np.int64)),
                "item_cats": (cat_v, cat_l)}

    def kjt(self, user_idx: np.ndarray, item_idx: np.ndarray):
        """A ``KeyedJaggedTensor`` with keys in :data:`SPARSE_FEATURES` order."""
        import torch
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        parts = self.sparse_parts(user_idx, item_idx)
        values = np.concatenate([parts[k][0] for k in SPARSE_FEATURES])
        lengths = np.concatenate([parts[k][1] for k in SPARSE_FEATURES])
        return KeyedJaggedTensor.from_lengths_sync(keys=list(SPARSE_FEATURES), values=torch.from_numpy(values),
                                                   lengths=torch.from_numpy(lengths))


@dataclass
class RankingExamples:
    """Labelled (user, item) rows in index space with the candidate-source features as extra dense columns."""

    user_idx: np.ndarray
    item_idx: np.ndarray
    labels: np.ndarray
    extra: np.ndarray  # (n, len(extra_names)) float32
    extra_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.user_idx = np.asarray(self.user_idx, dtype=np.int64)
        self.item_idx = np.asarray(self.item_idx, dtype=np.int64)
        self.labels = np.asarray(self.labels, dtype=np.float32)
        self.extra = np.asarray(self.extra, dtype=np.float32).reshape(len(self.user_idx), len(self.extra_names))
        if not (len(self.user_idx) == len(self.item_idx) == len(self.labels)):
            raise ValueError("user_idx, item_idx and labels must have the same length")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows: np.ndarray) -> "RankingExamples":
        return RankingExamples(self.user_idx[rows], self.item_idx[rows], self.labels[rows], self.extra[rows],
                               self.extra_names)

    def check(self, what: str) -> None:
        """Reject sets a ranker cannot learn from, naming what is wrong."""
        if len(self) == 0:
            raise DataError(f"{what}: no ranking examples")
        n_users = len(np.unique(self.user_idx))
        if n_users < 2:
            raise DataError(f"{what}: ranking examples cover {n_users} user(s); need at least 2 to learn anything general")
        pos = int(self.labels.sum())
        if pos == 0 or pos == len(self):
            raise DataError(f"{what}: labels are all {'negative' if pos == 0 else 'positive'} ({len(self)} rows); "
                            "BCE needs both classes")
        if not np.isfinite(self.extra).all():
            raise DataError(f"{what}: non-finite values in candidate-source features {self.extra_names}")


def examples_from_ratings(
    labelled: InteractionData,
    *,
    positive_min_rating: float | None = 4.0,
    negatives_per_positive: int = 4,
    exclude: "Any | None" = None,
    seed: int = 0,
) -> RankingExamples:
    """Engagement labels without candidate sources: rating >= ``positive_min_rating`` is positive
    (``None``: every interaction is), lower ratings are explicit negatives, plus uniformly
    sampled unseen items as negatives (``exclude``: a CSR of items to avoid, e.g. history)."""
    rng = np.random.default_rng(seed)
    pos = labelled.values >= positive_min_rating if positive_min_rating is not None else np.ones(len(labelled), bool)
    n_neg = int(pos.sum()) * negatives_per_positive
    su = rng.choice(labelled.user_idx, size=n_neg) if n_neg else np.empty(0, np.int64)
    si = rng.integers(0, labelled.n_items, size=n_neg)
    seen = labelled.csr()
    if exclude is not None:
        seen = seen + exclude
    ok = np.asarray(seen[su, si]).ravel() == 0 if n_neg else np.empty(0, bool)
    users = np.concatenate([labelled.user_idx, su[ok]])
    items = np.concatenate([labelled.item_idx, si[ok]])
    labels = np.concatenate([pos.astype(np.float32), np.zeros(int(ok.sum()), np.float32)])
    return RankingExamples(users, items, labels, np.zeros((len(users), 0), np.float32), ())


# ---------------------------------------------------------------------------------------------
# architecture, training wrapper
# ---------------------------------------------------------------------------------------------
def _tables(config: DLRMConfig):
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

    d = config.embedding_dim
    # Table names avoid ModuleDict attribute names ("items" clashes with ModuleDict.items).
    return [
        EmbeddingBagConfig(name="t_user", embedding_dim=d, num_embeddings=config.n_users + 1, feature_names=["user_id"]),
        EmbeddingBagConfig(name="t_item", embedding_dim=d, num_embeddings=config.n_items + 1,
                           feature_names=["item_id", "user_hist"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="t_cat", embedding_dim=d, num_embeddings=max(config.n_categories, 1),
                           feature_names=["item_cats"], pooling=PoolingType.MEAN),
    ]


def build_ranker(config: DLRMConfig, *, embeddings: str = "fused", embedding_lr: float = 0.05, seed: int = 0):
    """A :class:`DLRMRanker`. ``embeddings``: ``fused`` (fbgemm TBE, row-wise Adagrad applied in
    backward) or ``plain`` (``nn.EmbeddingBag`` via TorchRec's ``EmbeddingBagCollection``)."""
    import torch

    torch.manual_seed(seed)
    return _classes()["DLRMRanker"](config, embeddings=embeddings, embedding_lr=embedding_lr)


_CLASSES: dict[str, type] = {}


def _classes() -> dict[str, type]:
    """Define the torch module classes once, on first use (keeps torch out of import time)."""
    if _CLASSES:
        return _CLASSES
    import torch
    from torch import nn
    from torchrec.models.dlrm import DLRM

    class DLRMRanker(nn.Module):
        """Architecture only: ``torchrec.models.dlrm.DLRM`` (dense arch, sparse arch, interaction, over arch)."""

        def __init__(self, config: DLRMConfig, *, embeddings: str = "fused", embedding_lr: float = 0.05) -> None:
            super().__init__()
            self.config = config
            self.embeddings = embeddings
            tables = _tables(config)
            if embeddings == "fused":
                from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
                from torchrec.optim import RowWiseAdagrad

                ebc = FusedEmbeddingBagCollection(tables=tables, optimizer_type=RowWiseAdagrad,
                                                  optimizer_kwargs={"lr": embedding_lr, "eps": 1e-8})
            elif embeddings == "plain":
                from torchrec.modules.embedding_modules import EmbeddingBagCollection

                ebc = EmbeddingBagCollection(tables=tables)
                for bag in ebc.embedding_bags.values():  # same init scale as TBE
                    nn.init.uniform_(bag.weight, -math.sqrt(1 / bag.weight.shape[0]), math.sqrt(1 / bag.weight.shape[0]))
            else:
                raise ValueError(f"embeddings must be 'fused' or 'plain', not {embeddings!r}")
            self.dlrm = DLRM(embedding_bag_collection=ebc, dense_in_features=len(config.dense_names),
                             dense_arch_layer_sizes=list(config.dense_arch), over_arch_layer_sizes=list(config.over_arch))

        def forward(self, dense: torch.Tensor, sparse) -> torch.Tensor:
            return self.dlrm(dense, sparse).squeeze(-1)

        def dense_parameters(self) -> list[nn.Parameter]:
            """Parameters the dense optimizer owns (fused embedding tables update themselves in backward)."""
            if self.embeddings != "fused":
                return list(self.parameters())
            return [p for n, p in self.named_parameters() if ".embedding_bag_collection." not in n]

        def plain_state_dict(self) -> dict[str, torch.Tensor]:
            """Weights under the plain ``EmbeddingBagCollection`` names (fused and plain share the layout)."""
            return {k: v.detach().clone() for k, v in self.state_dict().items()}

    class DLRMTrain(nn.Module):
        """Training wrapper: BCE-with-logits on engagement labels (optionally weighted)."""

        def __init__(self, ranker: DLRMRanker) -> None:
            super().__init__()
            self.ranker = ranker
            self.loss_fn = nn.BCEWithLogitsLoss()

        def forward(self, dense: torch.Tensor, sparse, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.ranker(dense, sparse)
            return self.loss_fn(logits, labels), logits.detach()

    _CLASSES.update(DLRMRanker=DLRMRanker, DLRMTrain=DLRMTrain)
    return _CLASSES


def DLRMTrainWrapper(ranker):  # noqa: N802 - reads like a class at call sites
    """Wrap a :class:`DLRMRanker` in the BCE training module."""
    return _classes()["DLRMTrain"](ranker)


# ---------------------------------------------------------------------------------------------
# metrics & calibration
# ---------------------------------------------------------------------------------------------
def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC with tie handling (average ranks)."""
    labels = np.asarray(labels) > 0.5
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(np.asarray(scores, dtype=np.float64)).rank(method="average").to_numpy()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, dtype=np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def calibration_table(labels: np.ndarray, probs: np.ndarray, *, bins: int = 15) -> pd.DataFrame:
    """Equal-width reliability bins: count, mean predicted, observed rate."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 0, 1)
    b = np.minimum((p * bins).astype(int), bins - 1)
    df = pd.DataFrame({"bin": b, "p": p, "y": np.asarray(labels, dtype=np.float64)})
    g = df.groupby("bin").agg(count=("y", "size"), mean_pred=("p", "mean"), observed=("y", "mean")).reset_index()
    return g


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, *, bins: int = 15) -> float:
    t = calibration_table(labels, probs, bins=bins)
    if t.empty:
        return float("nan")
    return float((t["count"] * (t["mean_pred"] - t["observed"]).abs()).sum() / t["count"].sum())


def fit_platt(logits: np.ndarray, labels: np.ndarray, *, iters: int = 200) -> tuple[float, float]:
    """Platt scaling ``sigmoid(a * logit + b)`` by Newton's method on held-out data (why: negatives are
    subsampled and BCE logits drift, so raw sigmoid outputs are not probabilities)."""
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    a, b = 1.0, 0.0
    for _ in range(iters):
        z = np.clip(a * x + b, -40, 40)
        p = 1 / (1 + np.exp(-z))
        w = p * (1 - p) + 1e-9
        g = np.array([((p - y) * x).sum(), (p - y).sum()])
        h = np.array([[(w * x * x).sum(), (w * x).sum()], [(w * x).sum(), w.sum()]]) + 1e-6 * np.eye(2)
        step = np.linalg.solve(h, g)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-8:
            break
    if not (np.isfinite(a) and np.isfinite(b)):
        return 1.0, 0.0
    return float(a), float(b)


# ---------------------------------------------------------------------------------------------
# serving module
# ---------------------------------------------------------------------------------------------
def _check_csr(what: str, indptr: np.ndarray, indices: np.ndarray, n_rows: int, n_cols: int) -> None:
    """A CSR structure read by compiled kernels (which do not check bounds) must fit its tables: a
    corrupt or mismatched artifact fails here, at load, not as a wild memory access per request."""
    if len(indptr) != n_rows + 1 or (n_rows and (indptr[0] != 0 or indptr[-1] != len(indices) or (np.diff(indptr) < 0).any())):
        raise DataError(f"{what}: indptr does not describe {n_rows} rows of {len(indices)} entries")
    if len(indices) and (indices.min() < 0 or indices.max() >= n_cols):
        raise DataError(f"{what}: entries outside [0, {n_cols}): min {indices.min()}, max {indices.max()}")


class DLRMScorer:
    """Inference: rebuilds the DLRM with plain embeddings from weights + config, no training code.

    :meth:`score` scores arbitrary (user, item) rows; :meth:`score_candidates` is the request
    path: each request's user-side embeddings (``user_id``, ``user_hist``) are looked up once and
    broadcast over its candidates, and all requests go through one batched forward."""

    def __init__(self, config: DLRMConfig, features: RankingFeatures, state_dict: dict[str, Any], *,
                 dense_mean: np.ndarray, dense_std: np.ndarray, calibration: tuple[float, float] = (1.0, 0.0),
                 quantize: bool = False, precision: str = "fp32") -> None:
        import torch

        self.config = config
        self.features = features
        self.dense_mean = np.asarray(dense_mean, dtype=np.float32)
        self.dense_std = np.asarray(dense_std, dtype=np.float32)
        self.calibration = (float(calibration[0]), float(calibration[1]))
        self.model = build_ranker(config, embeddings="plain")
        self.model.load_state_dict({k: torch.as_tensor(v) for k, v in state_dict.items()})
        self.model.eval()
        self.quantized = False
        dlrm = self.model.dlrm
        bags = dlrm.sparse_arch.embedding_bag_collection.embedding_bags
        self._weights = {name: bags[name].weight.detach() for name in ("t_user", "t_item", "t_cat")}
        self._item_cats_table: "torch.Tensor | None" = None
        self._item_side_table: "tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None" = None
        self._item_side_np: tuple | None = None
        self._grouped_columns = self._grouped_layout()
        self.set_precision(precision)
        # normalised dense tables (the same float32 arithmetic as normalising per row, done once)
        n_u, n_i = len(USER_DENSE), len(ITEM_DENSE)
        self._user_dense_n = np.ascontiguousarray(
            (features.user_dense - self.dense_mean[:n_u]) / self.dense_std[:n_u], dtype=np.float32)
        self._item_dense_n = np.ascontiguousarray(
            (features.item_dense - self.dense_mean[n_u:n_u + n_i]) / self.dense_std[n_u:n_u + n_i], dtype=np.float32)
        self._extra_mean = np.ascontiguousarray(self.dense_mean[n_u + n_i:])
        self._extra_std = np.ascontiguousarray(self.dense_std[n_u + n_i:])
        # the fp32 tables as numpy views for the compiled request-path kernels
        self._user_table = self._weights["t_user"].numpy()
        self._item_table = self._weights["t_item"].numpy()
        self._hist_indptr = np.asarray(features.hist_indptr, dtype=np.int64)
        self._hist_indices = np.asarray(features.hist_indices, dtype=np.int64)
        _check_csr("ranker user histories", self._hist_indptr, self._hist_indices, features.n_users,
                   len(self._item_table))
        if len(features.primary_category) != features.n_items:
            raise DataError(f"ranker features: {len(features.primary_category)} primary categories for "
                            f"{features.n_items} items")
        if quantize:
            self.quantize()

    def set_precision(self, precision: str) -> "DLRMScorer":
        """Compute precision of the MLPs on the request path: ``fp32`` (exact), ``bf16`` or ``auto``
        (bf16 where the CPU has native bf16 matrix units; see :mod:`models.inference`)."""
        import torch
        from torch import nn

        from models.inference import LinearStack

        dlrm = self.model.dlrm
        dense_lin = [m for m in dlrm.dense_arch.modules() if isinstance(m, nn.Linear)]
        over_lin = [m for m in dlrm.over_arch.modules() if isinstance(m, nn.Linear)]
        # TorchRec's DenseArch applies ReLU after every layer, OverArch after all but the last
        over_relu = [True] * (len(over_lin) - 1) + [False]
        self._dense_mlp = LinearStack(dense_lin, [True] * len(dense_lin), precision=precision)
        self._over_mlp = LinearStack(over_lin, over_relu, precision=precision)
        self._over_mlp_grouped = None
        if self._grouped_columns is not None:  # the same first layer, columns in the grouped input's order
            first = nn.utils.skip_init(nn.Linear, over_lin[0].in_features, over_lin[0].out_features,
                                       bias=over_lin[0].bias is not None)  # no random init: overwritten below
            with torch.no_grad():
                first.weight.copy_(over_lin[0].weight[:, self._grouped_columns])
                if first.bias is not None:
                    first.bias.copy_(over_lin[0].bias)
            self._over_mlp_grouped = LinearStack([first, *over_lin[1:]], over_relu, precision=precision)
        self.precision = self._over_mlp.precision
        return self

    @property
    def mlp_backends(self) -> dict[str, str]:
        """The GEMM each request-path MLP runs on (``models.inference.LinearStack.backend``)."""
        return {"dense": self._dense_mlp.backend, "over": (self._over_mlp_grouped or self._over_mlp).backend}

    # -- int8 -------------------------------------------------------------------------------
    def quantize(self) -> "DLRMScorer":
        """Row-wise int8 embeddings (fbgemm fused 8-bit rows: scale + bias per row): ~4x smaller tables."""
        import torch

        self._q = {n: torch.ops.fbgemm.FloatToFused8BitRowwiseQuantized(w.contiguous()) for n, w in self._weights.items()}
        self.quantized = True
        self._item_cats_table = None
        self._item_side_table = None
        self._item_side_np = None
        return self

    def _item_cats(self) -> "torch.Tensor":
        """Each item's mean-pooled category embedding, ``(n_items + 1, D)`` (last row: unknown item,
        no categories -> zeros), pooled once: item categories only change with a new model."""
        if self._item_cats_table is None:
            import torch

            n = self.features.n_items
            values, lengths = _csr_gather(self.features.cat_indptr, self.features.cat_indices, np.arange(n))
            with torch.inference_mode():
                pooled = self._bag_mean("t_cat", values, lengths)
                self._item_cats_table = torch.cat([pooled, torch.zeros(1, pooled.shape[1])])
        return self._item_cats_table

    #: the request path's user-side (once per request) and item-side (once per item) vectors
    _USER_SIDE = ("user_id", "user_hist")
    _ITEM_SIDE = ("item_id", "item_cats")

    def _grouped_layout(self) -> "list[int] | None":
        """Columns of the over arch's input in the request path's order: the dense output, then the
        dots (user x item) user-major, (dense x user), (dense x item), (item_id x item_cats),
        (user_id x user_hist). None if the model has other sparse features (then the request path
        dots each pair per row in TorchRec's order)."""
        dlrm = self.model.dlrm
        names = ["dense", *dlrm.sparse_arch.sparse_feature_names]
        if sorted(names[1:]) != sorted(self._USER_SIDE + self._ITEM_SIDE):
            return None
        pair = {frozenset((names[i], names[j])): p for p, (i, j) in enumerate(dlrm.inter_arch.triu_indices.t().tolist())}
        order = [(u, i) for u in self._USER_SIDE for i in self._ITEM_SIDE]
        order += [("dense", u) for u in self._USER_SIDE] + [("dense", i) for i in self._ITEM_SIDE]
        order += [self._ITEM_SIDE, self._USER_SIDE]
        d = self.config.embedding_dim
        return list(range(d)) + [d + pair[frozenset(x)] for x in order]

    def _item_side(self) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
        """Per item (``n_items + 1`` rows, the last for unknown items): its ``item_id`` embedding, its
        pooled categories, and their dot product (the item_id x item_cats interaction). Nothing
        about them depends on the request, so they are computed once per model."""
        if self._item_side_table is None:
            import torch

            with torch.inference_mode():
                # the item table itself has the OOV row last (a full dequantized copy only when int8)
                ids = self._rows("t_item", torch.arange(self.features.n_items + 1)) if self.quantized \
                    else self._weights["t_item"]
                cats = self._item_cats()
                self._item_side_table = (ids, cats, (ids * cats).sum(dim=1))
        return self._item_side_table

    def _rows(self, table: str, idx: "torch.Tensor") -> "torch.Tensor":
        import torch

        if self.quantized:
            return torch.ops.fbgemm.Fused8BitRowwiseQuantizedToFloat(self._q[table][idx])
        return self._weights[table][idx]

    def _bag_mean(self, table: str, values: np.ndarray, lengths: np.ndarray) -> "torch.Tensor":
        """Mean-pooled bags (empty bag -> zeros) with torch's fused ``embedding_bag``."""
        import torch
        import torch.nn.functional as F

        offsets = torch.from_numpy(np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64))
        idx = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
        if self.quantized:  # dequantize only the rows used, then pool them
            rows = self._rows(table, idx)
            return F.embedding_bag(torch.arange(len(values)), rows, offsets, mode="mean")
        return F.embedding_bag(idx, self._weights[table], offsets, mode="mean")

    def _normalise(self, dense: np.ndarray) -> np.ndarray:
        return (dense - self.dense_mean) / self.dense_std

    # -- scoring ----------------------------------------------------------------------------
    def logits(self, user_idx: np.ndarray, item_idx: np.ndarray, extra: np.ndarray | None = None, *,
               request_of_row: np.ndarray | None = None, request_users: np.ndarray | None = None) -> np.ndarray:
        """Raw logits: TorchRec's DLRM forward (checked against it by :meth:`reference_logits`), laid
        out for serving. With ``request_users`` (one user per request) and ``request_of_row`` (the
        request of each row), user-side embeddings are computed once per request and the whole
        interaction is one compiled pass (:func:`models.kernels.grouped_interaction`); item-side
        category bags and the dense normalisation come from tables built once per model; the MLPs
        run in :attr:`precision` through :class:`models.inference.LinearStack`."""
        import torch

        user_idx = np.ascontiguousarray(user_idx, dtype=np.int64)
        item_idx = np.ascontiguousarray(item_idx, dtype=np.int64)
        feats = self.features
        if user_idx.shape != item_idx.shape or user_idx.ndim != 1:
            raise ValueError(f"user_idx and item_idx must be 1-d and equally long, got {user_idx.shape} and {item_idx.shape}")
        feats.check_indices(user_idx, item_idx)
        extra = self._check_extra(extra, len(item_idx))
        if request_users is None:
            request_users, request_of_row = user_idx, None
        req_u = np.ascontiguousarray(request_users, dtype=np.int64)
        if request_of_row is not None:  # the compiled kernels index with these unchecked
            request_of_row = np.ascontiguousarray(request_of_row, dtype=np.int64)
            feats.check_indices(req_u, np.zeros(0, np.int64))
            if request_of_row.shape != item_idx.shape or (len(request_of_row) and (
                    request_of_row.min() < 0 or request_of_row.max() >= len(req_u))):
                raise ValueError(f"request_of_row must give each of the {len(item_idx)} rows a request in "
                                 f"[0, {len(req_u)})")
        dense = ranker_dense_input(self._user_dense_n, self._item_dense_n, np.ascontiguousarray(extra),
                                   self._extra_mean, self._extra_std, user_idx, item_idx, feats.n_users, feats.n_items)
        i_rows = np.where(item_idx < 0, feats.n_items, item_idx)
        with torch.inference_mode():
            dense_emb = self._dense_mlp(torch.from_numpy(dense))
            if request_of_row is not None and self._over_mlp_grouped is not None:
                uid, uh = self._user_side(req_u)
                ids, cats, item_dots = self._item_side_arrays()
                x = grouped_interaction(dense_emb.numpy(), request_of_row, i_rows, uid, uh, ids, cats, item_dots)
                return self._over_mlp_grouped(torch.from_numpy(x)).squeeze(-1).numpy()
            parts_u = feats.user_parts(req_u)
            emb = {
                "user_id": self._rows("t_user", torch.from_numpy(parts_u["user_id"][0])),
                "user_hist": self._bag_mean("t_item", *parts_u["user_hist"]),
                "item_id": self._rows("t_item", torch.from_numpy(i_rows)),
                "item_cats": self._item_cats()[torch.from_numpy(i_rows)],
            }
            if request_of_row is not None:
                row_req = torch.from_numpy(np.asarray(request_of_row, dtype=np.int64))
                emb["user_id"] = emb["user_id"][row_req]
                emb["user_hist"] = emb["user_hist"][row_req]
            return self._over_mlp(self._interact(dense_emb, emb)).squeeze(-1).numpy()

    def _user_side(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(user_id, user_hist)`` vectors of each request's user, ``(B, D)`` float32 each: one compiled
        pass over the fp32 tables, or torch's dequantize + ``embedding_bag`` for int8 tables."""
        feats = self.features
        if not self.quantized:
            return user_side_vectors(self._user_table, self._item_table, users, feats.n_users, self._hist_indptr,
                                     self._hist_indices)
        import torch

        parts_u = feats.user_parts(users)
        return (self._rows("t_user", torch.from_numpy(parts_u["user_id"][0])).numpy(),
                self._bag_mean("t_item", *parts_u["user_hist"]).numpy())

    def _item_side_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`_item_side` as contiguous float32 numpy arrays (views, made once per table build)."""
        if self._item_side_np is None:  # reset with the tables (quantize)
            self._item_side_np = tuple(np.ascontiguousarray(t.numpy(), dtype=np.float32) for t in self._item_side())
        return self._item_side_np

    def _interact(self, dense_emb: "torch.Tensor", emb: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        """TorchRec's ``InteractionArch`` output, ``[dense, dot(v_i, v_j) for i < j]`` over (dense,
        *sparse features in the model's order)``, as one elementwise product-sum per pair: the
        library's batched ``bmm`` of 5x5 Gram matrices is overhead-bound at hundreds of thousands
        of rows (same numbers up to float summation order; checked by the fast-path test)."""
        import torch

        dlrm = self.model.dlrm
        vectors = [dense_emb] + [emb[name] for name in dlrm.sparse_arch.sparse_feature_names]
        tri = dlrm.inter_arch.triu_indices
        d = dense_emb.shape[1]
        out = torch.empty(dense_emb.shape[0], d + tri.shape[1])
        out[:, :d] = dense_emb
        for p, (i, j) in enumerate(tri.t().tolist()):
            out[:, d + p] = (vectors[i] * vectors[j]).sum(dim=1)
        return out

    def score(self, user_idx: np.ndarray, item_idx: np.ndarray, extra: np.ndarray | None = None, **kw: Any) -> np.ndarray:
        """Calibrated engagement probabilities."""
        a, b = self.calibration
        z = np.clip(a * self.logits(user_idx, item_idx, extra, **kw) + b, -40, 40)
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)

    def reference_logits(self, user_idx: np.ndarray, item_idx: np.ndarray, extra: np.ndarray | None = None) -> np.ndarray:
        """Through TorchRec's own ``DLRM.forward`` (KJT path); used to check the fast path."""
        import torch

        extra = self._check_extra(extra, len(item_idx))
        dense = torch.from_numpy(self._normalise(self.features.dense(user_idx, item_idx, extra)))
        with torch.inference_mode():
            return self.model(dense, self.features.kjt(np.asarray(user_idx), np.asarray(item_idx))).numpy()

    def _check_extra(self, extra: np.ndarray | None, n: int) -> np.ndarray:
        k = len(self.config.extra_dense)
        if extra is None:
            if k:
                raise ValueError(f"this ranker needs {k} candidate-source features {self.config.extra_dense}")
            return np.zeros((n, 0), np.float32)
        extra = np.asarray(extra, dtype=np.float32)
        if extra.shape != (n, k):
            raise ValueError(f"extra features must have shape ({n}, {k}) for {self.config.extra_dense}, got {extra.shape}")
        return extra

    # -- persistence (models.artifacts) ---------------------------------------------------
    def to_artifact(self, *, metadata: dict[str, Any] | None = None, feature_service_version: str | None = None):
        """A self-describing :class:`models.artifacts.Artifact` (kind ``dlrm``): typed config,
        weights, id maps, feature tables, normalisation and calibration; no training code."""
        from models.artifacts import Artifact

        cfg = DLRMArtifactConfig(**self.config.to_dict(), calibration=list(self.calibration),
                                 categories=self.features.categories.to_list(),
                                 sparse_features=list(SPARSE_FEATURES), dense_features=list(self.config.dense_names))
        arrays = {f"feat_{k}": v for k, v in self.features.arrays().items()}
        arrays.update(dense_mean=self.dense_mean, dense_std=self.dense_std)
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return Artifact(kind="dlrm", config=cfg, state_dict=state, users=self.features.users, items=self.features.items,
                        arrays=arrays, feature_service_version=feature_service_version, metadata=dict(metadata or {}))

    @classmethod
    def from_artifact(cls, artifact, *, quantize: bool = False, precision: str = "fp32") -> "DLRMScorer":
        if artifact.kind != "dlrm":
            raise DataError(f"not a DLRM ranker artifact (kind={artifact.kind!r})")
        cfg = artifact.typed_config()
        assert isinstance(cfg, DLRMArtifactConfig)
        if artifact.users is None or artifact.items is None:
            raise DataError("DLRM artifact without user/item id maps")
        arrays = artifact.arrays
        feats = RankingFeatures.from_parts(
            {"users": artifact.users.to_list(), "items": artifact.items.to_list(), "categories": cfg.categories},
            {k[len("feat_"):]: v for k, v in arrays.items() if k.startswith("feat_")})
        config = DLRMConfig(n_users=cfg.n_users, n_items=cfg.n_items, n_categories=cfg.n_categories,
                            extra_dense=tuple(cfg.extra_dense), embedding_dim=cfg.embedding_dim,
                            dense_arch=tuple(cfg.dense_arch), over_arch=tuple(cfg.over_arch), history_len=cfg.history_len)
        return cls(config, feats, artifact.state_dict, dense_mean=arrays["dense_mean"], dense_std=arrays["dense_std"],
                   calibration=tuple(cfg.calibration), quantize=quantize, precision=precision)

    def save(self, folder, **kw: Any):
        from models.artifacts import save_artifact

        return save_artifact(folder, artifact=self.to_artifact(**kw))

    @classmethod
    def load(cls, folder_or_uri, *, settings=None, quantize: bool = False, precision: str = "fp32") -> "DLRMScorer":
        """From an artifact folder or ``models:/ranker@champion`` (with ``settings``)."""
        from models.artifacts import load_artifact

        return cls.from_artifact(load_artifact(folder_or_uri, settings=settings), quantize=quantize, precision=precision)

    # -- MLflow pyfunc ------------------------------------------------------------------------
    def predict(self, frame: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """``user_id, item_id`` (+ the candidate-source columns) -> ``score`` (calibrated).
        Unknown users/items are scored through the out-of-vocabulary rows."""
        missing = [c for c in ("user_id", "item_id", *self.config.extra_dense) if c not in frame.columns]
        if missing:
            raise DataError(f"ranker input is missing column(s) {missing}")
        u = self.features.users.encode(frame["user_id"].astype(str), unknown="minus_one")
        i = self.features.items.encode(frame["item_id"].astype(str), unknown="minus_one")
        extra = frame[list(self.config.extra_dense)].to_numpy(dtype=np.float32) if self.config.extra_dense else None
        return pd.DataFrame({"score": self.score(u, i, extra)})

    def input_example(self, n: int = 3) -> pd.DataFrame:
        data: dict[str, Any] = {"user_id": list(self.features.users.ids[:n]), "item_id": list(self.features.items.ids[:n])}
        for c in self.config.extra_dense:
            data[c] = np.zeros(min(n, self.features.n_users, self.features.n_items), np.float64)
        k = min(n, self.features.n_users, self.features.n_items)
        return pd.DataFrame({c: v[:k] for c, v in data.items()})


def _artifact_config_cls():
    from pydantic import BaseModel, ConfigDict

    class DLRMArtifactConfig(BaseModel):
        """Typed config saved in a ``dlrm`` artifact."""

        model_config = ConfigDict(extra="forbid")
        n_users: int
        n_items: int
        n_categories: int
        extra_dense: list[str] = []
        embedding_dim: int = 64
        dense_arch: list[int] = [128, 64]
        over_arch: list[int] = [128, 64, 1]
        history_len: int = 50
        calibration: list[float] = [1.0, 0.0]
        categories: list[str] = []
        sparse_features: list[str] = list(SPARSE_FEATURES)
        dense_features: list[str] = []
        #: the two-stage pipeline around the ranker (candidate sources, quotas, candidate count), written
        #: by ``models.two_stage.pipeline_artifact``; its arrays are ``src__<source>__*`` / ``ts_history_*``
        two_stage: Optional[dict[str, Any]] = None

    return DLRMArtifactConfig


DLRMArtifactConfig = _artifact_config_cls()


def _register() -> None:
    from models.artifacts import register_kind

    register_kind("dlrm", config_cls=DLRMArtifactConfig, builder=lambda art: DLRMScorer.from_artifact(art))


_register()


# ---------------------------------------------------------------------------------------------
# training loop
# ---------------------------------------------------------------------------------------------
@dataclass
class DLRMTrainResult:
    scorer: DLRMScorer
    history: list[dict[str, float]]
    metrics: dict[str, float]
    best_epoch: int
    train_s: float
    samples_per_s: float
    calibration_curve: pd.DataFrame


def _batches(n: int, batch_size: int, rng: np.random.Generator | None):
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for s in range(0, n, batch_size):
        yield order[s:s + batch_size]


def train_dlrm(
    features: RankingFeatures,
    train: RankingExamples,
    valid: RankingExamples,
    *,
    embedding_dim: int = 64,
    dense_arch: Sequence[int] = (128, 64),
    over_arch: Sequence[int] = (128, 64, 1),
    epochs: int = 5,
    batch_size: int = 512,
    learning_rate: float = 1e-3,
    embedding_lr: float = 0.05,
    weight_decay: float = 0.0,
    patience: int = 2,
    id_dropout: float = 0.05,
    seed: int = 0,
    embeddings: str = "fused",
    progress: bool = True,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> DLRMTrainResult:
    """Train on ``train``, early-stop on validation AUC, Platt-calibrate on ``valid``.

    Raises :class:`TrainingError` on a non-finite loss (no model is returned, so nothing broken
    can be saved) and :class:`DataError` for unusable example sets."""
    import torch
    from tqdm.auto import tqdm

    train.check("training set")
    valid.check("validation set")
    if train.extra_names != valid.extra_names:
        raise ValueError(f"train and valid extra features differ: {train.extra_names} vs {valid.extra_names}")
    features.check_indices(train.user_idx, train.item_idx)
    features.check_indices(valid.user_idx, valid.item_idx)
    config = DLRMConfig(n_users=features.n_users, n_items=features.n_items, n_categories=len(features.categories),
                        extra_dense=train.extra_names, embedding_dim=embedding_dim, dense_arch=tuple(dense_arch),
                        over_arch=tuple(over_arch))
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    ranker = build_ranker(config, embeddings=embeddings, embedding_lr=embedding_lr, seed=seed)
    model = DLRMTrainWrapper(ranker)
    opt = torch.optim.Adam(ranker.dense_parameters(), lr=learning_rate, weight_decay=weight_decay)

    train_dense = features.dense(train.user_idx, train.item_idx, train.extra)
    mean = train_dense.mean(axis=0)
    std = train_dense.std(axis=0)
    std = np.where(std < 1e-6, 1.0, std).astype(np.float32)
    train_dense = (train_dense - mean) / std
    valid_dense = (features.dense(valid.user_idx, valid.item_idx, valid.extra) - mean) / std

    def predict(ex: RankingExamples, dense_n: np.ndarray) -> np.ndarray:
        ranker.eval()
        out = []
        with torch.no_grad():  # not inference_mode: fbgemm's fused CPU lookup is registered under autograd keys
            for rows in _batches(len(ex), 8192, None):
                out.append(ranker(torch.from_numpy(dense_n[rows]), features.kjt(ex.user_idx[rows], ex.item_idx[rows])).numpy())
        ranker.train()
        return np.concatenate(out) if out else np.empty(0, np.float32)

    history: list[dict[str, float]] = []
    best_auc, best_epoch, best_state, bad = -1.0, -1, None, 0
    t0 = time.perf_counter()
    seen = 0
    for epoch in range(epochs):
        ranker.train()
        total, n_b = 0.0, 0
        bar = tqdm(list(_batches(len(train), batch_size, rng)), desc=f"dlrm epoch {epoch + 1}/{epochs}",
                   disable=not progress, leave=False)
        for rows in bar:
            users = train.user_idx[rows]
            if id_dropout > 0:  # teach the out-of-vocabulary row to stand for an unknown user
                users = np.where(rng.random(len(users)) < id_dropout, -1, users)
            kjt = features.kjt(users, train.item_idx[rows])
            loss, _ = model(torch.from_numpy(train_dense[rows]), kjt, torch.from_numpy(train.labels[rows]))
            if not torch.isfinite(loss):
                raise TrainingError(f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, batch {n_b + 1}: "
                                    "lower learning_rate / embedding_lr or check the dense features")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach().item()
            n_b += 1
            seen += len(rows)
            if n_b % 50 == 0:
                bar.set_postfix(loss=f"{total / n_b:.4f}")
        v_logits = predict(valid, valid_dense)
        if not np.isfinite(v_logits).all():
            raise TrainingError(f"non-finite validation logits at epoch {epoch + 1}")
        v_prob = 1 / (1 + np.exp(-np.clip(v_logits, -40, 40)))
        row = {"epoch": epoch + 1, "train_loss": total / max(n_b, 1), "valid_auc": roc_auc(valid.labels, v_logits),
               "valid_log_loss": log_loss(valid.labels, v_prob)}
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch + 1, row)
        if row["valid_auc"] > best_auc + 1e-5:
            best_auc, best_epoch, bad = row["valid_auc"], epoch + 1, 0
            best_state = ranker.plain_state_dict()
        else:
            bad += 1
            if bad >= patience:
                break
    train_s = time.perf_counter() - t0
    assert best_state is not None
    scorer = DLRMScorer(config, features, best_state, dense_mean=mean, dense_std=std)
    v_logits = scorer.logits(valid.user_idx, valid.item_idx, valid.extra)
    raw = 1 / (1 + np.exp(-np.clip(v_logits, -40, 40)))
    # Calibration error is reported out of sample: fit on one half of valid, measure on the other;
    # the shipped calibration then uses all of valid.
    half = np.random.default_rng(seed + 1).random(len(valid)) < 0.5
    a, b = fit_platt(v_logits[half], valid.labels[half])
    held = ~half
    raw_held = raw[held]
    cal_held = 1 / (1 + np.exp(-np.clip(a * v_logits[held] + b, -40, 40)))
    scorer.calibration = fit_platt(v_logits, valid.labels)
    cal = scorer.score(valid.user_idx, valid.item_idx, valid.extra)
    metrics = {
        "valid_auc": roc_auc(valid.labels, v_logits),
        "valid_log_loss_raw": log_loss(valid.labels[held], raw_held),
        "valid_log_loss": log_loss(valid.labels[held], cal_held),
        "valid_ece_raw": expected_calibration_error(valid.labels[held], raw_held),
        "valid_ece": expected_calibration_error(valid.labels[held], cal_held),
        "valid_positive_rate": float(valid.labels.mean()),
    }
    return DLRMTrainResult(scorer, history, metrics, best_epoch, train_s, seen / max(train_s, 1e-9),
                           calibration_table(valid.labels, cal))
