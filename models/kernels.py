"""Compiled (numba) loops for the two-stage pipeline's per-batch bookkeeping.

Why this exists: a serving micro-batch is small (one to a few dozen requests, ~500 candidates
each), and at that size the vectorised numpy/torch code of the request path was dominated by
the cost of *calling* its ~1,000 small array operations (each allocates, dispatches and walks
its temporaries once), not by arithmetic: measured here before this module, ~1.8 ms of fixed
cost per micro-batch against ~0.34 ms per request (now: ``benchmarks/results/serving_breakdown.md``). Each function here does one
of those multi-pass steps -- merging the candidate sources, selecting a top ``n``, pooling
embedding bags, assembling the ranker's inputs -- as one pass of compiled code over the data,
with the GIL released (``nogil``), so the event loop keeps running while the model thread works.

The matrix products stay where they are fast (oneDNN / MKL through torch, FAISS), and so does
sorting: a top ``n`` or a per-request ranking is a kernel that packs each (score, index) pair
into one int64 *rank key* (the float's bits made order-preserving, so ascending keys are scores
descending, NaN last, ties by ascending index), numpy's SIMD ``partition`` / ``sort`` of the key
rows (branch-free; a compiled quicksort's branch misses cost ~2x more here), and a kernel that
reads the winners back. Every kernel keeps the contract of the numpy code it replaced, and the
tests check them against plain references (``tests/test_two_stage.py``, ``tests/test_dlrm.py``,
``tests/test_kernels.py``).

Compiled code is cached next to this module (``cache=True``): the first run on a machine
compiles (seconds), later ones load it. Callers pass one dtype set (int64 indices, float32
values): a new dtype would compile a new specialisation on a live request. numba does not check
bounds: indices are validated by the callers (or here, where a bad one is cheap to catch).
"""
from __future__ import annotations

import threading

import numba as nb
import numpy as np

_JIT = {"cache": True, "nogil": True}
#: for the dot products and pooled sums (the ranker's interaction, the user tower's bags): let LLVM
#: reassociate the float sums (and fuse multiply-adds) so a 16-wide dot is one SIMD multiply and a
#: tree reduction instead of 16 dependent scalar adds (~5x here). The sums then differ from torch's in the last bits (the tests allow 1e-5); no
#: ``nnan`` / ``ninf``: NaN and infinity still propagate as IEEE says.
_JIT_DOTS = {**_JIT, "fastmath": {"reassoc", "contract"}}


class KernelScratch(threading.local):
    """The calling thread's catalog-sized work tables for the kernels, kept from one call to the next.

    Why: several request-path kernels need a table as long as the catalog (a sparse set, score
    accumulators, stamps), though a call touches only the few thousand items of its batch.
    Allocated per call, each costs its pages' faults and, zeroed, a pass over the whole table: at
    1M items an item-item source took ~10 ms per call against ~0.05 at 3,700 items, and a ranked
    list's filter 0.09 against 0.004 (2026-11-25; docs/serving.md). Kept per thread (the model
    thread keeps its own; so does any other caller), each is allocated once per catalog size.

    Stamp tables are never cleared between calls: a call takes fresh tags (:meth:`tags`), larger
    than every tag this thread handed out before, so a stale stamp never matches. Any stamp table
    can serve any kernel, as long as one call does not use one table for two purposes."""

    def __init__(self) -> None:
        self._tables: dict[str, np.ndarray] = {}
        self._next_tag = 1

    def table(self, name: str, size: int, dtype: type = np.int64) -> np.ndarray:
        """This thread's ``name`` table as a view of exactly ``max(size, 1)`` entries, grown (to
        zeros) when the catalog outgrows it. Its content is whatever the last call left: a kernel
        either writes an entry before it reads it or compares it with a fresh tag (zeros are below
        every tag)."""
        size = size or 1
        table = self._tables.get(name)
        if table is None or len(table) < size or table.dtype.type is not dtype:
            table = self._tables[name] = np.zeros(size, dtype)
        return table if len(table) == size else table[:size]

    def tags(self, count: int) -> int:
        """The first of ``count`` consecutive stamp values never handed out on this thread."""
        first = self._next_tag
        self._next_tag = first + (count or 1)
        return first


