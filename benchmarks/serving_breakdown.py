"""Where a micro-batch's model time goes: the serving engine in-process, stage by stage, per batch size.

The HTTP benchmark (``benchmarks/serving.py``) says how much CPU a recommendation costs and on
which thread; this one says what the model thread spends it on. Same setup (``serving.fixtures.
benchmark_world``: 3,700 items, two-tower + DLRM ranker @champion, online features), the engine
built as the server builds it (``serving.ranker_precision`` from the settings), one thread, and
the real online histories of the requested users. For each batch size: wall time of each
candidate source, the merge, filter, ranking (DLRM), diversity, and the whole
``Engine.recommend`` call; the per-batch fixed cost and the per-request cost come from a
least-squares line through the totals. Last, one batch size after idle gaps of growing length:
what the same work costs on a core that idled before it; and batches with the other core idle or
busy (a CPU-only loop, a memory-streaming loop): what a neighbour's cache and memory traffic adds.

    python benchmarks/serving_breakdown.py [--batches 1,2,4,8,16,32,64] [--rounds 200]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

from benchmarks.serving import cpu_speed  # noqa: E402 - after the path set-up
from benchmarks.timing import median_ms  # noqa: E402


def _sampled_batches(client, users: list[str], batch: int, n: int, rng: random.Random) -> list[tuple[list[str], list[list[str]]]]:
    """``n`` micro-batches of ``batch`` random known users, each with its users' real online histories."""
    out = []
    for _ in range(n):
        ids = [rng.choice(users) for _ in range(batch)]
        out.append((ids, [[str(i) for i in (f.get("recent_items") or [])] for f in client.users_features(ids, derived=False)]))
    return out


