"""Two-stage pipeline: merge/filter/diversity/fallback on hand-made cases, and the Recommender wrapper."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from models.base import IdMap, InteractionData


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _hand_made():
    """6 users x 10 items; items 0-5 are category 'a', 6-7 'b', 8-9 'c'."""
    users = IdMap(tuple(f"u{i}" for i in range(6)))
    items = IdMap(tuple(f"i{i}" for i in range(10)))
    pairs = [(0, 0), (0, 1), (1, 1), (1, 2), (2, 0), (2, 3), (3, 4), (3, 5), (4, 6), (4, 7), (5, 8), (5, 9), (5, 0)]
    u, i = np.array(pairs).T
    data = InteractionData(users, items, u, i, np.full(len(u), 4.0))
    frame = pd.DataFrame({"item_id": items.ids, "categories": [["a"]] * 6 + [["b"]] * 2 + [["c"]] * 2,
                          "created_at": pd.NaT})
    return data, frame


def _pipeline(data, frame, *, quotas=None, **kw):
    from models.dlrm import DLRMConfig, DLRMScorer, RankingFeatures, build_ranker
    from models.two_stage import CoVisitationSource, PopularSource, TwoStagePipeline, source_feature_names

    feats = RankingFeatures.build(data, items_frame=frame)
    sources = [CoVisitationSource(neighbours=5).fit(data), PopularSource().fit(data)]
    cfg = DLRMConfig(n_users=data.n_users, n_items=data.n_items, n_categories=len(feats.categories),
                     extra_dense=source_feature_names([s.name for s in sources]), embedding_dim=4, dense_arch=(8, 4),
                     over_arch=(8, 1))
    state = build_ranker(cfg, embeddings="plain", seed=0).state_dict()  # an untrained (random) but real DLRM
    n_dense = len(cfg.dense_names)
    scorer = DLRMScorer(cfg, feats, state, dense_mean=np.zeros(n_dense), dense_std=np.ones(n_dense))
    return TwoStagePipeline(sources, scorer, quotas or {"covisit": 10, "popular": 10}, history=data.csr(), **kw)


def test_consumed_unavailable_and_blocked_items_are_never_recommended():
    data, frame = _hand_made()
    available = np.ones(10, bool)
    available[9] = False
    pipe = _pipeline(data, frame, available=available)
    recs = pipe.recommend(np.arange(6), k=10, blocked=[[2], [], [], [], [], [3]])
    consumed = data.csr().toarray() > 0
    for u in range(6):
        got = recs.items[u][recs.items[u] >= 0]
        assert len(set(got)) == len(got), "no duplicates after merging sources"
        assert not consumed[u, got].any(), f"user {u} got an item already consumed"
        assert 9 not in got, "unavailable item recommended"
    assert 2 not in recs.items[0] and 3 not in recs.items[5]
    # every unconsumed, available, unblocked item is reachable (popular covers the catalog here)
    assert set(recs.items[0][recs.items[0] >= 0]) == {3, 4, 5, 6, 7, 8}
    scores = recs.scores[0][recs.items[0] >= 0]
    assert (np.diff(scores) <= 1e-7).all(), "sorted by ranker score"


def test_sources_are_reported_per_item():
    data, frame = _hand_made()
    pipe = _pipeline(data, frame)
    recs = pipe.recommend(np.array([0]), k=8)
    by_item = {int(i): recs.sources_of(0, c) for c, i in enumerate(recs.items[0]) if i >= 0}
    # item 3 co-occurs with user 0's item 0 (user 2 has both): covisit and popular both produce it
    assert by_item[3] == ["covisit", "popular"]
    # item 6 co-occurs with nothing user 0 has: popular only
    assert by_item[6] == ["popular"]


def test_diversity_caps_a_category_and_refills_when_too_narrow():
    data, frame = _hand_made()
    pipe = _pipeline(data, frame)
    user = np.array([4])  # consumed 6, 7 (b): candidates are a x6, c x2
    free = pipe.recommend(user, k=4, max_category_share=None)
    capped = pipe.recommend(user, k=4, max_category_share=0.5)
    cats = pipe.ranker.features.primary_category
    got = capped.items[0]
    assert (np.bincount(cats[got], minlength=3) <= 2).all()
    assert set(cats[got]) == {0, 2}
    # greedy semantics: the capped list keeps the best-ranked items of each category in rank order
    a_items = [i for i in free.items[0] if cats[i] == 0]
    assert [i for i in got if cats[i] == 0] == a_items[:2] or len(a_items) < 2
    # too narrow: with k=6 the cap (3 per category) cannot be met from 2 categories -> refill, still 6 items
    wide = pipe.recommend(user, k=6, max_category_share=0.5)
    assert (wide.items[0] >= 0).sum() == 6


def test_cold_start_user_falls_back_to_popular_and_batching_matches_single_calls():
    data, frame = _hand_made()
    pipe = _pipeline(data, frame)
    recs = pipe.recommend(np.array([-1]), k=3)
    assert (recs.items[0] >= 0).all()
    assert all(recs.sources_of(0, c) == ["popular"] for c in range(3))
    batch = pipe.recommend(np.array([0, 3, 5]), k=5)
    for r, u in enumerate([0, 3, 5]):
        single = pipe.recommend(np.array([u]), k=5)
        np.testing.assert_array_equal(batch.items[r], single.items[0])
        np.testing.assert_allclose(batch.scores[r], single.scores[0], rtol=1e-5)
    frames = pipe.recommend_ids(["u0", "nobody"], k=2)
    assert list(frames[0].columns) == ["item_id", "score", "sources"] and len(frames[1]) == 2


def test_bad_requests_are_refused():
    from models.two_stage import TwoStageError

    data, frame = _hand_made()
    pipe = _pipeline(data, frame)
    with pytest.raises(TwoStageError, match="out of range"):
        pipe.recommend(np.array([99]))
    with pytest.raises(TwoStageError, match="k must be"):
        pipe.recommend(np.array([0]), k=0)
    with pytest.raises(TwoStageError, match="one list per request"):
        pipe.recommend(np.array([0, 1]), blocked=[[1]])
    with pytest.raises(TwoStageError, match="no quota"):
        _pipeline(data, frame, quotas={"covisit": 5})


def test_item_item_sources_round_trip_and_never_return_consumed_items():
    from models.two_stage import CoVisitationSource, ItemRegressionSource

    data, _ = _hand_made()
    hist = data.csr()
    users = np.arange(6)
    for src in (ItemRegressionSource(lam=1.0, neighbours=4).fit(data), CoVisitationSource(neighbours=3).fit(data)):
        items, scores = src.retrieve(users, hist, 5, exclude=hist)
        consumed = hist.toarray() > 0
        ok = items >= 0
        assert ok.any()
        assert not consumed[np.repeat(users, 5)[ok.ravel()], items[ok]].any()
        assert (np.diff(np.where(ok, scores, -np.inf), axis=1)[ok[:, 1:]] <= 1e-7).all(), "best first"
        assert (src.sim.getnnz(axis=1) <= src.neighbours).all()
        spec, arrays = src.to_parts()
        again = type(src).from_parts(spec, arrays, data.n_items)
        np.testing.assert_array_equal(again.retrieve(users, hist, 5, exclude=hist)[0], items)
        assert again.params() == src.params()


def test_item_regression_source_picks_lambda_on_held_out_labels():
    from models.two_stage import ItemRegressionSource

    data, _ = _hand_made()
    labels = InteractionData(data.users, data.items, np.array([0, 1, 4]), np.array([3, 0, 8]), np.ones(3))
    src = ItemRegressionSource(lam=None, neighbours=None).fit(data, labels=labels)
    assert src.lam in src.lam_grid and set(src.tuning) == set(src.lam_grid)
    assert ItemRegressionSource(lam=None).fit(data).lam is None  # no labels: the default penalty, nothing tuned


def test_candidate_cap_keeps_best_ranked():
    data, frame = _hand_made()
    pipe = _pipeline(data, frame, n_candidates=2)
    hist = data.csr()[[0]]
    c = pipe.retrieve(np.array([0]), hist, exclude=hist)
    assert len(c) == 2
    assert c.features[:, -1].max() >= 1  # src_count


@pytest.mark.slow
def test_recommender_wrapper_fits_scores_and_exposes_sources():
    from datetime import date

    from core.synthetic import generate
    from models.metrics import evaluate_recommender
    from models.two_stage import TwoStageError, TwoStageRecommender

    ds = generate(n_users=200, n_items=120, n_events=15_000, n_days=10, shift_date=date(2024, 1, 20), seed=5)
    events = ds.events.drop_duplicates(["user_id", "item_id"])
    data = InteractionData.from_frame(events)
    rng = np.random.default_rng(0)
    part = rng.choice(3, size=len(data), p=[0.7, 0.15, 0.15])

    def sub(p):
        m = part == p
        return InteractionData(data.users, data.items, data.user_idx[m], data.item_idx[m], data.values[m])

    train, valid, test = sub(0), sub(1), sub(2)
    model = TwoStageRecommender(items_frame=ds.items, n_candidates=60, quotas={"covisit": 50, "ease": 50, "popular": 30},
                                dlrm_params=dict(epochs=2, embedding_dim=8, dense_arch=(16, 8), over_arch=(16, 1),
                                                 learning_rate=1e-2))
    with pytest.raises(TwoStageError, match="before fit"):
        model.score(np.array([0]))
    model.fit(train, valid=valid)
    scores = model.score(np.arange(5))
    assert scores.shape == (5, data.n_items)
    consumed = (train.csr() + valid.csr()).toarray()[:5] > 0
    assert np.isneginf(scores[consumed]).all(), "consumed items are never candidates"
    assert (np.isfinite(scores).sum(1) <= 60).all()
    m = evaluate_recommender(model, train=train, test=test, valid=valid, ks=(10,))
    assert m["recall@10"] > 0
    names = [s.name for s in model.source_recommenders()]
    assert names == ["source_covisit", "source_ease", "source_popular"]
    assert model.pipeline.sources[1].lam in model.pipeline.sources[1].lam_grid  # chosen on the held-out labels
    assert 0 < model.report["candidate_recall"] <= 1
    single = InteractionData(data.users, data.items, np.zeros(5, np.int64), np.arange(5), np.ones(5))
    with pytest.raises(TwoStageError, match="single user"):
        TwoStageRecommender().fit(single)


@pytest.mark.slow
def test_train_ranker_logs_registers_and_round_trips(settings):
    """The pipeline end to end on tiny synthetic data: MLflow run, registered ``ranker``, same scores after load."""
    from datetime import date

    import mlflow

    from core.synthetic import generate
    from models.dlrm import DLRMScorer
    from pipelines.train_ranker import train_ranker

    from pipelines.train import train_two_tower

    ds = generate(n_users=150, n_items=100, n_events=10_000, n_days=10, shift_date=date(2024, 1, 20), seed=5)
    tt = train_two_tower(settings=settings, source="synthetic", dataset=ds, protocol="temporal", epochs=1, dim=8,
                         progress=False, aliases=("champion",))
    r = train_ranker(settings=settings, source="synthetic", dataset=ds, protocol="temporal", epochs=1, dim=8,
                     progress=False, two_tower=f"models:/{settings.registry.retrieval_model}/{tt.registered_version}")
    assert r.registered_name == settings.registry.ranking_model and r.registered_version == "1"
    assert {"test_auc", "test_log_loss", "test_ece", "two_stage_recall@10"} <= set(r.test_metrics)
    run = mlflow.get_run(r.run_id)
    assert "valid_auc" in run.data.metrics and "train_loss" in run.data.metrics
    arts = [a.path for a in mlflow.MlflowClient().list_artifacts(r.run_id, "plots")]
    assert "plots/calibration_test.png" in arts
    loaded = DLRMScorer.load(f"models:/{settings.registry.ranking_model}/1", settings=settings)
    trained = r.__dict__["two_stage"].pipeline.ranker
    assert trained.config.over_arch == tuple(settings.training.ranker.over_arch)  # the configured layer sizes
    assert loaded.config.over_arch == trained.config.over_arch
    u, i = np.arange(5), np.arange(5)
    extra = np.zeros((5, len(trained.config.extra_dense)), np.float32)
    np.testing.assert_array_equal(loaded.score(u, i, extra), trained.score(u, i, extra))
    # the promotion gate's view: the registered ranker behind the retrieval champion, rebuilt from
    # the registry's artifacts alone, recommends what the trained pipeline recommends
    from models.artifacts import load_from_registry
    from pipelines.promote import two_stage_view

    pipe = r.__dict__["two_stage"].pipeline
    assert pipe.source_names == ("covisit", "ease", "popular", "two_tower")
    view = two_stage_view(load_from_registry(f"models:/{settings.registry.ranking_model}/1", settings), settings)
    assert view.users == trained.features.users and view.items == trained.features.items
    users = np.arange(min(30, trained.features.n_users))
    expected = pipe.recommend(users, k=10, max_category_share=None)
    got = view.pipeline.recommend(users, k=10, max_category_share=None)
    np.testing.assert_array_equal(got.items, expected.items)
    scores = view.score(users)
    assert scores.shape == (len(users), trained.features.n_items)
    assert np.isfinite(scores).any(axis=1).all()


# ---------------------------------------------------------------------------------------------
# the pipeline rebuilt from artifacts alone (what serving and the promotion gate run)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory):
    """A tiny two-tower and a two-stage pipeline using it as a source, trained with the real
    training code, and both saved as artifact folders."""
    from datetime import date

    from core.synthetic import generate
    from models.artifacts import save_artifact
    from models.two_stage import RecommenderSource, TwoStageRecommender, pipeline_artifact
    from models.two_tower import TwoTowerRecommender

    ds = generate(n_users=150, n_items=100, n_events=8_000, n_days=10, shift_date=date(2024, 1, 20), seed=5)
    data = InteractionData.from_frame(ds.events.drop_duplicates(["user_id", "item_id"]))
    part = np.random.default_rng(0).choice(3, size=len(data), p=[0.7, 0.15, 0.15])

    def sub(p):
        m = part == p
        return InteractionData(data.users, data.items, data.user_idx[m], data.item_idx[m], data.values[m])

    train, valid = sub(0), sub(1)
    tower = TwoTowerRecommender({"epochs": 2, "embedding_dim": 8, "batch_size": 256, "seed": 0}, items_frame=ds.items,
                                progress=False).fit(train, valid=valid)
    model = TwoStageRecommender(items_frame=ds.items, n_candidates=60, quotas={"covisit": 40, "ease": 40, "popular": 20, "two_tower": 40},
                                extra_sources=[RecommenderSource(tower, name="two_tower")],
                                dlrm_params=dict(epochs=2, embedding_dim=8, dense_arch=(16, 8), over_arch=(16, 1),
                                                 learning_rate=1e-2))
    model.fit(train, valid=valid)
    root = tmp_path_factory.mktemp("artifacts")
    save_artifact(root / "two_tower", artifact=tower.to_artifact())
    save_artifact(root / "ranker", artifact=pipeline_artifact(model.pipeline))
    return {"ds": ds, "train": train, "valid": valid, "tower": tower, "model": model, "root": root}


@pytest.mark.slow
def test_pipeline_from_artifacts_recommends_exactly_like_the_trained_one(trained_pair):
    from models.artifacts import load_artifact
    from models.two_stage import EmbeddingSource, pipeline_from_artifacts, pipeline_recommender

    t = trained_pair
    model, train, valid = t["model"], t["train"], t["valid"]
    retrieval = load_artifact(t["root"] / "two_tower").build()
    pipe = pipeline_from_artifacts(retrieval, load_artifact(t["root"] / "ranker"), n_candidates=60)
    assert pipe.source_names == ("covisit", "ease", "popular", "two_tower")
    assert isinstance(pipe.sources[3], EmbeddingSource)  # the two-tower now answers through its FAISS index
    users = np.arange(train.n_users)
    a, b = model.pipeline.recommend(users, k=10), pipe.recommend(users, k=10)
    np.testing.assert_array_equal(a.items, b.items)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.source_mask, b.source_mask)
    # the Recommender view (evaluator / promotion gate) scores like the trained wrapper
    view = pipeline_recommender(pipe, also_exclude=valid.csr())
    assert view.users == train.users and view.items == train.items
    va, vb = model.score(users), view.score(users)
    np.testing.assert_array_equal(np.isfinite(va), np.isfinite(vb))
    np.testing.assert_allclose(va[np.isfinite(va)], vb[np.isfinite(vb)], rtol=1e-5, atol=1e-6)
    # the caller's history replaces the stored one: the same interactions give the same lists
    same = pipeline_from_artifacts(retrieval, load_artifact(t["root"] / "ranker"), n_candidates=60, history=train)
    np.testing.assert_array_equal(same.recommend(users[:20], k=10).items, a.items[:20])
    # public history rows (serving's fallback when online features are down); unknown users are empty
    rows = pipe.history_rows(np.array([0, -1]))
    assert rows.shape == (2, train.n_items) and rows[1].nnz == 0 and rows[0].nnz == train.csr()[0].nnz


def test_bare_csr_request_rows_retrieve_exactly_like_a_scipy_matrix(trained_pair):
    """Serving hands a batch's history rows to the pipeline as bare CSR arrays (``CSRRows``: no scipy
    matrix built and validated per batch): every source, the merge and the ranker give exactly what
    they give for the scipy matrix, and batches with the same source layout share the merge's
    column arrays (built once)."""
    from models.artifacts import load_artifact
    from models.two_stage import CSRRows, pipeline_from_artifacts

    t = trained_pair
    retrieval = load_artifact(t["root"] / "two_tower").build()
    pipe = pipeline_from_artifacts(retrieval, load_artifact(t["root"] / "ranker"), n_candidates=60)
    users = np.arange(min(25, t["train"].n_users))
    hist = pipe.history_rows(users)
    hist.sort_indices()
    bare = CSRRows(hist.indptr.astype(np.int64), hist.indices.astype(np.int64), hist.data.astype(np.float32), hist.shape)
    assert bare.nnz == hist.nnz > 0 and (bare.tocsr() != hist).nnz == 0
    a, b = pipe.retrieve(users, hist, exclude=hist), pipe.retrieve(users, bare, exclude=bare)
    for name in ("request", "item", "features", "source_mask"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(pipe.rank(users, a), pipe.rank(users, b))
    assert len(pipe._layouts) == 1  # noqa: SLF001 - both batches used one layout, built once
    for source in pipe.sources:  # each source alone, too (exclusions applied from the bare rows)
        q = int(pipe.quotas[source.name])
        for x, y in zip(source.retrieve(users, hist, q, exclude=hist), source.retrieve(users, bare, q, exclude=bare)):
            np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_pipeline_from_artifacts_aligns_a_retrieval_model_with_another_catalog(trained_pair):
    """A retrieval model trained on part of the catalog, users and items in another order: items it
    does not know are never its candidates, users it does not know still get recommendations."""
    from models.artifacts import load_artifact
    from models.base import IdMap
    from models.two_stage import pipeline_from_artifacts
    from models.two_tower import TwoTowerRecommender

    t = trained_pair
    train = t["train"]
    keep_items = np.arange(0, 70)
    keep_users = np.arange(0, 100)
    m = np.isin(train.item_idx, keep_items) & np.isin(train.user_idx, keep_users)
    items = IdMap(tuple(reversed([train.items.ids[i] for i in keep_items])))
    users = IdMap(tuple(reversed([train.users.ids[u] for u in keep_users])))
    other = InteractionData(users, items, users.encode(train.users.decode(train.user_idx[m])),
                            items.encode(train.items.decode(train.item_idx[m])), train.values[m])
    tower = TwoTowerRecommender({"epochs": 1, "embedding_dim": 8, "batch_size": 256, "seed": 1}, progress=False).fit(other)
    pipe = pipeline_from_artifacts(tower.to_artifact(), load_artifact(t["root"] / "ranker"), n_candidates=60)
    all_users = np.arange(train.n_users)
    hist = pipe.history_rows(all_users)
    cands = pipe.retrieve(all_users, hist, exclude=hist)
    from_tower = (cands.source_mask >> 3 & 1).astype(bool)
    assert from_tower.any()
    assert set(cands.item[from_tower]) <= set(keep_items), "an item the retrieval model does not know was retrieved by it"
    assert set(cands.request[from_tower]) <= set(keep_users) | set(np.flatnonzero(hist.getnnz(axis=1) > 0))
    recs = pipe.recommend(all_users, k=5)
    assert (recs.items >= 0).all()
    consumed = hist.toarray() > 0
    assert not consumed[np.repeat(all_users, 5), recs.items.ravel()].any()


@pytest.mark.slow
def test_pipeline_from_artifacts_refuses_what_it_cannot_rebuild(trained_pair):
    from models.artifacts import load_artifact
    from models.two_stage import TwoStageError, pipeline_from_artifacts

    t = trained_pair
    ranker = load_artifact(t["root"] / "ranker")
    with pytest.raises(TwoStageError, match="pass the built retrieval model"):
        pipeline_from_artifacts(None, ranker)
    with pytest.raises(TwoStageError, match="kind 'dlrm'"):
        pipeline_from_artifacts(None, load_artifact(t["root"] / "two_tower"))
    old = t["model"].pipeline.ranker.to_artifact()  # a ranker saved without its pipeline
    with pytest.raises(TwoStageError, match="retrain the ranker"):
        pipeline_from_artifacts(None, old)
    with pytest.raises(TwoStageError, match="history must be"):
        pipeline_from_artifacts(load_artifact(t["root"] / "two_tower"), ranker, history=sp.csr_matrix((2, 3)))


def test_exact_search_matches_faiss_flat():
    """A flat index is searched with one matrix product + argpartition: the same rows and scores
    as FAISS's own flat search (ties aside); an ANN index still goes through FAISS."""
    import faiss

    from models.two_stage import EmbeddingSource

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((7, 16)).astype(np.float32)
    src = EmbeddingSource(vecs, vecs[:3], name="emb")
    assert isinstance(src.index, faiss.IndexFlat)
    for depth in (1, 40, 500):
        got_s, got_i = src.search(queries, depth)
        want_s, want_i = src.index.search(queries, depth)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-5)
    hnsw = EmbeddingSource(vecs, vecs[:3], name="ann", hnsw_above=100)
    from models.ann import hnsw_of

    assert hnsw_of(hnsw.index) is not None
    _, found = hnsw.search(queries, 10)
    assert found.shape == (7, 10) and (found >= 0).all()
    _, exact = src.search(queries, 10)  # row numbers of the same catalog (the HNSW is stored reordered)
    assert np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)]) >= 0.9


