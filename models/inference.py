"""CPU inference kernels for the request path: MLP stacks run through oneDNN or MKL, in fp32 or bf16.

Why this exists: on the serving path the ranker's MLPs score hundreds of candidates per request
and dominate its CPU cost. ``nn.Sequential(Linear, ReLU, ...)`` spends as long in the separate
ReLU pass and its temporary as in the matrix products; oneDNN's fused linear + ReLU
(``torch.ops.mkldnn._linear_pointwise``, the kernel TorchInductor emits for CPU) does both in
one pass: the same fp32 numbers ~2x faster on the Intel development machine. On CPUs with
native bf16 matrix units (Intel AMX, AVX512-BF16) bf16 weights and activations are another
~2-4x; the scores then differ from fp32 by ~1e-2 relative, which barely moves a ranking
(``tests/test_inference.py`` bounds it), so ``auto`` picks bf16 only where the hardware makes
it pay.

Which fp32 GEMM is faster depends on the CPU and the row count: oneDNN's fused op was ~2x
faster on the Intel development machine; on an AVX2 AMD EPYC MKL's ``F.linear`` (the module's
own kernel) is 1.2-2x faster at ~500-1,000 rows, about as fast from ~2K to ~8K, and oneDNN
1.2-1.5x faster past ~16K (MKL's separate ReLU pass over activations that no longer fit in
cache). So a stack times both on its own layer shapes once per process, on its first call past
a handful of rows (the serving engine's warm-up, before traffic), and runs MKL below the
measured crossover, oneDNN from it (``backend="auto"``, the default; ``onednn`` / ``mkl`` force
one).

The module reads weights from an ``nn.Linear`` list and keeps its own copies: the trained
module is left untouched (offline evaluation keeps using it in fp32).
"""
from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Literal, Sequence, get_args

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS = get_args(Precision)
#: oneDNN builds (JIT-compiles) a kernel per input shape, ~1-2 ms each: a request path whose
#: batch has a new row count every time would pay that on every call. Rows are padded up to a
#: multiple of this, so a server sees a few dozen shapes, each built once (measured here: bucketed
#: shapes run as fast as a fixed shape; ever-changing shapes ~2x slower). Below it, the next power
#: of two (a one-request batch of the user tower must not compute 256 rows).
ROW_BUCKET = 256
#: at most this many rows, an fp32 stack always runs as plain ``F.linear`` (MKL): oneDNN's per-call
#: set-up (~10 us) is then most of the time (measured on the Intel machine: 8 rows 4.8 vs 14.3 us a
#: layer); the numbers are ``nn.Linear``'s own. bf16 stays on oneDNN at every size (MKL has no
#: faster bf16 path).
SMALL_FP32_ROWS = 64
#: at most this many multiply-adds per layer call (rows x the widest layer's weights), an fp32 stack
#: given a numpy array (:meth:`LinearStack.numpy`) runs on numpy's matmul: at a micro-batch of a few
#: requests torch's per-op dispatch is most of a small tower's time (the two-tower's user tower,
#: 152 -> 32 -> 64 at one row on the AVX2 EPYC: 54 us through torch, 14 through numpy). The bound
#: is OpenBLAS's own (numpy's wheels): it runs a GEMM on one thread up to 65,536 x 4 multiply-adds,
#: so no BLAS thread pool wakes beside the worker's threads.
NUMPY_MAX_MACS = 65_536 * 4
Backend = Literal["auto", "onednn", "mkl"]
BACKENDS = get_args(Backend)
#: row counts at which ``auto`` times both fp32 backends, smallest first, until oneDNN wins: from
#: a one-request micro-batch of 500 candidates to a 64-request one
PROBE_ROWS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
#: per process, per stack shape (torch's thread count, layers' weight shapes, ReLU flags): the row
#: count from which oneDNN is the faster fp32 backend (None: never up to the largest probe).
#: Measured once, so building many stacks (tests, hot swaps) pays it once.
_ONEDNN_FROM_ROWS: dict[tuple, int | None] = {}


