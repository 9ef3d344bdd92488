"""Inference kernels of the request path (models/inference.py) and the ranker's compute precisions."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mlp(sizes, *, seed=0, last_relu=False):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers = []
    for j, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if j < len(sizes) - 2 or last_relu:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


@pytest.mark.parametrize("backend", ["auto", "onednn", "mkl"])
@pytest.mark.parametrize("rows", [0, 1, 64, 65, 255, 256, 700])
def test_fp32_stack_equals_the_torch_module(rows, backend):
    """fp32 on either GEMM (MKL at a few rows; above, oneDNN's fused linear+ReLU or MKL, whichever
    ``auto`` measured faster) is the module's own arithmetic, at any row count (oneDNN's rows are
    padded to a bucket internally and the padding never leaks into the answer)."""
    import torch
    from torch import nn

    from models.inference import LinearStack

    mlp = _mlp([11, 32, 16, 1])
    stack = LinearStack([m for m in mlp if isinstance(m, nn.Linear)], [True, True, False], precision="fp32", backend=backend)
    assert stack.backend in ("onednn", "mkl") and (backend == "auto" or stack.backend == backend or not stack.fused)
    x = torch.randn(rows, 11, generator=torch.Generator().manual_seed(rows))
    with torch.inference_mode():
        want = mlp(x)
        got = stack(x)
    assert got.shape == (rows, 1) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bf16_stack_is_close_and_relu_flags_are_respected():
    import torch
    from torch import nn

    from models.inference import LinearStack

    mlp = _mlp([26, 64, 32], last_relu=True)
    lin = [m for m in mlp if isinstance(m, nn.Linear)]
    x = torch.randn(300, 26, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = mlp(x)
        got = LinearStack(lin, [True, True], precision="bf16")(x)
        no_last_relu = LinearStack(lin, [True, False], precision="fp32")(x)
    assert got.dtype == torch.float32
    assert (got >= 0).all()  # the last layer's ReLU ran
    assert (no_last_relu < 0).any()  # and is skipped when flagged off
    rel = (got - want).abs().max() / want.abs().max()
    assert rel < 0.03, f"bf16 relative error {rel:.4f}"


def test_auto_backend_keeps_the_fp32_gemm_measured_faster_once_per_shape(monkeypatch):
    """``auto`` times both GEMMs on the stack's own shapes and keeps the faster; the answer is kept
    per process and shape, so a second stack of the same shapes (a hot swap) is not timed again.
    The backends are made unequal by a delay, so the choice does not depend on this machine."""
    import time

    import torch
    from torch import nn

    from models import inference

    if inference._fused_op() is None:
        pytest.skip("this torch build has no oneDNN fused linear op")
    calls = {"onednn": 0, "mkl": 0}
    slow = {"name": "mkl"}
    run = inference.LinearStack._run

    def timed_run(self, x, op):
        name = "mkl" if op is None else "onednn"
        calls[name] += 1
        if name == slow["name"] and x.shape[0] in inference.PROBE_ROWS:
            time.sleep(0.002)
        return run(self, x, op)

    monkeypatch.setattr(inference.LinearStack, "_run", timed_run)
    monkeypatch.setattr(inference, "_ONEDNN_FASTER", {})
    lin = [m for m in _mlp([13, 24, 1]) if isinstance(m, nn.Linear)]
    assert inference.LinearStack(lin, [True, False], precision="fp32").backend == "onednn"
    probed = dict(calls)
    assert probed["mkl"] >= 5 * len(inference.PROBE_ROWS)
    assert inference.LinearStack(lin, [True, False], precision="fp32").backend == "onednn"
    assert calls["mkl"] == probed["mkl"]  # measured once for this shape
    slow["name"] = "onednn"
    other = [m for m in _mlp([13, 40, 1]) if isinstance(m, nn.Linear)]
    stack = inference.LinearStack(other, [True, False], precision="fp32")
    assert stack.backend == "mkl" and not stack.fused
    x = torch.randn(700, 13, generator=torch.Generator().manual_seed(3))
    before = calls["onednn"]
    with torch.inference_mode():
        stack(x)
    assert calls["onednn"] == before  # above the small-row switch too
    # bf16 is not switched by the fp32 measurement: it stays on oneDNN wherever oneDNN runs it
    w = other[0].weight.detach().to(torch.bfloat16)
    try:
        inference._fused_op()(torch.zeros(65, 13, dtype=torch.bfloat16), w, None, "relu", [], "")
        bf16_runs = True
    except RuntimeError:
        bf16_runs = False
    assert inference.LinearStack(other, [True, False], precision="bf16").fused == bf16_runs


def test_precision_names_are_checked():
    from models.inference import LinearStack, native_bf16, resolve_precision

    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("auto") == ("bf16" if native_bf16() else "fp32")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("int4")
    with pytest.raises(ValueError, match="one relu flag per layer"):
        LinearStack([], [], precision="fp32")
    with pytest.raises(ValueError, match="backend must be one of"):
        LinearStack([_mlp([3, 1])[0]], [False], precision="fp32", backend="cublas")


def test_bf16_ranker_ranks_like_fp32():
    """The serving ranker in bf16 must order candidates like the fp32 model it was evaluated as:
    per request, the top-10 of 100 candidates overlaps almost entirely and scores stay close."""
    from datetime import date

    from core.synthetic import generate
    from models.base import InteractionData
    from models.dlrm import RankingFeatures, examples_from_ratings, train_dlrm

    ds = generate(n_users=200, n_items=150, n_events=15_000, n_days=10, shift_date=date(2024, 1, 20), seed=5)
    data = InteractionData.from_frame(ds.events.drop_duplicates(["user_id", "item_id"]))
    feats = RankingFeatures.build(data, items_frame=ds.items, history_len=20)
    ex = examples_from_ratings(data, positive_min_rating=None, negatives_per_positive=3, seed=1)
    valid = np.random.default_rng(2).random(len(ex)) < 0.25
    res = train_dlrm(feats, ex.subset(np.flatnonzero(~valid)), ex.subset(np.flatnonzero(valid)), embedding_dim=16,
                     dense_arch=(32, 16), over_arch=(64, 32, 1), epochs=1, batch_size=256, seed=0, progress=False)
    fp32 = res.scorer
    assert fp32.precision == "fp32"
    users = np.arange(20)
    cand = np.tile(np.arange(100), len(users))
    req = np.repeat(np.arange(len(users)), 100)
    want = fp32.score(users[req], cand, request_of_row=req, request_users=users).reshape(len(users), 100)
    fp32.set_precision("bf16")
    got = fp32.score(users[req], cand, request_of_row=req, request_users=users).reshape(len(users), 100)
    fp32.set_precision("fp32")
    np.testing.assert_array_equal(fp32.score(users[req], cand, request_of_row=req, request_users=users).reshape(len(users), 100), want)
    assert np.abs(got - want).max() < 0.02
    overlap = [len(set(np.argsort(-w)[:10]) & set(np.argsort(-g)[:10])) / 10 for w, g in zip(want, got)]
    assert np.mean(overlap) >= 0.9, overlap


def test_an_op_that_cannot_run_here_falls_back_to_plain_linear(monkeypatch):
    """A torch build may list oneDNN's fused op without being able to run it on this CPU: the
    start-up probe (past the small-row switch, so the op itself is called) notices and every row
    count then runs on ``F.linear``."""
    import torch
    from torch import nn

    from models import inference

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this CPU")

    monkeypatch.setattr(inference, "_fused_op", lambda: broken)
    mlp = _mlp([11, 32, 1])
    stack = inference.LinearStack([m for m in mlp if isinstance(m, nn.Linear)], [True, False], precision="fp32")
    assert not stack.fused
    x = torch.randn(300, 11, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(stack(x), mlp(x), rtol=0, atol=0)
