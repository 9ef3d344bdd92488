"""What the per-host change stamps buy at the serving path: the user-feature cache as it was
(``features.online_cache_ttl_s`` 5 s, no stamps: other workers see an event within 5 s) against
a 60 s TTL with stamps (every worker on the host sees it at once), and the same with
``features.online_cache_refresh_ahead`` 0.2, on the real server.

Every arm serves the same world (``benchmarks/serving.py``'s) at the same fixed open-loop rates
while a poster sends feedback events for random users of the same population at a fixed rate, so
the stamps do fire: each event makes the other worker re-read its user. The arms alternate on
fresh servers (A B C, then C B A, ...), so this VM's drift within the run hits every arm alike. Per server:
a warm-up at the highest rate (long enough for the longer TTL's cache to reach its steady state
of expiries), then each rate in turn. Reported per arm and rate: p50/p95/p99 from the scheduled
send time (``benchmarks/open_loop_client.py``), the server's CPU per recommendation, the cache's
lookups by outcome (hit, miss, changed) and the share of responses the models served.

    python benchmarks/feature_cache.py [--rates 350,700] [--pairs 2] [--warm 60] [--duration 10]
                                       [--events-per-s 100]

Rates default to 1/4 and 1/2 of ``recommend_rps`` in ``benchmarks/results/serving.json`` (this
machine's measured maximum; run that benchmark first). Writes
``benchmarks/results/feature_cache.{json,md}``.
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serving import (KEY, RESULTS, bench_settings, bench_world, cache_between, cache_lookups,  # noqa: E402
                                cpu_per_request, cpu_speed, load_avg, model_served, open_loop, rec_counters,
                                spread, thread_cpu)

ARMS: dict[str, dict] = {
    "ttl5_no_stamps": {"online_cache_ttl_s": 5.0, "online_change_stamps": False},
    "ttl60_stamps": {"online_cache_ttl_s": 60.0, "online_change_stamps": True},
    # active users' entries renewed in the background before they expire: what is left on the
    # request path is the reads after a change
    "ttl60_stamps_refresh_ahead": {"online_cache_ttl_s": 60.0, "online_change_stamps": True,
                                   "online_cache_refresh_ahead": 0.2},
}


class EventPoster(threading.Thread):
    """Posts ``per_s`` feedback events a second (in requests of ``batch``) for random users and
    items of the benchmark's population, on a fixed schedule, until stopped; counts the 202s."""

    def __init__(self, url: str, users: list[str], items: list[str], *, per_s: float, batch: int = 5, seed: int = 0):
        super().__init__(name="event-poster", daemon=True)
        self.url, self.users, self.items, self.per_s, self.batch = url, users, items, per_s, batch
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.accepted = self.failed = 0

    def run(self) -> None:
        import httpx

        if self.per_s <= 0:
            return
        every = self.batch / self.per_s
        with httpx.Client(base_url=self.url, headers={"X-API-Key": KEY}, timeout=10.0) as client:
            due = time.monotonic()
            while not self.stop_event.wait(max(0.0, due - time.monotonic())):
                due += every
                events = [{"user_id": self.rng.choice(self.users), "item_id": self.rng.choice(self.items),
                           "event_type": "click"} for _ in range(self.batch)]
                try:
                    r = client.post("/v1/events", json=events)
                    ok = r.status_code == 202
                except httpx.HTTPError:
                    ok = False
                if ok:
                    self.accepted += self.batch
                else:
                    self.failed += self.batch

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=30)


def measure_arm(settings, users: list[str], items: list[str], *, rates: list[float], warm_s: float, duration: float,
                events_per_s: float, seed: int) -> dict:
    """One fresh server of this arm: warm up, then each rate in turn, with the poster running."""
    from serving.server import ServerProcess

    with ServerProcess(settings, workers=2) as srv:
        workers = srv.child_pids()
        poster = EventPoster(srv.url, users, items, per_s=events_per_s, seed=seed)
        poster.start()
        try:
            speed = cpu_speed()
            open_loop(srv.url, max(rates), warm_s, users)
            points = []
            for rate in rates:
                rec0, cache0, cpu0 = rec_counters(srv.url), cache_lookups(srv.url), thread_cpu(workers)
                events0 = poster.accepted
                run = open_loop(srv.url, rate, duration, users)
                cpu1 = thread_cpu(workers)
                points.append({"rate": rate, **{k: run[k] for k in ("sent", "ok", "errors", "p50_ms", "p95_ms", "p99_ms")},
                               "load_avg": load_avg(), "events_posted": poster.accepted - events0,
                               "feature_cache": cache_between(cache0, cache_lookups(srv.url)),
                               **model_served(rec0, rec_counters(srv.url)),
                               "server_cpu_ms_per_request": cpu_per_request(cpu0, cpu1, run["sent"])})
                print(json.dumps({"rate": rate, "p99_ms": run["p99_ms"], "cache": points[-1]["feature_cache"],
                                  "cpu": points[-1]["server_cpu_ms_per_request"].get("total")}), flush=True)
        finally:
            poster.stop()
    return {"cpu_speed": speed, "points": points, "events_failed": poster.failed}