def _median_ms(seconds: list[float]) -> float:
    return round(sorted(seconds)[len(seconds) // 2] * 1000, 3)


def breakdown(engine, client, users: list[str], batch: int, rounds: int, seed: int = 0) -> dict:
    """Median stage times (ms) for one fixed batch of ``batch`` random known users."""
    ((ids, hist),) = _sampled_batches(client, users, batch, 1, random.Random(seed + batch))
    p = engine.pipeline
    uidx = engine.users.encode(ids, unknown="minus_one")
    h = engine._history_matrix(hist)  # noqa: SLF001 - the engine's own history rows
    row: dict = {"batch": batch}
    src_total = 0.0
    for source in p.sources:
        q = int(p.quotas[source.name])
        ms = median_ms(lambda: source.retrieve(uidx, h, q, exclude=h), rounds)
        row[f"source_{source.name}_ms"] = round(ms, 3)
        src_total += ms
    cands = p.retrieve(uidx, h, exclude=h)
    row["retrieve_ms"] = round(median_ms(lambda: p.retrieve(uidx, h, exclude=h), rounds), 3)
    row["merge_ms"] = round(max(row["retrieve_ms"] - src_total, 0.0), 3)
    row["filter_ms"] = round(median_ms(lambda: p.filter(cands), rounds), 3)
    scores = p.rank(uidx, cands)
    row["candidates"] = len(cands)
    row["ranking_ms"] = round(median_ms(lambda: p.rank(uidx, cands), rounds), 3)
    # the ranker's two MLPs alone on this batch's row count (the rest of ranking assembles their inputs)
    import torch

    ranker = p.ranker
    over = ranker._over_mlp_grouped or ranker._over_mlp  # noqa: SLF001 - the MLPs the request path runs
    with torch.inference_mode():
        x_dense = torch.randn(len(cands), ranker._dense_mlp.in_features)  # noqa: SLF001
        x_over = torch.randn(len(cands), over.in_features)
        row["dense_mlp_ms"] = round(median_ms(lambda: ranker._dense_mlp(x_dense), rounds), 3)  # noqa: SLF001
        row["over_mlp_ms"] = round(median_ms(lambda: over(x_over), rounds), 3)
    row["diversity_ms"] = round(median_ms(lambda: p.post_process(len(uidx), cands, scores, 20, p.max_category_share), rounds), 3)
    row["total_ms"] = round(median_ms(lambda: engine.recommend(ids, k=20, histories=hist), rounds), 3)
    row["per_request_ms"] = round(row["total_ms"] / batch, 3)
    return row


def after_idle(engine, client, users: list[str], *, batch: int = 4, gaps_ms: tuple[float, ...] = (0.0, 1.0, 3.0, 10.0),
               rounds: int = 150, seed: int = 0) -> list[dict]:
    """A micro-batch's time after a gap against back to back: the same work after the thread slept
    (as a server's model thread does between batches at low load: the core idles or runs another
    thread), and after the thread spent the gap in a pure-Python loop (the core stayed busy, with
    other code: what is left of the slowdown is that code's footprint in the caches and branch
    predictors, not the core's idling). Median wall and thread-CPU ms per batch for each gap; the
    rounds of every gap and kind are interleaved."""
    batches = _sampled_batches(client, users, batch, 16, random.Random(seed + 1000 + batch))
    for ids, hist in batches:
        engine.recommend(ids, k=20, histories=hist)
    kinds = [(0.0, "none")] + [(g, k) for g in gaps_ms if g for k in ("sleep", "python_loop")]
    wall: dict[tuple[float, str], list[float]] = {x: [] for x in kinds}
    cpu: dict[tuple[float, str], list[float]] = {x: [] for x in kinds}
    for n in range(rounds):
        for g, kind in kinds:
            ids, hist = batches[n % len(batches)]
            if kind == "sleep":
                time.sleep(g / 1000.0)
            elif kind == "python_loop":
                end = time.perf_counter() + g / 1000.0
                while time.perf_counter() < end:
                    pass
            else:
                engine.recommend(ids, k=20, histories=hist)  # back to back: the batch before runs right before
            t, c = time.perf_counter(), time.thread_time()
            engine.recommend(ids, k=20, histories=hist)
            wall[(g, kind)].append(time.perf_counter() - t)
            cpu[(g, kind)].append(time.thread_time() - c)
    return [{"batch": batch, "idle_before_ms": g, "gap": kind, "wall_ms": _median_ms(wall[(g, kind)]),
             "cpu_ms": _median_ms(cpu[(g, kind)])} for g, kind in kinds]


#: what runs on the other core beside the batch: nothing, a pure-Python loop (CPU only, a few KB of
#: memory), and a loop streaming a 16 MB array (past this machine's 8 MB L3: memory traffic, as the
#: other worker's model thread, the event loops and the load generator make in the server)
CO_RUNNERS = {
    "idle": None,
    "python_loop": "x = 0\nwhile True: x += 1",
    "memory_stream": "import numpy as np\na = np.ones(4_000_000, np.float32)\nwhile True: a *= 1.0000001",
}


def beside_other_core(engine, client, users: list[str], *, batches: tuple[int, ...] = (1, 4), rounds: int = 150,
                      repeats: int = 2, seed: int = 0) -> list[dict] | None:
    """A micro-batch's thread CPU with this process pinned to one core and the other core idle, or
    running a co-runner process (``CO_RUNNERS``): what the same work costs while the neighbouring
    core competes for the shared cache and memory. In the server a batch of one costs ~1.4x its
    in-process time; this tells whether a busy neighbour explains it. Median ms per batch, each
    co-runner ``repeats`` times in interleaved order. None where the process cannot be pinned."""
    import subprocess

    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        return None
    mine, other = sorted(os.sched_getaffinity(0))[:2]
    before = os.sched_getaffinity(0)
    rng = random.Random(seed + 2000)
    work = {b: _sampled_batches(client, users, b, 16, rng) for b in batches}
    times: dict[tuple[str, int], list[float]] = {(name, b): [] for name in CO_RUNNERS for b in batches}
    os.sched_setaffinity(0, {mine})
    try:
        for _ in range(repeats):
            for name, code in CO_RUNNERS.items():
                proc = None
                if code:
                    proc = subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{other}}})\n{code}"])
                    time.sleep(0.3)  # started and pinned
                try:
                    for b in batches:
                        for n in range(rounds):
                            ids, hist = work[b][n % len(work[b])]
                            c = time.thread_time()
                            engine.recommend(ids, k=20, histories=hist)
                            times[(name, b)].append(time.thread_time() - c)
                finally:
                    if proc is not None:
                        proc.kill()
                        proc.wait()
    finally:
        os.sched_setaffinity(0, before)
    return [{"batch": b, "other_core": name, "cpu_ms": _median_ms(times[(name, b)]),
             "vs_idle": round(_median_ms(times[(name, b)]) / _median_ms(times[("idle", b)]), 2)}
            for b in batches for name in CO_RUNNERS]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b.strip()]

    import numpy as np

    from core.config import load_settings
    from models.artifacts import load_from_registry
    from pipelines.features import OnlineFeatureClient
    from serving import fixtures as F
    from serving.engine import build_engine

    work = Path(tempfile.mkdtemp(prefix="bench-breakdown-"))
    try:
        settings = load_settings(root=work, environ={}, overrides={"environment": "test"})
        t = time.time()
        world = F.benchmark_world(settings)
        setup_s = time.time() - t
        srv = settings.serving
        engine = build_engine(load_from_registry("models:/two_tower@champion", settings),
                              load_from_registry("models:/ranker@champion", settings), n_candidates=srv.candidates,
                              model_threads=srv.model_threads, precision=srv.ranker_precision)
        client = OnlineFeatureClient(settings, load_items=False)
        users = sorted(str(u) for u in engine.users.ids)
        rows = []
        speed_start = cpu_speed()
        for b in batches:
            rows.append(breakdown(engine, client, users, b, args.rounds))
            print(rows[-1], flush=True)
        idle = after_idle(engine, client, users)
        print(idle, flush=True)
        beside = beside_other_core(engine, client, users)
        print(beside, flush=True)
        speed_end = cpu_speed()
        client.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    x = np.array([r["batch"] for r in rows], float)
    y = np.array([r["total_ms"] for r in rows], float)
    slope, intercept = np.polyfit(x, y, 1) if len(rows) > 1 else (float("nan"), float("nan"))
    res = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "measured": {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_avg": [round(v, 2) for v in os.getloadavg()],
                     "cpu_speed_start_end": [speed_start, speed_end]},
        "setup": {"items": len(world["dataset"].items), "users": len(users), "candidates": srv.candidates,
                  "sources": {s.name: int(engine.pipeline.quotas[s.name]) for s in engine.pipeline.sources},
                  "ranker_precision": engine.pipeline.ranker.precision, "model_threads": srv.model_threads,
                  "rounds": args.rounds, "setup_s": round(setup_s, 1)},
        "rows": rows,
        "after_idle": idle,
        "beside_other_core": beside,
        "fixed_ms_per_batch": round(float(intercept), 3),
        "ms_per_request": round(float(slope), 3),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serving_breakdown.json").write_text(json.dumps(res, indent=2))
    (RESULTS / "serving_breakdown.md").write_text(render_md(res))
    print(json.dumps({k: res[k] for k in ("fixed_ms_per_batch", "ms_per_request")}))