#: one per thread (``threading.local``): what the request path's callers pass to the kernels below
SCRATCH = KernelScratch()


@nb.njit(**_JIT)
def _key(value: np.float32, bits: np.int64, item: np.int64, ibits: int) -> np.int64:
    """The rank key of one (float32 score, index) pair: an int64 whose ascending order is the scores
    descending (NaN last, -0.0 with 0.0), then the index ascending -- the float's bits (``bits``,
    its int32 view sign-extended) made order-preserving, flipped, and the index packed below them
    in ``ibits`` bits."""
    if value != value:  # NaN: after every number
        return (np.int64(0xFFFFFFFF) << ibits) | item
    if bits == np.int64(-2147483648):  # -0.0
        bits = 0
    ordered = (bits ^ 0x7FFFFFFF if bits < 0 else bits) + (np.int64(1) << 31)
    return ((np.int64(0xFFFFFFFF) - ordered) << ibits) | item


@nb.njit(**_JIT)
def _desc_keys(values: np.ndarray, items: np.ndarray, count: int, ibits: int, out: np.ndarray) -> None:
    """``out[j] = _key(values[j], ..., items[j])`` for the first ``count`` entries."""
    bits = values[:count].view(np.int32)
    for j in range(count):
        out[j] = _key(values[j], np.int64(bits[j]), items[j], ibits)


@nb.njit(**_JIT)
def candidate_union(items: np.ndarray, scores: np.ndarray, col_src: np.ndarray, col_rf: np.ndarray,
                    n_sources: int, n_items: int, ibits: int, sparse: np.ndarray):
    """The first half of the candidate merge of :meth:`models.two_stage.TwoStagePipeline.retrieve`.

    ``items`` / ``scores`` ``(B, W)``: every source's ranked block side by side (``-1`` = none);
    ``col_src`` / ``col_rf`` ``(W,)``: the source and rank fraction of each column. Per request: the
    union of the items, each in a slot (first-seen order) with its features -- per source the
    score and rank fraction (an item a source repeats keeps its last entry), the number of
    sources -- and source bitmask. Returns ``(keys (B, W), counts (B,), slot_items (B, W), features
    (B * W, 2 * n_sources + 1), masks (B * W,))``: ``keys[r]`` ranks request ``r``'s items by best rank
    fraction, ties by item (:data:`NO_KEY` past its last item), for numpy to sort
    (:func:`candidate_emit` then reads the winners).

    De-duplication is a sparse set over the catalog (valid when ``dense[sparse[i]] == i``), so its
    table ``sparse`` (``n_items`` long, :class:`KernelScratch`) needs no initialisation: the cost is
    per entry, not per catalog item."""
    b, w = items.shape
    n_f = 2 * n_sources + 1
    keys = np.full((b, w), NO_KEY, np.int64)
    slot_items = np.empty((b, w), np.int64)
    feats = np.empty((b * w, n_f), np.float32)
    masks = np.empty(b * w, np.int64)
    counts = np.zeros(b, np.int64)
    best = np.empty(w, np.float32)
    for r in range(b):
        base = r * w
        dense = slot_items[r]
        count = 0
        for c in range(w):
            it = items[r, c]
            if it < 0:
                continue
            if it >= n_items:
                raise ValueError("a candidate source returned an item index past the catalog")
            v = sparse[it]
            if v < 0 or v >= count or dense[v] != it:
                v = count
                sparse[it] = v
                dense[v] = it
                for f in range(n_f):  # element loops: a slice assignment builds a view per entry
                    feats[base + v, f] = 0.0
                best[v] = 0.0
                masks[base + v] = 0
                count += 1
            s = col_src[c]
            feats[base + v, 2 * s] = scores[r, c]
            feats[base + v, 2 * s + 1] = col_rf[c]
            if col_rf[c] > best[v]:
                best[v] = col_rf[c]
            masks[base + v] |= np.int64(1) << s
        for v in range(count):
            mk = masks[base + v]
            n_set = 0
            while mk:
                n_set += mk & 1
                mk >>= 1
            feats[base + v, n_f - 1] = n_set
        _desc_keys(best, dense, count, ibits, keys[r])
        counts[r] = count
    return keys, counts, slot_items, feats, masks


