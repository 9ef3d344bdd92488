"""DLRM ranker over-arch size: recommendation quality vs serving cost, side by side.

Why: on the serving path the ranker's MLPs score every candidate of every request and dominate
its CPU cost (``benchmarks/serving_breakdown.py``); the over arch (``models.dlrm.DLRMConfig.
over_arch``) is the biggest of them. This says whether a smaller one keeps the quality and how
much model time it saves. Its 10-seed run moved the default (``training.ranker.over_arch``) from
the baseline ``(256, 128, 1)`` to ``(128, 64, 1)``: no significant paired difference at n=10
(every metric within ~1 standard error; all four ranking means slightly lower, e.g. recall@10
-0.0011 +- 0.0010), for 1.8x (one request) to 2.8x (16-request batch) less over-arch time;
``(64, 32, 1)`` lost ~2-3 standard errors of NDCG. Only the ranker seed varies (one split, one
two-tower), so the standard errors understate the variance across splits.

Quality: for each over arch and each seed, the product's two-stage model (two-tower + co-visitation
+ EASE + popular candidates, DLRM ranker) on the ML-100K RecBole split (split seed 2020) through
the quality harness (``benchmarks.quality.run``, one fresh process per run). The arch goes in as
``{"two_stage": {"seed": SEED, "dlrm_params": {"over_arch": ARCH}}}``: ``TwoTowerPlusRanker`` hands
those keys to ``TwoStageRecommender(seed=..., dlrm_params=...)``, which passes ``dlrm_params`` to
``models.dlrm.train_dlrm``. ``SEED`` drives the ranker stage (negative sampling, DLRM init and
batches); the two-tower retriever keeps the training preset's seed, so every run ranks (nearly)
the same candidates. A probe (``on_epoch`` hook, also in ``dlrm_params``) records, from inside
``train_dlrm``, the config's over arch and the Linear shapes of the model being trained, so the
JSON shows that the arch really reached training.

Cost: the over arch alone, as the served model runs it (``models.inference.LinearStack``, ReLU
after all but the last layer, precision ``auto`` = bf16 on CPUs with native bf16), untrained
weights, one torch thread, median of many runs, on 500 rows (one request's candidates) and
8,000 rows (16 requests in one micro-batch). Input width 26 = the served model's 16-d dense
output + 10 pairwise dots; 74 (64-d + 10, the width the quality harness trains) is shown too.

    python benchmarks/ranker_arch.py                        # -> benchmarks/results/ranker_arch.{json,md}
    python benchmarks/ranker_arch.py --archs 256,128,1:64,32,1 --seeds 42 --out /tmp/x
    python benchmarks/ranker_arch.py --cost-only            # the MLP timing alone, in seconds
"""
from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

from benchmarks.timing import median_ms  # noqa: E402 - after the path set-up
SHARED_DATA = ROOT.parent / "shared" / "data"  # read-only MovieLens beside the repo

BASELINE = (256, 128, 1)  # the over arch before this study; differences are reported against it
DEFAULT_ARCHS = (BASELINE, (128, 64, 1), (64, 32, 1))
METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")
RANKER_KEYS = ("ranker_valid_auc", "ranker_valid_log_loss", "ranker_best_epoch", "ranker_ranker_train_s")
SERVED_WIDTH = 26  # 16-d dense output + C(5, 2) = 10 dots (serving fixture: 16-d embeddings)
TRAINED_WIDTH = 74  # 64-d (train_dlrm's default embedding_dim, used by the quality harness) + 10


def arch_name(arch: Sequence[int]) -> str:
    return "-".join(str(int(x)) for x in arch)


def parse_archs(text: str) -> list[tuple[int, ...]]:
    """``"256,128,1:64,32,1"`` -> ``[(256, 128, 1), (64, 32, 1)]``."""
    return [tuple(int(x) for x in part.split(",")) for part in text.split(":") if part.strip()]