def render_md(r: dict) -> str:
    cols = ["batch", "candidates"] + [k for k in r["rows"][0] if k.startswith("source_")] + \
        ["merge_ms", "filter_ms", "ranking_ms", "dense_mlp_ms", "over_mlp_ms", "diversity_ms", "total_ms", "per_request_ms"]
    lines = ["# Serving engine breakdown (in-process, one thread, median ms per micro-batch)", "",
             f"Measured {r['measured']['at']} (load average {r['measured']['load_avg']}; the host's CPU speed at the start and "
             f"the end, as `benchmarks/serving.py` reads it: {r['measured'].get('cpu_speed_start_end')}); setup {r['setup']}.", "",
             "| " + " | ".join(c.replace("_ms", "").replace("source_", "src ") for c in cols) + " |",
             "|" + "---|" * len(cols)]
    for row in r["rows"]:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in cols) + " |")
    lines += ["", f"Least-squares fit of the totals: **{r['fixed_ms_per_batch']} ms per batch + "
              f"{r['ms_per_request']} ms per request**. Sources and merge make up retrieval; "
              "`Engine.recommend` adds id mapping and history rows. `dense mlp` / `over mlp`: the ranker's two "
              "MLPs alone on the batch's candidate rows (part of `ranking`)."]
    if r.get("after_idle"):
        base = r["after_idle"][0]["cpu_ms"]
        lines += ["", "The same micro-batch after a gap: the thread slept (as a server's model thread does between batches at "
                  "low load), or spent the gap in a pure-Python loop (the core stayed busy with other code); median ms per "
                  "batch, rounds interleaved:", "",
                  "| batch | gap before (ms) | spent | wall ms | thread CPU ms | CPU vs back to back |", "|---|---|---|---|---|---|"]
        lines += [f"| {x['batch']} | {x['idle_before_ms']} | {x.get('gap', 'sleep' if x['idle_before_ms'] else 'none').replace('_', ' ')} "
                  f"| {x['wall_ms']} | {x['cpu_ms']} | {round(x['cpu_ms'] / base, 2) if base else ''} |" for x in r["after_idle"]]
    if r.get("beside_other_core"):
        lines += ["", "The same micro-batch with this process pinned to one core and the other core idle, running a "
                  "pure-Python loop, or streaming a 16 MB array (median thread-CPU ms per batch; co-runners interleaved):", "",
                  "| batch | other core | thread CPU ms | vs idle |", "|---|---|---|---|"]
        lines += [f"| {x['batch']} | {x['other_core'].replace('_', ' ')} | {x['cpu_ms']} | {x['vs_idle']} |"
                  for x in r["beside_other_core"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
