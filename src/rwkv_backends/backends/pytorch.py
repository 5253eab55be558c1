"""The PyTorch backend: serves every device, needs nothing but torch (the fallback everywhere)."""

from __future__ import annotations

import torch

from ..pytorch_chunked import (SHORT_MAX, _float32_math, run_chunked, run_chunked_backward,
                               step_decode, step_forward)
from ..reference import dlog_decay_dw, log_decay
from ..registry import Variant, register


def _dw(dL, w, L, w_form):
    """dw = dL * dL/dw. Where L = -inf (raw w past float32's exp range, about 88.7) the decay is
    exactly 0 and dL, which carries the factor e^L, is 0: dw is 0, the limit of L e^L, not 0 * inf."""
    # clampw: dL/dw = L (1 - sigmoid(w)), written as L sigmoid(-w), which keeps its digits where
    # sigmoid(w) rounds to 1 in float32 (w past about 9).
    dw = dL * (L * torch.sigmoid(-w) if w_form == "clampw" else dlog_decay_dw(w, L, w_form))
    return dw.masked_fill_(L == float("-inf"), 0.0) if w_form == "raw" else dw


class _LogDecay(torch.autograd.Function):
    """L = log_decay(w) with _dw as its backward (autograd's own through -exp(w) gives NaN at L = -inf)."""

    @staticmethod
    def forward(ctx, w, w_form):
        L = log_decay(w, w_form)
        ctx.save_for_backward(w, L)
        ctx.w_form = w_form
        return L

    @staticmethod
    def backward(ctx, dL):
        w, L = ctx.saved_tensors
        return _dw(dL, w, L, ctx.w_form), None


_FULL = (torch.float32, torch.float64)


class PyTorchChunk(Variant):
    name = "pytorch.chunk"
    backend = "pytorch"
    kernels = ()
    state_dtypes = ("float32", "bfloat16", "float16")   # computes in float32; wkv7 casts the state back

    def reasons(self, problem, device, runtime=True):
        return []

    @staticmethod
    def path(problem) -> str:
        """"decode" (one token, no gradients), "step" (sequences of at most SHORT_MAX tokens, step
        by step) or "chunk"; packed sequences choose per length class."""
        if problem.varlen:
            return "chunk"
        if problem.T > SHORT_MAX:
            return "chunk"
        return "decode" if problem.T == 1 and not problem.needs_grad else "step"

    def run(self, r, w, k, v, a, b, state, *, problem, plan, cu_seqlens):
        path = self.path(problem)
        if path != "chunk" and not problem.needs_grad:
            # No graph to build: the log-decay and the steps run directly.
            L = log_decay(w if w.dtype in _FULL else w.float(), problem.w_form)
            if state is None:
                state = k.new_zeros(problem.N, problem.H, problem.K, problem.V,
                                    dtype=torch.float64 if k.dtype == torch.float64 else torch.float32)
            if torch.is_autocast_enabled(k.device.type):
                with _float32_math(k.device):
                    return self._run_short(path, r, L, k, v, a, b, state, problem.scale)
            return self._run_short(path, r, L, k, v, a, b, state, problem.scale)
        L = _LogDecay.apply(w.float(), problem.w_form)
        state = state.float() if state is not None else None
        return run_chunked(r, L, k, v, a, b, state, scale=problem.scale, cu_seqlens=cu_seqlens)

    @staticmethod
    def _run_short(path, r, L, k, v, a, b, state, scale):
        if path == "decode":
            return step_decode(r, L, k, v, a, b, state, scale)
        o, final, _ = step_forward(r, L, k, v, a, b, state, scale)
        return o, final

    def backward(self, r, w, k, v, a, b, state, do, dstate, *, problem, plan, cu_seqlens):
        w32 = w.float()
        L = log_decay(w32, problem.w_form)
        state32 = state.float() if state is not None else None
        dr, dL, dk, dv, da, db, dst = run_chunked_backward(
            r, L, k, v, a, b, state32, do, dstate.float(), scale=problem.scale, cu_seqlens=cu_seqlens)
        dw = _dw(dL.float(), w32, L, problem.w_form)
        grads = [g.to(x.dtype) for g, x in zip((dr, dw, dk, dv, da, db), (r, w, k, v, a, b))]
        return (*grads, dst.to(state.dtype) if state is not None else None)


register(PyTorchChunk())