def test_filter_ranked_drops_excluded_and_compacts_in_order():
    """The exclusion filter of ranked lists (ANN results, popularity) keeps each row's order."""
    import scipy.sparse as sp

    from models.two_stage import _filter_ranked

    rng = np.random.default_rng(3)
    items = np.stack([rng.permutation(60)[:20] for _ in range(5)]).astype(np.int64)
    items[1, 3] = -1
    scores = -np.sort(-rng.random((5, 20)).astype(np.float32), axis=1)
    exclude = sp.csr_matrix((np.ones(4, np.float32), ([0, 0, 2, 3], [items[0, 0], items[0, 5], items[2, 19], 59])), shape=(5, 60))
    got_i, got_s = _filter_ranked(items, scores, exclude, 18)
    for r in range(5):
        bad = set(exclude[r].indices)
        want = [(i, s_) for i, s_ in zip(items[r], scores[r]) if i >= 0 and i not in bad][:18]
        assert got_i[r][: len(want)].tolist() == [i for i, _ in want]
        assert (got_i[r][len(want):] == -1).all() and (got_s[r][len(want):] == 0).all()
        np.testing.assert_array_equal(got_s[r][: len(want)], [s_ for _, s_ in want])


class _FixedSource:
    """A candidate source answering fixed ranked lists (``-1`` = none); ``overlong`` ignores ``n``."""

    def __init__(self, name, items, scores, overlong=False):
        self.name, self.items, self.scores, self.overlong = name, items, scores, overlong

    def retrieve(self, user_idx, history, n, *, exclude=None):
        items, scores = self.items[np.asarray(user_idx)], self.scores[np.asarray(user_idx)]
        return (items, scores) if self.overlong else (items[:, :n], scores[:, :n])


