"""Feature-store benchmark: what one recommendation request pays for its features, and what a
training set of ML-1M size costs.

    python -m benchmarks.features                 # -> benchmarks/results/features.json
    python -m benchmarks.features --requests 500 --skip-historical   # quick look

Online (ML-100K features, SQLite and Redis online stores): per request, the user's features
through Feast (cache off, so every request pays the read) + 500 random candidates gathered from
the in-process item table; beside it, the same 500 items read through Feast, and the floor: a
plain redis-py ``MGET`` of the same values (the user's and 500 items' features, packed with
orjson) under a unique key prefix. Also the real-time write (``apply_events``, one event).

Historical (each in a fresh process, so ``peak_rss_mb`` is its own ``ru_maxrss``): features
built from ML-1M's timestamped ratings (users 1-2999, 487,650 ratings; see
../shared/data/ml-1m/SOURCES.txt), then ``training_set`` for (a) every real rating as a label
row and (b) an ML-1M-sized frame of 1,000,209 rows sampled from them with jittered times.

Redis keys: Feast's are suffixed with a unique project name and removed by ``teardown``; the
floor's keys carry a unique prefix and are deleted at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED_DATA = ROOT.parent / "shared" / "data"   # read-only MovieLens beside the repo
REDIS_URL = "redis://127.0.0.1:6379/0"
CANDIDATES = 500


def _pcts(samples_s: list[float], cpu_s: list[float]) -> dict[str, float]:
    ms, cpu = np.asarray(samples_s) * 1e3, np.asarray(cpu_s) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4), "p95_ms": round(float(np.percentile(ms, 95)), 4),
            "p99_ms": round(float(np.percentile(ms, 99)), 4), "mean_ms": round(float(ms.mean()), 4),
            "cpu_p50_ms": round(float(np.percentile(cpu, 50)), 4), "cpu_p99_ms": round(float(np.percentile(cpu, 99)), 4),
            "n": int(len(ms)), "load_avg_1m": round(os.getloadavg()[0], 2)}


def _time(fn: Callable[[int], Any], n: int, warmup: int = 20) -> dict[str, float]:
    """Wall-clock and this thread's CPU time per call. The machine is shared (2 cores, other jobs):
    the wall p99 includes waiting for a core, ``cpu_*`` is what the call itself costs."""
    for i in range(warmup):
        fn(i)
    wall, cpu = [], []
    for i in range(n):
        c, t = time.thread_time(), time.perf_counter()
        fn(i)
        wall.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
    return _pcts(wall, cpu)


def _settings(root: Path, **features: Any) -> Any:
    from core.config import load_settings

    overrides: dict[str, Any] = {"paths": {"shared_data_dir": str(SHARED_DATA)}}
    if features:
        overrides["features"] = features
    return load_settings(root=root, environ={}, overrides=overrides)


# ---- online ---------------------------------------------------------------------------------------

def _online_store(settings: Any, *, requests: int, seed: int) -> dict[str, Any]:
    import pandas as pd

    from pipelines.features import OnlineFeatureClient

    client = OnlineFeatureClient(settings)
    rng = np.random.default_rng(seed)
    users = sorted({str(u) for u in pd.read_parquet(
        Path(settings.features.resolved_dir(settings.paths.var_dir)) / "tables" / "user_activity.parquet",
        columns=["user_id"])["user_id"]})
    item_ids = list(client.items.ids)
    user_seq = [users[i] for i in rng.integers(0, len(users), size=requests + 50)]
    cand_seq = [[item_ids[j] for j in rng.choice(len(item_ids), size=CANDIDATES, replace=False)] for _ in range(64)]
    now = time.time()

    client.cache_ttl_s = 0.0  # every request reads Feast: the worst case, no cache help

    def request(i: int) -> None:
        client.user_features(user_seq[i], now=now)
        client.item_features(cand_seq[i % 64], now=now)

    rounds = [_time(request, max(100, requests // 3)) for _ in range(3)]  # spread across rounds, not one number
    out: dict[str, Any] = {
        "request_user_feast_plus_500_items_in_process": _time(request, requests),
        "request_rounds_p99_ms": [r["p99_ms"] for r in rounds],
        "request_rounds_cpu_p99_ms": [r["cpu_p99_ms"] for r in rounds],
        "user_only_feast": _time(lambda i: client.user_features(user_seq[i], now=now), requests),
        "items_500_in_process": _time(lambda i: client.item_features(cand_seq[i % 64], now=now), requests),
        "items_500_via_feast": _time(lambda i: client.items_via_feast(cand_seq[i % 64]), max(30, requests // 20), warmup=3),
    }
    client.cache_ttl_s = settings.features.cache_ttl_s()
    out["request_user_cached_plus_500_items"] = _time(request, requests)
    day = pd.Timestamp("1998-04-23", tz="UTC")

    def apply(i: int) -> None:
        client.apply_events(pd.DataFrame([{"user_id": user_seq[i], "item_id": item_ids[i % len(item_ids)],
                                           "event_type": "rate", "value": float(1 + i % 5),
                                           "timestamp": day + pd.Timedelta(seconds=i)}]))

    out["apply_events_1_event"] = _time(apply, max(50, requests // 10), warmup=5)
    out["items_in_table"] = len(item_ids)
    out["users"] = len(users)
    out["_client"] = client
    out["_samples"] = (user_seq, cand_seq)
    return out


def _redis_floor(client: Any, *, requests: int) -> dict[str, Any]:
    """Plain redis-py: the user's features and 500 items' features packed (orjson) under unique keys."""
    import orjson
    import redis

    conn = redis.Redis.from_url(REDIS_URL)
    prefix = f"bench-floor-{uuid.uuid4().hex[:10]}:"
    user_seq, cand_seq = client["_samples"]
    feast_client = client["_client"]
    now = time.time()
    try:
        pipe = conn.pipeline(transaction=False)
        for uid in set(user_seq):
            feats = feast_client.user_features(uid, now=now)
            feats = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in feats.items()}
            pipe.set(prefix + "u:" + uid, orjson.dumps(feats))
        table = feast_client.items
        for i, iid in enumerate(table.ids):
            row = dict(zip(table.stored_columns, map(float, table.numeric[i])))
            row["item_categories"] = table.categories[i]
            pipe.set(prefix + "i:" + iid, orjson.dumps(row))
        pipe.execute()
        keys = [[(prefix + "u:" + user_seq[i]).encode()] + [(prefix + "i:" + c).encode() for c in cand_seq[i % 64]]
                for i in range(len(user_seq))]
        mget = _time(lambda i: conn.mget(keys[i]), requests)
        mget_decode = _time(lambda i: [orjson.loads(v) for v in conn.mget(keys[i])], requests)
        get_user = _time(lambda i: orjson.loads(conn.get(keys[i][0])), requests)
    finally:
        doomed = list(conn.scan_iter(match=prefix + "*", count=5000))
        for j in range(0, len(doomed), 1000):
            conn.delete(*doomed[j:j + 1000])
        conn.close()
    return {"mget_user_plus_500_items": mget, "mget_user_plus_500_items_with_decode": mget_decode,
            "get_user_only": get_user, "value_encoding": "orjson"}


def run_online(*, requests: int, seed: int, echo: Callable[[str], None]) -> dict[str, Any]:
    from pipelines.features import build_features, feature_store, materialize
    from pipelines.ingest import ingest

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        base = _settings(Path(tmp) / "sqlite")
        ingest("ml-100k", settings=base)
        t = time.perf_counter()
        build = build_features(settings=base)
        mat = materialize(settings=base)
        echo(f"ML-100K features built ({build.seconds:.1f}s) and materialised to SQLite ({mat.seconds:.1f}s)")
        results["build_s"] = build.seconds
        results["materialize_sqlite_s"] = mat.seconds
        results["rows"] = build.rows
        sqlite = _online_store(base, requests=requests, seed=seed)
        sqlite.pop("_client"), sqlite.pop("_samples")
        results["sqlite"] = sqlite
        echo(f"sqlite request p99 {sqlite['request_user_feast_plus_500_items_in_process']['p99_ms']:.3f} ms")

        project = f"bench{uuid.uuid4().hex[:10]}"
        rset = _settings(Path(tmp) / "redis", online_store="redis", project=project, redis_url=REDIS_URL)
        rset = rset.model_copy(update={"paths": rset.paths.model_copy(update={"lake_dir": base.paths.lake_dir})})
        try:
            build_features(settings=rset)
            rmat = materialize(settings=rset)
            results["materialize_redis_s"] = rmat.seconds
            redis_res = _online_store(rset, requests=requests, seed=seed)
            floor = _redis_floor(redis_res, requests=requests)
            redis_res.pop("_client"), redis_res.pop("_samples")
            results["redis"] = redis_res
            results["redis_floor"] = floor
            echo(f"redis request p99 {redis_res['request_user_feast_plus_500_items_in_process']['p99_ms']:.3f} ms; "
                 f"floor MGET p99 {floor['mget_user_plus_500_items']['p99_ms']:.3f} ms")
        finally:
            with contextlib.suppress(Exception):
                feature_store(rset).teardown()
        results["online_total_s"] = round(time.perf_counter() - t, 1)
    return results


# ---- historical (child processes) ------------------------------------------------------------------

def _child_build(root: str) -> dict[str, Any]:
    from core.datasets import load_ml1m
    from pipelines.features import build_features
    from pipelines.ingest import ingest

    settings = _settings(Path(root))
    t = time.perf_counter()
    # the timestamped ratings file explicitly (the loader's "auto" prefers the complete, timestamp-less one)
    dataset = load_ml1m(settings.paths.shared_data_dir / "ml-1m", ratings="dat")
    rep = ingest("ml-1m", settings=settings, dataset=dataset)
    ingest_s = time.perf_counter() - t
    build = build_features(settings=settings)
    return {"events": rep.events_read, "ingest_s": round(ingest_s, 2), "build_s": build.seconds, "rows": build.rows,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _child_training_set(root: str, rows: int, seed: int) -> dict[str, Any]:
    import pandas as pd

    from core.lake import Lake
    from pipelines.features import feature_store, training_set

    settings = _settings(Path(root))
    labels = Lake(settings.paths.lake_dir).read_events()[["user_id", "item_id", "timestamp", "value"]]
    if rows > len(labels):
        rng = np.random.default_rng(seed)
        labels = labels.iloc[rng.integers(0, len(labels), size=rows)].reset_index(drop=True)
        labels["timestamp"] = labels["timestamp"] + pd.to_timedelta(rng.integers(0, 30 * 86_400, size=rows), unit="s")
    store = feature_store(settings)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    chunk = int(os.environ.get("BENCH_CHUNK_ROWS", "100000")) or None
    out = training_set(labels, settings=settings, store=store, chunk_rows=chunk)
    seconds = time.perf_counter() - t
    return {"rows": int(len(out)), "seconds": round(seconds, 2), "rows_per_s": int(len(out) / seconds),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_before_mb": round(rss_before, 1),
            "null_user_feature_share": round(float(out["user_events_total"].isna().mean()), 4),
            "columns": int(out.shape[1]), "chunk_rows": chunk}


def _in_child(kind: str, *args: Any) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.features", "--child", kind, *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def run_historical(*, seed: int, echo: Callable[[str], None]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-features-hist-") as tmp:
        built = _in_child("build", tmp)
        echo(f"ML-1M (timestamped part): {built['events']:,} events, features built in {built['build_s']:.1f}s")
        real = _in_child("training_set", tmp, 0, seed)
        echo(f"training_set over {real['rows']:,} real label rows: {real['seconds']:.1f}s, peak {real['peak_rss_mb']:.0f} MB")
        big = _in_child("training_set", tmp, 1_000_209, seed)
        echo(f"training_set over {big['rows']:,} rows: {big['seconds']:.1f}s, peak {big['peak_rss_mb']:.0f} MB")
    return {"ml1m_build": built, "ml1m_real_labels": real, "ml1m_sized_1m_rows": big}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--skip-historical", action="store_true", help="Online part only (keeps earlier historical results).")
    parser.add_argument("--historical-only", action="store_true", help="Historical part only (keeps earlier online results).")
    parser.add_argument("--out", type=Path, default=RESULTS / "features.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "build":
            res = _child_build(rest[0])
        else:
            res = _child_training_set(rest[0], int(rest[1]), int(rest[2]))
        print(json.dumps(res))
        return 0

    echo = lambda line: print(line, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    online = previous.get("online") if args.historical_only else run_online(requests=args.requests, seed=args.seed, echo=echo)
    if online is None:
        raise SystemExit(f"--historical-only needs a previous run's online results in {args.out}")
    if args.skip_historical:
        historical = previous.get("historical", {})
    else:
        _write(args.out, online, previous.get("historical", {}), t0)  # keep the online numbers if this part fails
        historical = run_historical(seed=args.seed, echo=echo)
    _write(args.out, online, historical, t0)
    echo(f"wrote {args.out}")
    return 0


def _write(out: Path, online: dict[str, Any], historical: dict[str, Any], t0: float) -> None:
    req = "request_user_feast_plus_500_items_in_process"
    result = {
        "sqlite_online_p99_ms": online["sqlite"][req]["p99_ms"],
        "redis_online_p99_ms": online["redis"][req]["p99_ms"],
        "redis_floor_p99_ms": online["redis_floor"]["mget_user_plus_500_items"]["p99_ms"],
        "sqlite_online_cpu_p99_ms": online["sqlite"][req]["cpu_p99_ms"],
        "redis_online_cpu_p99_ms": online["redis"][req]["cpu_p99_ms"],
        "redis_online_p50_ms": online["redis"][req]["p50_ms"],
        "target_p99_ms": 3.0,
        "meets_target": online["redis"][req]["p99_ms"] <= 3.0,
        "meets_target_cpu": online["redis"][req]["cpu_p99_ms"] <= 3.0,
        "note": "Shared 2-core machine (load_avg_1m is recorded beside every measurement): wall-clock tails are "
                "dominated by waiting for a core, as the plain MGET floor's own p99 shows; cpu_p99_ms is the "
                "request's own cost. Re-run on an idle machine for wall-clock p99.",
        "what_a_request_reads": "1 user through Feast (2 views, cache off) + 500 random candidates from the "
                                "in-process item table (loaded from the online store after materialisation)",
        "online": online,
        "historical": historical,
        "staleness": {
            "user features (per process)": "0 in the process that called apply_events and, with "
                                           "features.online_change_stamps (default), in every process on its host; "
                                           "<= the cache TTL after a write on another host (features.cache_ttl_s(): "
                                           "60 s with Redis; with SQLite no other host writes)",
            "user window counters (events_1d/7d/30d)": "decay only at materialisation: until the next daily run they "
                                                      "can include events up to 1 day older than the window",
            "item stats and catalog": "as of the last materialised daily snapshot (<= 1 day + materialisation lag) "
                                      "+ <= features.item_refresh_interval_s (60 s) until the table reloads",
        },
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "run_s": round(time.perf_counter() - t0, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
