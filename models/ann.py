"""FAISS HNSW indexes over item embeddings, laid out for a large catalog's memory: built and loaded
one way by the two-tower export, the two-stage pipeline's embedding sources and the benchmark.

Why the layout matters: a query with 500 candidates visits a few thousand graph nodes, each a
random read of its 64-d vector (256 bytes) and its neighbour list. Over 4,000 items all of that
sits in the CPU's caches; over a million (256 MB of vectors, ~128 MB of links) nearly every visit
is a cache miss, and with 4 KB pages a TLB miss too. Two things cut that cost without changing
what the index answers:

- **Locality order** (:func:`locality_order`): items are stored in the order of their nearest
  k-means centroid, so the neighbours a search walks through tend to sit in the same pages and
  cache lines (graph reordering, as in Coleman et al., "Graph Reordering for Cache-Efficient
  Near Neighbor Search", 2022). The index is wrapped in ``IndexIDMap``, so searches still
  answer original row numbers.
- **Huge pages** (:func:`back_with_huge_pages`): the vectors and links are advised as
  transparent huge pages (``MADV_HUGEPAGE``, then ``MADV_COLLAPSE`` to move them now), so one
  TLB entry covers 2 MB instead of 4 KB. Linux only, best effort: where the kernel's THP mode is
  ``never``, or elsewhere, nothing changes.

Measured (``benchmarks/serving.py`` catalog part, against plain FAISS alternating query by query;
docs/serving.md has each machine's runs): at 1M items the p50 fell 13-21% on every machine; the
p99 fell 9% and 18% on the AVX2 machine of the 2026-11-25 late morning, came out above plain FAISS's in two runs on
the Zen 4 machine of that afternoon and below it with three timing passes (growth 4K -> 1M 1.27x
against 1.47x). At 4K nothing moved.
"""
from __future__ import annotations

import ctypes
import logging
import sys
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_HUGE = 1 << 21
_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25  # Linux 6.1+: collapse into huge pages now (else khugepaged does it, slowly)


def locality_order(vectors: np.ndarray, *, seed: int = 0, sample: int = 100_000, niter: int = 10) -> np.ndarray:
    """A permutation of the rows grouping each row with its nearest of ~sqrt(n) spherical k-means
    centroids (trained on at most ``sample`` rows, at least 39 per centroid as FAISS asks):
    ``vectors[order]`` is the storage order."""
    import faiss

    n, d = vectors.shape
    k = min(int(np.sqrt(n)), min(n, sample) // 39)
    if k < 2:
        return np.arange(n, dtype=np.int64)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    rows = np.random.default_rng(seed).choice(n, min(n, sample), replace=False)
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=True, verbose=False)
    km.train(x[np.sort(rows)])
    _, nearest = km.index.search(x, 1)
    return np.argsort(nearest[:, 0], kind="stable").astype(np.int64)


def hnsw_index(vectors: np.ndarray, *, m: int, ef_construction: int, ef_search: int,
               reorder: bool = True, huge_pages: bool = True, seed: int = 0) -> Any:
    """An inner-product HNSW index over ``vectors`` (rows = item numbers). ``reorder``: stored in
    :func:`locality_order` behind an ``IndexIDMap`` (searches answer row numbers either way);
    ``huge_pages``: :func:`back_with_huge_pages` once built."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    hnsw = faiss.IndexHNSWFlat(x.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = ef_construction
    hnsw.hnsw.efSearch = ef_search
    if reorder and len(x) > 1:
        order = locality_order(x, seed=seed)
        index = faiss.IndexIDMap(hnsw)  # the Python wrapper keeps ``hnsw`` alive with it
        index.add_with_ids(np.ascontiguousarray(x[order]), order)
    else:
        index = hnsw
        index.add(x)
    if huge_pages:
        back_with_huge_pages(index)
    return index


def hnsw_of(index: Any) -> Any | None:
    """The HNSW index inside ``index`` (itself, or the one an ``IndexIDMap`` wraps), else None."""
    import faiss

    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return inner if hasattr(inner, "hnsw") else None


def set_ef_search(index: Any, ef_search: int) -> None:
    """Set efSearch on an HNSW index (plain or wrapped); other indexes have none."""
    inner = hnsw_of(index)
    if inner is not None:
        inner.hnsw.efSearch = ef_search


def back_with_huge_pages(index: Any) -> int:
    """Advise an HNSW index's vectors and links as transparent huge pages and collapse them now
    (the collapse copies: ~0.3 s per 256 MB here, once, at load). FAISS allocates with plain
    ``malloc``, which Linux backs with 4 KB pages unless told (numpy advises its own big arrays).
    Returns the bytes advised (0: not Linux, not HNSW, or the kernel refused: THP ``never``)."""
    if not sys.platform.startswith("linux"):
        return 0
    import faiss

    inner = hnsw_of(index)
    if inner is None:
        return 0
    buffers = [(inner.hnsw.neighbors, inner.hnsw.neighbors.size() * 4)]
    storage = faiss.downcast_index(inner.storage)
    if hasattr(storage, "codes"):
        buffers.append((storage.codes, storage.codes.size()))
    libc = ctypes.CDLL(None, use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    for buf, nbytes in buffers:
        addr = int(buf.data())
        start, end = (addr + _HUGE - 1) & ~(_HUGE - 1), (addr + nbytes) & ~(_HUGE - 1)  # whole huge pages inside
        if end <= start:
            continue
        if madvise(start, end - start, _MADV_HUGEPAGE) != 0:
            log.debug("madvise(MADV_HUGEPAGE) refused: errno %d", ctypes.get_errno())
            continue
        advised += end - start
        if madvise(start, end - start, _MADV_COLLAPSE) != 0:  # older kernels: khugepaged collapses later
            log.debug("madvise(MADV_COLLAPSE) refused: errno %d", ctypes.get_errno())
    return advised