def _merge_reference(blocks, quotas, names, n_requests, n_candidates):
    """The merge rule in plain Python: union per request; per source its score and rank fraction
    ``1 - pos / quota`` (columns past the quota ignored; an item a source repeats keeps its last
    entry); the bitmask and count of sources; keep the ``n_candidates`` best by best rank
    fraction, ties by item index."""
    out = []
    for r in range(n_requests):
        found = {}
        for s, (name, (items, scores)) in enumerate(zip(names, blocks)):
            q = quotas[name]
            for pos, (i, sc) in enumerate(zip(items[r][:q], scores[r][:q])):
                if i < 0:
                    continue
                f = found.setdefault(int(i), {"feats": [0.0] * (2 * len(names) + 1), "mask": 0, "best": 0.0})
                rf = float(np.float32(1.0 - pos / q))
                f["feats"][2 * s], f["feats"][2 * s + 1] = float(sc), rf
                f["mask"] |= 1 << s
                f["best"] = max(f["best"], rf)
        ranked = sorted(found.items(), key=lambda kv: (-kv[1]["best"], kv[0]))[:n_candidates]
        for i, f in ranked:
            f["feats"][-1] = bin(f["mask"]).count("1")
            out.append((r, i, f["feats"], f["mask"]))
    return out


@pytest.mark.parametrize("n_candidates", [3, 7, 50])
def test_merge_matches_a_plain_python_reference(n_candidates):
    """The vectorised merge (one de-duplication, one packed-key sort) keeps exactly the reference's
    candidates, in its order, with its features: overlapping sources, different quotas (so rank
    fractions of different sources tie), missing entries, a request with nothing, a source that
    repeats an item and one that answers more than its quota."""
    data, frame = _hand_made()
    pipe = _pipeline(data, frame, quotas={"covisit": 6, "popular": 4}, n_candidates=n_candidates)
    rng = np.random.default_rng(n_candidates)
    b = 5
    blocks = []
    for width in (6, 4):
        items = np.stack([rng.permutation(10)[:width] for _ in range(b)]).astype(np.int64)
        items[rng.random(items.shape) < 0.2] = -1
        blocks.append((items, rng.random(items.shape).astype(np.float32)))
    blocks[0][0][3] = -1
    blocks[1][0][3] = -1  # request 3: no candidate from any source
    blocks[0][0][1, 4] = blocks[0][0][1, 0]  # request 1: covisit lists an item twice
    extra = np.full((b, 3), 9, np.int64)  # popular answers 3 columns past its quota of 4
    blocks[1] = (np.concatenate([blocks[1][0], extra], axis=1), np.concatenate([blocks[1][1], np.ones((b, 3), np.float32)], axis=1))
    pipe.sources = [_FixedSource("covisit", *blocks[0]), _FixedSource("popular", *blocks[1], overlong=True)]
    got = pipe.retrieve(np.arange(b), sp.csr_matrix((b, 10), dtype=np.float32))
    want = _merge_reference(blocks, pipe.quotas, ["covisit", "popular"], b, n_candidates)
    assert list(zip(got.request.tolist(), got.item.tolist())) == [(r, i) for r, i, _, _ in want]
    np.testing.assert_array_equal(got.features, np.array([f for _, _, f, _ in want], np.float32).reshape(-1, 5))
    assert got.source_mask.tolist() == [m for _, _, _, m in want]
    assert 3 not in got.request
    empty = pipe.retrieve(np.arange(0), sp.csr_matrix((0, 10), dtype=np.float32))
    assert len(empty) == 0


