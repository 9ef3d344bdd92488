"""Honest baselines: most-popular, ItemKNN (cosine), implicit ALS and EASE.

They exist to keep the neural models honest: on MovieLens a well-tuned EASE or iALS beats many
published deep models, so a two-tower/DLRM number means nothing unless these run on the same
data, through the same evaluator, in the same run. Each implements
:class:`models.base.Recommender`; ``score`` returns dense ``(n_users, n_items)`` scores and the
evaluator removes already-seen items.

Hyper-parameters are chosen on the *validation* split only: pass ``valid`` to ``fit`` and a
model with a ``search`` grid fits every candidate on ``train``, evaluates it on ``valid``
(excluding training items, full ranking) and keeps the best by ``select_metric``. The final
model stays trained on ``train`` alone (RecBole's protocol), so test is never looked at.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import scipy.sparse as sp

from core.schemas import DataError
from models.base import InteractionData


class BaselineError(DataError):
    """A baseline was used wrongly (not fitted, unknown user index, bad hyper-parameters)."""


@dataclass
class Tuning:
    """What validation-based selection tried and chose (logged to MLflow by the evaluator)."""

    metric: str
    trials: list[tuple[dict[str, Any], float]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)


class _Base:
    """Shared plumbing: the training matrix, index checks, and grid search on validation."""

    name = "base"
    #: grid of constructor keyword arguments tried when ``fit`` gets ``valid`` (empty: no tuning)
    search: Mapping[str, Sequence[Any]] = {}
    select_metric = "ndcg@10"

    def __init__(self) -> None:
        self._x: sp.csr_matrix | None = None
        self.tuning: Tuning | None = None

    # -- protocol -----------------------------------------------------------------------------
    def fit(self, train: InteractionData, *, valid: InteractionData | None = None) -> "_Base":
        if len(train) == 0:
            raise BaselineError(f"{self.name}: empty training set")
        if train.n_items < 2:
            raise BaselineError(f"{self.name}: needs at least 2 items, got {train.n_items}")
        if valid is not None and self.search:
            return self._select(train, valid)
        self._x = train.csr()
        self._fit(self._x)
        return self

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        if self._x is None:
            raise BaselineError(f"{self.name}: score() before fit()")
        users = np.asarray(user_idx, dtype=np.int64).ravel()
        n = self._x.shape[0]
        if users.size and (users.min() < 0 or users.max() >= n):
            bad = int(users[(users < 0) | (users >= n)][0])
            raise BaselineError(f"{self.name}: unknown user index {bad} (trained on {n} users)")
        return self._score(users)

    @property
    def params(self) -> dict[str, Any]:
        """The hyper-parameters in use (after tuning, the chosen ones)."""
        return {}

    # -- to implement --------------------------------------------------------------------------
    def _fit(self, x: sp.csr_matrix) -> None:
        raise NotImplementedError

    def _score(self, users: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # -- validation-based selection -----------------------------------------------------------
    def _with(self, **params: Any) -> "_Base":
        """A fresh, untuned copy with ``params`` replaced."""
        kwargs = {**self.params, **params}
        clone = type(self)(**kwargs)
        clone.search = {}
        return clone

    def _select(self, train: InteractionData, valid: InteractionData) -> "_Base":
        from models.metrics import evaluate_recommender

        k = int(self.select_metric.split("@")[1])
        tuning = Tuning(metric=self.select_metric)
        best_value, best_model = -np.inf, None
        keys = list(self.search)
        for combo in itertools.product(*(self.search[key] for key in keys)):
            params = dict(zip(keys, combo))
            model = self._with(**params).fit(train)
            value = evaluate_recommender(model, train=train, test=valid, ks=(k,))[self.select_metric]
            tuning.trials.append((params, float(value)))
            if value > best_value:
                best_value, best_model = value, model
        assert best_model is not None
        self.__dict__.update({key: val for key, val in best_model.__dict__.items() if key != "search"})
        tuning.best = self.params
        self.tuning = tuning
        return self


class MostPopular(_Base):
    """Score = number of training users who interacted with the item (same list for everyone)."""

    name = "pop"

    def __init__(self) -> None:
        super().__init__()
        self._pop: np.ndarray | None = None

    def _fit(self, x: sp.csr_matrix) -> None:
        self._pop = np.asarray(x.sum(axis=0), dtype=np.float64).ravel()

    def _score(self, users: np.ndarray) -> np.ndarray:
        assert self._pop is not None
        return np.tile(self._pop, (len(users), 1))


class ItemKNN(_Base):
    """Item-based kNN with cosine similarity, shrinkage and top-``k`` neighbours per item.

    ``sim(i, j) = |U_i & U_j| / (sqrt(|U_i| |U_j|) + shrink)``; for each item only its ``k``
    most similar items are kept (RecBole's ItemKNN); ``score(u, j) = sum_{i in u & N_k(j)} sim(i, j)``.
    Similarities are computed by column blocks, so memory is ``n_items x block``, not n_items^2.
    """

    name = "itemknn"
    search = {"k": (50, 100, 200, 400), "shrink": (0.0, 10.0)}

    def __init__(self, k: int = 100, shrink: float = 0.0, block: int = 1024) -> None:
        super().__init__()
        if k < 1 or shrink < 0:
            raise BaselineError(f"itemknn: k must be >= 1 and shrink >= 0, got k={k}, shrink={shrink}")
        self.k, self.shrink, self.block = int(k), float(shrink), int(block)
        self._w: sp.csr_matrix | None = None

    @property
    def params(self) -> dict[str, Any]:
        return {"k": self.k, "shrink": self.shrink, "block": self.block}

    def _fit(self, x: sp.csr_matrix) -> None:
        xc = x.tocsc().astype(np.float32)
        norms = np.sqrt(np.asarray(xc.multiply(xc).sum(axis=0)).ravel())
        n = x.shape[1]
        k = min(self.k, n - 1)
        xt = xc.T.tocsr()
        rows, cols, vals = [], [], []
        for start in range(0, n, self.block):
            stop = min(start + self.block, n)
            co = (xt @ xc[:, start:stop]).toarray()  # (n, block) co-occurrence counts
            sim = co / (np.outer(norms, norms[start:stop]) + self.shrink + 1e-12)
            sim[np.arange(start, stop), np.arange(stop - start)] = 0.0  # no self-similarity
            top = np.argpartition(-sim, k - 1, axis=0)[:k]  # (k, block): neighbours of each column
            v = np.take_along_axis(sim, top, axis=0)
            keep = v > 0
            rows.append(top[keep])
            cols.append(np.broadcast_to(np.arange(start, stop), top.shape)[keep])
            vals.append(v[keep])
        self._w = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n),
                                dtype=np.float32)

    def _score(self, users: np.ndarray) -> np.ndarray:
        assert self._x is not None and self._w is not None
        return (self._x[users] @ self._w).toarray().astype(np.float64)


class ALS(_Base):
    """Implicit-feedback matrix factorisation (Hu, Koren & Volinsky) via ``implicit``'s CPU ALS
    with the conjugate-gradient solver. Confidence of an observed pair = ``alpha``."""

    name = "als"
    # implicit does not scale regularization by the number of interactions, so useful values on
    # MovieLens-sized data are large (10-60); confidence alpha 2-3 beats the textbook 40 here.
    search = {"factors": (64, 128), "regularization": (10.0, 30.0, 60.0), "alpha": (2.0,)}

    def __init__(self, factors: int = 64, regularization: float = 30.0, alpha: float = 2.0, iterations: int = 15,
                 threads: int | None = None, seed: int = 42) -> None:
        super().__init__()
        if factors < 1 or regularization < 0 or alpha <= 0 or iterations < 1:
            raise BaselineError("als: factors >= 1, regularization >= 0, alpha > 0 and iterations >= 1 required")
        self.factors, self.regularization, self.alpha = int(factors), float(regularization), float(alpha)
        self.iterations, self.seed = int(iterations), int(seed)
        #: ALS threads; default all cores (``implicit`` parallelises over users/items itself)
        self.threads = int(threads) if threads else (os.cpu_count() or 1)
        self._users: np.ndarray | None = None
        self._items: np.ndarray | None = None

    @property
    def params(self) -> dict[str, Any]:
        return {"factors": self.factors, "regularization": self.regularization, "alpha": self.alpha,
                "iterations": self.iterations, "threads": self.threads, "seed": self.seed}

    def _fit(self, x: sp.csr_matrix) -> None:
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        model = AlternatingLeastSquares(factors=self.factors, regularization=self.regularization, alpha=self.alpha,
                                        iterations=self.iterations, num_threads=self.threads,
                                        random_state=self.seed, use_cg=True)
        # implicit runs its own threads; a multithreaded BLAS underneath would oversubscribe the cores
        with threadpool_limits(1, "blas"):
            model.fit(x.astype(np.float32), show_progress=False)
        self._users = np.asarray(model.user_factors)
        self._items = np.asarray(model.item_factors)

    def _score(self, users: np.ndarray) -> np.ndarray:
        assert self._users is not None and self._items is not None
        return (self._users[users] @ self._items.T).astype(np.float64)


class EASE(_Base):
    """Embarrassingly Shallow Autoencoder (Steck 2019), closed form:
    ``P = (X^T X + lambda I)^-1``, ``B = I - P diag(1/diag(P))`` (so ``diag(B) = 0``).
    Memory is dense ``n_items^2``, hence ``max_items``."""

    name = "ease"
    search = {"lam": (50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0)}

    def __init__(self, lam: float = 250.0, max_items: int = 40_000) -> None:
        super().__init__()
        if lam <= 0:
            raise BaselineError(f"ease: lambda must be > 0, got {lam}")
        self.lam, self.max_items = float(lam), int(max_items)
        self._b: np.ndarray | None = None

    @property
    def params(self) -> dict[str, Any]:
        return {"lam": self.lam, "max_items": self.max_items}

    def _fit(self, x: sp.csr_matrix) -> None:
        from scipy.linalg import cho_factor, cho_solve

        n = x.shape[1]
        if n > self.max_items:
            raise BaselineError(f"ease: {n} items needs a dense {n}x{n} matrix; above max_items={self.max_items}")
        g = (x.T @ x).toarray().astype(np.float64)
        g[np.diag_indices(n)] += self.lam
        p = cho_solve(cho_factor(g, overwrite_a=True), np.eye(n), overwrite_b=True)
        b = -p / np.diag(p)[None, :]
        b[np.diag_indices(n)] = 0.0
        self._b = b.astype(np.float32)

    def _score(self, users: np.ndarray) -> np.ndarray:
        assert self._x is not None and self._b is not None
        return np.asarray(self._x[users] @ self._b, dtype=np.float64)


BASELINES: dict[str, Callable[..., _Base]] = {
    "pop": MostPopular,
    "itemknn": ItemKNN,
    "als": ALS,
    "ease": EASE,
}


def make_baseline(name: str, **params: Any) -> _Base:
    """A baseline by name (``pop``, ``itemknn``, ``als``, ``ease``) with optional hyper-parameters."""
    try:
        factory = BASELINES[name]
    except KeyError:
        raise BaselineError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}") from None
    return factory(**params)