@nb.njit(**_JIT)
def candidate_emit(ranked: np.ndarray, counts: np.ndarray, slot_items: np.ndarray, feats: np.ndarray,
                   masks: np.ndarray, ibits: int, slot_of: np.ndarray):
    """The second half of the merge: each request's ranked keys (``(B, n)``, ascending, from
    :func:`candidate_union` through numpy's sort) back to ``(request, item, features, mask)`` rows,
    grouped by request in batch order. ``slot_of``: a catalog-long table, written before read."""
    b, n = ranked.shape
    w = slot_items.shape[1]
    m = 0
    for r in range(b):
        m += min(counts[r], n)
    out_req = np.empty(m, np.int64)
    out_item = np.empty(m, np.int64)
    n_f = feats.shape[1]
    out_feat = np.empty((m, n_f), np.float32)
    out_mask = np.empty(m, np.int64)
    low = (np.int64(1) << ibits) - 1
    m = 0
    for r in range(b):
        for v in range(counts[r]):  # item -> slot (a request's items are distinct)
            slot_of[slot_items[r, v]] = v
        for j in range(min(counts[r], n)):
            it = ranked[r, j] & low
            v = r * w + slot_of[it]
            out_req[m] = r
            out_item[m] = it
            for f in range(n_f):
                out_feat[m, f] = feats[v, f]
            out_mask[m] = masks[v]
            m += 1
    return out_req, out_item, out_feat, out_mask


@nb.njit(**_JIT)
def _mark_row(stamp: np.ndarray, tag: int, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, r: int) -> None:
    """``stamp[i] = tag`` for the items stored in row ``r`` of a CSR matrix with a positive value
    (a stored zero excludes nothing)."""
    if r + 1 < len(indptr):
        for e in range(indptr[r], indptr[r + 1]):
            if data[e] > 0 and indices[e] < len(stamp):  # a column past the scored ones excludes nothing
                stamp[indices[e]] = tag


#: the key of "no entry" in :func:`dense_keys` / :func:`item_item_keys` (sorts last)
NO_KEY = np.iinfo(np.int64).max


@nb.njit(**_JIT)
def dense_keys(scores: np.ndarray, ibits: int, ex_indptr: np.ndarray, ex_indices: np.ndarray, ex_data: np.ndarray,
               column_ok: np.ndarray, row_ok: np.ndarray) -> np.ndarray:
    """``(B, N)`` int64 rank keys of a dense float32 score block (best first = smallest key, ties by
    column): :data:`NO_KEY` where the score is not finite, the column is stored in the row's
    ``exclude`` CSR row, ``column_ok`` is False or the row's ``row_ok`` is False (empty masks allow
    everything). Selecting the smallest keys is numpy's SIMD partition/sort (:func:`decode_keys`)."""
    b, width = scores.shape
    keys = np.empty((b, width), np.int64)
    bits = scores.view(np.int32)
    stamp = np.zeros(max(width, 1), np.int64)
    check_col = len(column_ok) == width
    for r in range(b):
        if len(row_ok) == b and not row_ok[r]:
            keys[r, :] = NO_KEY
            continue
        _mark_row(stamp, r + 1, ex_indptr, ex_indices, ex_data, r)
        for i in range(width):
            v = scores[r, i]
            if stamp[i] == r + 1 or not np.isfinite(v) or (check_col and not column_ok[i]):
                keys[r, i] = NO_KEY
            else:
                keys[r, i] = _key(v, np.int64(bits[r, i]), i, ibits)
    return keys