@pytest.mark.parametrize("mapping", ["identity", "permuted_with_unknown"])
def test_exact_retrieval_masks_before_the_top_n_like_the_search_then_filter_path(mapping):
    """With an exact index every item is scored, so exclusions, index rows the pipeline does not
    know and requests without signal are masked before one top-n; the generic path (search deeper,
    map, filter, compact) must give the same lists."""
    from models.two_stage import EmbeddingSource

    rng = np.random.default_rng(1)
    n_rows, n_items, b = 60, 60, 6
    vecs = rng.standard_normal((n_rows, 8)).astype(np.float32)
    queries = rng.standard_normal((b, 8)).astype(np.float32)
    item_ids = None
    if mapping != "identity":
        item_ids = rng.permutation(n_items)[:n_rows].astype(np.int64)
        item_ids[[3, 17, 40]] = -1  # rows of items the pipeline does not know
    signal = np.ones(b, bool)
    signal[2] = False

    class Generic(EmbeddingSource):
        exact = False  # the search -> map -> filter path every ANN index takes

    fast = EmbeddingSource(vecs, lambda u, h: (queries, signal), item_ids=item_ids, n_items=n_items)
    slow = Generic(vecs, lambda u, h: (queries, signal), item_ids=item_ids, n_items=n_items, index=fast.index)
    exclude = sp.random(b, n_items, density=0.1, random_state=3, format="csr", dtype=np.float32)
    exclude.data[:] = 1.0
    for n in (1, 10, 45):
        got_i, got_s = fast.retrieve(np.arange(b), exclude, n, exclude=exclude)
        want_i, want_s = slow.retrieve(np.arange(b), exclude, n, exclude=exclude)
        np.testing.assert_array_equal(got_i, want_i[:, : got_i.shape[1]])
        np.testing.assert_allclose(got_s, want_s[:, : got_s.shape[1]], rtol=1e-6, atol=1e-6)
        assert (got_i[2] == -1).all()
        for r in range(b):
            assert not set(got_i[r].tolist()) & set(exclude[r].indices.tolist())