def native_bf16() -> bool:
    """True when this CPU multiplies bf16 matrices natively (AMX tiles or AVX512-BF16)."""
    try:
        import torch

        cpu = torch.cpu  # private helpers, present since torch 2.1; absent -> assume no
        return bool(cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported())
    except Exception:  # noqa: BLE001 - unknown build: the safe answer is fp32
        return False


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bf16`` where the CPU has native bf16 matrix units, else ``fp32``. An explicit
    ``bf16`` is kept, with a warning (once per process) where the CPU lacks those units: bf16 is
    then emulated, ~25x slower than fp32 (a 3-layer stack at 2,048 rows on an AVX2 AMD EPYC: 18.8
    against 0.77 ms), e.g. a configuration copied from an Intel AMX deployment."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16() else "fp32"
    if precision == "bf16" and not native_bf16():
        _warn_emulated_bf16()
    return precision


@functools.lru_cache(maxsize=1)
def _warn_emulated_bf16() -> None:
    log.warning("bf16 MLPs requested on a CPU without native bf16 matrix units (no AMX / AVX512-BF16): bf16 is "
                "emulated here, ~25x slower than fp32; set the precision to auto or fp32 "
                "(serving.ranker_precision for the server)")


def _fused_op():
    """oneDNN's fused linear + pointwise op, or None when this torch build lacks it."""
    try:
        import torch

        if not torch.backends.mkldnn.is_available():
            return None
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


