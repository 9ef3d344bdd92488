"""Two-stage recommendation: the ONE logic package behind offline evaluation and online serving.

retrieve -> merge -> filter -> rank -> post-process, batched over requests (no per-item Python
loops: matrix products on torch / FAISS, sorting on numpy, the glue between them in the compiled
kernels of :mod:`models.kernels`):

1. **Retrieve** up to ``quota`` items per candidate source per request. Sources:
   :class:`EmbeddingSource` (two-tower ANN: FAISS inner-product index over item embeddings),
   :class:`CoVisitationSource` (item-to-item co-occurrence from the user's history),
   :class:`ItemRegressionSource` (EASE-style item-to-item regression, the co-occurrence family's
   strongest member), :class:`PopularSource`, and :class:`RecommenderSource` (any fitted
   :class:`models.base.Recommender`, e.g. the two-tower model offline). Sources never return
   what the user already consumed.
2. **Merge** per request (union), remembering which source(s) produced each candidate, its rank
   and score in each (these become the ranker's candidate-source dense features); keep the
   ``n_candidates`` best by best per-source rank.
3. **Filter** unavailable items (global mask) and per-request blocked items.
4. **Rank** every candidate of every request with the DLRM (:class:`models.dlrm.DLRMScorer`) in
   one batched forward (user-side embeddings once per request).
5. **Post-process**: at most ``max_category_share`` of the top ``k`` from one (primary)
   category, filled back in rank order if the catalog is too narrow; top ``k``.

:class:`TwoStageRecommender` wraps the same pipeline as a :class:`models.base.Recommender`
(``fit`` trains sources on ``train`` and the ranker on held-out ``valid`` interactions;
``score`` covers the catalog with ``-inf`` for non-candidates) so the evaluator computes the
same top-K metrics for the whole pipeline; :meth:`TwoStageRecommender.source_recommenders`
exposes every source alone for the same table.

Serving and the promotion gate never see training code: :func:`pipeline_artifact` writes the
ranker artifact with every non-embedding source's arrays, and :func:`pipeline_from_artifacts`
rebuilds the pipeline from it plus the built two-tower (plugged in as an
:class:`EmbeddingSource`); :func:`pipeline_recommender` is its Recommender view.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import pandas as pd
import scipy.sparse as sp

from core.schemas import DataError
from models.base import IdMap, InteractionData
from models.kernels import (NO_KEY, SCRATCH, candidate_emit, candidate_union, decode_keys, dense_keys, filter_ranked,
                            item_item_keys, merged_histories, request_score_keys, top_k_diverse)


class TwoStageError(DataError):
    """The two-stage pipeline was configured or called wrongly (the message says how)."""


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CSRRows:
    """Consumed-items rows of a request batch as bare CSR arrays in the kernels' dtypes (int64
    ``indptr`` / ``indices``, float32 ``data``, each row's columns sorted and distinct), for the
    request path: every stage reads only these arrays, ``shape`` and ``nnz``, and building a scipy
    matrix re-validates them and narrows the indices to int32 (~0.1 ms a batch here, which the
    kernels then widen back). The builder (``serving.engine.Engine``) guarantees the layout;
    :meth:`tocsr` gives the scipy matrix where one is needed."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return len(self.indices)

    def tocsr(self) -> sp.csr_matrix:
        return sp.csr_matrix((self.data, self.indices, self.indptr), shape=self.shape)


def _as_csr(m: Any) -> sp.csr_matrix | CSRRows:
    """``m`` as CSR without a copy when it already is one (building a scipy matrix validates its
    arrays: ~10-20 us a call, several calls per source per request batch)."""
    return m if isinstance(m, CSRRows) or sp.isspmatrix_csr(m) else sp.csr_matrix(m)


def _bits(n: int) -> int:
    """Bits needed for the integers ``0 .. n - 1``."""
    return max(int(n - 1).bit_length(), 1)


def _key_bits(n: int) -> int:
    """Bits of the index part of a rank key (:mod:`models.kernels`): the score takes 32 of an
    int64's 63, so indices must stay below 2**30 (a NaN key must not reach ``NO_KEY``)."""
    bits = _bits(n)
    if bits > 30:
        raise TwoStageError(f"{n:,} items or rows do not fit a rank key (at most 2**30)")
    return bits


def _rows_csr(m: sp.csr_matrix, rows: np.ndarray) -> sp.csr_matrix:
    return m[rows] if len(rows) else sp.csr_matrix((0, m.shape[1]), dtype=m.dtype)


#: "no exclusions" as CSR arrays for the kernels (a one-entry ``indptr``: no row has entries)
_NO_ROWS = (np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))


