"""The PyTorch backend: serves every device, needs nothing but torch (the fallback everywhere)."""

from __future__ import annotations

from ..pytorch_chunked import DEFAULT_CHUNK, run_chunked
from ..reference import log_decay
from ..registry import Variant, register


class PyTorchChunk(Variant):
    name = "pytorch.chunk"
    backend = "pytorch"
    kernels = ()

    def reasons(self, problem, device, runtime=True):
        return []

    def run(self, r, w, k, v, a, b, state, *, problem, plan, cu_seqlens):
        L = log_decay(w.float(), problem.w_form)
        return run_chunked(r, L, k, v, a, b, state, scale=problem.scale, cu_seqlens=cu_seqlens, chunk=DEFAULT_CHUNK)


register(PyTorchChunk())
