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
    x = torch.randn(rows, 11, generator=torch.Generator().manual_seed(rows))
    with torch.inference_mode():
        want = mlp(x)
        got = stack(x)
    if backend == "auto":  # timed on the first call past the small-row switch
        assert (stack.backend == "auto (untimed)") == (rows <= 64 and stack._op is not None)
    else:
        assert stack.backend == backend or not stack.fused
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


def test_auto_backend_runs_each_row_count_on_the_gemm_measured_faster_there(monkeypatch):
    """``auto`` times both GEMMs on the stack's own shapes at growing row counts and runs MKL below
    the crossover, oneDNN from it; the answer is kept per process and shape, so a second stack of
    the same shapes (a hot swap) is not timed again. The GEMMs are made unequal by a delay, so
    the choice does not depend on this machine."""
    import time

    import torch
    from torch import nn

    from models import inference

    if inference._fused_op() is None:
        pytest.skip("this torch build has no oneDNN fused linear op")
    calls = {True: 0, False: 0}
    mkl_slow_at: set[int] = set()  # probe sizes where MKL is made slower; at the others oneDNN is
    run = inference.LinearStack._run

    def timed_run(self, x, onednn):
        calls[onednn] += 1
        rows = x.shape[0]
        if rows in inference.PROBE_ROWS and onednn != (rows in mkl_slow_at):
            time.sleep(0.003)
        return run(self, x, onednn)

    def stack(hidden, precision="fp32"):
        """A stack after its first call past the small-row switch (which times an ``auto`` stack)."""
        lin = [m for m in _mlp([13, hidden, 1]) if isinstance(m, nn.Linear)]
        out = inference.LinearStack(lin, [True, False], precision=precision)
        with torch.inference_mode():
            out(torch.zeros(inference.SMALL_FP32_ROWS + 1, 13))
        return out

    monkeypatch.setattr(inference.LinearStack, "_run", timed_run)
    monkeypatch.setattr(inference, "_ONEDNN_FROM_ROWS", {})
    # MKL slower from the smallest probe: oneDNN past the fixed small-row switch, as before
    mkl_slow_at.update(inference.PROBE_ROWS)
    first = stack(24)
    assert first.backend == "onednn" and first.onednn_from_rows == inference.SMALL_FP32_ROWS + 1
    probed = dict(calls)
    # measured once per shape: a second stack only runs the op's start-up check and its own call
    assert stack(24).onednn_from_rows == first.onednn_from_rows and calls == {True: probed[True] + 2, False: probed[False]}
    # nothing is timed before a call past the small-row switch
    small = inference.LinearStack([m for m in _mlp([13, 52, 1]) if isinstance(m, nn.Linear)], [True, False])
    before = dict(calls)
    with torch.inference_mode():
        small(torch.zeros(inference.SMALL_FP32_ROWS, 13))
    assert small.backend == "auto (untimed)" and calls == {True: before[True], False: before[False] + 1}
    # oneDNN slower everywhere: MKL at every row count
    mkl_slow_at.clear()
    everywhere = stack(40)
    assert everywhere.backend == "mkl" and not everywhere.fused and everywhere.onednn_from_rows is None
    # one oneDNN win alone (a burst of other load during MKL's turn) does not move the crossover
    mkl_slow_at.add(1024)
    assert stack(44).onednn_from_rows is None
    # MKL slower from 4096 rows: the crossover between 2048 and 4096, each call on its side of it
    mkl_slow_at.clear()
    mkl_slow_at.update(r for r in inference.PROBE_ROWS if r >= 4096)
    mixed = stack(48)
    assert mixed.onednn_from_rows == int((2048 * 4096) ** 0.5) and mixed.backend == f"mkl<{mixed.onednn_from_rows}"
    with torch.inference_mode():
        for rows, on_onednn in ((700, False), (3000, True)):
            x = torch.randn(rows, 13, generator=torch.Generator().manual_seed(rows))
            before = dict(calls)
            torch.testing.assert_close(mixed(x), torch.relu(x @ mixed.layers[0][0].T + mixed.layers[0][1]) @ mixed.layers[1][0].T
                                       + mixed.layers[1][1], rtol=1e-5, atol=1e-5)
            assert calls[on_onednn] == before[on_onednn] + 1 and calls[not on_onednn] == before[not on_onednn]
    # bf16 is not switched by the fp32 measurement: oneDNN at every size wherever oneDNN runs it
    w = torch.zeros(4, 13, dtype=torch.bfloat16)
    try:
        inference._fused_op()(torch.zeros(65, 13, dtype=torch.bfloat16), w, None, "relu", [], "")
        bf16_runs = True
    except RuntimeError:
        bf16_runs = False
    assert stack(40, "bf16").onednn_from_rows == (0 if bf16_runs else None)


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


def test_explicit_bf16_without_native_units_is_kept_and_warned_once(monkeypatch, caplog):
    """bf16 on a CPU without AMX / AVX512-BF16 is emulated (~25x slower than fp32 on the AVX2 AMD
    machine): an explicit request is honoured, but the log says so, once per process."""
    import logging

    from models import inference

    monkeypatch.setattr(inference, "native_bf16", lambda: False)
    inference._warn_emulated_bf16.cache_clear()
    with caplog.at_level(logging.WARNING, logger="models.inference"):
        assert inference.resolve_precision("bf16") == "bf16"
        assert inference.resolve_precision("bf16") == "bf16"
        assert inference.resolve_precision("auto") == "fp32"
    warned = [r for r in caplog.records if "emulated" in r.getMessage()]
    assert len(warned) == 1 and "serving.ranker_precision" in warned[0].getMessage()
    inference._warn_emulated_bf16.cache_clear()
    monkeypatch.setattr(inference, "native_bf16", lambda: True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="models.inference"):
        assert inference.resolve_precision("bf16") == "bf16"
    assert not caplog.records


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


@pytest.mark.parametrize("rows", [1, 3, 16, 300])
def test_numpy_entry_equals_the_module_and_leaves_numpy_only_below_the_bound(rows, monkeypatch):
    """``LinearStack.numpy``: numpy's matmul for small fp32 calls (a micro-batch's user tower), the
    module's numbers within float32 rounding; past ``NUMPY_MAX_MACS`` per layer call it runs the
    torch path (numpy's BLAS would thread it); wrong widths are refused."""
    import torch
    from torch import nn

    import models.inference as inference
    from models.inference import NUMPY_MAX_MACS, LinearStack

    mlp = _mlp([152, 32, 64])
    stack = LinearStack([m for m in mlp if isinstance(m, nn.Linear)], [True, False], precision="fp32",
                        backend="mkl")  # no backend timing: the only torch call is the one under test
    x = np.random.default_rng(rows).standard_normal((rows, 152)).astype(np.float32)
    with torch.inference_mode():
        want = mlp(torch.from_numpy(x)).numpy()
    got = stack.numpy(x)
    assert got.dtype == np.float32 and got.shape == (rows, 64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    on_numpy = rows * 152 * 32 <= NUMPY_MAX_MACS
    calls = []
    monkeypatch.setattr(inference.LinearStack, "_run", lambda self, t, onednn: calls.append(len(t)) or
                        torch.from_numpy(want.copy()))
    stack.numpy(x)
    assert calls == ([] if on_numpy else [rows]), "numpy below the bound, torch above it"
    assert (rows == 300) != on_numpy  # both sides of the bound are exercised
    with pytest.raises(ValueError, match="expected"):
        stack.numpy(x[:, :10])
