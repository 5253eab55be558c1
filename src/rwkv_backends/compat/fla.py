"""fla-core 0.6.0's RWKV-7 ops (`fla.ops.rwkv7`), same signatures, w = log-decay."""

from __future__ import annotations

from ..api import wkv7
from ._common import default_scale, float_state, reject


def chunk_rwkv7(r, w, k, v, a, b, scale=1.0, initial_state=None, output_final_state=False, cu_seqlens=None,
                cu_seqlens_cpu=None, safe_gate=False, chunk_size=None, disable_recompute=False, cp_context=None,
                lower_bound=None):
    """fla-core's chunk_rwkv7. `cu_seqlens_cpu`, `safe_gate`, `chunk_size`, `disable_recompute` and
    `lower_bound` select fla's own kernels and are accepted without effect on the result."""
    reject("cp_context", cp_context is not None, "context parallelism is not supported")
    o, s = wkv7(r, w, k, v, a, b, float_state(initial_state), w_form="log", scale=scale, cu_seqlens=cu_seqlens,
                output_final_state=output_final_state)
    return o, s


def fused_recurrent_rwkv7(r, w, k, v, a, b, scale=None, initial_state=None, output_final_state=True,
                          cu_seqlens=None):
    """fla-core's fused_recurrent_rwkv7: the default scale is K^-0.5."""
    o, s = wkv7(r, w, k, v, a, b, float_state(initial_state), w_form="log", scale=default_scale(scale, k),
                cu_seqlens=cu_seqlens, output_final_state=output_final_state)
    return o, s
