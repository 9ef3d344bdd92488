"""The model side of a request: the ONE two-stage pipeline (``models.two_stage``) assembled
from the registry's artifacts, behind a small id-space API for the HTTP layer.

Nothing here re-implements a model: retrieval, filtering, ranking and diversity are
``TwoStagePipeline.recommend``; the two-tower's user tower and FAISS index come from
``TwoTowerRetrieval`` (built by ``Artifact.build()``), the ranker from the ranker artifact.
This module only maps external ids <-> indices, builds per-request history rows from the
online features and times the stages.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from models.base import IdMap


class EngineError(RuntimeError):
    """The models cannot serve (missing, incompatible or failing); the caller falls back."""


@dataclass
class Engine:
    """Loaded models of one version pair. Immutable once built: hot swap replaces the object."""

    retrieval: Any  # models.two_tower.TwoTowerRetrieval
    pipeline: Any | None  # models.two_stage.TwoStagePipeline (None: retrieval only, ranker missing)
    items: IdMap
    users: IdMap
    versions: dict[str, str]
    degraded: str | None = None  # why the ranker is not used, when it is not
    loaded_at: float = field(default_factory=time.time)

    # ---- request path --------------------------------------------------------------------
    def _history_matrix(self, histories: Sequence[Sequence[str]]):
        """Consumed-items rows (requests x catalog, 1.0 per distinct known item, columns sorted),
        built as CSR arrays in one compiled pass and handed on bare (``models.two_stage.CSRRows``:
        no scipy construction, which re-validates and re-types them on every batch)."""
        from models.kernels import history_rows_csr
        from models.two_stage import CSRRows

        index = self.items.index
        cols = np.array([index.get(str(item), -1) for h in histories for item in h], dtype=np.int64)
        lengths = np.array([len(h) for h in histories], dtype=np.int64)
        indptr, indices, data = history_rows_csr(cols, lengths)
        return CSRRows(indptr, indices, data, (len(histories), len(self.items)))

    def recommend(self, user_ids: Sequence[str], *, k: int, histories: Sequence[Sequence[str]] | None = None,
                  blocked: Sequence[Sequence[str]] | None = None) -> tuple[list[tuple[list[str], list[float]]], dict[str, float]]:
        """Top-k (item ids, scores) per request, and stage timings in seconds.

        ``histories``: each user's consumed items (online features); they are excluded and,
        for users the models never saw, they are the only signal."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        hist_lists = list(histories) if histories is not None else [None] * len(user_ids)
        if self.pipeline is None:
            recs = self.retrieval.recommend(list(user_ids), k=k, histories=[list(h or []) for h in hist_lists])
            timings["retrieval"] = time.perf_counter() - t0
            return recs, timings
        p = self.pipeline
        users = self.users.encode(user_ids, unknown="minus_one")
        hist = self._history_matrix([h or [] for h in hist_lists])
        missing = [r for r, h in enumerate(hist_lists) if h is None]
        if missing and p.history is not None:
            # online features unavailable for these requests: fall back to the training-time history
            import scipy.sparse as sp

            stored = p.history_rows(users, None)
            use = np.zeros(len(users), bool)
            use[missing] = True
            hist = (sp.diags(use.astype(np.float32)) @ stored + sp.diags((~use).astype(np.float32)) @ hist.tocsr()).tocsr()
        blocked_idx = None
        if blocked is not None and any(blocked):
            blocked_idx = [[int(i) for i in self.items.encode(list(b), unknown="minus_one") if i >= 0] for b in blocked]
        t1 = time.perf_counter()
        cands = p.retrieve(users, hist, exclude=hist)
        t2 = time.perf_counter()
        cands = p.filter(cands, blocked=blocked_idx)
        t3 = time.perf_counter()
        scores = p.rank(users, cands)
        t4 = time.perf_counter()
        out = p.post_process(len(users), cands, scores, k, p.max_category_share)
        t5 = time.perf_counter()
        timings.update(retrieval=t2 - t1 + (t1 - t0), filter=t3 - t2, ranking=t4 - t3, diversity=t5 - t4)
        ids = self.items.ids
        rows, row_scores = out.items.tolist(), out.scores.tolist()  # two conversions per batch, not four numpy ops per request
        decoded = [([ids[i] for i in row if i >= 0], [sc for i, sc in zip(row, srow) if i >= 0])
                   for row, srow in zip(rows, row_scores)]
        return decoded, timings

    def similar(self, item_id: str, *, k: int) -> tuple[list[str], list[float]]:
        """Nearest items in the two-tower's item space (the same FAISS index retrieval uses)."""
        j = self.retrieval.items.index.get(str(item_id))
        if j is None:
            raise KeyError(item_id)
        vec = np.ascontiguousarray(self.retrieval.item_vectors[j:j + 1], dtype=np.float32)
        scores, found = self.retrieval.index.search(vec, min(k + 1, len(self.retrieval.items)))
        items, out = [], []
        for i, s in zip(found[0], scores[0]):
            if i >= 0 and int(i) != j:
                items.append(self.retrieval.items.ids[int(i)])
                out.append(float(s))
        return items[:k], out[:k]

    def warm_up(self) -> None:
        """One request through every stage before the engine takes traffic (first-call costs:
        FAISS index build, torch kernels), so a hot swap never makes a request slow."""
        some = list(self.users.ids[:2]) or ["__warmup__"]
        self.recommend(some, k=5)
        if len(self.retrieval.items):
            self.similar(self.retrieval.items.ids[0], k=5)


def build_engine(retrieval_art: Any, ranker_art: Any | None, *, n_candidates: int = 500,
                 model_threads: int = 1, precision: str = "fp32") -> Engine:
    """Assemble the two-stage pipeline from a two-tower artifact and (optionally) a ranker artifact.

    A missing or incompatible ranker degrades to retrieval-only (``Engine.degraded`` says why)
    instead of failing: ranking improves the order, retrieval alone still personalises.
    ``precision``: the ranker's MLP compute precision (``serving.ranker_precision``)."""
    import torch

    torch.set_num_threads(model_threads)
    retrieval = retrieval_art.build()
    versions = {str(retrieval_art.origin.get("name", "two_tower")): str(retrieval_art.origin.get("version", "local"))}
    if ranker_art is None:
        return Engine(retrieval, None, retrieval.items, retrieval.users, versions, degraded="ranker_unavailable")
    try:
        from models.two_stage import pipeline_from_artifacts

        pipeline = pipeline_from_artifacts(retrieval, ranker_art, n_candidates=n_candidates, precision=precision)
    except Exception as exc:  # noqa: BLE001 - any incompatibility means: serve retrieval only
        eng = Engine(retrieval, None, retrieval.items, retrieval.users, versions, degraded=f"ranker_unusable: {exc}")
        return eng
    versions[str(ranker_art.origin.get("name", "ranker"))] = str(ranker_art.origin.get("version", "local"))
    feats = pipeline.ranker.features
    return Engine(retrieval, pipeline, feats.items, feats.users, versions)
