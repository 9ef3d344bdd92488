"""The compiled request-path kernels (``models.kernels``) against plain references."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from models.two_stage import _top_n_dense


def _reference_top(row_scores: np.ndarray, n: int, banned: set[int]) -> list[tuple[int, float]]:
    """Best ``n`` finite, allowed entries of one row: by float32 score descending, ties by item."""
    ok = [(i, np.float32(v)) for i, v in enumerate(row_scores) if np.isfinite(v) and i not in banned]
    return sorted(ok, key=lambda t: (-float(t[1]), t[0]))[:n]


@pytest.mark.parametrize("n", [1, 5, 40, 80])
def test_top_n_rows_ranks_finite_allowed_entries_ties_by_item(n):
    rng = np.random.default_rng(n)
    scores = rng.integers(0, 6, (4, 40)).astype(np.float32) / 4  # many ties
    scores[0, 3] = np.nan
    scores[1, :5] = [np.inf, -np.inf, -np.inf, np.nan, -0.0]
    scores[2] = -np.inf  # nothing to return
    exclude = sp.csr_matrix((np.array([1, 1, 0, 1], np.float32), ([0, 0, 1, 3], [7, 9, 11, 0])), shape=(4, 40))
    items, got = _top_n_dense(scores, n, exclude)
    assert items.shape == (4, min(n, 40)) and got.dtype == np.float32
    for r in range(4):
        banned = {int(i) for i, v in zip(exclude[r].indices, exclude[r].data) if v > 0}  # a stored 0 excludes nothing
        want = _reference_top(scores[r], n, banned)
        assert items[r, :len(want)].tolist() == [i for i, _ in want]
        np.testing.assert_array_equal(got[r, :len(want)], [v for _, v in want])
        assert (items[r, len(want):] == -1).all() and (got[r, len(want):] == 0).all()
    assert _top_n_dense(scores, 0, None)[0].shape == (4, 0)


def test_item_item_top_n_is_the_sparse_product_ranked():
    """``history @ W`` summed in float64 (scipy's product), positive scores only, exclusions
    dropped, best ``n`` by float32 score then item; history values weight the rows."""
    from models.two_stage import CoVisitationSource

    w = sp.random(60, 60, density=0.1, random_state=1, format="csr", dtype=np.float32)
    w.data -= 0.3  # some negative weights: items whose sum is not positive are no candidates
    h = sp.random(6, 60, density=0.08, random_state=2, format="csr", dtype=np.float32)
    h[4] = 0  # an empty history row
    h.eliminate_zeros()
    src = CoVisitationSource()
    src.sim = w
    exclude = h.copy()
    exclude[5, 0] = 1.0
    for n in (1, 7, 60):
        items, scores = src.retrieve(np.arange(6), h, n, exclude=exclude)
        dense = (h.astype(np.float64) @ w.astype(np.float64)).toarray().astype(np.float32)
        for r in range(6):
            row = np.where(dense[r] > 0, dense[r], -np.inf)
            want = _reference_top(row, n, set(exclude[r].indices.tolist()))
            assert items[r, :len(want)].tolist() == [i for i, _ in want]
            np.testing.assert_allclose(scores[r, :len(want)], [v for _, v in want], rtol=1e-6)
            assert (items[r, len(want):] == -1).all()
        assert (items[4] == -1).all()
    assert src.retrieve(np.arange(2), sp.csr_matrix((2, 60), dtype=np.float32), 5)[0].shape == (2, 5)


def test_top_n_of_an_empty_batch_and_non_finite_item_item_sums():
    items, scores = _top_n_dense(np.zeros((0, 7), np.float32), 3, None)
    assert items.shape == (0, 3) and scores.shape == (0, 3)
    from models.two_stage import CoVisitationSource

    src = CoVisitationSource()
    src.sim = sp.csr_matrix(np.array([[0, np.inf, 1.0], [0, 0, 2.0], [0, 0, 0]], np.float32))
    got, _ = src.retrieve(np.arange(1), sp.csr_matrix(np.array([[1.0, 1.0, 0]], np.float32)), 3)
    assert got[0].tolist() == [2, -1, -1]  # item 1's infinite sum is no candidate, as before the kernels


def test_kernel_inputs_out_of_range_are_refused_not_read():
    """The kernels do not check bounds, so their callers do: a wrong request index, a neighbour
    index past the catalog or too many items for a rank key is an error naming the input."""
    from models.two_stage import ItemItemSource, TwoStageError, _key_bits

    arrays = {"indptr": np.array([0, 1, 1], np.int64), "indices": np.array([5], np.int32), "data": np.ones(1, np.float32)}
    with pytest.raises(TwoStageError, match="outside the catalog"):
        ItemItemSource.from_parts({"type": "item_item"}, arrays, 2)
    with pytest.raises(TwoStageError, match="rank key"):
        _key_bits(2**31)


def test_kernel_scratch_tables_are_per_thread_kept_grown_and_tags_never_repeat():
    """The request path's catalog-sized work tables (``models.kernels.KernelScratch``) are allocated
    once per thread and catalog size, not per call, and every call stamps with fresh tags."""
    import threading

    from models.kernels import KernelScratch

    scratch = KernelScratch()
    a = scratch.table("stamp", 100)
    assert a.shape == (100,) and a.dtype == np.int64 and not a.any()  # zeros: below every tag
    a[:] = 7
    assert np.shares_memory(scratch.table("stamp", 50), a)  # the same memory, not a new table
    assert (scratch.table("stamp", 100) == 7).all()  # kept between calls
    grown = scratch.table("stamp", 300)
    assert grown.shape == (300,) and not grown.any()
    assert scratch.table("acc", 10, np.float64).dtype == np.float64 and scratch.table("empty", 0).shape == (1,)
    first = scratch.tags(4)
    assert scratch.tags(1) == first + 4 and scratch.tags(0) == first + 5 and scratch.tags(3) == first + 6
    other: dict = {}
    t = threading.Thread(target=lambda: other.update(table=scratch.table("stamp", 300), tag=scratch.tags(1)))
    t.start()
    t.join()
    assert other["table"] is not grown and not np.shares_memory(other["table"], grown) and other["tag"] == 1


def test_item_item_and_filter_results_do_not_depend_on_what_earlier_calls_left_in_the_scratch():
    """Calls on catalogs of different sizes and exclusions, one after another on one thread (and the
    tables filled with stale stamps and garbage first), each equal to its plain reference."""
    import threading

    from models.kernels import SCRATCH
    from models.two_stage import CoVisitationSource, _filter_ranked

    def check(n_items: int, seed: int) -> None:
        w = sp.random(n_items, n_items, density=0.1, random_state=seed, format="csr", dtype=np.float32)
        h = sp.random(5, n_items, density=0.05, random_state=seed + 1, format="csr", dtype=np.float32)
        src = CoVisitationSource()
        src.sim = w
        items, scores = src.retrieve(np.arange(5), h, 10, exclude=h)
        dense = (h.astype(np.float64) @ w.astype(np.float64)).toarray().astype(np.float32)
        ranked = np.stack([np.random.default_rng(seed + r).permutation(n_items)[:30] for r in range(5)]).astype(np.int64)
        kept, _ = _filter_ranked(ranked, np.ones((5, 30), np.float32), h, 30)
        for r in range(5):
            banned = set(h[r].indices.tolist())
            want = _reference_top(np.where(dense[r] > 0, dense[r], -np.inf), 10, banned)
            assert items[r, :len(want)].tolist() == [i for i, _ in want] and (items[r, len(want):] == -1).all()
            want_kept = [i for i in ranked[r] if i not in banned]
            assert kept[r, :len(want_kept)].tolist() == want_kept and (kept[r, len(want_kept):] == -1).all()

    stale = SCRATCH.tags(1)  # below every tag handed out from now on
    for name, dtype in (("stamp_a", np.int64), ("stamp_b", np.int64), ("touched", np.int64), ("acc", np.float64), ("slots", np.int64)):
        SCRATCH.table(name, 200, dtype)[:] = stale if name.startswith("stamp") else 12345
    for n_items, seed in ((60, 1), (200, 2), (60, 3), (150, 4)):
        check(n_items, seed)
    errors: list[BaseException] = []

    def in_thread() -> None:  # another thread: its own tables, from zeros
        try:
            check(120, 5)
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            errors.append(exc)

    worker = threading.Thread(target=in_thread)
    worker.start()
    worker.join()
    assert not errors, errors


def test_merged_histories_ignore_stale_stamps():
    """The user tower's per-request history (stored history, then the request's consumed items the
    model knows and the stored one lacks, the last ``cap``), with the stamp table full of stale tags."""
    from models.kernels import SCRATCH, merged_histories

    n_model_items, cap = 30, 4
    hist_indptr = np.array([0, 3, 3, 5], np.int64)  # model users 0..2: stored histories
    hist_items = np.array([1, 2, 3, 7, 8], np.int64)
    local_to_model = np.array([-1, 1, 2, 9, 10, 7], np.int64)  # pipeline item -> model item (-1: unknown)
    h_indptr = np.array([0, 3, 5, 5, 6], np.int64)  # four requests' consumed items (pipeline indices)
    h_indices = np.array([1, 3, 0, 4, 5, 0], np.int64)
    model_users = np.array([0, 2, 1, -1], np.int64)
    stamp = SCRATCH.table("stamp_a", n_model_items)
    stamp[:] = SCRATCH.tags(1)  # stale: every tag handed out below is larger
    lengths, values, signal = merged_histories(model_users, h_indptr, h_indices, local_to_model, hist_indptr,
                                               hist_items, cap, stamp, SCRATCH.tags(len(model_users)))
    want = []
    for r, m in enumerate(model_users):
        stored = hist_items[hist_indptr[m]:hist_indptr[m + 1]].tolist() if m >= 0 else []
        extra = [int(local_to_model[i]) for i in h_indices[h_indptr[r]:h_indptr[r + 1]]
                 if local_to_model[i] >= 0 and local_to_model[i] not in stored]
        want.append((stored + extra)[-cap:])
    assert lengths.tolist() == [len(w) for w in want] and values.tolist() == [i for w in want for i in w]
    assert lengths.tolist() == [4, 3, 0, 0]  # the cap, a merge, a known user with nothing, nothing known
    assert signal.tolist() == [True, True, True, False]  # signal: a known user or a non-empty history