@nb.njit(**_JIT)
def item_item_keys(h_indptr: np.ndarray, h_indices: np.ndarray, h_data: np.ndarray, w_indptr: np.ndarray,
                   w_indices: np.ndarray, w_data: np.ndarray, ibits: int, ex_indptr: np.ndarray,
                   ex_indices: np.ndarray, ex_data: np.ndarray, acc: np.ndarray, touched: np.ndarray,
                   touched_at: np.ndarray, excluded_at: np.ndarray, tag0: int) -> np.ndarray:
    """Rank keys of ``history @ W`` per history row for a sparse item-to-item ``W``: each row's sum
    over its history entries of ``value * W[entry's item]`` (in float64, in entry order, as a
    ``bincount`` would; ranked as float32); items with a non-positive or non-finite score or stored in
    the row's ``exclude`` row get no key. Only the items a row touches are visited (no dense pass over the
    catalog per request): the result is ``(B, most keys in a row)``, padded with :data:`NO_KEY`.

    Work tables, each catalog-long (:class:`KernelScratch`): ``acc`` (float64) and ``touched`` are
    written before read; ``touched_at`` and ``excluded_at`` are stamp tables, row ``r`` stamping
    with ``tag0 + r`` (``tag0`` fresh: ``KernelScratch.tags(B)``)."""
    b = len(h_indptr) - 1
    value = np.empty(1, np.float32)
    bits = value.view(np.int32)
    per_row = np.empty(b, np.int64)
    flat = np.empty(0, np.int64)
    used = 0
    for r in range(b):
        tag = tag0 + r
        t = 0
        for e in range(h_indptr[r], h_indptr[r + 1]):
            x = np.float64(h_data[e])
            j = h_indices[e]
            for k in range(w_indptr[j], w_indptr[j + 1]):
                it = w_indices[k]
                if touched_at[it] != tag:
                    touched_at[it] = tag
                    acc[it] = 0.0
                    touched[t] = it
                    t += 1
                acc[it] += np.float64(w_data[k]) * x
        _mark_row(excluded_at, tag, ex_indptr, ex_indices, ex_data, r)
        if used + t > len(flat):  # grow the concatenated keys (amortised doubling)
            grown = np.empty(max(2 * len(flat), used + t, 64), np.int64)
            grown[:used] = flat[:used]
            flat = grown
        count = 0
        for q in range(t):
            it = touched[q]
            value[0] = np.float32(acc[it])
            if value[0] > 0 and np.isfinite(value[0]) and excluded_at[it] != tag:
                flat[used + count] = _key(value[0], np.int64(bits[0]), it, ibits)
                count += 1
        per_row[r] = count
        used += count
    width = 0
    for r in range(b):
        width = max(width, per_row[r])
    keys = np.full((b, width), NO_KEY, np.int64)
    start = 0
    for r in range(b):
        keys[r, :per_row[r]] = flat[start:start + per_row[r]]
        start += per_row[r]
    return keys


@nb.njit(**_JIT)
def decode_keys(keys: np.ndarray, ibits: int):
    """``(items, scores)`` back from rank keys (``(B, n)``, each row ascending): the item from the low
    bits, the float32 score from the high ones; :data:`NO_KEY` -> item -1, score 0."""
    b, n = keys.shape
    items = np.full((b, n), -1, np.int64)
    bits = np.zeros((b, n), np.int32)
    low = (np.int64(1) << ibits) - 1
    for r in range(b):
        for j in range(n):
            k = keys[r, j]
            if k == NO_KEY:
                break
            items[r, j] = k & low
            ordered = np.int64(0xFFFFFFFF) - (k >> ibits)
            v = ordered - (np.int64(1) << 31)
            bits[r, j] = np.int32(v ^ 0x7FFFFFFF if v < 0 else v)
    return items, bits.view(np.float32)


@nb.njit(**_JIT)
def filter_ranked(items: np.ndarray, scores: np.ndarray, n: int, n_items: int, ex_indptr: np.ndarray,
                  ex_indices: np.ndarray, ex_data: np.ndarray, stamp: np.ndarray, tag0: int):
    """Ranked lists ``(B, L)`` without ``-1`` entries and items stored in each row's ``exclude``
    row, each compacted to its first ``n`` in order. Returns ``(items (B, n), scores (B, n))``.
    ``stamp``: a stamp table of ``n_items`` entries, row ``r`` stamping with ``tag0 + r``
    (:class:`KernelScratch`)."""
    b, width = items.shape
    out_items = np.full((b, n), -1, np.int64)
    out_scores = np.zeros((b, n), np.float32)
    for r in range(b):
        tag = tag0 + r
        _mark_row(stamp, tag, ex_indptr, ex_indices, ex_data, r)
        j = 0
        for c in range(width):
            if j >= n:
                break
            it = items[r, c]
            if it >= 0 and (it >= n_items or stamp[it] != tag):
                out_items[r, j] = it
                out_scores[r, j] = scores[r, c]
                j += 1
    return out_items, out_scores


