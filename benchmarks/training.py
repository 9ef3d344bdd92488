"""Training throughput: DLRM on TorchRec's fused CPU path vs the same model on plain nn.EmbeddingBag.

Same architecture (``models.dlrm.DLRMRanker``), same dims, same batches; the only difference is
the embedding path: ``fused`` = ``FusedEmbeddingBagCollection`` (fbgemm table-batched embeddings,
row-wise Adagrad applied inside backward), ``plain`` = TorchRec's ``EmbeddingBagCollection`` of
``nn.EmbeddingBag`` modules with a dense ``torch.optim.Adagrad`` over the tables (what a plain
PyTorch implementation does). Batches are pre-built so the number is the model's step rate,
not feature assembly. The machine is shared, so each variant is run ``repeats`` times,
interleaved, and the median and spread are reported.

    python -m benchmarks.training [--repeats 3] [--steps 60]
Writes ``benchmarks/results/training.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "training.json"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_batches(*, n_users: int, n_items: int, n_categories: int, n_dense: int, batch_size: int, n_batches: int,
                 history_len: int, seed: int):
    """Synthetic batches with realistic shapes: power-law ids, a history bag and 1-3 categories per row."""
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from models.dlrm import SPARSE_FEATURES

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        b = batch_size
        users = rng.zipf(1.3, b) % n_users
        items = rng.zipf(1.3, b) % n_items
        hist_len = rng.integers(1, history_len + 1, b)
        hist = rng.zipf(1.3, int(hist_len.sum())) % n_items
        cat_len = rng.integers(1, 4, b)
        cats = rng.integers(0, n_categories, int(cat_len.sum()))
        parts = {"user_id": (users, np.ones(b, np.int64)), "item_id": (items, np.ones(b, np.int64)),
                 "user_hist": (hist, hist_len), "item_cats": (cats, cat_len)}
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=list(SPARSE_FEATURES),
            values=torch.from_numpy(np.concatenate([parts[k][0] for k in SPARSE_FEATURES]).astype(np.int64)),
            lengths=torch.from_numpy(np.concatenate([parts[k][1] for k in SPARSE_FEATURES]).astype(np.int64)))
        dense = torch.randn(b, n_dense)
        labels = torch.from_numpy((rng.random(b) < 0.2).astype(np.float32))
        out.append((dense, kjt, labels))
    return out


def run_variant(embeddings: str, batches, config, *, warmup: int = 5, lr: float = 1e-3, embedding_lr: float = 0.05) -> float:
    """Samples per second of forward + backward + optimizer over ``batches`` (after ``warmup`` steps)."""
    import torch

    from models.dlrm import DLRMTrainWrapper, build_ranker

    ranker = build_ranker(config, embeddings=embeddings, embedding_lr=embedding_lr, seed=0)
    model = DLRMTrainWrapper(ranker)
    dense_opt = torch.optim.Adam(ranker.dense_parameters() if embeddings == "fused" else
                                 [p for n, p in ranker.named_parameters() if ".embedding_bag_collection." not in n], lr=lr)
    emb_opt = None
    if embeddings == "plain":
        emb_opt = torch.optim.Adagrad([p for n, p in ranker.named_parameters() if ".embedding_bag_collection." in n],
                                      lr=embedding_lr)
    n = 0
    t0 = 0.0
    for step, (dense, kjt, labels) in enumerate(batches):
        if step == warmup:
            t0 = time.perf_counter()
            n = 0
        loss, _ = model(dense, kjt, labels)
        dense_opt.zero_grad(set_to_none=True)
        if emb_opt is not None:
            emb_opt.zero_grad(set_to_none=True)
        loss.backward()
        dense_opt.step()
        if emb_opt is not None:
            emb_opt.step()
        n += len(labels)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    import torch

    from models.dlrm import DLRMConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = DLRMConfig(n_users=args.users, n_items=args.items, n_categories=20, extra_dense=("s1", "s2", "s3", "s4", "s5", "s6", "s7"),
                        embedding_dim=args.dim, dense_arch=(128, args.dim), over_arch=(256, 128, 1))
    batches = make_batches(n_users=args.users, n_items=args.items, n_categories=20, n_dense=len(config.dense_names),
                           batch_size=args.batch_size, n_batches=args.steps + 5, history_len=50, seed=0)
    runs: dict[str, list[float]] = {"fused": [], "plain": []}
    for r in range(args.repeats):
        for variant in ("fused", "plain"):  # interleaved, so load changes hit both alike
            sps = run_variant(variant, batches, config)
            runs[variant].append(sps)
            print(f"repeat {r + 1}/{args.repeats} {variant:>5}: {sps:,.0f} samples/s", flush=True)
    fused, plain = statistics.median(runs["fused"]), statistics.median(runs["plain"])
    ratios = [f / p for f, p in zip(runs["fused"], runs["plain"])]
    result = {
        "fused_samples_per_s": round(fused, 1),
        "plain_samples_per_s": round(plain, 1),
        "ratio": round(fused / plain, 2),
        "ratio_per_repeat": [round(x, 2) for x in ratios],
        "fused_runs": [round(x, 1) for x in runs["fused"]],
        "plain_runs": [round(x, 1) for x in runs["plain"]],
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "setup": {"batch_size": args.batch_size, "embedding_dim": args.dim, "users": args.users, "items": args.items,
                  "history_len_max": 50, "steps_timed": args.steps, "threads": args.threads, "repeats": args.repeats,
                  "model": "torchrec DLRM, dense (128, d), over (256, 128, 1), 4 sparse features, 13 dense",
                  "fused": "FusedEmbeddingBagCollection + RowWiseAdagrad in backward; Adam on dense",
                  "plain": "EmbeddingBagCollection (nn.EmbeddingBag) + torch.optim.Adagrad on tables; Adam on dense",
                  "python": platform.python_version(), "torch": torch.__version__,
                  "note": "2 shared cores; other engineers' jobs were running, see the per-repeat spread"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("fused_samples_per_s", "plain_samples_per_s", "ratio", "peak_rss_mb")}))
    return result


if __name__ == "__main__":
    main()
