"""The serving benchmark's own arithmetic (``benchmarks/serving.py``): the open-loop curve's
aggregation over repeats and its argument parsing. The benchmark itself runs a real server and
load generators; it is not run by the test suite."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.serving import _batch_mean, _fractions, batch_mean_between, open_loop_curve  # noqa: E402


def _point(fraction: float, rate: float, p99: float, cpu: float, batch: float | None, share: float | None = 1.0) -> dict:
    return {"fraction": fraction, "rate": rate, "p50_ms": p99 / 4, "p99_ms": p99, "server_cpu_ms_per_request": {"total": cpu},
            "model_batch_size_mean": batch, "model_served_share": share}


def test_open_loop_curve_takes_medians_per_fraction_over_repeats():
    repeats = [
        [_point(0.25, 400.0, 6.0, 2.0, 1.0), _point(0.5, 800.0, 30.0, 1.2, 3.0)],
        [_point(0.25, 420.0, 12.0, 2.4, 1.2), _point(0.5, 840.0, 50.0, 1.1, 3.4, share=0.98)],
        [_point(0.25, 380.0, 8.0, 2.2, None), _point(0.5, 760.0, 40.0, 1.0, 2.6)],
    ]
    curve = open_loop_curve(repeats)
    assert [c["fraction"] for c in curve] == [0.25, 0.5]
    low, half = curve
    assert (low["rate"], low["p99_ms"], low["p99_ms_min"], low["p99_ms_max"]) == (400.0, 8.0, 6.0, 12.0)
    assert low["server_cpu_ms_per_request"] == 2.2
    assert low["model_batch_size_mean"] == 1.1  # a repeat without batches (None) is left out
    assert (half["rate"], half["p99_ms"], half["model_served_share_min"]) == (800.0, 40.0, 0.98)


def test_fractions_are_sorted_and_always_include_the_half_load_target():
    assert _fractions("0.25,0.125") == [0.125, 0.25, 0.5]
    assert _fractions("1, 0.5") == [0.5, 1.0]
    for bad in ("0", "1.5", "-0.25", "half"):
        with pytest.raises(argparse.ArgumentTypeError):
            _fractions(bad)


def test_batch_mean_between_two_snapshots():
    assert batch_mean_between((100.0, 40.0), (160.0, 60.0)) == 3.0
    assert batch_mean_between((100.0, 40.0), (100.0, 40.0)) is None  # no batch in between
    text = "# HELP ...\nrecsys_model_batch_size_sum 30.0\nrecsys_model_batch_size_count 10.0\n"
    assert _batch_mean(text) == 3.0
    assert _batch_mean("") is None  # no batch since start


def test_breakdown_report_shows_the_idle_and_co_runner_tables_only_when_measured():
    """``benchmarks/serving_breakdown.py``'s markdown: the stage table, then the idle-gap table and
    the other-core table (``beside_other_core`` is None where the process could not be pinned)."""
    from benchmarks.serving_breakdown import CO_RUNNERS, render_md

    row = {"batch": 1, "candidates": 480, "source_ease_ms": 0.1, "merge_ms": 0.2, "filter_ms": 0.0, "ranking_ms": 1.0,
           "dense_mlp_ms": 0.2, "over_mlp_ms": 0.4, "diversity_ms": 0.04, "total_ms": 2.0, "per_request_ms": 2.0}
    res = {"measured": {"at": "t", "load_avg": [0.1], "cpu_speed_start_end": [30.0, 31.0]}, "setup": {}, "rows": [row],
           "fixed_ms_per_batch": 1.2, "ms_per_request": 0.8,
           "after_idle": [{"batch": 4, "idle_before_ms": 0.0, "gap": "none", "wall_ms": 2.6, "cpu_ms": 2.55},
                          {"batch": 4, "idle_before_ms": 10.0, "gap": "sleep", "wall_ms": 5.2, "cpu_ms": 5.1},
                          {"batch": 4, "idle_before_ms": 10.0, "gap": "python_loop", "wall_ms": 3.9, "cpu_ms": 3.83}],
           "beside_other_core": [{"batch": 1, "other_core": name, "cpu_ms": 2.0 * (1 + k), "vs_idle": 1.0 + k}
                                 for k, name in enumerate(CO_RUNNERS)]}
    md = render_md(res)
    assert "| 1 | 480 | 0.1 | 0.2 | 0.0 | 1.0 | 0.2 | 0.4 | 0.04 | 2.0 | 2.0 |" in md
    assert "| 4 | 10.0 | sleep | 5.2 | 5.1 | 2.0 |" in md and "| 4 | 10.0 | python loop | 3.9 | 3.83 | 1.5 |" in md
    assert list(CO_RUNNERS)[0] == "idle" and "| 1 | memory stream | 6.0 | 3.0 |" in md
    assert "other core" not in render_md({**res, "beside_other_core": None})


def test_cache_lookups_between_snapshots_and_the_feature_cache_summary():
    """The feature-cache counts of an open-loop point, and ``benchmarks/feature_cache.py``'s
    medians per arm and rate over its servers."""
    from benchmarks.feature_cache import ARMS, render_md, summarize
    from benchmarks.serving import cache_between
    from serving.metrics import counter_by_label

    text = ('# HELP recsys_feature_cache_lookups_total ...\nrecsys_feature_cache_lookups_total{outcome="hit"} 12.0\n'
            'recsys_feature_cache_lookups_total{outcome="changed"} 3.0\nrecsys_fallbacks_total{reason="timeout"} 1.0\n')
    assert counter_by_label(text, "recsys_feature_cache_lookups", "outcome") == {"hit": 12.0, "changed": 3.0}
    assert cache_between({"hit": 10.0, "miss": 5.0}, {"hit": 40.0, "miss": 15.0, "changed": 10.0}) == {
        "hit": 30, "miss": 10, "changed": 10, "hit_share": 0.6}
    assert cache_between({}, {})["hit_share"] is None

    def server(p99s: list[float], hits: list[float], cpu: float) -> dict:
        return {"cpu_speed": 50.0, "points": [
            {"rate": r, "p50_ms": p / 3, "p95_ms": p / 2, "p99_ms": p, "server_cpu_ms_per_request": {"total": cpu},
             "feature_cache": {"hit": 0, "miss": 0, "changed": 7, "hit_share": h}, "model_served_share": 1.0}
            for r, p, h in zip((350, 700), p99s, hits)]}

    runs = {"ttl5_no_stamps": [server([20, 60], [0.3, 0.4], 2.5), server([30, 80], [0.3, 0.5], 2.7)],
            "ttl60_stamps": [server([10, 30], [0.9, 0.9], 2.4), server([14, 20], [0.8, 0.9], 2.2)]}
    summary = summarize(runs, [350, 700])
    assert summary["ttl60_stamps"]["700"]["p99_ms"] == 25.0 and summary["ttl60_stamps"]["700"]["p99_ms_per_server"] == [30, 20]
    assert summary["ttl5_no_stamps"]["350"]["feature_cache_hit_share"] == 0.3
    assert summary["ttl5_no_stamps"]["700"]["server_cpu_ms_per_request"] == 2.6
    assert set(summary) == set(runs) <= set(ARMS)
    md = render_md({"measured_at": "now", "machine": {"cpus": 2}, "pairs": 2, "order": list(runs) * 2, "warm_s": 60,
                    "duration_s": 10, "events_per_s": 100, "users": 1787, "cpu_speed": [50.0] * 4, "summary": summary})
    assert "| ttl60_stamps | 700 | " in md and "(30, 20)" in md


def test_catalog_scaling_measures_the_serving_layout_beside_plain_faiss():
    """Both layouts of the same HNSW graph per size, each at the smallest efSearch reaching the
    recall target, answering in the catalog's row numbers (recall is against exact search)."""
    pytest.importorskip("faiss")
    from benchmarks.serving import LAYOUTS, catalog_scaling

    out = catalog_scaling([1500], queries=20, target_recall=0.9, passes=3)
    assert set(out) == set(LAYOUTS)
    for name, rows in out.items():
        (row,) = rows
        assert row["items"] == 1500 and row["ann_recall@100"] >= 0.9 and row["cpu_p99_ms"] >= row["cpu_p50_ms"] > 0
        assert len(row["p99_ms_per_pass"]) == 3 and sorted(row["p99_ms_per_pass"])[1] == row["p99_ms"]  # the median pass
        assert row["layout"] == ("plain" if name == "plain" else "locality order, huge pages")
    stage = out["serving"][0]  # the whole candidate stage is timed beside the serving layout's searches
    assert stage["retrieve_cpu_p99_ms"] >= stage["retrieve_cpu_p50_ms"] > 0 and stage["retrieve_p99_ms"] >= stage["retrieve_p50_ms"]
    assert stage["model_path_cpu_p50_ms"] > stage["retrieve_cpu_p50_ms"]  # the ranker over every candidate comes on top
    assert "retrieve_p99_ms" not in out["plain"][0]
    from benchmarks.serving import _passes_md

    assert _passes_md([0.2, 0.31, 0.25]) == " [0.2, 0.31, 0.25]" and _passes_md([0.2]) == _passes_md(None) == ""