def test_exact_retrieval_into_a_wider_catalog_takes_its_width_from_the_request():
    """An index over fewer items than the pipeline's catalog (no ``n_items`` given): the exact
    path scores into the catalog the history rows describe; excluded items beyond the index's
    rows are fine."""
    from models.two_stage import EmbeddingSource

    rng = np.random.default_rng(2)
    vecs = rng.standard_normal((5, 4)).astype(np.float32)
    q = rng.standard_normal((1, 4)).astype(np.float32)
    src = EmbeddingSource(vecs, lambda u, h: (q, np.ones(1, bool)))
    exclude = sp.csr_matrix((np.ones(2, np.float32), ([0, 0], [7, int(np.argmax(q @ vecs.T))])), shape=(1, 8))
    items, scores = src.retrieve(np.arange(1), exclude, 3, exclude=exclude)
    order = [i for i in np.argsort(-(q @ vecs.T)[0], kind="stable") if i not in exclude[0].indices][:3]
    assert items[0].tolist() == order


def _post_process_reference(request, item, scores, mask, category, n_requests, k, cap):
    """Greedy diversity in plain Python: per request, candidates by score descending (NaN last,
    ties by row order); take an item unless its category already has ``cap``; then refill with
    the skipped ones in rank order."""
    out = []
    for q in range(n_requests):
        rows = [r for r in range(len(request)) if request[r] == q]
        rows.sort(key=lambda r: (np.isnan(scores[r]), -scores[r] if not np.isnan(scores[r]) else 0.0, r))
        taken, skipped, counts = [], [], {}
        for r in rows:
            c = category[item[r]]
            if cap and c >= 0 and counts.get(c, 0) >= cap:
                skipped.append(r)
                continue
            counts[c] = counts.get(c, 0) + 1
            taken.append(r)
        out.append((taken + skipped)[:k])
    return out


