"""Quality benchmark: every model and baseline on one RecBole-protocol split, one table, one run.

    python -m benchmarks.quality --dataset ml-1m            # -> benchmarks/results/quality-ml-1m.{json,md}
    python -m benchmarks.quality --dataset ml-100k
    python -m benchmarks.quality --dataset ml-1m --models pop,ease --out /tmp/x   # a subset elsewhere

Each model runs in its own fresh process (same split: same data, same seed), so its
``peak_rss_mb`` is its own ``ru_maxrss`` (which includes the loaded split: ``data_rss_mb``).
Hyper-parameters come from validation only (grid search for the baselines, early stopping for
the neural models). A model that fails (e.g. not implemented yet) is recorded under
``"missing"`` with its error; the others still run. The whole table is logged as one MLflow run.

The JSON keeps the keys other tools read: ``{"protocol": "recbole", "models": {NAME:
{"recall@10", "ndcg@10", "recall@20", "ndcg@20", "train_s", "peak_rss_mb", ...}}}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
import traceback
from pathlib import Path
from typing import Any, Mapping, Sequence

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MODELS = ("pop", "itemknn", "als", "ease", "two_tower", "two_stage")

#: Published RecBole numbers (ML-1M, this protocol) and our own earlier measurements on this copy.
REFERENCE = {
    "ml-1m": {
        "recbole_published": {"pop": [0.0699, 0.1006], "itemknn": [0.1723, 0.2389], "bpr": [0.1725, 0.2407],
                              "lightgcn": [0.1823, 0.2478], "ease": [0.2139, 0.2865]},
        "measured_on_this_copy": {"pop": [[0.077, 0.081], [0.118, 0.120]], "itemknn": [[0.172, 0.175], [0.239, 0.240]],
                                  "als": [[0.208, 0.208], [0.272, 0.274]], "ease": [[0.212, 0.214], [0.284, 0.288]]},
        "columns": ["recall@10", "ndcg@10"],
    }
}

#: Neural overrides for the benchmark (empty: the trainer's own preset, ``pipelines.train.two_tower_params``,
#: so the benchmark trains the same model the training pipeline does; early stopping on validation).
NEURAL_PARAMS: dict[str, dict[str, Any]] = {}


def run(
    *,
    dataset: str = "ml-1m",
    models: Sequence[str] = DEFAULT_MODELS,
    seed: int = 2020,
    out_dir: Path = RESULTS,
    settings: Any = None,
    model_params: Mapping[str, Mapping[str, Any]] | None = None,
    ks: Sequence[int] = (10, 20, 50),
    log_mlflow: bool = True,
    echo: Any = print,
) -> dict[str, Any]:
    """Run the benchmark and write ``quality-<dataset>.json`` and ``.md`` under ``out_dir``."""
    from core.config import load_settings
    from pipelines.evaluate import EvalReport, log_report, run_isolated
    from core.tracking import git_commit

    settings = settings or load_settings()
    params = {**NEURAL_PARAMS, **{k: dict(v) for k, v in (model_params or {}).items()}}
    threads = os.cpu_count() or 1
    results, missing, extra = [], {}, {}
    t_start = time.perf_counter()
    for name in models:
        echo(f"[{dataset}] {name} ...")
        t0 = time.perf_counter()
        try:
            result, info = run_isolated(
                name, settings=settings,
                prepare_kwargs={"source": dataset, "protocol": "recbole", "seed": seed},
                run_kwargs={"ks": tuple(ks), "seed": settings.training.seed, "params": params.get(name),
                            "tune": True, "threads": threads},
            )
        except Exception as exc:  # recorded, not hidden: the JSON says which model failed and why
            missing[name] = f"{type(exc).__name__}: {exc}"
            echo(f"[{dataset}] {name} FAILED: {missing[name][:300]}")
            echo(traceback.format_exc(limit=3))
            continue
        extra = info
        results.append(result)
        for part in result.parts:
            part.peak_rss_mb = None
            results.append(part)
        echo(f"[{dataset}] {name}: recall@10 {result.metrics['recall@10']:.4f} ndcg@10 {result.metrics['ndcg@10']:.4f} "
             f"train {result.train_s:.1f}s peak RSS {result.peak_rss_mb:.0f} MB (wall {time.perf_counter() - t0:.0f}s)")
    if not results:
        raise RuntimeError(f"every model failed: {missing}")
    report = EvalReport(dataset, "recbole", seed, extra.get("sizes", {}), sorted(set(ks)), results)
    if log_mlflow:
        log_report(report, settings=settings, run_name=f"benchmark-quality-{dataset}")
    payload: dict[str, Any] = {
        "protocol": "recbole",
        "dataset": dataset,
        "split_seed": seed,
        "sizes": report.sizes,
        "data_rss_mb": extra.get("data_rss_mb"),
        "models": {},
        "missing": missing,
        "reference": REFERENCE.get(dataset, {}),
        "mlflow_run_id": report.run_id,
        "git_commit": git_commit(settings.paths.root),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    for r in results:
        row: dict[str, Any] = {k: round(float(v), 6) for k, v in r.metrics.items()}
        row["train_s"] = round(r.train_s, 2)
        row["eval_s"] = round(r.eval_s, 2)
        row["peak_rss_mb"] = None if r.peak_rss_mb is None else round(r.peak_rss_mb, 1)
        if r.params:
            row["params"] = r.params
        if r.tuning:
            row["validation_trials"] = r.tuning
        payload["models"][r.name] = row
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"quality-{dataset}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md = ["# Quality benchmark: " + dataset, "", report.markdown(), ""]
    md.append("Peak RSS is each model's own process (fresh per model), including the loaded split "
              f"(~{payload['data_rss_mb'] or 0:.0f} MB). Rows `two_stage/source_*` are the two-stage pipeline's "
              "candidate sources evaluated alone (no training time of their own).")
    if missing:
        md += ["", "Missing (failed) models:", *[f"- {k}: {v[:300]}" for k, v in missing.items()]]
    ref = REFERENCE.get(dataset)
    if ref:
        md += ["", "Reference (Recall@10 / NDCG@10): RecBole published " +
               ", ".join(f"{k} {a:.4f}/{b:.4f}" for k, (a, b) in ref["recbole_published"].items()) +
               "; measured on this copy " +
               ", ".join(f"{k} {r[0][0]}-{r[0][1]}/{r[1][0]}-{r[1][1]}" for k, r in ref["measured_on_this_copy"].items())]
    (out_dir / f"quality-{dataset}.md").write_text("\n".join(md) + "\n")
    echo(report.markdown())
    return payload


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-1m", choices=["ml-1m", "ml-100k", "ml-latest-small"])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args(argv)
    run(dataset=args.dataset, models=[m for m in args.models.split(",") if m], seed=args.seed, out_dir=args.out,
        log_mlflow=not args.no_mlflow)


if __name__ == "__main__":
    main()