# ---- the probe that runs inside train_dlrm ----------------------------------------------------
def arch_probe(path: str, epoch: int, row: dict[str, float]) -> None:
    """``train_dlrm``'s ``on_epoch`` hook: appends the trained model's over arch (config and the
    live ``nn.Linear`` shapes, read from ``train_dlrm``'s own frame) and the epoch's validation
    numbers to ``path`` (JSON lines). Module level so the harness's spawned process can unpickle it."""
    from torch import nn

    frame = inspect.currentframe()
    caller = frame.f_back if frame is not None else None
    while caller is not None and caller.f_code.co_name != "train_dlrm":
        caller = caller.f_back
    rec: dict[str, Any] = {"epoch": epoch, **{k: float(v) for k, v in row.items()}}
    if caller is None:
        rec["error"] = "not called from train_dlrm"
    else:
        try:  # a probe must never break the training it watches
            config, ranker = caller.f_locals.get("config"), caller.f_locals.get("ranker")
            rec["config_over_arch"] = list(config.over_arch) if config is not None else None
            rec["embedding_dim"] = int(config.embedding_dim) if config is not None else None
            if ranker is not None:
                rec["over_arch_linears"] = [[m.in_features, m.out_features] for m in ranker.dlrm.over_arch.modules()
                                            if isinstance(m, nn.Linear)]
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            rec["error"] = f"{type(exc).__name__}: {exc}"
    del frame, caller  # no reference cycle through train_dlrm's frame
    with open(path, "a") as fh:
        fh.write(json.dumps(rec) + "\n")


# ---- quality -----------------------------------------------------------------------------------
def settings_for(root: Path) -> Any:
    from core.config import load_settings

    return load_settings(root=root, environ={}, overrides={"environment": "test",
                                                           "paths": {"shared_data_dir": str(SHARED_DATA)}})


def quality_run(arch: tuple[int, ...], seed: int, *, dataset: str = "ml-100k", split_seed: int = 2020) -> dict[str, Any]:
    """One two-stage run through the quality harness; the row this benchmark keeps."""
    from benchmarks.quality import run
    from core.tracking import git_commit

    work = Path(tempfile.mkdtemp(prefix="bench-ranker-arch-"))
    probe = work / "probe.jsonl"
    try:
        settings = settings_for(work)
        params = {"two_stage": {"seed": seed, "dlrm_params": {"over_arch": tuple(arch),
                                                              "on_epoch": functools.partial(arch_probe, str(probe))}}}
        t0 = time.perf_counter()
        payload = run(dataset=dataset, models=["two_stage"], seed=split_seed, out_dir=work / "out",
                      settings=settings, model_params=params, log_mlflow=False, echo=lambda m: print("   ", m, flush=True))
        wall = time.perf_counter() - t0
        if payload["missing"]:
            raise RuntimeError(f"two_stage failed: {payload['missing']}")
        epochs = [json.loads(line) for line in probe.read_text().splitlines()] if probe.is_file() else []
    finally:
        shutil.rmtree(work, ignore_errors=True)
    m = payload["models"]["two_stage"]
    p = m.get("params", {})
    tt = payload["models"].get("two_stage/source_two_tower", {})
    trained = epochs[0].get("config_over_arch") if epochs else None
    linears = epochs[0].get("over_arch_linears") if epochs else None
    return {
        "arch": arch_name(arch), "seed": seed,
        **{k: m[k] for k in METRICS},
        "ranker_valid_auc": p.get("ranker_valid_auc"), "ranker_valid_log_loss": p.get("ranker_valid_log_loss"),
        "ranker_best_epoch": p.get("ranker_best_epoch"), "ranker_train_s": round(p.get("ranker_ranker_train_s", 0.0), 1),
        "ranker_examples": p.get("ranker_ranker_examples"), "candidate_recall": p.get("ranker_candidate_recall"),
        "two_tower_best_epoch": p.get("two_tower_best_epoch"), "two_tower_recall@10": tt.get("recall@10"),
        "train_s": m["train_s"], "eval_s": m["eval_s"], "peak_rss_mb": m["peak_rss_mb"], "wall_s": round(wall, 1),
        "trained_over_arch": trained, "trained_over_arch_linears": linears,
        # the config's arch and the live Linear layers both match (in -> out chained, ending in the logit)
        "arch_reached_training": trained == list(arch) and bool(linears)
                                 and [out for _, out in linears] == list(arch)
                                 and all(a[1] == b[0] for a, b in zip(linears, linears[1:])),
        "epochs": epochs,
        "sizes": payload["sizes"], "git_commit": git_commit(ROOT),
    }