def summarize(runs: dict[str, list[dict]], rates: list[float]) -> dict:
    """Per arm and rate: medians (and the per-server values) over the arm's servers."""
    out: dict = {}
    for arm, servers in runs.items():
        out[arm] = {}
        for i, rate in enumerate(rates):
            pts = [srv["points"][i] for srv in servers]

            def med(values: list) -> float | None:  # serving.py's spread: None left out
                return spread(values, digits=3).get("median")

            out[arm][str(rate)] = {
                "p50_ms": med([p["p50_ms"] for p in pts]), "p95_ms": med([p["p95_ms"] for p in pts]),
                "p99_ms": med([p["p99_ms"] for p in pts]), "p99_ms_per_server": [p["p99_ms"] for p in pts],
                "server_cpu_ms_per_request": med([p["server_cpu_ms_per_request"].get("total") for p in pts]),
                "feature_cache_hit_share": med([p["feature_cache"]["hit_share"] for p in pts]),
                "feature_cache_changed": med([p["feature_cache"]["changed"] for p in pts]),
                "model_served_share_min": min((p["model_served_share"] for p in pts if p["model_served_share"] is not None),
                                              default=None),
            }
    return out


def render_md(r: dict) -> str:
    lines = [
        "# Feature cache: TTL 5 s without change stamps vs TTL 60 s with them (and with refresh-ahead)", "",
        f"Measured {r['measured_at']} on {r['machine']['cpus']} cores; {r['pairs']} servers per arm, alternating "
        f"(order {r['order']}); warm-up {r['warm_s']} s at the highest rate, then {r['duration_s']} s per rate; "
        f"{r['events_per_s']} feedback events/s posted meanwhile (random users of the same {r['users']:,}); "
        f"CPU speed at each server's start {r['cpu_speed']}. Medians over the servers.", "",
        "| arm | rate (RPS) | p50 ms | p95 ms | p99 ms (per server) | server CPU ms/req | cache hit share | re-reads after a change per run | model-served share (min) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, by_rate in r["summary"].items():
        for rate, x in by_rate.items():
            lines.append(f"| {arm} | {rate} | {x['p50_ms']} | {x['p95_ms']} | {x['p99_ms']} ({', '.join(map(str, x['p99_ms_per_server']))}) | "
                         f"{x['server_cpu_ms_per_request']} | {x['feature_cache_hit_share']} | {x['feature_cache_changed']} | "
                         f"{x['model_served_share_min']} |")
    lines += ["", "Consistency: with TTL 5 s and no stamps, a worker that did not apply an event serves the user's "
                  "old features for up to 5 s; with stamps it re-reads them at the next request (the `changed` "
                  "lookups), and the 60 s TTL bounds only writes made on other hosts (docs/features.md)."]
    return "\n".join(lines) + "\n"


def _rates(text: str) -> list[float]:
    try:
        values = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not values or values[0] <= 0:
        raise argparse.ArgumentTypeError(f"rates must be positive, got {text!r}")
    return values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", type=_rates, default=None, help="open-loop rates, RPS (default: 1/4 and 1/2 of serving.json's recommend_rps)")
    ap.add_argument("--pairs", type=int, default=2, help="servers per arm, in alternating order")
    ap.add_argument("--warm", type=float, default=60.0, help="seconds of warm-up per server at the highest rate")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds measured per rate")
    ap.add_argument("--events-per-s", type=float, default=100.0)
    args = ap.parse_args()
    if shutil.which("curl") is None:
        sys.exit("curl is not installed")
    rates = args.rates
    if rates is None:
        serving = RESULTS / "serving.json"
        if not serving.is_file():
            sys.exit("no benchmarks/results/serving.json: run benchmarks/serving.py --parts http first, or pass --rates")
        top = json.loads(serving.read_text())["recommend_rps"]
        rates = [round(top * f) for f in (0.25, 0.5)]
    work = Path(tempfile.mkdtemp(prefix="bench-feature-cache-"))
    try:
        base = bench_settings(work)
        _, users, items, _ = bench_world(base)
        arms = {name: base.model_copy(update={"features": base.features.model_copy(update=cfg)}) for name, cfg in ARMS.items()}
        names = list(arms)
        order = [n for i in range(args.pairs) for n in (names if i % 2 == 0 else names[::-1])]  # A B C, C B A, ...
        runs: dict[str, list[dict]] = {n: [] for n in names}
        speeds: list[float] = []
        for i, name in enumerate(order):
            print("server", i, name, flush=True)
            runs[name].append(measure_arm(arms[name], users, items, rates=rates, warm_s=args.warm, duration=args.duration,
                                          events_per_s=args.events_per_s, seed=i))
            speeds.append(runs[name][-1]["cpu_speed"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
           "arms": ARMS, "rates": rates, "pairs": args.pairs, "order": order, "warm_s": args.warm,
           "duration_s": args.duration, "events_per_s": args.events_per_s, "users": len(users),
           "cpu_speed": speeds,
           "summary": summarize(runs, rates), "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "feature_cache.json").write_text(json.dumps(res, indent=2))
    (RESULTS / "feature_cache.md").write_text(render_md(res))
    print(render_md(res))


if __name__ == "__main__":
    main()
