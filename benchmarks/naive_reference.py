"""The serving issue's naive reference, measured the way ``benchmarks/serving.py`` measures the
real server, so the two can be read side by side.

The issue sets its targets against "a naive reference (FastAPI + uvicorn, 2 workers, wrk): FAISS
flat over 3.7K items + a 3-layer MLP scoring 500 candidates per request ~1,350 RPS, i.e. 0.10 x
no-op". This is that reference, written out: per request a user vector, a FAISS flat
inner-product search over 3,700 items for 500 candidates, one 3-layer MLP (user ++ item vector ->
256 -> 64 -> 1, fp32, one torch thread) over the 500, top-20 as JSON. No batching across
requests, no features, no filters: every request costs the same CPU at any load. Served like the
real server (uvicorn, 2 workers, one ``SO_REUSEPORT`` socket per worker: ``serving.server.
ReusePortSupervisor``) and driven by the same tools (wrk closed loop over the same concurrencies,
``benchmarks/open_loop_client.py`` at fractions of the measured maximum), so its maximum, its
ratio to its own no-op endpoint and its p99 at half load are comparable with
``benchmarks/results/serving.json``.

Why it is worth measuring: it says what the latency target costs on this machine. A server whose
CPU per request does not depend on load is ~half busy at half of its maximum; one that batches
across concurrent requests is cheaper per request the more requests share a batch, so it reaches a
higher maximum and, at half of it, is busier than half.

    python benchmarks/naive_reference.py [--repeats 3] [--duration 10] [--connections 64,256]
    python benchmarks/naive_reference.py serve PORT     # the server alone (what the run starts)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

N_ITEMS, N_USERS, DIM, CANDIDATES = 3_700, 2_000, 64, 500


def create_app(*, n_items: int = N_ITEMS, n_users: int = N_USERS, dim: int = DIM, candidates: int = CANDIDATES, seed: int = 0):
    """The reference ASGI app: ``GET /v1/recommendations/{user_id}?k=20`` (the path the load tools
    request), ``GET /noop`` (its own ceiling) and ``GET /healthz`` (naming the worker, as the real
    server's does, so the run starts once both workers listen). Random unit vectors and MLP weights (seeded): the
    cost, not the quality, is what is measured. A user id maps to a vector by a stable hash."""
    import os
    import zlib

    import faiss
    import numpy as np
    import torch
    from fastapi import FastAPI

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(seed)
    items = rng.standard_normal((n_items, dim)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    users = rng.standard_normal((n_users, dim)).astype(np.float32)
    users /= np.linalg.norm(users, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(dim)
    index.add(items)
    torch.manual_seed(seed)
    mlp = torch.nn.Sequential(torch.nn.Linear(2 * dim, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 1)).eval()
    items_t = torch.from_numpy(items)
    depth = min(candidates, n_items)
    app = FastAPI(title="naive reference")

    @app.get("/noop")
    async def noop() -> dict:
        return {"ok": True}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "detail": {"worker": os.getpid()}}

    @app.get("/v1/recommendations/{user_id}")
    async def recommend(user_id: str, k: int = 20) -> dict:
        u = users[zlib.crc32(user_id.encode()) % n_users][None, :]
        _, found = index.search(u, depth)
        cand = torch.from_numpy(found[0])
        with torch.inference_mode():
            x = torch.cat([torch.from_numpy(u).expand(len(cand), dim), items_t[cand]], dim=1)
            top = torch.topk(mlp(x).squeeze(1), min(k, depth))
        ids, scores = cand[top.indices].tolist(), top.values.tolist()
        return {"user_id": user_id, "items": [{"item_id": str(i), "score": s, "position": p}
                                              for p, (i, s) in enumerate(zip(ids, scores))]}

    return app


def serve(port: int, *, workers: int = 2) -> None:
    """Serve the reference on loopback as the real server is served (``serving.server.run``)."""
    from uvicorn import Config

    from serving.server import ReusePortSupervisor

    ReusePortSupervisor(Config("benchmarks.naive_reference:create_app", factory=True, host="127.0.0.1", port=port,
                               workers=workers, log_level="warning", access_log=False, loop="uvloop",
                               http="httptools")).run()


def run(*, repeats: int = 3, duration: int = 10, connections: tuple[int, ...] = (64, 256),
        fractions: tuple[float, ...] = (0.25, 0.5)) -> dict:
    """Start the reference (2 workers), then per repeat: each endpoint's closed-loop maximum over
    ``connections``, and the recommendation path in open loop at ``fractions`` of its maximum."""
    from benchmarks.serving import cpu_speed, load_avg, lua_recommend, open_loop, run_wrk, spread
    from serving.server import free_port, wait_for_workers

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    users = [f"u{i}" for i in range(N_USERS)]
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.naive_reference", "serve", str(port)], cwd=str(ROOT),
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    rows = []
    try:
        wait_for_workers(url, 2, proc=proc)
        with tempfile.TemporaryDirectory() as tmp:
            lua = lua_recommend(users, Path(tmp) / "rec.lua")
            run_wrk(url + "/", script=lua, connections=16, duration=3)  # warm-up
            for _ in range(repeats):
                row: dict = {"cpu_speed": cpu_speed(), "load_avg": load_avg()}
                for name, path, script in (("noop", "/noop", None), ("recommend", "/", lua)):
                    points = [{**run_wrk(url + path, script=script, connections=c, duration=duration), "connections": c}
                              for c in connections]
                    row[name] = max(points, key=lambda p: p["rps"])
                row["open_loop"] = []
                for f in fractions:
                    ol = open_loop(url, row["recommend"]["rps"] * f, duration, users)
                    row["open_loop"].append({"fraction": f, "rate": round(row["recommend"]["rps"] * f, 1),
                                             **{k: ol[k] for k in ("sent", "errors", "p50_ms", "p95_ms", "p99_ms")},
                                             "client_cpu_ms_per_request": ol.get("client_cpu_ms_per_request")})
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    half = [next(p for p in r["open_loop"] if p["fraction"] == 0.5) for r in rows] if 0.5 in fractions else []
    rec, noop = spread([r["recommend"]["rps"] for r in rows]), spread([r["noop"]["rps"] for r in rows])
    return {
        "measured": {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_avg_end": load_avg()},
        "setup": {"items": N_ITEMS, "users": N_USERS, "dim": DIM, "candidates": CANDIDATES, "workers": 2,
                  "connections": list(connections), "duration_s": duration, "repeats": repeats,
                  "path": "user vector -> FAISS flat IP top-500 -> MLP 128-256-64-1 (fp32, 1 thread) -> top-20; no batching"},
        "noop_rps": noop["median"], "recommend_rps": rec["median"],
        "recommend_to_noop": round(rec["median"] / noop["median"], 3),
        "recommend_p99_ms_at_half_load": spread([p["p99_ms"] for p in half])["median"] if half else None,
        "spread": {"noop_rps": noop, "recommend_rps": rec,
                   "recommend_to_noop_per_repeat": [round(r["recommend"]["rps"] / r["noop"]["rps"], 4) for r in rows],
                   "p99_ms_at_half_load": [p["p99_ms"] for p in half]},
        "runs": rows,
    }


def render_md(r: dict) -> str:
    s = r["setup"]
    lines = [
        "# Naive reference server (the serving issue's yardstick)",
        "",
        f"Measured {r['measured']['at']}. {s['path']}; {s['items']:,} items, {s['workers']} workers, "
        f"{s['repeats']} repeats of {s['duration_s']} s, closed loop at {s['connections']} connections.",
        "",
        f"- No-op: **{r['noop_rps']:,.0f} RPS**; recommendation: **{r['recommend_rps']:,.0f} RPS** "
        f"= **{r['recommend_to_noop']} x** its no-op (per repeat {r['spread']['recommend_to_noop_per_repeat']}).",
        f"- p99 at half of the maximum (open loop): **{r['recommend_p99_ms_at_half_load']} ms** "
        f"(per repeat {r['spread']['p99_ms_at_half_load']}).",
        "",
        "| repeat | CPU speed | no-op RPS | rec RPS | open loop: fraction, rate, p50 / p95 / p99 ms |",
        "|---|---|---|---|---|",
    ]
    for i, row in enumerate(r["runs"]):
        ol = "; ".join(f"{p['fraction']} at {p['rate']:,.0f}: {p['p50_ms']} / {p['p95_ms']} / {p['p99_ms']}" for p in row["open_loop"])
        lines.append(f"| {i} | {row['cpu_speed']} | {row['noop']['rps']:,.0f} | {row['recommend']['rps']:,.0f} | {ol} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", default="64,256")
    args = ap.parse_args()
    res = run(repeats=args.repeats, duration=args.duration,
              connections=tuple(int(c) for c in args.connections.split(",") if c.strip()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "naive_reference.json").write_text(json.dumps(res, indent=2))
    (RESULTS / "naive_reference.md").write_text(render_md(res))
    print(json.dumps({k: res[k] for k in ("noop_rps", "recommend_rps", "recommend_to_noop", "recommend_p99_ms_at_half_load")}))


if __name__ == "__main__":
    main()