def summarize(rows: list[dict[str, Any]], archs: Sequence[tuple[int, ...]]) -> dict[str, dict[str, Any]]:
    """Per arch: mean, min, max (and per-seed values) of each metric."""
    out: dict[str, dict[str, Any]] = {}
    keys = (*METRICS, "ranker_valid_auc", "ranker_valid_log_loss", "ranker_train_s", "train_s")
    for arch in archs:
        mine = [r for r in rows if r["arch"] == arch_name(arch)]
        if not mine:
            continue
        s: dict[str, Any] = {"n_seeds": len(mine), "seeds": [r["seed"] for r in mine]}
        for k in keys:
            vals = [float(r[k]) for r in mine if r.get(k) is not None]
            if vals:
                s[k] = {"mean": round(statistics.fmean(vals), 6), "min": round(min(vals), 6), "max": round(max(vals), 6),
                        "spread": round(max(vals) - min(vals), 6), "values": [round(v, 6) for v in vals]}
        out[arch_name(arch)] = s
    return out


def paired_vs_baseline(rows: list[dict[str, Any]], archs: Sequence[tuple[int, ...]]) -> dict[str, dict[str, Any]]:
    """Per arch: the per-seed difference to the baseline arch (same seed, same split, same two-tower:
    a paired comparison), its mean, standard error and how many seeds came out worse."""
    base = {r["seed"]: r for r in rows if r["arch"] == arch_name(BASELINE)}
    out: dict[str, dict[str, Any]] = {}
    for arch in archs:
        if tuple(arch) == BASELINE:
            continue
        mine = [r for r in rows if r["arch"] == arch_name(arch) and r["seed"] in base]
        if not mine:
            continue
        out[arch_name(arch)] = {"n_seeds": len(mine)}
        for k in (*METRICS, "ranker_valid_auc"):
            diffs = [float(r[k]) - float(base[r["seed"]][k]) for r in mine]
            se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
            out[arch_name(arch)][k] = {"mean": round(statistics.fmean(diffs), 6), "se": None if se is None else round(se, 6),
                                       "worse": sum(d < 0 for d in diffs), "diffs": [round(d, 6) for d in diffs]}
    return out