# ---- the ranker's inputs (models.dlrm.DLRMScorer) ----------------------------------------------
@nb.njit(**_JIT)
def ranker_dense_input(user_dense: np.ndarray, item_dense: np.ndarray, extra: np.ndarray, extra_mean: np.ndarray,
                       extra_std: np.ndarray, user_idx: np.ndarray, item_idx: np.ndarray, user_oov: int, item_oov: int):
    """The dense arch's input per row: ``[user_dense[u], item_dense[i], (extra - mean) / std]`` in
    float32 (the tables already normalised; ``-1`` -> the ``*_oov`` row)."""
    m = len(item_idx)
    nu, ni, ne = user_dense.shape[1], item_dense.shape[1], extra.shape[1]
    out = np.empty((m, nu + ni + ne), np.float32)
    for r in range(m):
        u = user_idx[r] if user_idx[r] >= 0 else user_oov
        i = item_idx[r] if item_idx[r] >= 0 else item_oov
        for c in range(nu):
            out[r, c] = user_dense[u, c]
        for c in range(ni):
            out[r, nu + c] = item_dense[i, c]
        for c in range(ne):
            out[r, nu + ni + c] = (extra[r, c] - extra_mean[c]) / extra_std[c]
    return out


@nb.njit(**_JIT_DOTS)
def user_side_vectors(user_table: np.ndarray, item_table: np.ndarray, users: np.ndarray, user_oov: int,
                      hist_indptr: np.ndarray, hist_indices: np.ndarray):
    """Per request user: its ``user_id`` embedding row (``-1`` -> the OOV row) and the mean of its
    history items' embedding rows (``user_hist``, mean-pooled like ``embedding_bag``; an unknown
    user or an empty history -> zeros). Returns two ``(B, D)`` float32 arrays."""
    b, d = len(users), user_table.shape[1]
    uid = np.empty((b, d), np.float32)
    uh = np.zeros((b, d), np.float32)
    for q in range(b):
        u = users[q]
        row = u if u >= 0 else user_oov
        uid[q, :] = user_table[row, :]
        if u < 0:
            continue
        lo, hi = hist_indptr[u], hist_indptr[u + 1]
        if hi <= lo:
            continue
        for e in range(lo, hi):
            it = hist_indices[e]
            for c in range(d):
                uh[q, c] += item_table[it, c]
        scale = np.float32(1.0) / np.float32(hi - lo)
        for c in range(d):
            uh[q, c] *= scale
    return uid, uh


@nb.njit(**_JIT_DOTS)
def _dot(a: np.ndarray, i: int, b: np.ndarray, j: int) -> np.float32:
    s = np.float32(0.0)
    for c in range(a.shape[1]):
        s += a[i, c] * b[j, c]
    return s


@nb.njit(**_JIT_DOTS)
def grouped_interaction(dense_emb: np.ndarray, row_req: np.ndarray, item_rows: np.ndarray, user_ids: np.ndarray,
                        user_hist: np.ndarray, item_ids: np.ndarray, item_cats: np.ndarray, item_dots: np.ndarray):
    """The over arch's input on the request path (``DLRMScorer._grouped_layout``'s column order):
    the dense arch's output, then the dots (user_id, user_hist) x (item_id, item_cats) user-major,
    (dense x user_id), (dense x user_hist), (dense x item_id), (dense x item_cats),
    (item_id x item_cats) from the per-item table, (user_id x user_hist) once per request.
    ``row_req`` / ``item_rows``: each row's request and item table row."""
    m, d = dense_emb.shape
    out = np.empty((m, d + 10), np.float32)
    b = user_ids.shape[0]
    user_dots = np.empty(b, np.float32)
    for q in range(b):
        user_dots[q] = _dot(user_ids, q, user_hist, q)
    for r in range(m):
        q, i = row_req[r], item_rows[r]
        # the eight dots in one sweep over the embedding dimension: each of the five vectors is
        # read once (eight separate dot loops read sixteen)
        ui_i = ui_c = uh_i = uh_c = de_u = de_h = de_i = de_c = np.float32(0.0)
        for c in range(d):
            de, u, h, it, ct = dense_emb[r, c], user_ids[q, c], user_hist[q, c], item_ids[i, c], item_cats[i, c]
            out[r, c] = de
            ui_i += u * it
            ui_c += u * ct
            uh_i += h * it
            uh_c += h * ct
            de_u += de * u
            de_h += de * h
            de_i += de * it
            de_c += de * ct
        out[r, d], out[r, d + 1], out[r, d + 2], out[r, d + 3] = ui_i, ui_c, uh_i, uh_c
        out[r, d + 4], out[r, d + 5], out[r, d + 6], out[r, d + 7] = de_u, de_h, de_i, de_c
        out[r, d + 8] = item_dots[i]
        out[r, d + 9] = user_dots[q]
    return out