def test_candidate_stage_merges_every_source_and_leaves_out_the_consumed_items():
    """The catalog curve's candidate stage is the request path's: each source contributes within its
    quota, nothing a request consumed comes back, at most ``n_candidates`` per request."""
    pytest.importorskip("faiss")
    import faiss
    import numpy as np

    from benchmarks.serving import CANDIDATE_QUOTAS, candidate_stage

    rng = np.random.default_rng(0)
    items = rng.standard_normal((3000, 16)).astype(np.float32)
    queries = rng.standard_normal((5, 16)).astype(np.float32)
    index = faiss.IndexFlatIP(16)
    index.add(items)
    run, consumed_rows = candidate_stage(items, queries, index, rng=rng, active=200, neighbours=20, history=10,
                                         n_candidates=400)
    names = list(CANDIDATE_QUOTAS)
    for i in range(5):
        cands = run(i)
        consumed = set(consumed_rows[i].indices.tolist())
        assert len(consumed) == 10
        assert 0 < len(cands) <= 400 and (cands.request == 0).all() and len(set(cands.item.tolist())) == len(cands)
        assert not consumed & set(cands.item.tolist())
        assert {names[b] for m in cands.source_mask.tolist() for b in range(3) if m >> b & 1} == set(names)


def test_synthetic_ranker_scores_the_candidate_stage_as_the_pipeline_would():
    """The catalog curve's ranker covers the catalog, takes the merge's candidate features as its
    extra inputs and scores every candidate of a request in one batched call."""
    pytest.importorskip("faiss")
    import faiss
    import numpy as np

    from benchmarks.serving import CANDIDATE_QUOTAS, candidate_stage, synthetic_ranker

    rng = np.random.default_rng(1)
    items = rng.standard_normal((2000, 16)).astype(np.float32)
    index = faiss.IndexFlatIP(16)
    index.add(items)
    run, _ = candidate_stage(items, items[:3], index, rng=rng, active=100, neighbours=10, n_candidates=300)
    ranker = synthetic_ranker(2000, list(CANDIDATE_QUOTAS), rng=rng, n_users=10)
    assert ranker.features.n_items == 2000
    cands, user = run(0), np.array([3])
    scores = ranker.score(user[cands.request], cands.item, cands.features, request_of_row=cands.request, request_users=user)
    assert scores.shape == (len(cands),) and np.isfinite(scores).all() and ((scores > 0) & (scores < 1)).all()
    assert len(np.unique(scores)) > 1


