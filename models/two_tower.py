"""Two-tower retrieval on TorchRec.

Three separate pieces, as in TorchRec's own retrieval example
(``examples/retrieval/modules/two_tower.py``: ``TwoTower`` / ``TwoTowerTrainTask`` /
``TwoTowerRetrieval``):

- :class:`TwoTower` (architecture): one ``EmbeddingBagCollection`` over every sparse feature,
  a user tower (user id, mean-pooled bag of the user's recent items, profile features) and an
  item tower (item id, category bag, popularity and age buckets), each an MLP ending in an
  L2-normalised vector, so a score is a cosine similarity.
- :class:`TwoTowerTrainTask` (training wrapper): in-batch sampled softmax with mixed random
  negatives (Yang et al. 2020), logQ correction of the sampling bias (Yi et al. 2019) and a
  temperature. Accidental hits (the positive item appearing as a negative) are masked.
- :class:`TwoTowerRetrieval` (serving): rebuilt from an :class:`models.artifacts.Artifact`
  with no training code; user vectors from id + (real-time) history, item vectors and a FAISS
  index (exact inner product for small catalogs, HNSW for large ones) exported at training time.

:class:`TwoTowerRecommender` implements :class:`models.base.Recommender` (``fit`` on
:class:`InteractionData`, ``score`` over the whole catalog) so the evaluator compares it with
the baselines on the same data. Embedding tables train on TorchRec's fused CPU path
(``FusedEmbeddingBagCollection``: fbgemm table-batched embeddings with row-wise Adagrad applied
inside backward), the towers with Adam; ``backend="ebc"`` uses the plain
``EmbeddingBagCollection`` with the same row-wise Adagrad via ``apply_optimizer_in_backward``.

History in training: with timestamps, each example's history is the user's items *before* it
(the product's own situation: predict the next item); without timestamps (RecBole's random
split), it is a random sample of the user's *other* training items (the evaluation situation:
held-out items are never in the history). Either way the target is never in its own history.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from core.schemas import DataError
from models.artifacts import Artifact, register_kind
from models.base import IdMap, InteractionData
from models.kernels import bag_means_into, l2_normalize_rows

log = logging.getLogger(__name__)

KIND = "two_tower"
USER_ID, USER_HIST, ITEM_ID, ITEM_CAT, ITEM_POP, ITEM_AGE = "user_id", "user_hist", "item_id", "item_cat", "item_pop", "item_age"
PROFILE_COLUMNS = ("age", "gender", "occupation")
POP_BUCKETS = 24
AGE_BUCKET_YEARS = 5


class TrainingError(RuntimeError):
    """Training cannot produce a usable model (NaN loss, diverged); nothing is saved."""


class TwoTowerConfig(BaseModel):
    """Architecture + training hyper-parameters (saved with the artifact; serving reads the
    architecture part, the rest documents how the model was made). Unknown keys are errors:
    a misspelt hyper-parameter must not silently fall back to its default."""

    model_config = ConfigDict(extra="forbid")

    n_users: int = Field(ge=1)
    n_items: int = Field(ge=1)
    embedding_dim: int = Field(64, ge=2, description="Id tables (user, item, history).")
    feature_dim: int = Field(16, ge=2, description="Side-feature tables (categories, buckets, profile).")
    tower_hidden: list[int] = Field(default_factory=list)
    output_dim: int = Field(64, ge=2)
    use_user_id: bool = True
    history_len: int = Field(50, ge=0, description="History items sampled per training example.")
    max_history: int = Field(200, ge=0, description="History items used at inference without time order "
                             "(with it, the last history_len items, as in training).")
    sequential: bool = Field(False, description="History = items before the target (needs timestamps).")
    user_features: dict[str, int] = Field(default_factory=dict, description="profile feature -> cardinality")
    item_features: dict[str, int] = Field(default_factory=dict, description="item feature -> cardinality")
    vocabularies: dict[str, list[str]] = Field(default_factory=dict, description="categorical values; index = position + 1")
    age_bucket_start_year: int | None = None
    # training
    temperature: float = Field(0.15, gt=0)
    logq_weight: float = Field(1.0, ge=0, le=1, description="0 = no popularity correction, 1 = full logQ.")
    random_negatives: int = Field(256, ge=0)
    batch_size: int = Field(1024, ge=2)
    epochs: int = Field(20, ge=1)
    embedding_lr: float = Field(0.2, gt=0)
    dense_lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    patience: int = Field(3, ge=0, description="Epochs without validation gain before stopping; 0 = never stop early.")
    eval_k: int = Field(10, ge=1)
    seed: int = 42
    backend: Literal["fused", "ebc"] = "fused"
    index: Literal["auto", "flat", "hnsw"] = "auto"
    flat_index_max_items: int = Field(50_000, ge=1)
    hnsw_m: int = Field(32, ge=4)
    hnsw_ef_search: int = Field(256, ge=1)

    @property
    def inference_history(self) -> int:
        """History items a user vector reads at inference. Sequential training only ever saw the
        ``history_len`` items before a target, so inference reads the same window (the last
        ``history_len``: ML-100K temporal recall@10 0.044 with 200 vs 0.091 with 30); otherwise
        more items just average out the sampling noise of training."""
        return self.history_len if self.sequential else self.max_history


# ---------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------
@dataclass
class TwoTowerFeatures:
    """Everything the towers read, as numpy arrays in index space (saved in the artifact).

    ``hist_indptr/hist_items``: each user's training items in order (time order when
    ``sequential``); ``user_cat[name]`` and ``item_cat[name]``: per-row category index (0 =
    unknown); ``cat_indptr/cat_values``: each item's category bag; ``item_counts``: training
    interactions per item (popularity, for logQ and cold-start fallback)."""

    hist_indptr: np.ndarray
    hist_items: np.ndarray
    user_cat: dict[str, np.ndarray] = field(default_factory=dict)
    item_cat: dict[str, np.ndarray] = field(default_factory=dict)
    cat_indptr: np.ndarray | None = None
    cat_values: np.ndarray | None = None
    item_counts: np.ndarray | None = None

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"hist_indptr": self.hist_indptr, "hist_items": self.hist_items}
        out.update({f"user_cat__{k}": v for k, v in self.user_cat.items()})
        out.update({f"item_cat__{k}": v for k, v in self.item_cat.items()})
        if self.cat_indptr is not None:
            out["cat_indptr"], out["cat_values"] = self.cat_indptr, self.cat_values
        if self.item_counts is not None:
            out["item_counts"] = self.item_counts
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "TwoTowerFeatures":
        return cls(
            hist_indptr=arrays["hist_indptr"], hist_items=arrays["hist_items"],
            user_cat={k.split("__", 1)[1]: v for k, v in arrays.items() if k.startswith("user_cat__")},
            item_cat={k.split("__", 1)[1]: v for k, v in arrays.items() if k.startswith("item_cat__")},
            cat_indptr=arrays.get("cat_indptr"), cat_values=arrays.get("cat_values"),
            item_counts=arrays.get("item_counts"),
        )


def _vocab_index(values: pd.Series) -> tuple[list[str], dict[str, int]]:
    vocab = sorted({str(v) for v in values.dropna() if str(v) != ""})
    return vocab, {v: i + 1 for i, v in enumerate(vocab)}


def build_features(
    train: InteractionData,
    *,
    items_frame: pd.DataFrame | None = None,
    users_frame: pd.DataFrame | None = None,
) -> tuple[TwoTowerFeatures, dict[str, Any]]:
    """Derive the towers' inputs from training interactions and (optional) catalog/profile
    tables. Returns the features and the config fields they imply (feature cardinalities,
    vocabularies, ``sequential``). Only training data is used, so nothing leaks from evaluation."""
    n_users, n_items = train.n_users, train.n_items
    sequential = train.timestamps is not None
    order = np.lexsort((train.timestamps, train.user_idx)) if sequential else np.argsort(train.user_idx, kind="stable")
    hist_items = train.item_idx[order].astype(np.int64)
    counts = np.bincount(train.user_idx, minlength=n_users)
    hist_indptr = np.r_[0, np.cumsum(counts)].astype(np.int64)
    feats = TwoTowerFeatures(hist_indptr=hist_indptr, hist_items=hist_items,
                             item_counts=np.bincount(train.item_idx, minlength=n_items).astype(np.float64))
    implied: dict[str, Any] = {"sequential": sequential, "user_features": {}, "item_features": {}, "vocabularies": {}}

    if users_frame is not None and len(users_frame):
        prof = users_frame.drop_duplicates("user_id").set_index(users_frame.drop_duplicates("user_id")["user_id"].astype(str))
        prof = prof.reindex(list(train.users.ids))
        for col in PROFILE_COLUMNS:
            if col not in prof.columns or prof[col].nunique(dropna=True) < 2:
                continue
            vocab, index = _vocab_index(prof[col])
            feats.user_cat[col] = np.array([index.get(str(v), 0) if pd.notna(v) else 0 for v in prof[col]], dtype=np.int64)
            implied["user_features"][col] = len(vocab) + 1
            implied["vocabularies"][col] = vocab

    # popularity bucket: log2 of training count, so the tower can tell head from tail items
    pop = np.minimum(np.floor(np.log2(1 + feats.item_counts)).astype(np.int64) + 1, POP_BUCKETS - 1)
    feats.item_cat[ITEM_POP] = pop
    implied["item_features"][ITEM_POP] = POP_BUCKETS

    if items_frame is not None and len(items_frame):
        cat = items_frame.drop_duplicates("item_id").copy()
        cat.index = cat["item_id"].astype(str)
        cat = cat.reindex(list(train.items.ids))
        if "categories" in cat.columns:
            bags = [list(c) if isinstance(c, (list, tuple, np.ndarray)) else [] for c in cat["categories"]]
            vocab = sorted({str(g) for b in bags for g in b if str(g)})
            if vocab:
                index = {g: i + 1 for i, g in enumerate(vocab)}
                feats.cat_values = np.array([index[str(g)] for b in bags for g in b if str(g)], dtype=np.int64)
                feats.cat_indptr = np.r_[0, np.cumsum([sum(1 for g in b if str(g)) for b in bags])].astype(np.int64)
                implied["item_features"][ITEM_CAT] = len(vocab) + 1
                implied["vocabularies"][ITEM_CAT] = vocab
        if "created_at" in cat.columns:
            years = pd.to_datetime(cat["created_at"], utc=True, errors="coerce").dt.year
            if years.notna().sum() >= 2 and years.nunique() >= 2:
                start = int(years.min())
                b = ((years - start) // AGE_BUCKET_YEARS + 1).fillna(0).astype(np.int64).to_numpy()
                feats.item_cat[ITEM_AGE] = b
                implied["item_features"][ITEM_AGE] = int(b.max()) + 1
                implied["age_bucket_start_year"] = start
    return feats, implied


def _jagged(indptr: np.ndarray, values: np.ndarray, rows: np.ndarray, cap: int | None = None,
            last: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Lengths and concatenated values of ``rows`` of a CSR-like (indptr, values) list, keeping
    at most ``cap`` (the last ones when ``last``)."""
    starts, ends = indptr[rows], indptr[rows + 1]
    lens = ends - starts
    if cap is not None:
        keep = np.minimum(lens, cap)
        starts = np.where(last, ends - keep, starts)
        lens = keep
    total = int(lens.sum())
    if total == 0:
        return lens.astype(np.int64), np.zeros(0, dtype=np.int64)
    within = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
    return lens.astype(np.int64), values[np.repeat(starts, lens) + within]