# ---- the two-tower's user tower (models.two_tower.UserTower) ----------------------------------
@nb.njit(**_JIT_DOTS)
def bag_means_into(out: np.ndarray, col: int, table: np.ndarray, lengths: np.ndarray, values: np.ndarray) -> None:
    """``out[r, col:col + D]`` = the mean of ``table``'s rows listed in bag ``r`` (``lengths[r]``
    consecutive ``values``; an empty bag -> zeros): ``embedding_bag(mode="mean")`` for every bag of
    one feature, written straight into its slice of the tower's input."""
    d = table.shape[1]
    e = 0
    for r in range(len(lengths)):
        n = lengths[r]
        for c in range(d):
            out[r, col + c] = 0.0
        for k in range(e, e + n):
            row = values[k]
            for c in range(d):
                out[r, col + c] += table[row, c]
        if n > 1:
            scale = np.float32(1.0) / np.float32(n)
            for c in range(d):
                out[r, col + c] *= scale
        e += n


@nb.njit(**_JIT_DOTS)
def l2_normalize_rows(x: np.ndarray) -> None:
    """``x / max(||x||, 1e-12)`` per row, in place (``torch.nn.functional.normalize``)."""
    for r in range(x.shape[0]):
        s = np.float32(0.0)
        for c in range(x.shape[1]):
            s += x[r, c] * x[r, c]
        norm = max(np.float32(np.sqrt(s)), np.float32(1e-12))
        for c in range(x.shape[1]):
            x[r, c] /= norm


# ---- post-processing (models.two_stage.TwoStagePipeline.post_process) ---------------------------
@nb.njit(**_JIT)
def request_score_keys(request: np.ndarray, scores: np.ndarray, n_requests: int, rbits: int) -> np.ndarray:
    """``(B, most rows of a request)`` rank keys of scored candidate rows, one row of keys per
    request: score descending (NaN last), ties by row order; :data:`NO_KEY` pads. The row index is
    packed in the low ``rbits`` bits (:func:`top_k_diverse` reads it back)."""
    m = len(request)
    counts = np.zeros(n_requests, np.int64)
    for r in range(m):
        counts[request[r]] += 1
    width = 0
    for q in range(n_requests):
        width = max(width, counts[q])
    keys = np.full((n_requests, width), NO_KEY, np.int64)
    fill = np.zeros(n_requests, np.int64)
    bits = scores.view(np.int32)
    for r in range(m):
        q = request[r]
        keys[q, fill[q]] = _key(scores[r], np.int64(bits[r]), r, rbits)
        fill[q] += 1
    return keys


@nb.njit(**_JIT)
def top_k_diverse(ranked: np.ndarray, rbits: int, item: np.ndarray, scores: np.ndarray, source_mask: np.ndarray,
                  category: np.ndarray, n_categories: int, k: int, cap: int):
    """Top ``k`` per request from its ranked rows (``(B, L)`` keys, ascending, from
    :func:`request_score_keys` through numpy's sort), at most ``cap`` items per category
    (``category[item] < 0``: uncapped; ``cap <= 0``: no cap): the greedy "take the next-best item
    unless its category is full", then the skipped items in rank order while the list is short
    (a catalog too narrow for the cap). Returns ``(items, scores, masks)``, each ``(B, k)``."""
    b, width = ranked.shape
    out_i = np.full((b, k), -1, np.int64)
    out_s = np.zeros((b, k), np.float32)
    out_m = np.zeros((b, k), np.int64)
    taken = np.zeros(max(n_categories, 1), np.int64)
    skipped = np.empty(width, np.int64)
    low = (np.int64(1) << rbits) - 1
    for q in range(b):
        n, n_skip = 0, 0
        for j in range(width):
            if n >= k or ranked[q, j] == NO_KEY:
                break
            r = ranked[q, j] & low
            c = category[item[r]] if cap > 0 else -1
            if c >= len(taken):
                c = -1  # not a known category: uncapped
            if c >= 0 and taken[c] >= cap:
                skipped[n_skip] = r
                n_skip += 1
                continue
            if c >= 0:
                taken[c] += 1
            out_i[q, n], out_s[q, n], out_m[q, n] = item[r], scores[r], source_mask[r]
            n += 1
        for j in range(n_skip):  # refill, best first
            if n >= k:
                break
            r = skipped[j]
            out_i[q, n], out_s[q, n], out_m[q, n] = item[r], scores[r], source_mask[r]
            n += 1
        if cap > 0:  # reset only the categories this request touched
            for j in range(n):
                c = category[out_i[q, j]]
                if 0 <= c < len(taken):
                    taken[c] = 0
    return out_i, out_s, out_m


