"""HNSW indexes in locality order and on huge pages (``models/ann.py``): same answers, in row
numbers, through a save and a load."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from models.ann import back_with_huge_pages, hnsw_index, hnsw_of, locality_order, set_ef_search  # noqa: E402


def _clustered(n: int, d: int = 16, clusters: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / truth.shape[1] for f, t in zip(found, truth)]))


def test_locality_order_is_a_permutation_that_groups_neighbours() -> None:
    x = _clustered(3000)
    order = locality_order(x)
    assert order.dtype == np.int64 and np.array_equal(np.sort(order), np.arange(3000))
    # consecutive stored rows are far more alike than consecutive original rows
    stored = x[order]
    assert float(np.mean(np.sum(stored[1:] * stored[:-1], axis=1))) > 2 * float(np.mean(np.sum(x[1:] * x[:-1], axis=1)))
    assert np.array_equal(locality_order(x[:1]), [0])


def test_reordered_hnsw_answers_row_numbers_like_the_plain_one() -> None:
    x = _clustered(4000)
    q = _clustered(50, seed=1)
    exact = faiss.IndexFlatIP(16)
    exact.add(x)
    _, truth = exact.search(q, 20)
    plain = hnsw_index(x, m=16, ef_construction=64, ef_search=128, reorder=False)
    ordered = hnsw_index(x, m=16, ef_construction=64, ef_search=128)
    assert isinstance(ordered, faiss.IndexIDMap) and hnsw_of(ordered) is not None and hnsw_of(plain) is plain
    _, got = ordered.search(q, 20)
    _, got_plain = plain.search(q, 20)
    assert _recall(got, truth) >= 0.97 and _recall(got_plain, truth) >= 0.97
    _, own = ordered.search(x[:200], 1)  # each item finds itself: labels are original rows
    assert np.mean(own[:, 0] == np.arange(200)) >= 0.99
    set_ef_search(ordered, 33)
    assert hnsw_of(ordered).hnsw.efSearch == 33
    set_ef_search(exact, 33)  # no efSearch on a flat index: nothing happens
    assert hnsw_of(exact) is None


def test_a_saved_two_tower_index_loads_with_its_order_and_ef_search() -> None:
    from models.two_tower import TwoTowerConfig, build_faiss_index, load_faiss_index

    x = _clustered(1500)
    cfg = TwoTowerConfig(n_users=1, n_items=1500, index="hnsw", hnsw_m=16, hnsw_ef_search=77)
    built = build_faiss_index(x, cfg)
    loaded = load_faiss_index(faiss.serialize_index(built), cfg)
    assert isinstance(loaded, faiss.IndexIDMap) and hnsw_of(loaded).hnsw.efSearch == 77
    q = _clustered(30, seed=2)
    np.testing.assert_array_equal(built.search(q, 10)[1], loaded.search(q, 10)[1])


def _thp_mode() -> str | None:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not sys.platform.startswith("linux") or not path.exists():
        return None
    return path.read_text().split("[", 1)[1].split("]", 1)[0]


def test_huge_pages_change_nothing_in_the_answers() -> None:
    """32K x 64-d vectors (8 MB): the whole huge pages inside them are advised where the kernel's
    THP mode allows it (``madvise`` or ``always``); the answers stay the same."""
    x = _clustered(32_768, d=64)
    index = hnsw_index(x, m=8, ef_construction=16, ef_search=32, reorder=False, huge_pages=False)
    q = _clustered(20, d=64, seed=3)
    before = index.search(q, 10)[1]
    advised = back_with_huge_pages(index)
    mode = _thp_mode()
    if mode in ("madvise", "always"):  # elsewhere the advice may or may not be taken: only the answers count
        assert advised >= 2 << 21  # at least two of the vectors' four huge pages
    np.testing.assert_array_equal(index.search(q, 10)[1], before)
    assert back_with_huge_pages(faiss.IndexFlatIP(64)) == 0  # not an HNSW index