class LinearStack:
    """``Linear -> ReLU -> ... -> Linear [-> ReLU]`` as one inference call.

    ``relu_after[j]``: whether layer ``j`` is followed by a ReLU (TorchRec's ``MLP`` applies it
    after every layer; ``OverArch`` after all but the last). Input and output are fp32 tensors
    whatever the compute precision."""

    def __init__(self, linears: Sequence["torch.nn.Linear"], relu_after: Sequence[bool], *, precision: Precision = "fp32",
                 backend: Backend = "auto") -> None:
        import torch

        if len(linears) != len(relu_after) or not linears:
            raise ValueError(f"need one relu flag per layer ({len(linears)} layers, {len(relu_after)} flags)")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
        self.precision = resolve_precision(precision)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.dtype = dtype
        self.layers = [(lin.weight.detach().to(dtype).contiguous(),
                        None if lin.bias is None else lin.bias.detach().to(dtype).contiguous(), bool(r))
                       for lin, r in zip(linears, relu_after)]
        self.in_features = int(linears[0].in_features)
        self.out_features = int(linears[-1].out_features)
        #: numpy copies for :meth:`numpy` (fp32 only; weights transposed once: ``x @ w`` row-major)
        self._np_layers = None if dtype != torch.float32 else [
            (w.numpy().T.copy(), None if b is None else b.numpy().copy(), relu) for w, b, relu in self.layers]
        self._widest = max(int(w.shape[0] * w.shape[1]) for w, _, _ in self.layers)
        self._op = _fused_op()
        if self._op is not None:  # a build may list the op but not run it on this CPU: check once
            try:
                with torch.inference_mode():
                    self._run(torch.zeros(SMALL_FP32_ROWS + 1, self.in_features), True)
            except Exception:  # noqa: BLE001
                self._op = None
        #: fp32 runs oneDNN's fused op from this many rows, MKL below (None: MKL at every size;
        #: bf16 is always oneDNN when it runs here)
        self.onednn_from_rows: int | None = None
        #: ``auto``: timed on the first call past ``SMALL_FP32_ROWS`` rows (a stack that never sees
        #: more, like the user tower at micro-batch sizes, never pays for the timing)
        self._untimed = False
        if self._op is not None:
            if dtype != torch.float32:
                self.onednn_from_rows = 0
            elif backend == "onednn":
                self.onednn_from_rows = SMALL_FP32_ROWS + 1
            elif backend == "auto":
                self._untimed = True

    @property
    def fused(self) -> bool:
        """oneDNN's fused op runs at some row count (bf16; fp32 where it measured faster)."""
        return self.onednn_from_rows is not None

    @property
    def backend(self) -> str:
        """The GEMM in use, for reports: ``onednn``, ``mkl``, ``mkl<N`` (MKL below N rows, oneDNN
        from N), or ``auto (untimed)`` before an ``auto`` stack's first call past the small-row switch."""
        if self._untimed:
            return "auto (untimed)"
        n = self.onednn_from_rows
        return "mkl" if n is None else "onednn" if n <= SMALL_FP32_ROWS + 1 else f"mkl<{n}"

    def _measured_onednn_from_rows(self) -> int | None:
        """Times this stack on both fp32 backends at growing ``PROBE_ROWS`` (once per process and
        shape, ~0.05-0.2 s) until oneDNN wins at two sizes in a row (one win alone may be a burst of other load
        on this shared machine): interleaved rounds, the best round of each. The crossover is put
        halfway (geometrically) between the last size MKL won and the first of oneDNN's run; where
        oneDNN wins from the smallest, the fixed small-row switch stays."""
        import time

        import torch

        key = (torch.get_num_threads(), *((tuple(w.shape), relu) for w, _, relu in self.layers))
        if key not in _ONEDNN_FROM_ROWS:
            last_mkl, first_onednn = None, None  # first_onednn: the first size of the current run of oneDNN wins
            with torch.inference_mode():
                for rows in PROBE_ROWS:
                    x = torch.randn(rows, self.in_features, generator=torch.Generator().manual_seed(rows))
                    best = {True: float("inf"), False: float("inf")}
                    for onednn in best:  # oneDNN builds each shape's kernel on first use: not timed
                        self._run(x, onednn)
                    for _ in range(5):
                        for onednn in best:
                            t = time.perf_counter()
                            self._run(x, onednn)
                            best[onednn] = min(best[onednn], time.perf_counter() - t)
                    if best[True] >= best[False]:
                        last_mkl, first_onednn = rows, None
                    elif first_onednn is not None:
                        break  # the second win in a row
                    else:
                        first_onednn = rows
            _ONEDNN_FROM_ROWS[key] = (None if first_onednn is None else SMALL_FP32_ROWS + 1 if last_mkl is None
                                      else int((last_mkl * first_onednn) ** 0.5))
        return _ONEDNN_FROM_ROWS[key]

    def _uses_onednn(self, rows: int) -> bool:
        if self._untimed and rows > SMALL_FP32_ROWS:
            self.onednn_from_rows = self._measured_onednn_from_rows()
            self._untimed = False
        return self.onednn_from_rows is not None and rows >= self.onednn_from_rows

    def _run(self, x: "torch.Tensor", onednn: bool) -> "torch.Tensor":
        """The stack on oneDNN's fused op (rows padded to a bucket) or on MKL (``F.linear`` + ReLU)."""
        import torch
        import torch.nn.functional as F

        rows = x.shape[0]
        pad = 0
        if onednn:
            bucket = ROW_BUCKET if rows > ROW_BUCKET else 1 << max(rows - 1, 0).bit_length()  # small: next power of 2
            pad = (-rows) % bucket
        # no-op conversions and slices skipped: each is a few us of torch dispatch, and a stack runs
        # three times per micro-batch (the fp32 MKL path needs none of them)
        h = x if x.dtype == self.dtype else x.to(self.dtype)
        if pad:
            h = torch.cat([h, h.new_zeros(pad, h.shape[1])])
        for w, b, relu in self.layers:
            if onednn:
                h = self._op(h, w, b, "relu" if relu else "none", [], "")
            else:
                h = F.linear(h, w, b)
                if relu:
                    h.relu_()
        if pad:
            h = h[:rows]
        return h if h.dtype == torch.float32 else h.float()

    def numpy(self, x: np.ndarray) -> np.ndarray:
        """The stack on a float32 ``(rows, in_features)`` numpy array, returning one: numpy's matmul
        when every layer call stays under ``NUMPY_MAX_MACS`` (fp32 only), else the torch path."""
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"expected (rows, {self.in_features}) input, got {tuple(x.shape)}")
        if self._np_layers is None or x.shape[0] * self._widest > NUMPY_MAX_MACS:
            import torch

            with torch.inference_mode():
                return self(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
        h = np.asarray(x, dtype=np.float32)
        for w, b, relu in self._np_layers:
            h = h @ w
            if b is not None:
                h += b
            if relu:
                np.maximum(h, 0.0, out=h)
        return h

    def __call__(self, x: "torch.Tensor") -> "torch.Tensor":
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"expected (rows, {self.in_features}) input, got {tuple(x.shape)}")
        if x.shape[0] == 0:
            import torch

            return torch.zeros(0, self.out_features)
        return self._run(x.contiguous(), self._uses_onednn(x.shape[0]))