def _csr_arrays(m: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A CSR matrix's ``(indptr, indices, data)`` as int64 / int64 / float32, the one dtype set the
    kernels are compiled for (no copy when they already are): a matrix with other dtypes (scipy
    picks int32 indices for small ones) would otherwise compile a new specialisation -- seconds --
    on a live request."""
    m = _as_csr(m)
    return (m.indptr.astype(np.int64, copy=False), m.indices.astype(np.int64, copy=False),
            m.data.astype(np.float32, copy=False))


def _exclusion(exclude: sp.csr_matrix | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``exclude``'s CSR arrays for :mod:`models.kernels` (see :func:`_csr_arrays`)."""
    if exclude is None or not exclude.nnz:
        return _NO_ROWS
    return _csr_arrays(exclude)


def _smallest_keys(keys: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` smallest rank keys of each row, ascending (all of a row's keys when it has fewer):
    numpy's SIMD ``partition`` + ``sort`` of the int64 keys (~4 us a row of 3,700 here, faster than
    any compiled loop we tried)."""
    n = max(int(n), 0)
    if n < keys.shape[1]:
        keys = np.partition(keys, n - 1, axis=1)[:, :n] if n else keys[:, :0]
    return np.sort(keys, axis=1)


def _top_from_keys(keys: np.ndarray, n: int, ibits: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(items, scores)`` of the ``n`` smallest rank keys per row (at most ``width`` columns, ``-1`` /
    ``0`` where a row has fewer; :func:`models.kernels.decode_keys`)."""
    n = max(min(int(n), int(width)), 0)
    if keys.shape[1] < n:
        keys = np.concatenate([keys, np.full((keys.shape[0], n - keys.shape[1]), NO_KEY, np.int64)], axis=1)
    return decode_keys(_smallest_keys(keys, n), ibits)


_ALL = np.zeros(0, bool)  # "no mask" for :func:`models.kernels.dense_keys`


def _top_n_dense(scores: np.ndarray, n: int, exclude: sp.csr_matrix | None, *, column_ok: np.ndarray = _ALL,
                 row_ok: np.ndarray = _ALL) -> tuple[np.ndarray, np.ndarray]:
    """Top ``n`` columns per row of a dense score block, best first (ties by column); excluded,
    non-finite and masked-out entries (``column_ok`` / ``row_ok`` False) never come back; rows with
    fewer get item -1, score 0."""
    s = np.ascontiguousarray(scores, dtype=np.float32)
    if s.ndim != 2:
        raise TwoStageError(f"scores must be a (requests, items) block, got shape {s.shape}")
    ibits = _key_bits(s.shape[1])
    return _top_from_keys(dense_keys(s, ibits, *_exclusion(exclude), column_ok, row_ok), n, ibits, s.shape[1])


def _filter_ranked(items: np.ndarray, scores: np.ndarray, exclude: sp.csr_matrix | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop excluded items from ranked lists (B, L) and compact each row to its first ``n``, in order."""
    items = np.ascontiguousarray(items, dtype=np.int64)
    width = exclude.shape[1] if exclude is not None else int(items.max(initial=-1)) + 1
    return filter_ranked(items, np.ascontiguousarray(scores, dtype=np.float32), int(n), int(width), *_exclusion(exclude),
                         SCRATCH.table("stamp_a", width), SCRATCH.tags(len(items)))


# ---------------------------------------------------------------------------------------------
# candidate sources
# ---------------------------------------------------------------------------------------------
@runtime_checkable
class CandidateSource(Protocol):
    """Returns up to ``n`` ranked items per request (``-1`` = none), never one in ``exclude``.
    Columns past ``n`` are ignored by the merge (their rank fraction would not be positive)."""

    name: str

    def retrieve(self, user_idx: np.ndarray, history: sp.csr_matrix, n: int, *,
                 exclude: sp.csr_matrix | None = None) -> tuple[np.ndarray, np.ndarray]: ...


class PopularSource:
    """Most-interacted items (distinct users) in the history it was fitted on; the cold-start fallback."""

    name = "popular"

    def __init__(self) -> None:
        self.counts: np.ndarray | None = None
        self.order: np.ndarray | None = None

    def fit(self, history: InteractionData, *, labels: InteractionData | None = None) -> "PopularSource":
        if len(history) == 0:
            raise TwoStageError("popular source: empty history")
        self.counts = np.asarray(history.csr().sum(axis=0)).ravel().astype(np.float32)
        self.order = np.argsort(-self.counts, kind="stable")
        return self

    @classmethod
    def from_counts(cls, counts: np.ndarray) -> "PopularSource":
        src = cls()
        src.counts = np.asarray(counts, dtype=np.float32)
        src.order = np.argsort(-src.counts, kind="stable")
        return src

    def to_parts(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(spec, arrays) to save in the ranker artifact (see :func:`pipeline_artifact`)."""
        assert self.counts is not None, "fit() first"
        return {"type": "popular"}, {"counts": self.counts}

    @classmethod
    def from_parts(cls, spec: dict[str, Any], arrays: dict[str, np.ndarray], n_items: int) -> "PopularSource":
        counts = np.asarray(arrays["counts"], dtype=np.float32)
        if counts.shape != (n_items,):
            raise TwoStageError(f"popular source: {counts.shape[0]} counts for a catalog of {n_items} items")
        return cls.from_counts(counts)

    def retrieve(self, user_idx, history, n, *, exclude=None):
        assert self.order is not None and self.counts is not None, "fit() first"
        b = len(user_idx)
        depth = min(len(self.order), n + (int(np.diff(exclude.indptr).max()) if exclude is not None and exclude.nnz else 0))
        items = np.tile(self.order[:depth], (b, 1))
        scores = np.tile(np.log1p(self.counts[self.order[:depth]]), (b, 1))
        return _filter_ranked(items, scores, exclude, n)


class ItemItemSource:
    """Candidates from a sparse item-to-item weight matrix ``W``: a user's scores are
    ``history @ W`` (one sparse product per batch), items with a non-positive score are not
    candidates. Subclasses differ in how ``W`` is fitted; all save and load the same way (the
    pruned matrix as CSR arrays: no training data is needed to rebuild them)."""

    name = "item_item"
    kind = "item_item"

    def __init__(self, *, neighbours: int | None = 200) -> None:
        self.neighbours = neighbours
        self.sim: sp.csr_matrix | None = None
        self._weights_of: tuple[Any, Any] = (None, None)

    def params(self) -> dict[str, Any]:
        return {"neighbours": self.neighbours}

    def to_parts(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(spec, arrays) to save in the ranker artifact (see :func:`pipeline_artifact`)."""
        assert self.sim is not None, "fit() first"
        sim = self.sim.tocsr()
        return ({"type": self.kind, **self.params()},
                {"indptr": sim.indptr.astype(np.int64), "indices": sim.indices.astype(np.int32),
                 "data": sim.data.astype(np.float32)})

    @classmethod
    def from_parts(cls, spec: dict[str, Any], arrays: dict[str, np.ndarray], n_items: int) -> "ItemItemSource":
        src = cls(**{k: v for k, v in spec.items() if k not in ("type", "name")})
        indptr = np.asarray(arrays["indptr"])
        if len(indptr) != n_items + 1:
            raise TwoStageError(f"{cls.kind} source: weight matrix has {len(indptr) - 1} rows, catalog has {n_items} items")
        indices = np.asarray(arrays["indices"])
        if len(indices) and (indices.min() < 0 or indices.max() >= n_items):  # scipy does not check; the kernel would not
            raise TwoStageError(f"{cls.kind} source: neighbour indices outside the catalog of {n_items} items")
        src.sim = sp.csr_matrix((np.asarray(arrays["data"], np.float32), indices, indptr), shape=(n_items, n_items))
        return src

    def _weights(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``sim``'s CSR arrays in the kernels' dtypes, converted once per matrix."""
        if self._weights_of[0] is not self.sim:
            self._weights_of = (self.sim, _csr_arrays(self.sim))
        return self._weights_of[1]

    def retrieve(self, user_idx, history, n, *, exclude=None):
        assert self.sim is not None, "fit() first"
        h, w = history, self.sim
        if h.shape[1] != w.shape[0]:
            raise TwoStageError(f"{self.name} source: history rows have {h.shape[1]} items, the weights {w.shape[0]}")
        n_items = w.shape[1]
        ibits = _key_bits(n_items)
        keys = item_item_keys(*_csr_arrays(h), *self._weights(), ibits, *_exclusion(exclude),
                              SCRATCH.table("acc", n_items, np.float64), SCRATCH.table("touched", n_items),
                              SCRATCH.table("stamp_a", n_items), SCRATCH.table("stamp_b", n_items), SCRATCH.tags(h.shape[0]))
        return _top_from_keys(keys, n, ibits, n_items)


class CoVisitationSource(ItemItemSource):
    """Item-to-item co-occurrence: items often consumed by the same users as the user's history.

    Similarity ``c_ij / (n_i^a * n_j^(1-a))`` (asymmetric cosine; ``a=0.5`` is cosine), pruned to
    each item's ``neighbours`` strongest, so a request costs a sparse (history x neighbours) sum."""

    name = "covisit"
    kind = "covisit"

    def __init__(self, *, neighbours: int | None = 200, alpha: float = 0.5, shrink: float = 10.0) -> None:
        super().__init__(neighbours=neighbours)
        self.alpha, self.shrink = alpha, shrink

    def params(self) -> dict[str, Any]:
        return {"neighbours": self.neighbours, "alpha": self.alpha, "shrink": self.shrink}

    def fit(self, history: InteractionData, *, labels: InteractionData | None = None) -> "CoVisitationSource":
        if len(history) == 0:
            raise TwoStageError("covisit source: empty history")
        x = history.csr()
        co = (x.T @ x).tocsr().astype(np.float32)
        co.setdiag(0)
        co.eliminate_zeros()
        n = np.asarray(x.sum(axis=0)).ravel().astype(np.float32) + 1e-6
        co = co.tocoo()
        val = co.data / (np.power(n[co.row], self.alpha) * np.power(n[co.col], 1 - self.alpha) + self.shrink)
        sim = sp.csr_matrix((val.astype(np.float32), (co.row, co.col)), shape=co.shape)
        self.sim = sim if self.neighbours is None else _prune_rows(sim, self.neighbours)
        return self


class ItemRegressionSource(ItemItemSource):
    """EASE-style item-to-item regression (Steck 2019; :class:`models.baselines.EASE`'s closed form):
    each item's column predicted from all other items' columns with an L2 penalty ``lam``.
    Co-occurrence family like :class:`CoVisitationSource`, but the weights explain away items
    that merely co-occur with popular ones (and can be negative). Each history item keeps its
    ``neighbours`` largest-magnitude weights, so serving stays a sparse product; the dense fit
    needs ``n_items^2`` memory (``max_items``). ``lam=None``: chosen on held-out labels by
    :meth:`TwoStageRecommender.fit` among ``lam_grid``."""

    name = "ease"
    kind = "ease"
    lam_grid = (100.0, 250.0, 500.0, 1000.0, 2000.0)

    def __init__(self, *, lam: float | None = 500.0, neighbours: int | None = 500, max_items: int = 40_000) -> None:
        super().__init__(neighbours=neighbours)
        self.lam, self.max_items = lam, int(max_items)
        self.tuning: dict[float, float] = {}

    def params(self) -> dict[str, Any]:
        return {"lam": self.lam, "neighbours": self.neighbours, "max_items": self.max_items}

    def fit(self, history: InteractionData, *, labels: InteractionData | None = None) -> "ItemRegressionSource":
        """Fit on ``history``; with ``lam=None`` and held-out ``labels``, ``lam`` is the grid value
        with the best NDCG@10 on them (full ranking, history excluded), as the EASE baseline tunes."""
        from models.baselines import EASE

        if len(history) == 0:
            raise TwoStageError("ease source: empty history")
        if history.n_items > self.max_items:
            raise TwoStageError(f"ease source: {history.n_items} items need a dense {history.n_items}^2 fit; above "
                                f"max_items={self.max_items} (use the covisit source alone)")
        if self.lam is None and labels is not None and len(labels):
            from models.metrics import evaluate_recommender

            trials = {lam: evaluate_recommender(EASE(lam=lam, max_items=self.max_items).fit(history), train=history,
                                                test=labels, ks=(10,))["ndcg@10"] for lam in self.lam_grid}
            self.lam = max(trials, key=trials.__getitem__)
            self.tuning = trials
        model = EASE(lam=float(self.lam if self.lam is not None else 500.0), max_items=self.max_items).fit(history)
        b = model._b  # the baseline's fitted weights (same closed form, not re-implemented here)
        assert b is not None
        if self.neighbours is not None and self.neighbours < b.shape[1]:
            k = int(self.neighbours)
            cols = np.argpartition(-np.abs(b), k - 1, axis=1)[:, :k]
            rows = np.repeat(np.arange(b.shape[0]), k)
            vals = np.take_along_axis(b, cols, axis=1).ravel()
            sim = sp.csr_matrix((vals.astype(np.float32), (rows, cols.ravel())), shape=b.shape)
        else:
            sim = sp.csr_matrix(b.astype(np.float32))
        sim.eliminate_zeros()
        self.sim = sim
        return self


def _prune_rows(m: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Keep each row's ``k`` largest entries (vectorised: sort by (row, -value))."""
    m = m.tocsr()
    m.sort_indices()
    row = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    order = np.lexsort((-m.data, row))
    rank = np.arange(len(order)) - np.repeat(m.indptr[:-1], np.diff(m.indptr))
    keep = order[rank < k]
    return sp.csr_matrix((m.data[keep], (row[keep], m.indices[keep])), shape=m.shape)


class EmbeddingSource:
    """ANN retrieval over item embeddings (the two-tower's): FAISS inner product, exact for small
    catalogs, HNSW above ``hnsw_above`` items (or the model's own ``index``). ``user_vectors(user_idx,
    history)`` gives the query vectors (a table lookup offline, the user tower online); it may
    return ``(vectors, has_signal)`` so requests with nothing to personalise on retrieve nothing.

    ``item_ids`` maps the index's rows to this pipeline's item indices (``-1`` for items the
    pipeline does not know, which are skipped), for a retrieval model trained on another catalog."""

    def __init__(self, item_vectors: np.ndarray, user_vectors: np.ndarray | Callable[[np.ndarray, sp.csr_matrix], Any],
                 *, name: str = "two_tower", index: Any = None, item_ids: np.ndarray | None = None,
                 n_items: int | None = None, hnsw_above: int = 200_000, ef_search: int = 256) -> None:
        self.name = name
        self.item_vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)
        self._user = user_vectors
        self.item_ids = None if item_ids is None else np.asarray(item_ids, dtype=np.int64)
        if self.item_ids is not None and len(self.item_ids) != len(self.item_vectors):
            raise TwoStageError(f"{name}: item_ids has {len(self.item_ids)} rows for {len(self.item_vectors)} item vectors")
        self._unmapped = 0 if self.item_ids is None else int((self.item_ids < 0).sum())
        # the pipeline's catalog size when known (the exact path otherwise takes it from the
        # request's history rows) and, per catalog width, the item vectors in that catalog's order
        self.n_items = None if n_items is None else int(n_items)
        self._columns_of: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        import faiss

        if index is None:
            d = self.item_vectors.shape[1]
            if len(self.item_vectors) > hnsw_above:
                from models.ann import hnsw_index

                index = hnsw_index(self.item_vectors, m=32, ef_construction=40, ef_search=ef_search)
            else:
                index = faiss.IndexFlatIP(d)
                index.add(self.item_vectors)
        elif index.ntotal != len(self.item_vectors):
            raise TwoStageError(f"{name}: the index holds {index.ntotal} vectors, item_vectors {len(self.item_vectors)}")
        self.index = index
        self._exact = isinstance(index, faiss.IndexFlat) and index.metric_type == faiss.METRIC_INNER_PRODUCT

    @classmethod
    def from_retrieval(cls, retrieval: Any, *, users: IdMap, items: IdMap, name: str = "two_tower") -> "EmbeddingSource":
        """The built two-tower servable (``models.two_tower.TwoTowerRetrieval``) as a source of a
        pipeline whose ranker uses ``users`` / ``items``: ids are aligned by external id, the
        FAISS index and item vectors are the model's own, and a user's query vector comes from
        the user tower over the model's stored history plus any newer consumed items in the
        request's history row (exactly the stored-history vector when there are none).
        Users or items unknown to one side are skipped, never an error."""
        item_ids = items.encode(retrieval.items.ids, unknown="minus_one")
        if (item_ids < 0).all():
            raise TwoStageError(f"{name}: the retrieval model knows none of the ranker's {len(items)} items "
                                "(trained on another catalog?)")
        local_to_model = retrieval.items.encode(items.ids, unknown="minus_one")
        user_to_model = retrieval.users.encode(users.ids, unknown="minus_one")
        feats = retrieval.features
        hist_indptr = np.asarray(feats.hist_indptr, dtype=np.int64)
        hist_items = np.asarray(feats.hist_items, dtype=np.int64)
        if len(hist_items) and (hist_items.min() < 0 or hist_items.max() >= len(retrieval.items)):
            raise TwoStageError(f"{name}: the retrieval model's stored histories name items outside its catalog")
        if len(hist_indptr) != len(retrieval.users) + 1:
            raise TwoStageError(f"{name}: stored histories for {len(hist_indptr) - 1} users, the model has {len(retrieval.users)}")

        def queries(user_idx: np.ndarray, history: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
            u = np.asarray(user_idx, dtype=np.int64)
            mu = np.where(u >= 0, user_to_model[np.maximum(u, 0)], -1)
            h_indptr, h_indices, _ = _csr_arrays(history)
            lengths, values, signal = merged_histories(mu, h_indptr, h_indices, local_to_model, hist_indptr, hist_items,
                                                       int(retrieval.config.inference_history),
                                                       SCRATCH.table("stamp_a", len(retrieval.items)), SCRATCH.tags(len(mu)))
            return retrieval.user_vectors(mu, hist=(lengths, values)), signal

        return cls(retrieval.item_vectors, queries, name=name, index=retrieval.index, item_ids=item_ids, n_items=len(items))

    def query_vectors(self, user_idx: np.ndarray, history: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
        if callable(self._user):
            out = self._user(user_idx, history)
            vecs, signal = out if isinstance(out, tuple) else (out, np.ones(len(user_idx), bool))
        else:
            known = np.asarray(user_idx) >= 0
            vecs, signal = self._user[np.where(known, user_idx, 0)], known
        return np.ascontiguousarray(vecs, dtype=np.float32), np.asarray(signal, bool)

    def _columns(self, width: int) -> tuple[np.ndarray, np.ndarray]:
        """The item vectors laid out as a catalog of ``width`` items (row ``j`` = pipeline item ``j``;
        zeros where the index has no vector for it) and which columns have one (empty: all do).
        Built once per width, so the exact path's product lands in the pipeline's order directly
        (no scatter of every score per request)."""
        if width not in self._columns_of:
            n_rows = len(self.item_vectors)
            dest = np.arange(n_rows, dtype=np.int64) if self.item_ids is None else self.item_ids
            if n_rows == width and np.array_equal(dest, np.arange(width)):
                self._columns_of[width] = (self.item_vectors, _ALL)
            else:
                rows = np.flatnonzero((dest >= 0) & (dest < width))
                vectors = np.zeros((width, self.item_vectors.shape[1]), np.float32)
                vectors[dest[rows]] = self.item_vectors[rows]
                ok = np.zeros(width, bool)
                ok[dest[rows]] = True
                self._columns_of[width] = (vectors, ok)
        return self._columns_of[width]

    @property
    def exact(self) -> bool:
        """Is the index an exact (flat) inner-product one? Then search is a matrix product."""
        return self._exact

    def _all_scores(self, queries: np.ndarray, vectors: np.ndarray | None = None) -> np.ndarray:
        """``(B, rows)`` inner products with ``vectors`` (default: the index's rows): torch's GEMM
        honours the worker's thread count (numpy's BLAS may spin extra threads)."""
        import torch

        vectors = self.item_vectors if vectors is None else vectors
        return (torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)) @ torch.from_numpy(vectors).T).numpy()

    def search(self, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``depth`` index rows per query, best first. An exact (flat) inner-product index is
        searched as one matrix product + a rank-key top-n (the same answer ~5x faster than FAISS's
        heap-based flat search at the hundreds of results a request asks for); ANN indexes go
        through FAISS."""
        if self.exact:
            rows, scores = _top_n_dense(self._all_scores(queries), depth, None)
            return scores, rows
        return self.index.search(queries, depth)

    def retrieve(self, user_idx, history, n, *, exclude=None):
        q, signal = self.query_vectors(np.asarray(user_idx), history)
        if self.exact:
            # every item is scored anyway: exclusions, items without a vector and requests without
            # signal are masked in the top n itself (no over-fetch, no filtering pass after it)
            width = exclude.shape[1] if exclude is not None else history.shape[1] if history is not None else \
                self.n_items if self.n_items is not None else len(self.item_vectors)
            vectors, column_ok = self._columns(int(width))
            return _top_n_dense(self._all_scores(q, vectors), n, exclude, column_ok=column_ok, row_ok=signal)
        extra = int(np.diff(exclude.indptr).max()) if exclude is not None and exclude.nnz else 0
        depth = min(self.index.ntotal, n + extra + self._unmapped)
        if depth <= 0:
            return np.full((len(q), 0), -1, np.int64), np.zeros((len(q), 0), np.float32)
        scores, items = self.search(q, depth)
        items = items.astype(np.int64)
        if self.item_ids is not None:
            items = np.where(items >= 0, self.item_ids[np.maximum(items, 0)], -1)
        items[~signal] = -1
        return _filter_ranked(items, scores.astype(np.float32), exclude, n)


class RecommenderSource:
    """Any fitted :class:`models.base.Recommender` (scores over the catalog) as a source."""

    def __init__(self, model: Any, *, name: str | None = None) -> None:
        self.model = model
        self.name = name or getattr(model, "name", type(model).__name__)

    def retrieve(self, user_idx, history, n, *, exclude=None):
        scores = np.asarray(self.model.score(np.asarray(user_idx)), dtype=np.float32)
        return _top_n_dense(scores, n, exclude)


# ---------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------
@dataclass
class Candidates:
    """Merged candidates of a batch of requests, one row per (request, item)."""

    request: np.ndarray  # (M,) request position in the batch, sorted
    item: np.ndarray  # (M,)
    features: np.ndarray  # (M, 2 * n_sources + 1) ranker dense features
    source_mask: np.ndarray  # (M,) bit s set if source s produced the item
    feature_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.item)


@dataclass
class Recommendations:
    """Top-k per request, in index space (``-1`` pads rows with fewer than k items)."""

    items: np.ndarray  # (B, k)
    scores: np.ndarray  # (B, k) calibrated engagement probabilities
    source_mask: np.ndarray  # (B, k)
    source_names: tuple[str, ...]

    def sources_of(self, row: int, col: int) -> list[str]:
        m = int(self.source_mask[row, col])
        return [n for s, n in enumerate(self.source_names) if m >> s & 1]

    def to_frames(self, items: IdMap, users: Sequence[str] | None = None) -> list[pd.DataFrame]:
        """One frame per request: ``item_id, score, sources`` (external ids)."""
        out = []
        for r in range(self.items.shape[0]):
            ok = self.items[r] >= 0
            out.append(pd.DataFrame({
                "item_id": items.decode(self.items[r][ok]),
                "score": self.scores[r][ok],
                "sources": [self.sources_of(r, c) for c in np.flatnonzero(ok)],
            }))
        return out


def source_feature_names(names: Sequence[str]) -> tuple[str, ...]:
    return tuple(f for n in names for f in (f"src_{n}_score", f"src_{n}_rank")) + ("src_count",)


@dataclass
class TwoStagePipeline:
    """Sources + ranker + item metadata: everything a request needs, already fitted.

    ``history`` is the consumed-items matrix in the ranker's index space (users x items);
    serving passes fresh rows per request instead (``history=`` on :meth:`recommend`)."""

    sources: list[Any]
    ranker: Any  # models.dlrm.DLRMScorer
    quotas: dict[str, int]
    n_candidates: int = 500
    history: sp.csr_matrix | None = None
    available: np.ndarray | None = None  # (n_items,) bool
    max_category_share: float | None = None
    _layouts: dict[tuple, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise TwoStageError(f"candidate source names must be unique, got {names}")
        if not self.sources:
            raise TwoStageError("a two-stage pipeline needs at least one candidate source")
        if len(names) > 30:
            raise TwoStageError("at most 30 candidate sources (source bitmask)")
        missing = [n for n in names if n not in self.quotas]
        if missing:
            raise TwoStageError(f"no quota for candidate source(s) {missing}; quotas: {self.quotas}")
        self.feature_names = source_feature_names(names)
        if tuple(self.ranker.config.extra_dense) != self.feature_names:
            raise TwoStageError(f"the ranker was trained on features {self.ranker.config.extra_dense}, "
                                f"these sources produce {self.feature_names}")

    @property
    def n_items(self) -> int:
        return self.ranker.features.n_items

    @property
    def source_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sources)

    # -- stages -----------------------------------------------------------------------------
    def history_rows(self, user_idx: np.ndarray, history: sp.csr_matrix | None = None) -> sp.csr_matrix:
        """Consumed-items rows of a batch of requests, ``(len(user_idx), n_items)``: ``history`` as
        given (checked), else the pipeline's stored history (training-time; serving's fallback
        when online features are unavailable); unknown users (``-1``) get an empty row."""
        user_idx = np.asarray(user_idx, dtype=np.int64)
        if history is not None:
            h = sp.csr_matrix(history)
            if h.shape != (len(user_idx), self.n_items):
                raise TwoStageError(f"history must be (n_requests, n_items) = {(len(user_idx), self.n_items)}, got {h.shape}")
            return h
        if self.history is None:
            return sp.csr_matrix((len(user_idx), self.n_items), dtype=np.float32)
        known = user_idx >= 0
        h = _rows_csr(self.history, np.where(known, user_idx, 0)).tolil() if not known.all() else None
        if h is None:
            return _rows_csr(self.history, user_idx)
        for r in np.flatnonzero(~known):  # unknown users have no history (rows only, not items)
            h.rows[r], h.data[r] = [], []
        return h.tocsr()

    _history_rows = history_rows  # the name serving used before it was public

    def retrieve(self, user_idx: np.ndarray, history: sp.csr_matrix, *, exclude: sp.csr_matrix | None = None) -> Candidates:
        """Merged, de-duplicated candidates with per-source rank/score features.

        Rows come out grouped by request, each request's best first (by best per-source rank
        fraction, ties by item index), at most ``n_candidates`` per request. The sources' ``(B, q)``
        blocks go side by side into one compiled pass (:func:`models.kernels.candidate_union`), numpy's
        SIMD sort ranks each request's union, and a second pass reads the winners out."""
        n_items = self.n_items
        n_s = len(self.sources)
        blocks_i, blocks_s, layout = [], [], []
        for s, source in enumerate(self.sources):
            q = int(self.quotas[source.name])
            if q <= 0:
                continue
            items, scores = source.retrieve(user_idx, history, q, exclude=exclude)
            items, scores = items[:, :q], scores[:, :q]  # rank fractions stay in (0, 1]
            blocks_i.append(np.asarray(items, dtype=np.int64))
            blocks_s.append(np.asarray(scores, dtype=np.float32))
            layout.append((s, items.shape[1], q))
        if not blocks_i:
            raise TwoStageError("every candidate source has quota 0")
        items = np.concatenate(blocks_i, axis=1) if len(blocks_i) > 1 else blocks_i[0]
        sc = np.concatenate(blocks_s, axis=1) if len(blocks_s) > 1 else blocks_s[0]
        ibits = _key_bits(n_items)
        col_src, col_rf = self._columns_of(tuple(layout))
        slots = SCRATCH.table("slots", n_items)  # the merge's sparse set, then its item -> slot table
        keys, counts, slot_items, feats, masks = candidate_union(np.ascontiguousarray(items), np.ascontiguousarray(sc),
                                                                 col_src, col_rf, n_s, n_items, ibits, slots)
        request, item, feats, mask = candidate_emit(_smallest_keys(keys, self.n_candidates), counts, slot_items, feats,
                                                    masks, ibits, slots)
        return Candidates(request, item, feats, mask, self.feature_names)

    def _columns_of(self, layout: tuple[tuple[int, int, int], ...]) -> tuple[np.ndarray, np.ndarray]:
        """The merged block's column -> source index and rank fraction (``1 - rank / quota``), for
        sources side by side as ``(source, columns, quota)``. A batch has one of a few layouts (a
        source returns fewer columns only when the catalog is small), so each is built once."""
        if layout not in self._layouts:
            if len(self._layouts) >= 64:  # bounded: an unusual source could return every width
                self._layouts.clear()
            self._layouts[layout] = (
                np.concatenate([np.full(cols, s, np.int64) for s, cols, _ in layout]),
                np.concatenate([(1.0 - np.arange(cols) / max(q, 1)).astype(np.float32) for _, cols, q in layout]))
        return self._layouts[layout]

    def filter(self, cands: Candidates, *, blocked: Sequence[Sequence[int]] | None = None) -> Candidates:
        """Drop unavailable items and each request's blocked items."""
        keep = np.ones(len(cands), bool)
        if self.available is not None:
            keep &= self.available[cands.item]
        if blocked:
            rows = np.repeat(np.arange(len(blocked)), [len(x) for x in blocked])
            cols = np.concatenate([np.asarray(x, dtype=np.int64) for x in blocked]) if len(rows) else np.empty(0, np.int64)
            if len(rows):
                bkeys = rows * self.n_items + cols
                keep &= ~np.isin(cands.request * self.n_items + cands.item, bkeys)
        if keep.all():  # nothing to drop (the usual case): no copy of every candidate row
            return cands
        return Candidates(cands.request[keep], cands.item[keep], cands.features[keep], cands.source_mask[keep],
                          cands.feature_names)

    def rank(self, user_idx: np.ndarray, cands: Candidates) -> np.ndarray:
        """Calibrated scores of every candidate, one batched DLRM forward."""
        if len(cands) == 0:
            return np.empty(0, np.float32)
        return self.ranker.score(user_idx[cands.request], cands.item, cands.features,
                                 request_of_row=cands.request, request_users=user_idx)

    def post_process(self, n_requests: int, cands: Candidates, scores: np.ndarray, k: int,
                     max_category_share: float | None) -> Recommendations:
        """Top ``k`` per request with at most ``ceil(share * k)`` items per primary category.

        Greedy: take the next-best item unless its category is full; skipped items refill the list
        (in rank order) when the catalog is too narrow to satisfy the cap. Scores rank as float32
        (ties by candidate order): numpy's SIMD sort per request, then one compiled pass
        (:func:`models.kernels.top_k_diverse`)."""
        scores = np.ascontiguousarray(scores, dtype=np.float32)
        request = np.ascontiguousarray(cands.request, dtype=np.int64)
        if scores.shape != request.shape or (len(request) and (request.min() < 0 or request.max() >= n_requests)):
            raise TwoStageError(f"post_process: {len(scores)} scores for {len(request)} candidates of {n_requests} requests "
                                "(each candidate's request must be in range)")
        rbits = _key_bits(len(cands))
        ranked = np.sort(request_score_keys(request, scores, int(n_requests), rbits), axis=1)
        cap = max(1, int(np.ceil(max_category_share * k))) if max_category_share is not None and max_category_share < 1.0 else 0
        feats = self.ranker.features
        items, out_s, out_m = top_k_diverse(ranked, rbits, np.ascontiguousarray(cands.item, dtype=np.int64), scores,
                                            np.ascontiguousarray(cands.source_mask, dtype=np.int64),
                                            feats.primary_category.astype(np.int64, copy=False), len(feats.categories),
                                            int(k), cap)
        return Recommendations(items, out_s, out_m, self.source_names)

    # -- entry points -----------------------------------------------------------------------
    def recommend(self, user_idx: np.ndarray | Sequence[int], *, k: int = 20, history: sp.csr_matrix | None = None,
                  blocked: Sequence[Sequence[int]] | None = None, max_category_share: float | None | str = "default",
                  ) -> Recommendations:
        """Recommendations for a batch of requests (one user index each; ``-1`` = unknown user,
        served from the history given, or popular items). Batch concurrent requests for speed."""
        users = np.asarray(user_idx, dtype=np.int64).ravel()
        if k < 1:
            raise TwoStageError(f"k must be >= 1, got {k}")
        n_u = self.ranker.features.n_users
        if len(users) and (users.min() < -1 or users.max() >= n_u):
            raise TwoStageError(f"user index out of range [-1, {n_u}): {users[(users < -1) | (users >= n_u)][0]}")
        if blocked is not None and len(blocked) != len(users):
            raise TwoStageError(f"blocked must have one list per request ({len(users)}), got {len(blocked)}")
        hist = self.history_rows(users, history)
        cands = self.filter(self.retrieve(users, hist, exclude=hist), blocked=blocked)
        scores = self.rank(users, cands)
        share = self.max_category_share if max_category_share == "default" else max_category_share
        return self.post_process(len(users), cands, scores, k, share)  # type: ignore[arg-type]

    def recommend_ids(self, user_ids: Sequence[str], *, k: int = 20, **kw: Any) -> list[pd.DataFrame]:
        """External ids in and out; unknown users get ``-1`` (cold start)."""
        feats = self.ranker.features
        idx = feats.users.encode(user_ids, unknown="minus_one")
        return self.recommend(idx, k=k, **kw).to_frames(feats.items)


# ---------------------------------------------------------------------------------------------
# training data for the ranker
# ---------------------------------------------------------------------------------------------
def candidate_examples(
    *,
    sources: Sequence[Any],
    quotas: dict[str, int],
    n_candidates: int,
    history: sp.csr_matrix,
    labels: InteractionData,
    n_items: int,
    positive_min_rating: float | None = None,
    negatives_per_user: int = 100,
    seed: int = 0,
    batch_users: int = 512,
):
    """Ranking examples from retrieval: for each user with held-out ``labels``, retrieve with the
    ``history`` matrix; a candidate that is a held-out positive is labelled 1, a held-out
    interaction below ``positive_min_rating`` 0, and about ``negatives_per_user`` other candidates
    per user are sampled uniformly as negatives.
    Returns :class:`models.dlrm.RankingExamples` and the candidate recall (share of held-out
    positives retrieved)."""
    from models.dlrm import RankingExamples

    rng = np.random.default_rng(seed)
    names = [s.name for s in sources]
    stub = _RetrieverOnly(list(sources), quotas, n_candidates, n_items)
    lab = labels.csr(binary=False)
    pos_mask = labels.values >= positive_min_rating if positive_min_rating is not None else np.ones(len(labels), bool)
    pos_m = sp.csr_matrix((np.where(pos_mask, 1.0, -1.0), (labels.user_idx, labels.item_idx)), shape=lab.shape)
    pos_m.sum_duplicates()
    users = np.unique(labels.user_idx)
    out_u, out_i, out_y, out_f = [], [], [], []
    n_pos_total, n_pos_found = int((pos_m.data > 0).sum()), 0
    for s in range(0, len(users), batch_users):
        ub = users[s:s + batch_users]
        hist = _rows_csr(history, ub)
        c = stub.retrieve(ub, hist, exclude=hist)
        lab_rows = _rows_csr(pos_m, ub)
        y = np.asarray(lab_rows[c.request, c.item]).ravel()
        is_pos, is_neg_explicit = y > 0, y < 0
        n_pos_found += int(is_pos.sum())
        # Negatives: a uniform sample of the other candidates at the same rate for every rank, so
        # the sample does not distort how source ranks relate to engagement (a "hard negatives
        # from the top" scheme would teach the ranker that a top source rank means negative).
        other = ~is_pos & ~is_neg_explicit
        denom = np.maximum(np.bincount(c.request[other], minlength=len(ub)), 1)
        p = np.minimum(1.0, negatives_per_user / denom[c.request])
        take = other & (rng.random(len(c)) < p)
        sel = is_pos | is_neg_explicit | take
        # users without any retrieved positive add nothing but noise
        has_pos = np.bincount(c.request[is_pos], minlength=len(ub)) > 0
        sel &= has_pos[c.request]
        out_u.append(ub[c.request[sel]])
        out_i.append(c.item[sel])
        out_y.append(is_pos[sel].astype(np.float32))
        out_f.append(c.features[sel])
    feature_names = source_feature_names(names)
    ex = RankingExamples(np.concatenate(out_u), np.concatenate(out_i), np.concatenate(out_y),
                         np.concatenate(out_f) if out_f else np.zeros((0, len(feature_names)), np.float32), feature_names)
    return ex, n_pos_found / max(n_pos_total, 1)


class _RetrieverOnly(TwoStagePipeline):
    """Retrieval and merge without a ranker (used to build the ranker's own training data)."""

    def __init__(self, sources: list[Any], quotas: dict[str, int], n_candidates: int, n_items: int) -> None:
        self.sources, self.quotas, self.n_candidates = sources, quotas, n_candidates
        self._n_items = n_items
        self.feature_names = source_feature_names([s.name for s in sources])
        self.available, self.history, self.max_category_share = None, None, None
        self._layouts = {}

    @property
    def n_items(self) -> int:  # type: ignore[override]
        return self._n_items


# ---------------------------------------------------------------------------------------------
# the Recommender wrapper (offline evaluation)
# ---------------------------------------------------------------------------------------------
DEFAULT_QUOTAS = {"two_tower": 300, "covisit": 300, "ease": 300, "popular": 100}
#: the sources a :class:`TwoStageRecommender` fits itself, by name, with their parameters
DEFAULT_SOURCES: dict[str, dict[str, Any]] = {"covisit": {}, "ease": {"lam": None}, "popular": {}}
SOURCE_CLASSES: dict[str, Callable[..., Any]] = {"covisit": CoVisitationSource, "ease": ItemRegressionSource,
                                                 "popular": PopularSource}


@dataclass
class TwoStageRecommender:
    """The whole pipeline as a :class:`models.base.Recommender`.

    ``fit(train, valid)``: candidate sources on ``train``; the ranker on ``valid`` (labels) with
    features from ``train`` (so nothing the ranker learns from is in its inputs); without
    ``valid``, a random ``label_share`` of each user's training interactions is held out as labels.
    ``sources`` names the sources it fits itself (default: co-visitation, EASE-style regression
    with its penalty chosen on the labels, popular; ``source_factories`` replaces them with
    callables), plus ``extra_sources`` (e.g. a fitted two-tower wrapped in :class:`RecommenderSource`).
    Ranker negatives: ``negatives_per_user`` candidates per user drawn uniformly from that user's
    retrieved candidates (hard negatives: what retrieval really proposes, at every rank)."""

    name: str = "two_stage"
    n_candidates: int = 500
    quotas: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_QUOTAS))
    extra_sources: list[Any] = field(default_factory=list)
    source_factories: list[Callable[[InteractionData], Any]] | None = None
    sources: dict[str, dict[str, Any]] = field(default_factory=lambda: {k: dict(v) for k, v in DEFAULT_SOURCES.items()})
    items_frame: pd.DataFrame | None = None
    positive_min_rating: float | None = None
    label_share: float = 0.125
    negatives_per_user: int = 400
    ranker_valid_share: float = 0.1
    max_category_share: float | None = None
    seed: int = 0
    dlrm_params: dict[str, Any] = field(default_factory=dict)
    progress: bool = False

    def __post_init__(self) -> None:
        self.pipeline: TwoStagePipeline | None = None
        self._also_consumed: sp.csr_matrix | None = None
        self.report: dict[str, Any] = {}

    def _default_sources(self, history: InteractionData, labels: InteractionData | None = None) -> list[Any]:
        if self.source_factories is not None:
            return [f(history) for f in self.source_factories]
        unknown = sorted(set(self.sources) - set(SOURCE_CLASSES))
        if unknown:
            raise TwoStageError(f"unknown candidate source(s) {unknown}; known: {sorted(SOURCE_CLASSES)}")
        out = []
        for name, params in self.sources.items():
            src = SOURCE_CLASSES[name](**params)
            if isinstance(src, ItemRegressionSource) and history.n_items > src.max_items:
                # a dense n_items^2 fit does not scale to large catalogs: the other sources carry on
                self.report["skipped_sources"] = {**self.report.get("skipped_sources", {}),
                                                  name: f"{history.n_items} items > max_items={src.max_items}"}
                continue
            out.append(src.fit(history, labels=labels))
        return out

    def fit(self, train: InteractionData, *, valid: InteractionData | None = None) -> "TwoStageRecommender":
        from models.dlrm import RankingFeatures, train_dlrm

        self.report = {}
        if len(train) == 0:
            raise TwoStageError("two_stage: empty training set")
        if len(np.unique(train.user_idx)) < 2:
            raise TwoStageError("two_stage: the training set has a single user; the ranker needs several")
        if valid is None or len(valid) == 0:
            rng = np.random.default_rng(self.seed)
            held = rng.random(len(train)) < self.label_share
            history = _subset(train, ~held)
            labels = _subset(train, held)
        else:
            if valid.users != train.users or valid.items != train.items:
                raise TwoStageError("two_stage: valid must share train's user and item id maps")
            history, labels = train, valid
        if len(labels) == 0 or len(history) == 0:
            raise TwoStageError("two_stage: not enough interactions to hold out ranker labels")
        sources = self._default_sources(history, labels) + list(self.extra_sources)
        quotas = {s.name: int(self.quotas.get(s.name, self.n_candidates)) for s in sources}
        hist_m = history.csr()
        ex, cand_recall = candidate_examples(sources=sources, quotas=quotas, n_candidates=self.n_candidates,
                                             history=hist_m, labels=labels, n_items=train.n_items,
                                             positive_min_rating=self.positive_min_rating,
                                             negatives_per_user=self.negatives_per_user,
                                             seed=self.seed)
        if len(ex) == 0:
            raise TwoStageError("two_stage: retrieval found none of the held-out positives; nothing to train the ranker on")
        rng = np.random.default_rng(self.seed + 7)
        users = np.unique(ex.user_idx)
        val_users = rng.random(len(users)) < self.ranker_valid_share
        is_val = np.isin(ex.user_idx, users[val_users])
        feats = RankingFeatures.build(history, items_frame=self.items_frame, seed=self.seed)
        res = train_dlrm(feats, ex.subset(np.flatnonzero(~is_val)), ex.subset(np.flatnonzero(is_val)),
                         seed=self.seed, progress=self.progress, **self.dlrm_params)
        # Sources and ranker features read `history`; validation items are excluded from the lists
        # (already consumed) but not used as inputs, like the baselines, which also fit on train only.
        self._also_consumed = None if valid is None else labels.csr()
        self.pipeline = TwoStagePipeline(sources, res.scorer, quotas, self.n_candidates, history=hist_m,
                                         max_category_share=self.max_category_share)
        self.train_result = res
        self.report = {**self.report, "candidate_recall": cand_recall, "ranker_examples": len(ex),
                       "ranker_positive_rate": float(ex.labels.mean()), **res.metrics,
                       "best_epoch": res.best_epoch, "ranker_train_s": res.train_s}
        return self

    def score(self, user_idx: np.ndarray, *, k: int = 100, chunk: int = 512) -> np.ndarray:
        """See :meth:`PipelineRecommender.score` (validation items are excluded as consumed)."""
        if self.pipeline is None:
            raise TwoStageError("two_stage: score() before fit()")
        return PipelineRecommender(self.pipeline, also_exclude=self._also_consumed, k=k, chunk=chunk).score(user_idx)

    def source_recommenders(self) -> list["SourceRecommender"]:
        """Each fitted candidate source alone, as a Recommender (for the evaluator's table)."""
        if self.pipeline is None:
            raise TwoStageError("two_stage: source_recommenders() before fit()")
        excl = self.pipeline.history if self._also_consumed is None else (self.pipeline.history + self._also_consumed).tocsr()
        return [SourceRecommender(s, self.pipeline.history, self.pipeline.n_items, exclude=excl) for s in self.pipeline.sources]


@dataclass
class PipelineRecommender:
    """A built :class:`TwoStagePipeline` seen as a :class:`models.base.Recommender` (``users`` /
    ``items`` id maps, full-catalog ``score``) for the evaluator and the promotion gate: the same
    retrieve -> filter -> rank -> post-process serving runs, on each user's stored history."""

    pipeline: TwoStagePipeline
    also_exclude: sp.csr_matrix | None = None  # consumed items that are not model inputs (e.g. validation)
    k: int = 100
    chunk: int = 512
    name: str = "two_stage"

    def __post_init__(self) -> None:
        # plain attributes (callers may re-point them); the ranker's id maps index score()'s rows/columns
        self.users: IdMap = self.pipeline.ranker.features.users
        self.items: IdMap = self.pipeline.ranker.features.items

    def fit(self, train: InteractionData, *, valid: InteractionData | None = None) -> "PipelineRecommender":
        return self  # built from artifacts; evaluation only

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        """``(len(user_idx), n_items)``: the final top ``k`` (after post-processing) get scores above
        every other candidate in list order; other candidates keep their ranker score (so deeper
        cut-offs still see the ranker's order); non-candidates are ``-inf``."""
        p, k = self.pipeline, self.k
        users = np.asarray(user_idx, dtype=np.int64).ravel()
        out = np.full((len(users), p.n_items), -np.inf, dtype=np.float32)
        for s in range(0, len(users), self.chunk):
            ub = users[s:s + self.chunk]
            hist = p.history_rows(ub, None)
            excl = hist if self.also_exclude is None else (hist + _rows_csr(self.also_exclude, ub)).tocsr()
            cands = p.filter(p.retrieve(ub, hist, exclude=excl))
            sc = p.rank(ub, cands)
            out[s + cands.request, cands.item] = sc
            if p.max_category_share is not None:
                recs = p.post_process(len(ub), cands, sc, k, p.max_category_share)
                rows, cols = np.nonzero(recs.items >= 0)
                out[s + rows, recs.items[rows, cols]] = 2.0 + (k - cols) / k
        return out


def pipeline_recommender(pipeline: TwoStagePipeline, *, also_exclude: sp.csr_matrix | None = None,
                         k: int = 100) -> PipelineRecommender:
    """The Recommender view of a pipeline (what ``pipelines.promote`` measures)."""
    return PipelineRecommender(pipeline, also_exclude=also_exclude, k=k)


# ---------------------------------------------------------------------------------------------
# persistence: the ranker artifact carries the whole pipeline except the retrieval model
# ---------------------------------------------------------------------------------------------
#: source ``type`` of sources supplied at rebuild time by the retrieval model (two-tower ANN)
RETRIEVAL_SOURCE = "retrieval"
ITEM_ITEM_KINDS: dict[str, type[ItemItemSource]] = {c.kind: c for c in (ItemItemSource, CoVisitationSource,
                                                                         ItemRegressionSource)}


def pipeline_artifact(pipeline: TwoStagePipeline, *, metadata: dict[str, Any] | None = None,
                      feature_service_version: str | None = None, include_history: bool = True):
    """The ranker artifact (kind ``dlrm``) of a fitted pipeline, with everything needed to rebuild
    the pipeline with no training code: the DLRM and its feature tables, each non-embedding
    source's arrays (co-visitation neighbour matrix, popularity counts), the quotas and candidate
    count, and (``include_history``) the training-time consumed-items matrix, which is the
    fallback history when the caller has none. Sources that wrap a model (the two-tower) are
    recorded by name and type ``retrieval``: :func:`pipeline_from_artifacts` plugs the retrieval
    artifact in their place."""
    art = pipeline.ranker.to_artifact(metadata=metadata, feature_service_version=feature_service_version)
    specs = []
    for src in pipeline.sources:
        to_parts = getattr(src, "to_parts", None)
        spec, arrays = to_parts() if to_parts is not None else ({"type": RETRIEVAL_SOURCE}, {})
        specs.append({"name": src.name, **spec})
        art.arrays.update({f"src__{src.name}__{k}": v for k, v in arrays.items()})
    if include_history and pipeline.history is not None:
        h = sp.csr_matrix(pipeline.history)
        art.arrays["ts_history_indptr"] = h.indptr.astype(np.int64)
        art.arrays["ts_history_indices"] = h.indices.astype(np.int32)
    two_stage = {"sources": specs, "quotas": {k: int(v) for k, v in pipeline.quotas.items()},
                 "n_candidates": int(pipeline.n_candidates), "max_category_share": pipeline.max_category_share}
    art.config = art.config.model_copy(update={"two_stage": two_stage})
    return art


def _history_in(history: Any, users: IdMap, items: IdMap) -> sp.csr_matrix:
    """Consumed items as a (users x items) CSR in the ranker's index space. ``InteractionData`` in
    other id maps is re-encoded by external id (unknown users/items dropped)."""
    if isinstance(history, InteractionData):
        if history.users == users and history.items == items:
            return history.csr()
        u = users.encode(history.users.decode(history.user_idx), unknown="minus_one")
        i = items.encode(history.items.decode(history.item_idx), unknown="minus_one")
        ok = (u >= 0) & (i >= 0)
        m = sp.csr_matrix((np.ones(int(ok.sum()), np.float32), (u[ok], i[ok])), shape=(len(users), len(items)))
        m.data[:] = 1.0
        return m
    m = sp.csr_matrix(history, dtype=np.float32)
    if m.shape != (len(users), len(items)):
        raise TwoStageError(f"history must be (n_users, n_items) = {(len(users), len(items))} in the ranker's "
                            f"index space, got {m.shape}")
    return m


def pipeline_from_artifacts(retrieval: Any, ranker_artifact: Any, *, n_candidates: int | None = 500,
                            history: Any = None, quotas: dict[str, int] | None = None,
                            max_category_share: float | None | str = "saved", quantize: bool = False,
                            precision: str = "fp32") -> TwoStagePipeline:
    """Rebuild the serving pipeline from artifacts alone.

    ``retrieval``: the built two-tower servable (``Artifact.build()`` of a ``two_tower`` artifact,
    or the artifact itself), used as an :class:`EmbeddingSource` (its FAISS index and item
    vectors, ids aligned with the ranker's by external id) for every source the ranker was
    trained with as type ``retrieval``; may be ``None`` if the ranker has no such source.
    ``ranker_artifact``: a ``dlrm`` artifact written by :func:`pipeline_artifact`.
    ``history``: users' consumed items (``InteractionData`` or a CSR in the ranker's space); by
    default the training-time history saved in the artifact. ``n_candidates=None`` keeps the
    saved value. ``quantize`` / ``precision``: the ranker's int8 embeddings and MLP compute
    precision (:meth:`models.dlrm.DLRMScorer.set_precision`); serving chooses, evaluation keeps fp32."""
    from models.dlrm import DLRMScorer

    if getattr(ranker_artifact, "kind", None) != "dlrm":
        raise TwoStageError(f"the ranker artifact must be of kind 'dlrm', got {getattr(ranker_artifact, 'kind', None)!r}")
    cfg = ranker_artifact.typed_config()
    spec = getattr(cfg, "two_stage", None)
    if not spec:
        raise TwoStageError("this ranker artifact has no candidate sources saved (written before the two-stage "
                            "pipeline was part of the artifact): retrain the ranker")
    if retrieval is not None and hasattr(retrieval, "kind") and hasattr(retrieval, "build"):
        retrieval = retrieval.build()
    scorer = DLRMScorer.from_artifact(ranker_artifact, quantize=quantize, precision=precision)
    feats = scorer.features
    arrays = ranker_artifact.arrays
    sources: list[Any] = []
    for s in spec["sources"]:
        name, kind = s["name"], s["type"]
        parts = {k[len(f"src__{name}__"):]: v for k, v in arrays.items() if k.startswith(f"src__{name}__")}
        if kind in ITEM_ITEM_KINDS:
            sources.append(ITEM_ITEM_KINDS[kind].from_parts(s, parts, feats.n_items))
        elif kind == "popular":
            sources.append(PopularSource.from_parts(s, parts, feats.n_items))
        elif kind == RETRIEVAL_SOURCE:
            if retrieval is None:
                raise TwoStageError(f"the ranker was trained with candidate source {name!r} from a retrieval model; "
                                    "pass the built retrieval model")
            sources.append(EmbeddingSource.from_retrieval(retrieval, users=feats.users, items=feats.items, name=name))
        else:
            raise TwoStageError(f"unknown candidate source type {kind!r} (source {name!r}) in the ranker artifact")
        sources[-1].name = name
    if history is not None:
        hist = _history_in(history, feats.users, feats.items)
    elif "ts_history_indptr" in arrays:
        indices = np.asarray(arrays["ts_history_indices"])
        hist = sp.csr_matrix((np.ones(len(indices), np.float32), indices, np.asarray(arrays["ts_history_indptr"])),
                             shape=(feats.n_users, feats.n_items))
    else:
        hist = None
    share = spec.get("max_category_share") if max_category_share == "saved" else max_category_share
    return TwoStagePipeline(sources, scorer, {**spec["quotas"], **(quotas or {})},
                            int(spec["n_candidates"] if n_candidates is None else n_candidates),
                            history=hist, max_category_share=share)  # type: ignore[arg-type]


@dataclass
class SourceRecommender:
    """One candidate source as a Recommender: its top ``depth`` items scored by rank, rest ``-inf``."""

    source: Any
    history: sp.csr_matrix
    n_items: int
    depth: int = 100
    exclude: sp.csr_matrix | None = None

    @property
    def name(self) -> str:
        return f"source_{self.source.name}"

    def fit(self, train: InteractionData, *, valid: InteractionData | None = None) -> "SourceRecommender":
        return self  # fitted as part of the two-stage pipeline

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        users = np.asarray(user_idx, dtype=np.int64).ravel()
        hist = _rows_csr(self.history, users)
        excl = hist if self.exclude is None else _rows_csr(self.exclude, users)
        items, _ = self.source.retrieve(users, hist, self.depth, exclude=excl)
        out = np.full((len(users), self.n_items), -np.inf, dtype=np.float32)
        rows, cols = np.nonzero(items >= 0)
        out[rows, items[rows, cols]] = (self.depth - cols).astype(np.float32)
        return out


def _subset(d: InteractionData, mask: np.ndarray) -> InteractionData:
    return InteractionData(d.users, d.items, d.user_idx[mask], d.item_idx[mask], d.values[mask],
                           None if d.timestamps is None else d.timestamps[mask])