# ---- serving cost ------------------------------------------------------------------------------
def mlp_cost(arch: Sequence[int], *, in_width: int = SERVED_WIDTH, precision: str = "auto",
             rows: Sequence[int] = (500, 8000), rounds: int = 400, seed: int = 0) -> dict[str, Any]:
    """Median ms of the over arch as ``LinearStack`` (ReLU after all but the last layer) per call."""
    import torch
    from torch import nn

    from models.inference import LinearStack

    torch.manual_seed(seed)
    widths = [in_width, *arch]
    linears = [nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])]
    stack = LinearStack(linears, [True] * (len(linears) - 1) + [False], precision=precision)
    res: dict[str, Any] = {"arch": arch_name(arch), "in_width": in_width, "precision": stack.precision,
                           "flops_per_row": 2 * sum(a * b for a, b in zip(widths[:-1], widths[1:]))}
    with torch.inference_mode():
        for n in rows:
            x = torch.randn(n, in_width)
            ms = median_ms(lambda: stack(x), max(rounds * 500 // n, 30), warmup=5)
            res[f"ms_{n}_rows"] = round(ms, 4)
            res[f"ms_per_request_{n}_rows"] = round(ms * 500 / n, 4)
    # read after the calls: an ``auto`` stack picks its GEMM on its first call past a handful of rows
    res.update(fused=stack.fused, backend=stack.backend)
    return res


def cost_table(archs: Sequence[tuple[int, ...]], widths: Sequence[int], rounds: int) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(1)
    out = []
    for w in widths:
        for arch in archs:
            out.append(mlp_cost(arch, in_width=w, rounds=rounds))
            print("  cost", out[-1], flush=True)
    return out


# ---- report ------------------------------------------------------------------------------------
def render_md(res: dict[str, Any]) -> str:
    s, costs = res["summary"], res["mlp_cost"]
    cost = {(c["arch"], c["in_width"]): c for c in costs}
    base = arch_name(BASELINE)
    lines = ["# DLRM over-arch size: quality vs serving cost", "",
             f"ML-100K, RecBole split (seed {res['split_seed']}), product two-stage model via `benchmarks.quality`; "
             f"ranker seeds {res['seeds']}; measured {res['measured']['at']} on {res['machine']['cpus']} CPUs; "
             f"total wall {res['wall_s'] / 60:.1f} min.", "",
             "Quality: mean over seeds (per-seed values in brackets).", "",
             "| over arch | " + " | ".join(METRICS) + " | ranker valid AUC | ranker log loss | train s | arch trained |",
             "|---|" + "---:|" * (len(METRICS) + 3) + "---|"]
    for name, a in s.items():
        def cell(k: str, fmt: str = ".4f") -> str:
            if k not in a:
                return "-"
            return f"{a[k]['mean']:{fmt}} [" + ", ".join(f"{v:{fmt}}" for v in a[k]["values"]) + "]"
        ok = all(r["arch_reached_training"] for r in res["runs"] if r["arch"] == name)
        lines.append(f"| ({name.replace('-', ', ')}) | " + " | ".join(cell(k) for k in METRICS) +
                     f" | {cell('ranker_valid_auc')} | {cell('ranker_valid_log_loss')} | {cell('train_s', '.0f')} | "
                     f"{'yes' if ok else 'NO'} |")
    if base in s:
        lines += ["", f"Difference of the means vs the baseline ({base.replace('-', ', ')}), and the baseline's own "
                  "seed-to-seed spread (max - min):", "",
                  "| over arch | " + " | ".join(f"d {k}" for k in METRICS) + " | d AUC |", "|---|" + "---:|" * (len(METRICS) + 1)]
        for name, a in s.items():
            if name == base:
                lines.append(f"| spread of baseline | " + " | ".join(f"{a[k]['spread']:.4f}" for k in METRICS) +
                             f" | {a['ranker_valid_auc']['spread']:.4f} |")
                continue
            lines.append(f"| ({name.replace('-', ', ')}) | " +
                         " | ".join(f"{a[k]['mean'] - s[base][k]['mean']:+.4f}" for k in METRICS) +
                         f" | {a['ranker_valid_auc']['mean'] - s[base]['ranker_valid_auc']['mean']:+.4f} |")
    paired = res.get("paired_vs_baseline", {})
    if paired:
        lines += ["", "Paired per seed (same seed, split and two-tower for every arch): mean difference vs the baseline "
                  "+- standard error, (seeds worse / seeds):", "",
                  "| over arch | " + " | ".join(f"d {k}" for k in (*METRICS, "AUC")) + " |", "|---|" + "---:|" * (len(METRICS) + 1)]
        for name, a in paired.items():
            lines.append(f"| ({name.replace('-', ', ')}) | " + " | ".join(
                f"{a[k]['mean']:+.4f} +- {a[k]['se'] if a[k]['se'] is not None else float('nan'):.4f} ({a[k]['worse']}/{a['n_seeds']})"
                for k in (*METRICS, "ranker_valid_auc")) + " |")
    widths = sorted({c["in_width"] for c in costs})
    lines += ["", f"Serving cost of the over arch alone (`LinearStack`, precision {costs[0]['precision'] if costs else '-'}, "
              "one thread, median; ms per 500-row request):", "",
              "| over arch | " + " | ".join(f"width {w}: 1 request | width {w}: 16-request batch, per request" for w in widths) +
              " | MFLOP per request |", "|---|" + "---:|" * (2 * len(widths) + 1)]
    for arch in res["archs"]:
        name = arch_name(arch)
        cells = []
        for w in widths:
            c = cost.get((name, w), {})
            cells += [str(c.get("ms_per_request_500_rows", "-")), str(c.get("ms_per_request_8000_rows", "-"))]
        fl = cost.get((name, SERVED_WIDTH), cost.get((name, widths[0]), {})).get("flops_per_row", 0) * 500 / 1e6
        lines.append(f"| ({name.replace('-', ', ')}) | " + " | ".join(cells) + f" | {fl:.2f} |")
    lines += ["", f"Width {SERVED_WIDTH} is the served model's over-arch input (16-d dense output + 10 dots); "
              f"{TRAINED_WIDTH} is what this quality run trains (64-d + 10). The seed varies the ranker stage only "
              "(negatives, DLRM init, batch order); the two-tower retriever uses the preset seed in every run. "
              "`arch trained` = the over arch read from inside `train_dlrm` (config and Linear shapes) equals the requested one. "
              "`train s` covers both stages (two-tower + sources + DLRM) in wall time on a shared machine: noisy, and the "
              "first run of a session pays cold caches."]
    return "\n".join(lines) + "\n"


def write(res: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "ranker_arch.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (out / "ranker_arch.md").write_text(render_md(res))


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=":".join(",".join(map(str, a)) for a in DEFAULT_ARCHS))
    ap.add_argument("--seeds", default=",".join(str(x) for x in range(42, 52)))
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--split-seed", type=int, default=2020)
    ap.add_argument("--widths", default=f"{SERVED_WIDTH},{TRAINED_WIDTH}", help="over-arch input widths to time")
    ap.add_argument("--rounds", type=int, default=400, help="timing rounds at 500 rows (scaled down for bigger batches)")
    ap.add_argument("--cost-only", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    archs = parse_archs(args.archs)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    t_start = time.perf_counter()
    res: dict[str, Any] = {
        "dataset": args.dataset, "split_seed": args.split_seed, "archs": [list(a) for a in archs], "seeds": seeds,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "measured": {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "runs": [], "summary": {}, "mlp_cost": [], "wall_s": 0.0,
    }
    print("MLP cost (one thread) ...", flush=True)
    res["mlp_cost"] = cost_table(archs, [int(w) for w in args.widths.split(",") if w.strip()], args.rounds)
    res["measured"]["load_avg_after_cost"] = [round(v, 2) for v in os.getloadavg()]
    if not args.cost_only:
        total = len(archs) * len(seeds)
        for i, (seed, arch) in enumerate(((s, a) for s in seeds for a in archs), 1):  # seed-major: a partial run compares archs
            print(f"[{i}/{total}] over_arch={arch} seed={seed} (elapsed {(time.perf_counter() - t_start) / 60:.1f} min)", flush=True)
            row = quality_run(arch, seed, dataset=args.dataset, split_seed=args.split_seed)
            res["runs"].append(row)
            print(f"[{i}/{total}] {row['arch']} seed {seed}: " + " ".join(f"{k} {row[k]:.4f}" for k in METRICS) +
                  f" AUC {row['ranker_valid_auc']:.4f} train {row['train_s']:.0f}s trained arch {row['trained_over_arch']} "
                  f"linears {row['trained_over_arch_linears']}", flush=True)
            res["summary"] = summarize(res["runs"], archs)
            res["paired_vs_baseline"] = paired_vs_baseline(res["runs"], archs)
            res["wall_s"] = round(time.perf_counter() - t_start, 1)
            write(res, args.out)  # after every run: an interrupted benchmark keeps what it measured
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    write(res, args.out)
    print(render_md(res))


if __name__ == "__main__":
    main()