@pytest.mark.parametrize("share", [None, 0.25, 0.5])
def test_post_process_matches_a_plain_python_reference(share):
    """Top-k with the category cap: rows of requests in any order, tied and NaN scores, items
    without a category (never capped), a request with no candidate, one too narrow for the cap."""
    from models.two_stage import Candidates

    data, frame = _hand_made()
    pipe = _pipeline(data, frame)
    rng = np.random.default_rng(7)
    n_req, k = 5, 8
    request = rng.integers(0, n_req, 60)
    request[request == 2] = 3  # request 2: no candidate
    item = rng.integers(0, 10, 60)
    scores = rng.integers(0, 5, 60).astype(np.float32) / 4  # many ties
    scores[[3, 17]] = np.nan
    mask = rng.integers(1, 4, 60)
    category = pipe.ranker.features.primary_category.copy()
    category[9] = -1  # an item without a category
    pipe.ranker.features.primary_category = category
    cands = Candidates(request, item, np.zeros((60, 5), np.float32), mask, pipe.feature_names)
    got = pipe.post_process(n_req, cands, scores, k, share)
    cap = max(1, int(np.ceil(share * k))) if share is not None else 0
    want = _post_process_reference(request, item, scores, mask, category, n_req, k, cap)
    for q in range(n_req):
        rows = want[q]
        assert got.items[q, :len(rows)].tolist() == item[rows].tolist()
        np.testing.assert_array_equal(got.scores[q, :len(rows)], scores[rows])
        assert got.source_mask[q, :len(rows)].tolist() == mask[rows].tolist()
        assert (got.items[q, len(rows):] == -1).all()
    assert (got.items[2] == -1).all()
    from models.two_stage import TwoStageError

    with pytest.raises(TwoStageError, match="request must be in range"):
        pipe.post_process(2, cands, scores, k, share)  # rows of requests 2-4 in a batch of 2
