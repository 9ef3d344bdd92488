"""Serving benchmark: the real server (uvicorn, 2 workers) on loopback, driven by separate
load-generator processes, plus the ANN catalog-scaling curve.

- closed loop, max throughput: ``wrk`` (many connections: keep-alive sticks to a worker) on
  (a) ``/noop`` on the same server (the ceiling), (b) the full recommendation path, each at every
  concurrency of ``--connections`` (default 64, 128, 256) in the same repeat: a server that
  batches concurrent requests needs concurrency to batch, so its maximum is the plateau of that
  curve, not its value at one arbitrary connection count; each endpoint's maximum over the sweep
  is its max throughput, and the whole curve (RPS, p50, p99 per concurrency) is reported;
  (c) event ingest (``POST /v1/events``, 202 only after fsync), single events and batches;
- open loop at fractions of the measured recommendation throughput (``--open-loop-fractions``,
  default 1/8, 1/4 and 1/2; half is the latency target's point), the latency-vs-load curve: an
  asyncio client in its own
  process (``benchmarks/open_loop_client.py``) sends on a fixed schedule and measures from the
  *scheduled* send time (no coordinated omission), p50/p95/p99, drawing users from the same
  population as the closed loop (so the online-feature cache misses as often); it reports its
  own CPU per request, since it shares the machine's two cores with the server;
- catalog scaling 4K -> 100K -> 1M items: clustered synthetic 64-d embeddings (mixture of
  Gaussians on the unit sphere, like trained two-tower vectors), exact search vs IVF, top-500
  per query, recall@100 of the ANN against exact, p99 per query on one thread.

Every measurement is repeated (``--repeats``) and reported with its spread: runs on this
shared 2-core machine sometimes stall. Loopback only; every loop is bounded.

    python benchmarks/serving.py [--quick] [--repeats 3] [--duration 8] [--connections 64,128,256]
                                 [--open-loop-fractions 0.125,0.25,0.5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from core.config import Settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
KEY = "bench-key"


# ---- wrk ------------------------------------------------------------------------------------
def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000.0 if unit == "us" else v * 1000.0 if unit == "s" else v


def run_wrk(url: str, *, script: Path | None, connections: int, duration: int, threads: int = 2) -> dict:
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "5s"]
    if script is not None:
        cmd += ["-s", str(script)]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=duration + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    pct = {p: _ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M)}
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "p50_ms": pct.get("50"), "p90_ms": pct.get("90"), "p99_ms": pct.get("99"),
            "non_2xx": int(non2xx.group(1)) if non2xx else 0, "socket_errors": errors.group(1) if errors else None}


def lua_recommend(users: list[str], path: Path) -> Path:
    path.write_text("local users = {" + ",".join(json.dumps(u) for u in users) + "}\n"
                    "request = function()\n  local u = users[math.random(#users)]\n"
                    "  return wrk.format('GET', '/v1/recommendations/' .. u .. '?k=20')\nend\n")
    return path


def lua_events(users: list[str], items: list[str], batch: int, path: Path) -> Path:
    """POST ``batch`` events per request; ids differ per request (a counter) so nothing dedupes."""
    path.write_text(
        "local users = {" + ",".join(json.dumps(u) for u in users[:200]) + "}\n"
        "local items = {" + ",".join(json.dumps(i) for i in items[:200]) + "}\n"
        "local n = 0\n"
        f"wrk.method = 'POST'\nwrk.headers['Content-Type'] = 'application/json'\nwrk.headers['X-API-Key'] = '{KEY}'\n"
        "request = function()\n  local parts = {}\n"
        f"  for j = 1, {batch} do\n    n = n + 1\n"
        "    parts[j] = string.format('{\"user_id\":\"%s\",\"item_id\":\"%s\",\"event_type\":\"click\",\"event_id\":\"b%d-%d\"}',"
        " users[math.random(#users)], items[math.random(#items)], math.random(1000000000), n)\n  end\n"
        "  return wrk.format(nil, '/v1/events', nil, '[' .. table.concat(parts, ',') .. ']')\nend\n")
    return path


# ---- open loop ------------------------------------------------------------------------------
def open_loop(url: str, rate: float, duration: float, users: list[str]) -> dict:
    """``benchmarks/open_loop_client.py`` in its own process (see its docstring: requests due on a
    fixed schedule, latency from the due time, and the client's own CPU per request)."""
    from urllib.parse import urlparse

    u = urlparse(url)
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "open_loop_client.py"), u.hostname, str(u.port),
                          str(rate), str(duration), json.dumps(users)], capture_output=True, text=True, timeout=duration + 90)
    if out.returncode != 0:
        raise RuntimeError(f"open-loop client failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- catalog scaling --------------------------------------------------------------------------
def clustered(n: int, d: int, *, clusters: int, rng, spread: float = 0.5, intrinsic_dim: int | None = 16,
              ambient_noise: float = 0.05) -> "np.ndarray":
    """Unit vectors around ``clusters`` random centres (mixture of Gaussians on the sphere).

    ``intrinsic_dim``: the clusters live in a random ``intrinsic_dim``-dimensional subspace of
    the ``d``-dimensional space (plus ``ambient_noise`` in all ``d`` dimensions), as trained
    embedding tables do (a 64-d two-tower item table is far from full rank); ``None``: the
    noise is isotropic in all ``d`` dimensions, which makes each cluster a cloud of nearly
    equidistant random directions, the worst case for any ANN index. ``spread``: expected norm
    of the within-cluster noise relative to the (unit) centre."""
    import numpy as np

    r = d if intrinsic_dim is None else intrinsic_dim
    basis = np.linalg.qr(rng.standard_normal((d, r)))[0].astype(np.float32)  # (d, r) orthonormal columns
    centers = rng.standard_normal((clusters, r)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    z = centers[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, r)).astype(np.float32) / np.sqrt(r)
    x = z @ basis.T
    if intrinsic_dim is not None and ambient_noise > 0:
        x += ambient_noise * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


#: the two layouts of the same HNSW graph the catalog part measures side by side (``models.ann``)
LAYOUTS = {"serving": {"reorder": True, "huge_pages": True}, "plain": {"reorder": False, "huge_pages": False}}
#: the candidate stage's sources over a synthetic catalog, with serving's quotas for them
CANDIDATE_QUOTAS = {"two_tower": 300, "covisit": 300, "popular": 100}


def candidate_stage(items, queries, index, *, rng, active: int = 20_000, neighbours: int = 100, history: int = 10,
                    n_candidates: int = 500):
    """The request path's candidate stage over a synthetic catalog, as serving runs it for a batch
    of one (``models.two_stage``: every source, then the merge), so the catalog curve covers what
    grows with the catalog besides the index: the two-tower source answering each query through
    ``index`` (its consumed items excluded), a co-visitation source whose rows are ``active``
    random items' ``neighbours`` anywhere in the catalog, popularity over the whole catalog, and the
    merge of the three. Each query is a request whose ``history`` consumed items come from the
    active ones. Returns ``run(i)``, which retrieves query ``i``'s candidates, and each query's
    consumed items (a ``(1, n)`` CSR row each)."""
    import numpy as np
    import scipy.sparse as sp

    from models.two_stage import CoVisitationSource, EmbeddingSource, PopularSource, _RetrieverOnly

    n = len(items)
    act = rng.choice(n, size=min(active, n), replace=False)
    rows = np.repeat(act, neighbours)
    sim = sp.csr_matrix((rng.random(len(rows), dtype=np.float32) + 0.01, (rows, rng.integers(0, n, len(rows)))), shape=(n, n))
    covisit = CoVisitationSource()
    covisit.sim = sim
    popular = PopularSource.from_counts(rng.zipf(1.3, n).astype(np.float64))
    two_tower = EmbeddingSource(items, queries, index=index, n_items=n)
    retriever = _RetrieverOnly([two_tower, covisit, popular], dict(CANDIDATE_QUOTAS), n_candidates, n)
    consumed = [sp.csr_matrix((np.ones(history, np.float32), (np.zeros(history, np.int64), rng.choice(act, history, replace=False))),
                              shape=(1, n)) for _ in range(len(queries))]

    def run(i: int):
        return retriever.retrieve(np.array([i]), consumed[i], exclude=consumed[i])

    return run, consumed


def synthetic_ranker(n_items: int, sources: list[str], *, rng, n_users: int = 1000, n_categories: int = 50,
                     history: int = 50):
    """A DLRM ranker over ``n_items`` items as serving runs it (``models.dlrm.DLRMScorer``, the default
    architecture, MLPs in ``auto`` precision) with random weights and synthetic feature tables:
    its cost, not its quality, is measured. Its extra dense inputs are the candidate features of
    ``sources`` (the merge's), so it scores :func:`candidate_stage`'s output as the pipeline would.
    What grows with the catalog is its item tables (embedding rows, pooled categories, dense
    features), gathered at each request's candidates."""
    import numpy as np

    from models.base import IdMap
    from models.dlrm import ITEM_DENSE, USER_DENSE, DLRMConfig, DLRMScorer, RankingFeatures, build_ranker
    from models.two_stage import source_feature_names

    config = DLRMConfig(n_users=n_users, n_items=n_items, n_categories=n_categories, extra_dense=source_feature_names(sources))
    cats = rng.integers(1, 3, n_items)
    feats = RankingFeatures(
        users=IdMap(tuple(f"u{i}" for i in range(n_users))), items=IdMap(tuple(str(i) for i in range(n_items))),
        categories=IdMap(tuple(f"c{i}" for i in range(n_categories))),
        hist_indptr=np.arange(0, n_users * history + 1, history, dtype=np.int64),
        hist_indices=rng.integers(0, n_items, n_users * history).astype(np.int64),
        cat_indptr=np.concatenate(([0], np.cumsum(cats))).astype(np.int64),
        cat_indices=rng.integers(0, n_categories, int(cats.sum())).astype(np.int64),
        user_dense=rng.standard_normal((n_users + 1, len(USER_DENSE))).astype(np.float32),
        item_dense=rng.standard_normal((n_items + 1, len(ITEM_DENSE))).astype(np.float32))
    width = len(config.dense_names)
    return DLRMScorer(config, feats, build_ranker(config, embeddings="plain").state_dict(),
                      dense_mean=np.zeros(width, np.float32), dense_std=np.ones(width, np.float32), precision="auto")


def catalog_scaling(sizes: list[int], *, queries: int = 1000, d: int = 64, seed: int = 0, target_recall: float = 0.95,
                    m: int = 16, ef_construction: int = 64, ef_ladder: tuple[int, ...] = (64, 128, 256, 512, 1024),
                    candidates: int = 500, spread: float = 0.5, intrinsic_dim: int | None = 16,
                    passes: int = 3) -> dict[str, list[dict]]:
    """Like for like: the SAME index type (HNSW, ``m`` links, ``ef_construction``) at every
    catalog size, over clustered embeddings, in two layouts (:data:`LAYOUTS`): as serving builds
    it (``models.ann.hnsw_index``: locality order, huge pages) and plain FAISS. Per size and
    layout, efSearch is the smallest value on ``ef_ladder`` whose recall@100 (of the
    top-``candidates`` ANN answer, against exact top-100) reaches ``target_recall``. Latency is
    one query at a time on one thread (what a request costs), the two layouts alternating query by
    query (drift of a shared machine hits both alike), p50/p99 over ``queries``, in wall time and
    in the thread's CPU time (on a shared machine wall-time p99 mostly measures the other tenants'
    preemptions; CPU time measures the search); exact (flat) search time is reported beside it.
    The queries are timed in ``passes`` passes and each percentile is the median over the passes
    (the p99s' range kept): a p99 of 1,000 queries is their 10th slowest, and one burst of the
    host's other work during a pass moved it 2-4x at 1M items (2026-11-25).
    Beside the serving layout's searches, the whole candidate stage (:func:`candidate_stage`) is
    timed per query the same way (``retrieve_*`` in the serving rows), and so is the model path:
    the candidate stage, then a DLRM ranker over the catalog (:func:`synthetic_ranker`) scoring
    every candidate (``model_path_*``).
    Returns the rows per layout."""
    import faiss
    import numpy as np

    from models.ann import hnsw_index, set_ef_search

    rng = np.random.default_rng(seed)
    out: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    for n in sizes:
        clusters = max(64, n // 500)
        state = rng.bit_generator.state  # queries come from the same mixture (same centres and subspace)
        items = clustered(n, d, clusters=clusters, rng=rng, spread=spread, intrinsic_dim=intrinsic_dim)
        rng.bit_generator.state = state
        q = clustered(n + queries, d, clusters=clusters, rng=rng, spread=spread, intrinsic_dim=intrinsic_dim)[n:]
        faiss.omp_set_num_threads(2)
        exact = faiss.IndexFlatIP(d)
        exact.add(items)
        faiss.omp_set_num_threads(1)
        t = time.perf_counter()
        _, truth = exact.search(q, 100)
        exact_ms = (time.perf_counter() - t) / queries * 1000
        indexes, build_s, efs, recalls = {}, {}, {}, {}
        for name, layout in LAYOUTS.items():
            faiss.omp_set_num_threads(2)
            t = time.perf_counter()
            indexes[name] = hnsw_index(items, m=m, ef_construction=ef_construction, ef_search=ef_ladder[0], seed=seed, **layout)
            build_s[name] = time.perf_counter() - t
            faiss.omp_set_num_threads(1)
            for ef in ef_ladder:
                set_ef_search(indexes[name], ef)
                _, found = indexes[name].search(q, candidates)
                recalls[name] = float(np.mean([len(set(found[i, :100]) & set(truth[i])) / 100 for i in range(queries)]))
                efs[name] = ef
                if recalls[name] >= target_recall:
                    break
        stage, _ = candidate_stage(items, q, indexes["serving"], rng=rng, n_candidates=candidates)
        ranker = synthetic_ranker(n, list(CANDIDATE_QUOTAS), rng=rng)

        def model_path(i: int):
            cands, user = stage(i), np.array([i % ranker.features.n_users])
            return ranker.score(user[cands.request], cands.item, cands.features, request_of_row=cands.request,
                                request_users=user)

        timed = {**{name: (lambda i, index=index: index.search(q[i:i + 1], candidates)) for name, index in indexes.items()},
                 "retrieve": stage, "model_path": model_path}
        for i in range(20):  # warm caches
            for run in timed.values():
                run(i)
        # per timed step and pass: the four percentiles (wall p50, wall p99, CPU p50, CPU p99)
        stats: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in timed}
        for _ in range(max(passes, 1)):
            lat: dict[str, list[float]] = {name: [] for name in timed}
            cpu: dict[str, list[float]] = {name: [] for name in timed}
            for i in range(queries):
                for name, run in timed.items():
                    t, c = time.perf_counter(), time.thread_time()
                    run(i)
                    cpu[name].append((time.thread_time() - c) * 1000)
                    lat[name].append((time.perf_counter() - t) * 1000)
            for name in timed:
                w, c = sorted(lat[name]), sorted(cpu[name])
                stats[name].append((w[len(w) // 2], w[int(0.99 * queries)], c[len(c) // 2], c[int(0.99 * queries)]))
        medians = {name: tuple(statistics.median(col) for col in zip(*stats[name])) for name in timed}
        for name in LAYOUTS:
            p50, p99, cpu50, cpu99 = medians[name]
            layout = "locality order, huge pages" if LAYOUTS[name]["reorder"] else "plain"
            row = {"items": n, "spread": spread, "clusters": clusters, "intrinsic_dim": intrinsic_dim,
                   "index": f"hnsw (M {m}, efConstruction {ef_construction})", "layout": layout, "ef_search": efs[name],
                   "build_s": round(build_s[name], 1), "p50_ms": round(p50, 3), "p99_ms": round(p99, 3),
                   "cpu_p50_ms": round(cpu50, 3), "cpu_p99_ms": round(cpu99, 3),
                   "p99_ms_per_pass": [round(st[1], 3) for st in stats[name]],
                   "ann_recall@100": round(recalls[name], 4), "exact_ms_per_query": round(exact_ms, 3)}
            if name == "serving":
                for step in ("retrieve", "model_path"):
                    row.update(zip((f"{step}_p50_ms", f"{step}_p99_ms", f"{step}_cpu_p50_ms", f"{step}_cpu_p99_ms"),
                                   (round(x, 3) for x in medians[step])))
            out[name].append(row)
            print("catalog", row, flush=True)
        del indexes, exact, items, stage, ranker, timed
    return out


def _batch_sums(metrics_text: str) -> tuple[float, float]:
    """(requests, batched model calls) in a Prometheus text (``recsys_model_batch_size`` sum and count)."""
    vals = dict(re.findall(r"^recsys_model_batch_size_(sum|count) ([\d.e+]+)$", metrics_text, re.M))
    return float(vals.get("sum", 0.0)), float(vals.get("count", 0.0))


def batch_totals(url: str) -> tuple[float, float]:
    """(requests, batched model calls) so far, all workers."""
    return _batch_sums(subprocess.run(["curl", "-s", url + "/metrics"], capture_output=True, text=True).stdout)


def batch_mean_between(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    """Mean requests per batched model call between two :func:`batch_totals` snapshots."""
    calls = after[1] - before[1]
    return round((after[0] - before[0]) / calls, 2) if calls > 0 else None


def _batch_mean(metrics_text: str) -> float | None:
    """Mean requests per batched model call since the server started."""
    return batch_mean_between((0.0, 0.0), _batch_sums(metrics_text))


# ---- main -----------------------------------------------------------------------------------
def spread(values: list[float], digits: int = 2) -> dict:
    vals = [v for v in values if v is not None]
    return {"median": round(statistics.median(vals), digits), "min": round(min(vals), digits), "max": round(max(vals), digits),
            "runs": [round(v, digits) for v in vals]} if vals else {}


def rec_counters(url: str) -> dict[str, float]:
    """Recommendation responses so far and fallbacks by reason (Prometheus, all workers)."""
    text = subprocess.run(["curl", "-s", url + "/metrics"], capture_output=True, text=True).stdout
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r'recsys_http_requests_total\{endpoint="recommendations",status="200"\} ([\d.e+]+)', line)
        if m:
            out["responses"] = float(m.group(1))
        m = re.match(r'recsys_fallbacks_total\{reason="([^"]+)"\} ([\d.e+]+)', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def cache_lookups(url: str) -> dict[str, float]:
    """The serving path's user-feature cache lookups so far by outcome (hit, miss, changed; all workers)."""
    from serving.metrics import counter_by_label

    text = subprocess.run(["curl", "-s", url + "/metrics"], capture_output=True, text=True).stdout
    return counter_by_label(text, "recsys_feature_cache_lookups", "outcome")


def cache_between(before: dict[str, float], after: dict[str, float]) -> dict:
    """Lookups by outcome between two :func:`cache_lookups` snapshots, and the share that hit."""
    diff = {k: int(after.get(k, 0.0) - before.get(k, 0.0)) for k in ("hit", "miss", "changed")}
    n = sum(diff.values())
    return {**diff, "hit_share": round(diff["hit"] / n, 4) if n else None}


def model_served(before: dict[str, float], after: dict[str, float]) -> dict:
    """Share of the responses between two snapshots that the models (not a fallback) produced."""
    diff = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in set(before) | set(after)}
    n = diff.pop("responses", 0.0)
    fell = sum(v for k, v in diff.items() if k not in ("features_unavailable", "ranker_unavailable"))
    return {"responses": int(n), "fallbacks": {k: int(v) for k, v in diff.items() if v},
            "model_served_share": round(1 - fell / n, 4) if n else None}


def _per_thread(pids: list[int], name: str, parse) -> dict[str, tuple]:
    """``parse(text of /proc/<pid>/task/<tid>/<name>)`` for every thread of the workers, summed
    element-wise by thread label (``core.threads.thread_proc_files``: the OS thread name,
    ``event-loop`` for a worker's main thread). Linux only (empty elsewhere)."""
    from core.threads import thread_proc_files

    out: dict[str, tuple] = {}
    for label, text in thread_proc_files(pids, name):
        try:
            values = parse(text)
        except (ValueError, IndexError):
            continue
        out[label] = tuple(x + y for x, y in zip(out.get(label, (0,) * len(values)), values))
    return out


def thread_cpu(pids: list[int]) -> dict[str, float]:
    """CPU seconds so far of the workers' threads, by thread name (user + system time)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = _per_thread(pids, "stat", lambda text: tuple(int(v) for v in text.rsplit(")", 1)[1].split()[11:13]))
    return {label: (utime + stime) / tick for label, (utime, stime) in stats.items()}


def thread_sched(pids: list[int]) -> dict[str, tuple[int, int]]:
    """Nanoseconds so far the workers' threads, by thread name, spent running and runnable but
    waiting for a CPU (``schedstat``)."""
    return _per_thread(pids, "schedstat", lambda text: tuple(int(v) for v in text.split()[:2]))


def run_queue_wait(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], seconds: float) -> dict[str, dict]:
    """Per thread (all workers), ms per second of running and of waiting in the run queue over an
    interval: a thread that waits about as long as it runs is starved of CPU, i.e. the machine is
    saturated, whatever the request rate says."""
    out = {}
    for k, (run, wait) in after.items():
        r0, w0 = before.get(k, (0, 0))
        if run - r0 > 1e6 * seconds:  # threads busy < 1 ms/s are left out
            out[k] = {"run_ms_per_s": round((run - r0) / 1e6 / seconds, 1), "run_queue_wait_ms_per_s": round((wait - w0) / 1e6 / seconds, 1)}
    return out


def cpu_per_request(before: dict[str, float], after: dict[str, float], requests: float) -> dict[str, float]:
    """Server CPU ms per request, by thread: where the time goes (the model thread, the event loop ...)."""
    if requests <= 0:
        return {}
    diff = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    out = {k: round(v * 1000 / requests, 3) for k, v in sorted(diff.items(), key=lambda kv: -kv[1]) if v > 0}
    return {"total": round(sum(diff.values()) * 1000 / requests, 3), **out}


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_speed(seconds: float = 0.25) -> float:
    """Millions of pure-Python loop iterations per second on one core, read while the server idles.
    This VM's host sometimes takes up to half of a core's speed for minutes (seen on 2026-11-25:
    ~50 at full speed, 24-31 then); a repeat measured then is slower everywhere, and this says so,
    where the load average (which counts only this machine's own work) does not."""
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        for _ in range(10_000):
            pass
        n += 10_000
    return round(n / elapsed / 1e6, 2)


def bench_settings(work: Path, **features) -> "Settings":
    """The benchmarked server's settings under ``work``: the defaults (``features`` overrides the
    feature section's), but with budgets far above any latency seen here, so every response
    measured is the full model path (with the production 50 ms budget an overloaded server answers
    `timeout` -> popularity, and a throughput figure would measure the fallback; the share is
    checked per run)."""
    from core.config import load_settings

    overrides: dict = {"environment": "test", "serving": {
        "api_key": KEY, "registry_poll_s": 0, "workers": 2, "total_budget_ms": 5_000, "model_budget_ms": 4_000,
        "features_budget_ms": 1_000}}
    if features:
        overrides["features"] = features
    return load_settings(root=work, environ={}, overrides=overrides)


def bench_world(settings: "Settings") -> tuple[dict, list[str], list[str], float]:
    """Train tiny-but-real models (two-tower + DLRM ranker), register them and materialise the
    online features under ``settings``: the world, the users the models know (the load-test
    population; others would be cold starts, served by popularity), the item ids, and the seconds
    it took."""
    from models.artifacts import load_from_registry
    from serving import fixtures as F
    from serving.engine import build_engine

    t = time.time()
    world = F.benchmark_world(settings)
    setup_s = time.time() - t
    engine = build_engine(load_from_registry("models:/two_tower@champion", settings),
                          load_from_registry("models:/ranker@champion", settings), n_candidates=settings.serving.candidates)
    users = sorted(str(u) for u in engine.users.ids)
    del engine
    return world, users, world["dataset"].items["item_id"].astype(str).tolist(), setup_s


def http_part(args, work: Path) -> dict:
    """Start the real server over :func:`bench_world` and drive it."""
    from serving.server import ServerProcess

    settings = bench_settings(work)
    world, users, items, setup_s = bench_world(settings)
    ds, version, ranker = world["dataset"], world["two_tower"], world["ranker"]
    res: dict = {"setup": {"users": len(users), "items": len(items), "events": len(ds.events),
                           "model_versions": {"two_tower": version, "ranker": ranker}, "candidates": settings.serving.candidates,
                           "setup_s": round(setup_s, 1), "workers": 2, "connections": args.connections,
                           "duration_s": args.duration, "repeats": args.repeats}}
    runs: dict[str, list] = {"noop": [], "recommend": [], "sweep": [], "events_single": [], "events_batch50": [],
                             "open_loop_curve": [], "cpu_speed": []}
    with ServerProcess(settings, workers=2) as srv:
        info = json.loads(subprocess.run(["curl", "-s", srv.url + "/readyz"], capture_output=True, text=True).stdout)
        res["setup"]["ready"] = info
        if info["detail"].get("ranker") != "ok":
            raise SystemExit(f"the server does not rank with the DLRM: {info['detail']}")
        workers = srv.child_pids()
        rec_lua = lua_recommend(users, work / "rec.lua")
        ev1 = lua_events(users, items, 1, work / "ev1.lua")
        ev50 = lua_events(users, items, 50, work / "ev50.lua")
        sample = json.loads(subprocess.run(["curl", "-s", f"{srv.url}/v1/recommendations/{users[0]}?k=20"],
                                           capture_output=True, text=True).stdout)
        res["setup"]["sample_response"] = {k: sample[k] for k in ("model_versions", "fallback_reason", "timings_ms")}
        run_wrk(srv.url + "/v1/recommendations/" + users[0], script=rec_lua, connections=16, duration=2)  # warm-up
        for r in range(args.repeats):
            la = load_avg()
            runs["cpu_speed"].append(cpu_speed())
            points = []
            for conns in args.connections:  # the closed-loop curve; each endpoint's best point is its max
                noop_run = run_wrk(srv.url + "/noop", script=None, connections=conns, duration=args.duration)
                before, batches0 = rec_counters(srv.url), batch_totals(srv.url)
                cpu0 = thread_cpu(workers)
                rec_run = run_wrk(srv.url + "/", script=rec_lua, connections=conns, duration=args.duration)
                cpu1 = thread_cpu(workers)
                points.append({"connections": conns, "noop": {**noop_run, "load_avg": la},
                               "recommend": {**rec_run, "load_avg": la, **model_served(before, rec_counters(srv.url)),
                                             "server_cpu_ms_per_request": cpu_per_request(cpu0, cpu1, rec_run["rps"] * args.duration),
                                             "model_batch_size_mean": batch_mean_between(batches0, batch_totals(srv.url))}})
                print("connections", conns, "recommend", rec_run["rps"], "noop", noop_run["rps"], flush=True)
            runs["sweep"].append(points)
            runs["noop"].append({**max((p_["noop"] for p_ in points), key=lambda x: x["rps"]),
                                 "connections": max(points, key=lambda p_: p_["noop"]["rps"])["connections"]})
            best = max(points, key=lambda p_: p_["recommend"]["rps"])
            runs["recommend"].append({**best["recommend"], "connections": best["connections"]})
            print("recommend", runs["recommend"][-1], "noop", runs["noop"][-1], flush=True)
            curve_points = []
            for fraction in args.open_loop_fractions:  # ascending; 0.5 (the target's point) is always one
                rate = runs["recommend"][-1]["rps"] * fraction
                before, batches0, cache0 = rec_counters(srv.url), batch_totals(srv.url), cache_lookups(srv.url)
                cpu0, sched0, t0 = thread_cpu(workers), thread_sched(workers), time.perf_counter()
                ol_run = open_loop(srv.url, rate, args.duration, users)
                cpu1, sched1, t1 = thread_cpu(workers), thread_sched(workers), time.perf_counter()
                point = {"fraction": fraction, "rate": round(rate, 1), **ol_run, "load_avg": load_avg(),
                         **model_served(before, rec_counters(srv.url)),
                         "feature_cache": cache_between(cache0, cache_lookups(srv.url)),
                         "server_cpu_ms_per_request": cpu_per_request(cpu0, cpu1, ol_run["sent"]),
                         "server_threads_sched": run_queue_wait(sched0, sched1, t1 - t0),
                         "model_batch_size_mean": batch_mean_between(batches0, batch_totals(srv.url))}
                curve_points.append(point)
                print("open loop", fraction, "rate", point["rate"], "p99", point["p99_ms"], flush=True)
            runs["open_loop_curve"].append(curve_points)
            runs["events_single"].append({**run_wrk(srv.url + "/", script=ev1, connections=args.connections[0], duration=args.duration), "load_avg": load_avg()})
            runs["events_batch50"].append({**run_wrk(srv.url + "/", script=ev50, connections=16, duration=args.duration), "load_avg": load_avg()})
            print("repeat", r, {k: v[-1] for k, v in runs.items()}, flush=True)
        metrics_text = subprocess.run(["curl", "-s", srv.url + "/metrics"], capture_output=True, text=True).stdout
    # the target's point of each repeat's curve (``_fractions`` always includes 0.5)
    runs["open_loop_half"] = [next(p_ for p_ in rep if p_["fraction"] == 0.5) for rep in runs["open_loop_curve"]]
    res["runs"] = runs
    noop = spread([x["rps"] for x in runs["noop"]])
    rec = spread([x["rps"] for x in runs["recommend"]])
    ol = spread([x["p99_ms"] for x in runs["open_loop_half"]])
    ev1s = spread([x["rps"] for x in runs["events_single"]])
    ev50s = spread([x["rps"] * 50 for x in runs["events_batch50"]])
    ratios = spread([r_["rps"] / n_["rps"] for r_, n_ in zip(runs["recommend"], runs["noop"])], digits=4)  # a target is 0.2
    res.update({
        "noop_rps": noop["median"], "recommend_rps": rec["median"],
        "recommend_to_noop": round(rec["median"] / noop["median"], 3),
        "recommend_p99_ms_at_half_load": ol["median"],
        "recommend_model_served_share": spread([x["model_served_share"] for x in runs["recommend"]])["median"],
        "open_loop_model_served_share": spread([x["model_served_share"] for x in runs["open_loop_half"]])["median"],
        "feature_cache_hit_share_at_half_load": spread([x["feature_cache"]["hit_share"] for x in runs["open_loop_half"]]).get("median"),
        "feature_cache_ttl_s": settings.features.cache_ttl_s(),
        "feature_change_stamps": settings.features.online_change_stamps,
        "recommend_p50_ms_at_half_load": spread([x["p50_ms"] for x in runs["open_loop_half"]])["median"],
        "recommend_p95_ms_at_half_load": spread([x["p95_ms"] for x in runs["open_loop_half"]])["median"],
        "ingest_events_per_s": ev50s["median"], "ingest_single_event_requests_per_s": ev1s["median"],
        "cpu_speed_per_repeat": runs["cpu_speed"],
        "spread": {"noop_rps": noop, "recommend_rps": rec, "recommend_to_noop_per_repeat": ratios,
                   "recommend_p99_ms_at_half_load": ol, "ingest_events_per_s_batch50": ev50s, "ingest_single_event_rps": ev1s},
        "budgets_ms": {"total": settings.serving.total_budget_ms, "model": settings.serving.model_budget_ms,
                       "features": settings.serving.features_budget_ms},
        "served_path": (f"features (Feast online, TTL cache) -> two-tower retrieval (FAISS flat, {len(items):,} items, "
                        f"{settings.serving.candidates} candidates) -> filter -> DLRM ranker (one batched forward per "
                        "micro-batch) -> diversity -> top-20"),
        "stage_metrics_sample": [l for l in metrics_text.splitlines() if l.startswith("recsys_stage_seconds_sum")],
        "model_batch_size_mean": runs["recommend"][len(runs["recommend"]) // 2].get("model_batch_size_mean"),
        "model_batch_size_mean_whole_run": _batch_mean(metrics_text),
        "server_cpu_ms_per_request": runs["recommend"][len(runs["recommend"]) // 2].get("server_cpu_ms_per_request"),
        "open_loop_server_cpu_ms_per_request": runs["open_loop_half"][len(runs["open_loop_half"]) // 2].get("server_cpu_ms_per_request"),
        "open_loop_client_cpu_ms_per_request": spread([x.get("client_cpu_ms_per_request") for x in runs["open_loop_half"]], digits=3).get("median"),
        "open_loop_server_threads_sched": runs["open_loop_half"][len(runs["open_loop_half"]) // 2].get("server_threads_sched"),
        "open_loop_where_time_went": runs["open_loop_half"][len(runs["open_loop_half"]) // 2].get("where_time_went"),
        "closed_loop_curve": closed_loop_curve(runs["sweep"]),
        "open_loop_curve": (ol_curve := open_loop_curve(runs["open_loop_curve"])),
        "open_loop_p99_le_10ms_up_to_rps": max((p_["rate"] for p_ in ol_curve if p_["p99_ms"] <= 10), default=None),
    })
    return res


def _median3(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def closed_loop_curve(sweeps: list[list[dict]]) -> list[dict]:
    """Per concurrency, medians over repeats: no-op and recommendation RPS, their ratio (per repeat,
    then the median), the recommendation's p50 / p99 and server CPU per request."""
    out = []
    for i, conns in enumerate(p_["connections"] for p_ in sweeps[0]):
        pts = [sw[i] for sw in sweeps]
        med = _median3
        out.append({"connections": conns, "noop_rps": med([p_["noop"]["rps"] for p_ in pts]),
                    "recommend_rps": med([p_["recommend"]["rps"] for p_ in pts]),
                    "recommend_to_noop": med([p_["recommend"]["rps"] / p_["noop"]["rps"] for p_ in pts]),
                    "recommend_p50_ms": med([p_["recommend"]["p50_ms"] for p_ in pts if p_["recommend"]["p50_ms"] is not None]),
                    "recommend_p99_ms": med([p_["recommend"]["p99_ms"] for p_ in pts if p_["recommend"]["p99_ms"] is not None]),
                    "server_cpu_ms_per_request": med([p_["recommend"]["server_cpu_ms_per_request"]["total"] for p_ in pts]),
                    "model_batch_size_mean": med([p_["recommend"]["model_batch_size_mean"] for p_ in pts
                                                  if p_["recommend"].get("model_batch_size_mean")])})
    return out


def open_loop_curve(repeats: list[list[dict]]) -> list[dict]:
    """Per fraction of the recommendation maximum, medians over repeats: the rate sent, p50 / p99 (and
    the p99's spread), server CPU per request, requests per batched model call, and the smallest
    model-served share (a point served by fallbacks would measure the fallback)."""
    out = []
    for i, fraction in enumerate(p_["fraction"] for p_ in repeats[0]):
        pts = [rep[i] for rep in repeats]
        med = _median3
        p99s = [p_["p99_ms"] for p_ in pts]
        out.append({"fraction": fraction, "rate": med([p_["rate"] for p_ in pts]), "p50_ms": med([p_["p50_ms"] for p_ in pts]),
                    "p99_ms": med(p99s), "p99_ms_min": min(p99s), "p99_ms_max": max(p99s),
                    "server_cpu_ms_per_request": med([p_["server_cpu_ms_per_request"]["total"] for p_ in pts
                                                      if p_["server_cpu_ms_per_request"]]),
                    "model_batch_size_mean": med([p_["model_batch_size_mean"] for p_ in pts if p_["model_batch_size_mean"]]),
                    "model_served_share_min": min((p_["model_served_share"] for p_ in pts if p_["model_served_share"] is not None),
                                                  default=None)})
    return out


def _fractions(text: str) -> list[float]:
    """``--open-loop-fractions``: each in (0, 1], sorted, with 0.5 (the half-load target) added if missing."""
    try:
        values = {float(x) for x in text.split(",") if x.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    bad = sorted(v for v in values if not 0 < v <= 1)
    if bad:
        raise argparse.ArgumentTypeError(f"fractions of the maximum must be in (0, 1], got {bad}")
    return sorted(values | {0.5})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small catalog curve")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--connections", type=lambda v: [int(x) for x in v.split(",") if x.strip()], default=[64, 128, 256],
                    help="closed-loop concurrencies (comma-separated): the curve whose plateau is max throughput")
    ap.add_argument("--open-loop-fractions", type=_fractions, default=_fractions("0.125,0.25,0.5"),
                    help="open-loop rates as fractions of each repeat's recommendation maximum (comma-separated; "
                         "0.5, the half-load target, is always run): the latency-vs-load curve")
    ap.add_argument("--parts", default="http,catalog",
                    help="http (server: no-op, recommend, open loop, ingest), catalog (ANN scaling); a part not run "
                         "keeps its previous results from benchmarks/results/serving.json")
    ap.add_argument("--spread", type=float, default=0.5, help="within-cluster noise of the synthetic embeddings")
    ap.add_argument("--intrinsic-dim", type=int, default=16, help="subspace dimension of the clusters (0: isotropic 64-d noise)")
    args = ap.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts <= {"http", "catalog"}:
        sys.exit(f"--parts: unknown part(s) {sorted(parts - {'http', 'catalog'})} (http, catalog)")
    if "http" in parts and shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install -y wrk)")
    previous = json.loads((RESULTS / "serving.json").read_text()) if (RESULTS / "serving.json").is_file() else {}
    res: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    cat_keys = ("catalog_scaling", "catalog_scaling_plain_hnsw", "catalog_p99_growth", "catalog_cpu_p99_growth",
                "catalog_retrieve_p99_growth", "catalog_model_path_p99_growth", "catalog_measured")
    if "http" in parts:
        work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
        try:
            res.update(http_part(args, work))
            res["http_measured"] = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_avg_end": load_avg()}
        finally:
            shutil.rmtree(work, ignore_errors=True)
    else:  # keep the previous HTTP part whole: everything that is not the catalog part's (or recomputed below)
        res.update({k: v for k, v in previous.items() if k not in cat_keys and k not in res and k != "targets"})
    if "catalog" in parts:
        la = load_avg()
        sizes = [4_000, 100_000] if args.quick else [4_000, 100_000, 1_000_000]
        layouts = catalog_scaling(sizes, spread=args.spread, intrinsic_dim=args.intrinsic_dim or None)
        res["catalog_scaling"], res["catalog_scaling_plain_hnsw"] = layouts["serving"], layouts["plain"]
        base, cbase = res["catalog_scaling"][0]["p99_ms"], res["catalog_scaling"][0]["cpu_p99_ms"]
        res["catalog_p99_growth"] = round(res["catalog_scaling"][-1]["p99_ms"] / base, 2) if base else None
        res["catalog_cpu_p99_growth"] = round(res["catalog_scaling"][-1]["cpu_p99_ms"] / cbase, 2) if cbase else None
        for step in ("retrieve", "model_path"):
            first, last = res["catalog_scaling"][0][f"{step}_p99_ms"], res["catalog_scaling"][-1][f"{step}_p99_ms"]
            res[f"catalog_{step}_p99_growth"] = round(last / first, 2) if first else None
        res["catalog_measured"] = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_avg_start": la,
                                   "load_avg_end": load_avg()}
    else:
        res.update({k: previous[k] for k in cat_keys if k in previous})
    if "noop_rps" not in res or "catalog_scaling" not in res:
        sys.exit("run both parts at least once (no previous results to keep)")
    res["targets"] = targets(res)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps(res, indent=2))
    (RESULTS / "serving.md").write_text(render_md(res))
    print(json.dumps({k: res[k] for k in ("noop_rps", "recommend_rps", "recommend_p99_ms_at_half_load", "ingest_events_per_s",
                                          "catalog_scaling", "targets")}, indent=2))


def targets(res: dict) -> dict[str, bool]:
    """The issue's targets, met or not, from a results dict (the catalog's growth three ways: the
    index's p99 in wall and CPU time, and the whole candidate stage's)."""
    recall_ok = all(r["ann_recall@100"] >= 0.95 for r in res["catalog_scaling"])

    def growth_ok(key: str) -> bool:
        return bool(res.get(key) is not None and res[key] <= 2 and recall_ok)

    return {
        "p99_at_half_load_le_10ms": res["recommend_p99_ms_at_half_load"] is not None and res["recommend_p99_ms_at_half_load"] <= 10,
        "recommend_ge_0.2_noop": res["recommend_to_noop"] >= 0.2,
        "ingest_ge_5000_events_per_s": res["ingest_events_per_s"] >= 5000,
        "catalog_p99_growth_le_2x_with_recall_ge_0.95": growth_ok("catalog_p99_growth"),
        "catalog_cpu_time_p99_growth_le_2x_with_recall_ge_0.95": growth_ok("catalog_cpu_p99_growth"),
        "catalog_candidate_stage_p99_growth_le_2x_with_recall_ge_0.95": growth_ok("catalog_retrieve_p99_growth"),
        "catalog_model_path_p99_growth_le_2x_with_recall_ge_0.95": growth_ok("catalog_model_path_p99_growth"),
    }


def _curve_md(curve: list[dict] | None) -> list[str]:
    if not curve:
        return []
    lines = ["Closed-loop curve (medians over repeats; the ratio is taken per repeat at the same concurrency):", "",
             "| connections | no-op RPS | recommendation RPS | ratio | rec. p50 ms | rec. p99 ms | server CPU ms/rec. | requests per model batch |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {c['connections']} | {c['noop_rps']} | {c['recommend_rps']} | {c['recommend_to_noop']} | {c['recommend_p50_ms']} | "
              f"{c['recommend_p99_ms']} | {c['server_cpu_ms_per_request']} | {c.get('model_batch_size_mean')} |" for c in curve]
    return lines + [""]


def _open_curve_md(curve: list[dict] | None, up_to: float | None) -> list[str]:
    if not curve:
        return []
    lines = ["Open-loop curve (each repeat at fractions of its own recommendation maximum; medians over repeats, the "
             "p99's range in brackets):", "",
             "| fraction of max | RPS sent | p50 ms | p99 ms | server CPU ms/rec. | requests per model batch | model-served share (min) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {c['fraction']} | {c['rate']} | {c['p50_ms']} | {c['p99_ms']} [{c['p99_ms_min']}-{c['p99_ms_max']}] | "
              f"{c['server_cpu_ms_per_request']} | {c['model_batch_size_mean']} | {c['model_served_share_min']} |" for c in curve]
    return lines + ["", "p99 <= 10 ms (median over repeats) up to: "
                    + (f"{up_to} RPS of those measured" if up_to is not None else "none of the rates measured"), ""]


def _sched_md(sched: dict | None) -> str:
    if not sched:
        return "not measured"
    return ", ".join(f"{k} {v['run_ms_per_s']} / {v['run_queue_wait_ms_per_s']}" for k, v in sched.items())


def _time_went_md(went: dict | None) -> str:
    """One sentence per latency band of the open-loop client's ``where_time_went``."""
    if not went:
        return "not measured"
    names = {"p45_p55": "around the median", "slowest_1pct": "the slowest 1%"}
    return "; ".join(f"{names.get(k, k)}: {v['latency_ms']} ms, of which the handler {v['server_total_ms']} (the micro-batch it rode "
                     f"{v['server_model_ms']}, the feature read {v['server_features_ms']}) and {v['outside_server_ms']} outside it"
                     for k, v in went.items() if v)


def _passes_md(per_pass: list[float] | None) -> str:
    return f" [{', '.join(str(x) for x in per_pass)}]" if per_pass and len(per_pass) > 1 else ""


def render_md(r: dict) -> str:
    s = r["spread"]
    hm, cm = r.get("http_measured", {}), r.get("catalog_measured", {})
    lines = [
        "# Serving benchmark", "",
        f"Real server: uvicorn, 2 workers, loopback; wrk ({r['setup']['connections']} connections, {r['setup']['duration_s']} s each; "
        f"max throughput = the best point of that sweep, per endpoint) "
        f"and an open-loop asyncio client, each in its own process, on the same {r['machine']['cpus']}-core machine "
        f"(the load generator competes with the server for CPU; other engineers' jobs share it too: the load "
        f"average at each repeat is in the JSON; the host's CPU speed at each repeat's start, in millions of Python "
        f"loop iterations per second on one core with the server idle: {r.get('cpu_speed_per_repeat')}). "
        f"{r['setup']['repeats']} repeats; median [min-max]. "
        f"HTTP part measured {hm.get('at', '?')}.", "",
        f"Served path: {r['served_path']}. Sample response: model versions {r['setup'].get('sample_response', {}).get('model_versions')}.", "",
        "| measurement | median | min | max |", "|---|---|---|---|",
        f"| no-op RPS (ceiling) | {s['noop_rps']['median']} | {s['noop_rps']['min']} | {s['noop_rps']['max']} |",
        f"| recommendation RPS | {s['recommend_rps']['median']} | {s['recommend_rps']['min']} | {s['recommend_rps']['max']} |",
        f"| recommendation / no-op, per repeat | {s.get('recommend_to_noop_per_repeat', {}).get('median')} | "
        f"{s.get('recommend_to_noop_per_repeat', {}).get('min')} | {s.get('recommend_to_noop_per_repeat', {}).get('max')} |",
        f"| recommendation p99 ms at half load (open loop) | {s['recommend_p99_ms_at_half_load']['median']} | "
        f"{s['recommend_p99_ms_at_half_load']['min']} | {s['recommend_p99_ms_at_half_load']['max']} |",
        f"| ingest events/s (batches of 50, 202 after fsync) | {s['ingest_events_per_s_batch50']['median']} | "
        f"{s['ingest_events_per_s_batch50']['min']} | {s['ingest_events_per_s_batch50']['max']} |",
        f"| ingest single-event requests/s | {s['ingest_single_event_rps']['median']} | {s['ingest_single_event_rps']['min']} | "
        f"{s['ingest_single_event_rps']['max']} |", "",
        f"recommendation / no-op (medians) = {r['recommend_to_noop']}; p50/p95/p99 at half load = {r['recommend_p50_ms_at_half_load']} / "
        f"{r['recommend_p95_ms_at_half_load']} / {r['recommend_p99_ms_at_half_load']} ms.", "",
        f"Share of recommendation responses produced by the models (not a fallback: budgets exceeded -> "
        f"`timeout`, etc.; `features_unavailable` still counts as model-served): closed loop "
        f"{r.get('recommend_model_served_share')}, open loop at half load {r.get('open_loop_model_served_share')} "
        f"(per-run fallback counts in the JSON).", "",
        f"User-feature cache at half load: {r.get('feature_cache_hit_share_at_half_load')} of the lookups hit "
        f"(TTL {r.get('feature_cache_ttl_s')} s, change stamps {'on' if r.get('feature_change_stamps') else 'off'}; "
        f"a miss or a `changed` entry is read from the online store in micro-batches on a thread; counts per point "
        f"in the JSON).", "",
        *_curve_md(r.get("closed_loop_curve")),
        *_open_curve_md(r.get("open_loop_curve"), r.get("open_loop_p99_le_10ms_up_to_rps")),
        f"Where the server's CPU goes under closed-loop load (ms per recommendation, by worker thread, middle "
        f"repeat): {r.get('server_cpu_ms_per_request')}; mean requests per batched model call there: "
        f"{r.get('model_batch_size_mean')} (over the whole run, every phase: {r.get('model_batch_size_mean_whole_run')}); ranker MLP precision: {r['setup'].get('ready', {}).get('detail', {}).get('ranker_precision')}, "
        f"GEMMs: {r['setup'].get('ready', {}).get('detail', {}).get('ranker_mlp_backends')}.", "",
        f"At half load (open loop, middle repeat) the server spent {r.get('open_loop_server_cpu_ms_per_request')} ms of CPU per "
        f"recommendation and the open-loop client {r.get('open_loop_client_cpu_ms_per_request')} ms (median over repeats); "
        f"the workers' threads (all workers, ms per second running / waiting in the run queue for a CPU): "
        f"{_sched_md(r.get('open_loop_server_threads_sched'))}. Where a request's time went (mean latency of the band, "
        f"middle repeat; the handler's times are the server's own `timings_ms`, outside it is waiting for an event loop "
        f"and the network): {_time_went_md(r.get('open_loop_where_time_went'))}.", "",
        "## Catalog scaling (retrieval, one thread, top-500 per query, clustered 64-d embeddings, same index type at every size)", "",
        f"Measured {cm.get('at', '?')} (load average {cm.get('load_avg_start')} -> {cm.get('load_avg_end')}). The index as "
        "serving builds it (`models.ann.hnsw_index`: items stored in k-means locality order, vectors and links on "
        "transparent huge pages) and, below it, the same graph in plain FAISS; the two alternate query by query. "
        "Percentiles are medians over the timing passes (each pass's p99 in brackets).", "",
        "| items | index | layout | efSearch | build s | p50 ms | p99 ms | CPU p50 ms | CPU p99 ms | ANN recall@100 | exact ms/query |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in r["catalog_scaling"] + r.get("catalog_scaling_plain_hnsw", []):
        lines.append(f"| {c['items']:,} | {c['index']} | {c.get('layout', 'plain')} | {c.get('ef_search', '')} | {c.get('build_s', '')} | "
                     f"{c['p50_ms']} | {c['p99_ms']}{_passes_md(c.get('p99_ms_per_pass'))} | {c.get('cpu_p50_ms', '')} | "
                     f"{c.get('cpu_p99_ms', '')} | {c['ann_recall@100']} | "
                     f"{c['exact_ms_per_query']} |")
    plain = r.get("catalog_scaling_plain_hnsw")
    if plain and plain[0].get("cpu_p99_ms"):
        lines += ["", f"Plain FAISS, the same graph: p99 growth {round(plain[-1]['p99_ms'] / plain[0]['p99_ms'], 2)}x wall "
                  f"time, {round(plain[-1]['cpu_p99_ms'] / plain[0]['cpu_p99_ms'], 2)}x CPU time."]
    stage_rows = [c for c in r["catalog_scaling"] if "retrieve_p99_ms" in c]
    if stage_rows:
        lines += ["", "Per request, timed beside the searches: the whole candidate stage (`candidate_stage`: the two-tower "
                  f"source through the serving index, a co-visitation source, popularity, the merge; quotas {CANDIDATE_QUOTAS}) "
                  "and the model path (that stage, then a DLRM ranker over the catalog, `synthetic_ranker`, scoring every "
                  "candidate):", "",
                  "| items | stage p50 ms | stage p99 ms | stage CPU p99 ms | model path p50 ms | model path p99 ms | "
                  "model path CPU p99 ms |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {c['items']:,} | {c['retrieve_p50_ms']} | {c['retrieve_p99_ms']} | {c['retrieve_cpu_p99_ms']} | "
                  f"{c.get('model_path_p50_ms', '')} | {c.get('model_path_p99_ms', '')} | {c.get('model_path_cpu_p99_ms', '')} |"
                  for c in stage_rows]
        lines += ["", f"p99 growth smallest -> largest: candidate stage {r.get('catalog_retrieve_p99_growth')}x, model path "
                  f"{r.get('catalog_model_path_p99_growth')}x (wall time)."]
    lines += ["", f"p99 growth smallest -> largest: {r['catalog_p99_growth']}x wall time, "
              f"{r.get('catalog_cpu_p99_growth')}x CPU time", "", "## Targets", ""]
    lines += [f"- {k}: {'met' if v else 'NOT met'}" for k, v in r["targets"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
