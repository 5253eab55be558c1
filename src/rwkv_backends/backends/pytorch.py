"""The PyTorch backend: serves every device, needs nothing but torch (the fallback everywhere)."""

from __future__ import annotations

from ..pytorch_chunked import DEFAULT_CHUNK, run_chunked, run_chunked_backward
from ..reference import dlog_decay_dw, log_decay
from ..registry import Variant, register


class PyTorchChunk(Variant):
    name = "pytorch.chunk"
    backend = "pytorch"
    kernels = ()
    state_dtypes = ("float32", "bfloat16", "float16")   # computes in float32; wkv7 casts the state back

    def reasons(self, problem, device, runtime=True):
        return []

    def run(self, r, w, k, v, a, b, state, *, problem, plan, cu_seqlens):
        L = log_decay(w.float(), problem.w_form)
        state = state.float() if state is not None else None
        return run_chunked(r, L, k, v, a, b, state, scale=problem.scale, cu_seqlens=cu_seqlens, chunk=DEFAULT_CHUNK)

    def backward(self, r, w, k, v, a, b, state, do, dstate, *, problem, plan, cu_seqlens):
        w32 = w.float()
        L = log_decay(w32, problem.w_form)
        state32 = state.float() if state is not None else None
        dr, dL, dk, dv, da, db, dst = run_chunked_backward(
            r, L, k, v, a, b, state32, do, dstate.float(), scale=problem.scale, cu_seqlens=cu_seqlens,
            chunk=DEFAULT_CHUNK)
        dw = dL.float() * dlog_decay_dw(w32, L, problem.w_form)
        grads = [g.to(x.dtype) for g, x in zip((dr, dw, dk, dv, da, db), (r, w, k, v, a, b))]
        return (*grads, dst.to(state.dtype) if state is not None else None)


register(PyTorchChunk())