class FeatureBuilder:
    """Builds TorchRec ``KeyedJaggedTensor`` inputs for users, items and training batches.

    All towers read one KJT whose rows are examples; keys of the other tower get zero-length
    bags (pooled to zeros and never read), so a single fused TBE call serves both towers."""

    def __init__(self, config: TwoTowerConfig, feats: TwoTowerFeatures):
        self.config, self.feats = config, feats
        self.user_keys = ([USER_ID] if config.use_user_id else []) + ([USER_HIST] if config.max_history or config.history_len else [])
        self.user_keys += [f"user_{k}" for k in config.user_features]
        self.item_keys = [ITEM_ID] + [k for k in (ITEM_CAT, ITEM_POP, ITEM_AGE) if k in config.item_features]
        self.keys = self.user_keys + self.item_keys

    def kjt(self, parts: dict[str, tuple[np.ndarray, np.ndarray]], stride: int):
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        empty = (np.zeros(stride, dtype=np.int64), np.zeros(0, dtype=np.int64))
        lengths, values = [], []
        for key in self.keys:
            ln, val = parts.get(key, empty)
            if len(ln) != stride:  # pad rows this key does not cover (e.g. random negatives' users)
                ln = np.r_[ln, np.zeros(stride - len(ln), dtype=np.int64)]
            lengths.append(ln)
            values.append(val)
        return KeyedJaggedTensor.from_lengths_sync(
            keys=self.keys, values=torch.from_numpy(np.concatenate(values).astype(np.int64)),
            lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int64)))

    # -- users --------------------------------------------------------------------------------
    def user_parts(self, users: np.ndarray, hist: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """User-side features; ``hist`` overrides the stored history (lengths, values)."""
        n = len(users)
        ones = np.ones(n, dtype=np.int64)
        parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        known = users >= 0
        if USER_ID in self.user_keys:
            parts[USER_ID] = (known.astype(np.int64), users[known].astype(np.int64))
        if USER_HIST in self.user_keys:
            if hist is None:
                rows = np.where(known, users, 0)
                ln, val = _jagged(self.feats.hist_indptr, self.feats.hist_items, rows, cap=self.config.inference_history)
                if not known.all():  # unknown users without a given history: empty bag
                    keep = np.repeat(known, ln)
                    ln, val = np.where(known, ln, 0), val[keep]
                hist = (ln, val)
            parts[USER_HIST] = hist
        for name in self.config.user_features:
            col = self.feats.user_cat[name]
            v = np.where(known, col[np.where(known, users, 0)], 0)
            parts[f"user_{name}"] = (ones, v.astype(np.int64))
        return parts

    def item_parts(self, items: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        ones = np.ones(len(items), dtype=np.int64)
        parts = {ITEM_ID: (ones, items.astype(np.int64))}
        if ITEM_CAT in self.item_keys:
            parts[ITEM_CAT] = _jagged(self.feats.cat_indptr, self.feats.cat_values, items)
        for k in (ITEM_POP, ITEM_AGE):
            if k in self.item_keys:
                parts[k] = (ones, self.feats.item_cat[k][items])
        return parts

    def sample_history(self, users: np.ndarray, positions: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Training-time history of examples (user, position of the target in the user's list):
        the items before it (sequential), or a random sample of the user's other items."""
        n_hist = self.config.history_len
        starts = self.feats.hist_indptr[users]
        n_user = self.feats.hist_indptr[users + 1] - starts
        if self.config.sequential:
            lens = np.minimum(positions, n_hist)
            total = int(lens.sum())
            within = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
            pos = np.repeat(starts + positions - lens, lens) + within
            return lens.astype(np.int64), self.feats.hist_items[pos]
        others = n_user - 1
        lens = np.minimum(others, n_hist)
        total = int(lens.sum())
        within = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
        o = np.repeat(others, lens)
        take_all = o <= n_hist
        raw = np.where(take_all, within, (rng.random(total) * np.maximum(o, 1)).astype(np.int64))
        raw = raw + (raw >= np.repeat(positions, lens))  # skip the target itself
        return lens.astype(np.int64), self.feats.hist_items[np.repeat(starts, lens) + raw]


# ---------------------------------------------------------------------------------------------
# architecture, training wrapper, serving
# ---------------------------------------------------------------------------------------------
def _tables(config: TwoTowerConfig):
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

    d, f = config.embedding_dim, config.feature_dim
    # Every table pools with MEAN (= SUM for single-valued features): TorchRec 1.8's
    # FusedEmbeddingBagCollection groups tables by pooling type and concatenates the groups'
    # outputs in group order while labelling them in table order, so mixing SUM and MEAN tables
    # in a non-grouped order silently mislabels the pooled features.
    # "t_"-prefixed names: a table called "items" would clash with ModuleDict.items
    item_features = [ITEM_ID] + ([USER_HIST] if (config.history_len or config.max_history) else [])
    tables = [EmbeddingBagConfig(name="t_item", embedding_dim=d, num_embeddings=config.n_items,
                                 feature_names=item_features, pooling=PoolingType.MEAN)]
    if config.use_user_id:
        tables.append(EmbeddingBagConfig(name="t_user", embedding_dim=d, num_embeddings=config.n_users,
                                         feature_names=[USER_ID], pooling=PoolingType.MEAN))
    for name, card in config.user_features.items():
        tables.append(EmbeddingBagConfig(name=f"t_user_{name}", embedding_dim=f, num_embeddings=card,
                                         feature_names=[f"user_{name}"], pooling=PoolingType.MEAN))
    for name, card in config.item_features.items():
        tables.append(EmbeddingBagConfig(name=f"t_{name}", embedding_dim=f, num_embeddings=card,
                                         feature_names=[name], pooling=PoolingType.MEAN))
    return tables


def _mlp(n_in: int, hidden: list[int], n_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(n_in, h), nn.ReLU()]
        n_in = h
    layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


class TwoTower(nn.Module):
    """Architecture: shared ``EmbeddingBagCollection`` + user and item MLP towers, L2-normalised.

    The item table is shared between the item tower (``item_id``) and the user's history bag
    (``user_hist``), so "users who watched X" and "item X" live in one space."""

    def __init__(self, config: TwoTowerConfig, *, ebc: nn.Module | None = None):
        super().__init__()
        from torchrec.modules.embedding_modules import EmbeddingBagCollection

        self.config = config
        tables = _tables(config)
        self.ebc = ebc if ebc is not None else EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))
        dims = {n: t.embedding_dim for t in tables for n in t.feature_names}
        fb = FeatureBuilder(config, TwoTowerFeatures(np.zeros(1, np.int64), np.zeros(0, np.int64)))
        self.user_keys, self.item_keys = fb.user_keys, fb.item_keys
        self.user_tower = _mlp(sum(dims[k] for k in self.user_keys), config.tower_hidden, config.output_dim)
        self.item_tower = _mlp(sum(dims[k] for k in self.item_keys), config.tower_hidden, config.output_dim)

    def forward(self, kjt, n_user_rows: int | None = None, item_rows: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Pooled embeddings -> (user vectors of the first ``n_user_rows`` rows, item vectors of all rows)."""
        pooled = self.ebc(kjt).to_dict()
        u = v = None
        if n_user_rows is None or n_user_rows > 0:
            x = torch.cat([pooled[k] for k in self.user_keys], dim=1)
            x = x if n_user_rows is None else x[:n_user_rows]
            u = nn.functional.normalize(self.user_tower(x), dim=1)
        if item_rows:
            v = nn.functional.normalize(self.item_tower(torch.cat([pooled[k] for k in self.item_keys], dim=1)), dim=1)
        return u, v

    def embedding_parameter_names(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.startswith("ebc.")}


@dataclass
class Batch:
    """One training batch: KJT rows = ``n_pos`` (user, positive item) pairs then random negatives."""

    kjt: Any
    n_pos: int
    items: torch.Tensor  # item index of every KJT row
    log_q: torch.Tensor  # sampling log-probability of every row's item


class TwoTowerTrainTask(nn.Module):
    """Training wrapper: sampled softmax over in-batch + random negatives, logQ-corrected."""

    def __init__(self, model: TwoTower):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        u, v = self.model(batch.kjt, n_user_rows=batch.n_pos)
        logits = (u @ v.T) / self.config.temperature  # (B, B + M)
        if self.config.logq_weight > 0:
            logits = logits - self.config.logq_weight * batch.log_q[None, :]
        pos = batch.items[: batch.n_pos]
        hit = pos[:, None] == batch.items[None, :]
        hit[torch.arange(batch.n_pos), torch.arange(batch.n_pos)] = False
        logits = logits.masked_fill(hit, float("-inf"))
        labels = torch.arange(batch.n_pos)
        return nn.functional.cross_entropy(logits, labels), logits.detach()


class TwoTowerRetrieval:
    """Serving module: user vectors, item vectors and a FAISS index; no training code.

    ``predict(frame, params)`` (the MLflow pyfunc contract) takes ``user_id`` (and optionally a
    ``history`` column of item-id lists, e.g. the real-time history from the feature store) and
    returns the top ``k`` items per user in long format, excluding the user's known history."""

    def __init__(self, config: TwoTowerConfig, state_dict: dict[str, torch.Tensor], users: IdMap, items: IdMap,
                 arrays: dict[str, np.ndarray], *, feature_service_version: str | None = None):
        self.config, self.users, self.items = config, users, items
        self.feature_service_version = feature_service_version
        self.features = TwoTowerFeatures.from_arrays(arrays)
        self.builder = FeatureBuilder(config, self.features)
        torch.manual_seed(0)  # init values are overwritten by the state dict; keeps construction quiet
        self.model = TwoTower(config)
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise DataError(f"two-tower weights do not fit the config: missing {missing}, unexpected {unexpected}")
        self.model.eval()
        self.item_vectors = np.ascontiguousarray(arrays["item_vectors"], dtype=np.float32) if "item_vectors" in arrays \
            else compute_item_vectors(self.model, self.builder, config.n_items)
        self.popularity = self.features.item_counts
        self._index = None
        self._index_bytes = arrays.get("faiss_index")
        self._user_tower: UserTower | None = None

    @classmethod
    def from_artifact(cls, art: Artifact) -> "TwoTowerRetrieval":
        if art.users is None or art.items is None:
            raise DataError("two-tower artifact has no id maps")
        return cls(art.typed_config(), art.state_dict, art.users, art.items, art.arrays,  # type: ignore[arg-type]
                   feature_service_version=art.feature_service_version)

    @property
    def index(self):
        if self._index is None:
            self._index = (load_faiss_index(self._index_bytes, self.config) if self._index_bytes is not None
                           else build_faiss_index(self.item_vectors, self.config))
        return self._index

    def user_vectors(self, user_idx: np.ndarray, histories: list[list[int]] | None = None, *,
                     hist: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Vectors of users by index (-1 = unknown user; then only ``histories`` inform it).

        ``hist``: the histories already as ``(lengths, values)``, each at most
        ``config.inference_history`` long (the serving path builds them in one compiled pass).

        Served by :class:`UserTower` (the user features' bags pooled directly and the tower's
        MLP fused; checked against the module by ``tests/test_two_tower.py``), which skips
        TorchRec's jagged-tensor plumbing for the item keys a user row never fills."""
        user_idx = np.asarray(user_idx, dtype=np.int64)
        if hist is None and histories is not None:
            cap = self.config.inference_history
            lists = [list(h)[-cap:] if cap else [] for h in histories]
            hist = (np.array([len(h) for h in lists], dtype=np.int64),
                    np.array([i for h in lists for i in h], dtype=np.int64))
        if self._user_tower is None:
            self._user_tower = UserTower(self.model, self.builder)
        return self._user_tower(user_idx, hist)

    def recommend(self, user_ids: list[str], *, k: int = 20, histories: list[list[str]] | None = None,
                  exclude_history: bool = True) -> list[tuple[list[str], list[float]]]:
        """Top ``k`` (item ids, scores) per user via the FAISS index.

        ``histories`` are recent item ids per user (e.g. real-time events not yet in the
        training data): appended to a known user's training history, or the whole history of
        a user the model has never seen. Unknown item ids in them are ignored; an unknown user
        with no known history item is an error naming the user."""
        idx = self.users.encode(user_ids, unknown="minus_one")
        recent = [[] for _ in user_ids] if histories is None else \
            [[int(i) for i in self.items.encode(list(h), unknown="minus_one") if i >= 0] for h in histories]
        if len(recent) != len(user_ids):
            raise DataError(f"{len(user_ids)} users but {len(recent)} histories")
        for pos in np.flatnonzero(idx < 0):
            if not recent[pos]:
                raise DataError(f"unknown user_id {user_ids[pos]!r} and no known items in its history")
        f = self.features
        stored = [f.hist_items[f.hist_indptr[u]:f.hist_indptr[u + 1]].tolist() if u >= 0 else [] for u in idx]
        # stored + recent, a recent item once at its latest position (online features often repeat
        # stored items); without recent items the vector is exactly the one score() uses
        full = [_merge_history(s, r) for s, r in zip(stored, recent)]
        vecs = self.user_vectors(idx, full)
        seen = [set(h) if exclude_history else set() for h in full]
        extra = max((len(s) for s in seen), default=0)
        scores, found = self.index.search(vecs.astype(np.float32), min(k + extra, self.config.n_items))
        out = []
        for r in range(len(idx)):
            keep = [(int(i), float(s)) for i, s in zip(found[r], scores[r]) if i >= 0 and int(i) not in seen[r]][:k]
            out.append((self.items.decode([i for i, _ in keep]), [s for _, s in keep]))
        return out

    def predict(self, frame: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if "user_id" not in frame.columns:
            raise DataError(f"input needs a 'user_id' column; got {list(frame.columns)}")
        k = int((params or {}).get("k", 20))
        histories = None
        if "history" in frame.columns:
            histories = [list(h) if isinstance(h, (list, tuple, np.ndarray)) else [] for h in frame["history"]]
        users = frame["user_id"].astype(str).tolist()
        recs = self.recommend(users, k=k, histories=histories)
        rows = [(u, item, score, rank + 1) for u, (its, scs) in zip(users, recs) for rank, (item, score) in enumerate(zip(its, scs))]
        return pd.DataFrame(rows, columns=["user_id", "item_id", "score", "rank"])


def _merge_history(stored: list[int], recent: list[int]) -> list[int]:
    if not recent:
        return stored
    fresh = set(recent)
    return [i for i in stored if i not in fresh] + list(dict.fromkeys(recent))


class UserTower:
    """The user tower for serving: each user feature's bag mean-pooled straight from its table into
    the tower's input (:func:`models.kernels.bag_means_into`, the plain ``EmbeddingBagCollection``'s
    arithmetic), the tower's MLP through :class:`models.inference.LinearStack` in fp32,
    L2-normalised in place. The same numbers as
    ``TwoTower.forward`` on the user keys, without building a ``KeyedJaggedTensor`` over every
    key of both towers per request batch."""

    def __init__(self, model: TwoTower, builder: FeatureBuilder) -> None:
        from models.inference import LinearStack

        self.builder = builder
        bags = model.ebc.embedding_bags
        table_of = {f: t.name for t in _tables(model.config) for f in t.feature_names}
        # numpy views of the fp32 tables and each feature's first column in the tower's input
        self.tables = [(key, bags[table_of[key]].weight.detach().numpy()) for key in builder.user_keys]
        self.columns = np.concatenate(([0], np.cumsum([t.shape[1] for _, t in self.tables])[:-1])).astype(int).tolist()
        self.in_features = int(sum(t.shape[1] for _, t in self.tables))
        linears = [m for m in model.user_tower if isinstance(m, nn.Linear)]
        self.mlp = LinearStack(linears, [True] * (len(linears) - 1) + [False], precision="fp32")

    def __call__(self, user_idx: np.ndarray, hist: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        if len(user_idx) == 0:
            return np.zeros((0, self.mlp.out_features), np.float32)
        parts = self.builder.user_parts(np.asarray(user_idx, dtype=np.int64), hist)
        x = np.empty((len(user_idx), self.in_features), np.float32)
        for (key, table), col in zip(self.tables, self.columns):
            lengths, values = parts[key]
            bag_means_into(x, col, table, np.asarray(lengths, dtype=np.int64), np.asarray(values, dtype=np.int64))
        out = self.mlp.numpy(x)  # numpy's matmul at micro-batch sizes, torch past them
        l2_normalize_rows(out)
        return out


def user_vectors(model: TwoTower, builder: FeatureBuilder, user_idx: np.ndarray, *,
                 hist: tuple[np.ndarray, np.ndarray] | None = None, chunk: int = 4096) -> np.ndarray:
    out = []
    with torch.no_grad():
        for s in range(0, len(user_idx), chunk):
            rows = user_idx[s:s + chunk]
            h = None
            if hist is not None:
                ln, val = hist
                off = np.r_[0, np.cumsum(ln)]
                h = (ln[s:s + chunk], val[off[s]:off[min(s + chunk, len(ln))]])
            kjt = builder.kjt(builder.user_parts(rows, h), len(rows))
            u, _ = model(kjt, n_user_rows=len(rows), item_rows=False)
            out.append(u.numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, model.config.output_dim), np.float32)


def compute_item_vectors(model: TwoTower, builder: FeatureBuilder, n_items: int, *, chunk: int = 8192) -> np.ndarray:
    out = []
    with torch.no_grad():
        for s in range(0, n_items, chunk):
            rows = np.arange(s, min(s + chunk, n_items))
            _, v = model(builder.kjt(builder.item_parts(rows), len(rows)), n_user_rows=0)
            out.append(v.numpy())
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def build_faiss_index(vectors: np.ndarray, config: TwoTowerConfig, *, huge_pages: bool = True):
    """Exact inner product (cosine on normalised vectors) for small catalogs, HNSW for large ones
    (in locality order, on huge pages where the kernel allows: ``models.ann``; ``huge_pages=False``
    for an index that is only serialized: loading advises its own copy)."""
    import faiss

    from models.ann import hnsw_index

    kind = config.index
    if kind == "auto":
        kind = "flat" if len(vectors) <= config.flat_index_max_items else "hnsw"
    if kind == "flat":
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return index
    return hnsw_index(vectors, m=config.hnsw_m, ef_construction=200, ef_search=config.hnsw_ef_search,
                      huge_pages=huge_pages)


def load_faiss_index(data: np.ndarray, config: TwoTowerConfig):
    import faiss

    from models.ann import back_with_huge_pages, set_ef_search

    index = faiss.deserialize_index(np.asarray(data, dtype=np.uint8))
    set_ef_search(index, config.hnsw_ef_search)
    back_with_huge_pages(index)
    return index


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "user_id"), ColSpec(Array("string"), "history", required=False)]),
        outputs=Schema([ColSpec("string", "user_id"), ColSpec("string", "item_id"), ColSpec("float", "score"),
                        ColSpec("long", "rank")]),
        params=ParamSchema([ParamSpec("k", "long", 20)]),
    )


register_kind(KIND, config_cls=TwoTowerConfig, builder=TwoTowerRetrieval.from_artifact, signature=_signature)


# ---------------------------------------------------------------------------------------------
# the Recommender: fit + score
# ---------------------------------------------------------------------------------------------
@dataclass
class EpochReport:
    epoch: int
    loss: float
    seconds: float
    samples_per_s: float
    valid: dict[str, float] = field(default_factory=dict)


def check_training_data(train: InteractionData) -> None:
    """Refuse sets a two-tower cannot learn from, with the reason."""
    if len(train) == 0:
        raise DataError("two-tower: the training set is empty")
    n_u, n_i = len(np.unique(train.user_idx)), len(np.unique(train.item_idx))
    if n_u < 2:
        raise DataError(f"two-tower: the training set has {n_u} user(s); in-batch negatives need at least 2")
    if n_i < 2:
        raise DataError(f"two-tower: the training set has {n_i} item(s); retrieval needs at least 2")
    if train.user_idx.max() >= train.n_users or train.item_idx.max() >= train.n_items:
        raise DataError("two-tower: interaction indices exceed the id maps")


class TwoTowerRecommender:
    """:class:`models.base.Recommender` around the two-tower model (fit / score / artifact)."""

    name = "two_tower"

    def __init__(self, config: dict[str, Any] | None = None, *, items_frame: pd.DataFrame | None = None,
                 users_frame: pd.DataFrame | None = None, progress: bool = True,
                 on_epoch: Callable[[EpochReport], None] | None = None):
        self.params = dict(config or {})
        self.items_frame, self.users_frame = items_frame, users_frame
        self.progress, self.on_epoch = progress, on_epoch
        self.config: TwoTowerConfig | None = None
        self.model: TwoTower | None = None
        self.features: TwoTowerFeatures | None = None
        self.builder: FeatureBuilder | None = None
        self.item_vectors: np.ndarray | None = None
        self.users: IdMap | None = None
        self.items: IdMap | None = None
        self.history: list[EpochReport] = []
        self.best_epoch: int | None = None

    # -- training -----------------------------------------------------------------------------
    def fit(self, train: InteractionData, *, valid: InteractionData | None = None) -> "TwoTowerRecommender":
        check_training_data(train)
        feats, implied = build_features(train, items_frame=self.items_frame, users_frame=self.users_frame)
        cfg = TwoTowerConfig(**{**self.params, **implied, "n_users": train.n_users, "n_items": train.n_items})
        self.config, self.features, self.users, self.items = cfg, feats, train.users, train.items
        self.builder = FeatureBuilder(cfg, feats)
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        model = TwoTower(cfg)
        model.ebc = _fused_or_plain(model.ebc, cfg)
        task = TwoTowerTrainTask(model)
        emb_names = model.embedding_parameter_names()
        dense = [p for n, p in model.named_parameters() if n not in emb_names]
        opt = torch.optim.Adam(dense, lr=cfg.dense_lr, weight_decay=cfg.weight_decay)
        self.model = model

        # examples in the order of the user's history list, so "position" indexes it
        order_users = np.repeat(np.arange(train.n_users), np.diff(feats.hist_indptr))
        positions = np.arange(len(feats.hist_items)) - feats.hist_indptr[order_users]
        ex_users, ex_items = order_users, feats.hist_items
        q = feats.item_counts / feats.item_counts.sum()
        log_q_batch = np.log(np.maximum(q * cfg.batch_size, 1e-12))
        log_q_rand = math.log(max(cfg.random_negatives, 1) / cfg.n_items)

        best, best_state, stale = -1.0, None, 0
        from tqdm.auto import tqdm

        epochs = tqdm(range(1, cfg.epochs + 1), desc="two-tower", unit="epoch", disable=not self.progress)
        for epoch in epochs:
            model.train()
            t0 = time.perf_counter()
            perm = rng.permutation(len(ex_users))
            n_batches = max(1, len(perm) // cfg.batch_size)  # drop the ragged tail: in-batch negatives need a full batch
            total, seen = 0.0, 0
            bar = tqdm(range(n_batches), desc=f"epoch {epoch}", unit="batch", leave=False, disable=not self.progress)
            for b in bar:
                rows = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                batch = self._batch(ex_users[rows], ex_items[rows], positions[rows], rng, log_q_batch, log_q_rand)
                loss, _ = task(batch)
                if not torch.isfinite(loss):
                    raise TrainingError(f"two-tower: non-finite loss ({loss.item()}) at epoch {epoch}, batch {b + 1}; "
                                        f"lower embedding_lr/dense_lr or raise temperature (now {cfg.temperature})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(rows)
                seen += len(rows)
                if b % 20 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
            secs = time.perf_counter() - t0
            report = EpochReport(epoch, total / max(seen, 1), secs, seen / max(secs, 1e-9))
            self._refresh_item_vectors()
            if valid is not None and len(valid):
                report.valid = self.validate(train, valid)
                score = report.valid[f"recall@{cfg.eval_k}"]
                if score > best:
                    best, stale, self.best_epoch = score, 0, epoch
                    best_state = copy.deepcopy(_plain_state(model))
                else:
                    stale += 1
            self.history.append(report)
            epochs.set_postfix(loss=f"{report.loss:.3f}", **({f"R@{cfg.eval_k}": f"{report.valid[f'recall@{cfg.eval_k}']:.4f}"} if report.valid else {}))
            if self.on_epoch:
                self.on_epoch(report)
            if valid is not None and cfg.patience and stale >= cfg.patience:
                log.info("early stop at epoch %d (best %d)", epoch, self.best_epoch)
                break
        if best_state is not None:
            model.load_state_dict(best_state, strict=False)
        self.best_epoch = self.best_epoch or len(self.history)
        self._refresh_item_vectors()
        model.eval()
        return self

    def _batch(self, users: np.ndarray, items: np.ndarray, positions: np.ndarray, rng: np.random.Generator,
               log_q_batch: np.ndarray, log_q_rand: float) -> Batch:
        cfg, fb = self.config, self.builder
        assert cfg is not None and fb is not None
        neg = rng.integers(0, cfg.n_items, size=cfg.random_negatives)
        all_items = np.r_[items, neg]
        hist = fb.sample_history(users, positions, rng) if USER_HIST in fb.user_keys else None
        parts = fb.user_parts(users, hist)
        parts.update(fb.item_parts(all_items))
        log_q = np.r_[log_q_batch[items], np.full(len(neg), log_q_rand)]
        return Batch(fb.kjt(parts, len(all_items)), len(items), torch.from_numpy(all_items),
                     torch.from_numpy(log_q.astype(np.float32)))

    def _refresh_item_vectors(self) -> None:
        assert self.model is not None and self.builder is not None and self.config is not None
        self.model.eval()
        self.item_vectors = compute_item_vectors(self.model, self.builder, self.config.n_items)
        if not np.isfinite(self.item_vectors).all():
            raise TrainingError("two-tower: item vectors contain NaN/inf; the model diverged")

    def validate(self, train: InteractionData, valid: InteractionData) -> dict[str, float]:
        """Full-ranking recall/ndcg@eval_k on ``valid``, excluding training items (early stopping)."""
        from models.metrics import ranking_metrics

        k = self.config.eval_k  # type: ignore[union-attr]
        m = ranking_metrics(self.score, test=valid.csr(), exclude=train.csr(), ks=[k])
        return {f"recall@{k}": m[f"recall@{k}"], f"ndcg@{k}": m[f"ndcg@{k}"]}

    # -- scoring ------------------------------------------------------------------------------
    def user_vectors(self, user_idx: np.ndarray) -> np.ndarray:
        if self.model is None or self.builder is None:
            raise RuntimeError("two-tower: fit() or from_artifact() first")
        user_idx = np.asarray(user_idx, dtype=np.int64)
        if len(user_idx) and (user_idx.min() < 0 or user_idx.max() >= self.config.n_users):  # type: ignore[union-attr]
            bad = user_idx[(user_idx < 0) | (user_idx >= self.config.n_users)][0]  # type: ignore[union-attr]
            raise DataError(f"two-tower: user index {int(bad)} outside [0, {self.config.n_users})")  # type: ignore[union-attr]
        self.model.eval()
        return user_vectors(self.model, self.builder, user_idx)

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        """Cosine similarity of the users' vectors with every item: ``(len(user_idx), n_items)``."""
        assert self.item_vectors is not None
        return self.user_vectors(user_idx) @ self.item_vectors.T

    # -- artifacts ----------------------------------------------------------------------------
    def to_artifact(self, *, feature_service_version: str | None = None, metadata: dict[str, Any] | None = None,
                    with_index: bool = True) -> Artifact:
        if self.model is None or self.config is None or self.features is None:
            raise RuntimeError("two-tower: nothing to export, fit() first")
        arrays = self.features.to_arrays()
        arrays["item_vectors"] = self.item_vectors
        if with_index:
            import faiss

            arrays["faiss_index"] = faiss.serialize_index(build_faiss_index(self.item_vectors, self.config, huge_pages=False))
        return Artifact(kind=KIND, config=self.config, state_dict=_plain_state(self.model), users=self.users,
                        items=self.items, arrays=arrays, feature_service_version=feature_service_version,
                        metadata=dict(metadata or {}))

    @classmethod
    def from_artifact(cls, art: Artifact) -> "TwoTowerRecommender":
        serving = TwoTowerRetrieval.from_artifact(art)
        rec = cls(serving.config.model_dump())
        rec.config, rec.model, rec.features, rec.builder = serving.config, serving.model, serving.features, serving.builder
        rec.item_vectors, rec.users, rec.items = serving.item_vectors, serving.users, serving.items
        return rec


def _fused_or_plain(ebc: nn.Module, cfg: TwoTowerConfig) -> nn.Module:
    """Swap in TorchRec's fused CPU embeddings (fbgemm TBE, row-wise Adagrad inside backward)."""
    from torchrec.optim import RowWiseAdagrad

    if cfg.backend == "fused":
        from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

        return FusedEmbeddingBagCollection(tables=ebc.embedding_bag_configs(), optimizer_type=RowWiseAdagrad,
                                           optimizer_kwargs={"lr": cfg.embedding_lr, "eps": 1e-8},
                                           device=torch.device("cpu"))
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    for bag in ebc.embedding_bags.values():  # TBE's default init scale, so both backends start alike
        nn.init.uniform_(bag.weight, -math.sqrt(1 / bag.weight.shape[0]), math.sqrt(1 / bag.weight.shape[0]))
    apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": cfg.embedding_lr, "eps": 1e-8})
    return ebc


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights under plain ``EmbeddingBagCollection`` names (fused and plain share the layout)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