# ---- request histories (serving.engine.Engine) ------------------------------------------------
@nb.njit(**_JIT)
def history_rows_csr(cols: np.ndarray, lengths: np.ndarray):
    """CSR arrays ``(indptr, indices, data)`` of consumed-items rows: row ``r`` holds the distinct
    non-negative entries of its ``lengths[r]`` consecutive ``cols`` (``-1`` = an item the models
    do not know), ascending, each with value 1."""
    b = len(lengths)
    indptr = np.zeros(b + 1, np.int64)
    indices = np.empty(len(cols), np.int64)
    m, e = 0, 0
    for r in range(b):
        start = m
        for k in range(e, e + lengths[r]):
            c = cols[k]
            if c < 0:
                continue
            j = m  # insertion into the row's sorted run; a repeat is dropped
            while j > start and indices[j - 1] > c:
                j -= 1
            if j > start and indices[j - 1] == c:
                continue
            for t in range(m, j, -1):
                indices[t] = indices[t - 1]
            indices[j] = c
            m += 1
        e += lengths[r]
        indptr[r + 1] = m
    return indptr, indices[:m].copy(), np.ones(m, np.float32)


# ---- the two-tower as a candidate source (models.two_stage.EmbeddingSource.from_retrieval) ------
@nb.njit(**_JIT)
def merged_histories(model_users: np.ndarray, h_indptr: np.ndarray, h_indices: np.ndarray, local_to_model: np.ndarray,
                     hist_indptr: np.ndarray, hist_items: np.ndarray, cap: int, stamp: np.ndarray, tag0: int):
    """Each request's history for the user tower, in the retrieval model's item space: the user's
    stored (training-time) history, then the request's consumed items (its history row, pipeline
    item indices) the model knows and the stored history lacks; the last ``cap`` of them
    (``cap <= 0``: none). Returns ``(lengths, values, has_signal)``: a request has signal when
    the model knows its user or the merged history is not empty. ``stamp``: a stamp table over the
    model's items, request ``r`` stamping with ``tag0 + r`` (:class:`KernelScratch`)."""
    b = len(model_users)
    lengths = np.zeros(b, np.int64)
    signal = np.zeros(b, np.bool_)
    total = 0
    for r in range(b):
        m = model_users[r]
        n = hist_indptr[m + 1] - hist_indptr[m] if m >= 0 else 0
        total += n + (h_indptr[r + 1] - h_indptr[r])
    values = np.empty(total, np.int64)
    used = 0
    for r in range(b):
        m = model_users[r]
        count = 0  # the request's merged history is built at ``used``, then its last ``keep`` move there
        if m >= 0:
            for e in range(hist_indptr[m], hist_indptr[m + 1]):
                values[used + count] = hist_items[e]
                stamp[hist_items[e]] = tag0 + r
                count += 1
        for e in range(h_indptr[r], h_indptr[r + 1]):
            mi = local_to_model[h_indices[e]]
            if mi >= 0 and stamp[mi] != tag0 + r:
                values[used + count] = mi
                count += 1
        signal[r] = count > 0 or m >= 0
        keep = min(count, cap) if cap > 0 else 0
        for j in range(keep):  # a left shift: each source lies at or after its destination
            values[used + j] = values[used + count - keep + j]
        lengths[r] = keep
        used += keep
    return lengths, values[:used].copy(), signal