def test_naive_reference_ranks_the_flat_search_candidates_with_its_mlp():
    """The issue's yardstick does the work it stands for: the items returned are the FAISS flat
    top-``candidates`` by inner product, ordered by the MLP's scores, the same for the same user."""
    import zlib

    import numpy as np
    from fastapi.testclient import TestClient

    from benchmarks.naive_reference import create_app

    n_items, n_users, dim, cands = 60, 10, 8, 7
    with TestClient(create_app(n_items=n_items, n_users=n_users, dim=dim, candidates=cands, seed=3)) as client:
        assert client.get("/noop").status_code == 200
        assert client.get("/healthz").json()["detail"]["worker"] > 0
        first = client.get("/v1/recommendations/alice", params={"k": 5}).json()
        assert client.get("/v1/recommendations/alice", params={"k": 5}).json() == first
        everything = client.get("/v1/recommendations/alice", params={"k": 50}).json()  # k above the candidates: all of them
    rng = np.random.default_rng(3)  # the app's vectors, drawn the same way
    items = rng.standard_normal((n_items, dim)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    users = rng.standard_normal((n_users, dim)).astype(np.float32)
    users /= np.linalg.norm(users, axis=1, keepdims=True)
    top = set(np.argsort(-(items @ users[zlib.crc32(b"alice") % n_users]))[:cands].tolist())
    assert {int(x["item_id"]) for x in everything["items"]} == top
    scores = [x["score"] for x in everything["items"]]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1
    assert [x["item_id"] for x in first["items"]] == [x["item_id"] for x in everything["items"]][:5]
    assert [x["position"] for x in first["items"]] == list(range(5))
