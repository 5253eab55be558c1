"""`wkv7` as torch.library custom ops, so torch.compile traces it as one node, forward and
backward, with no graph break. This follows PyTorch's guidance for Triton kernels:
- each op's real implementation calls the dispatcher;
- a fake implementation gives the output shapes;
- autograd is registered with a second op for the backward, which calls the chosen variant's own
  backward (no autograd graph is built inside an op).

`rwkv_backends.wkv7` routes through these ops while torch.compile traces and calls the dispatcher
directly in eager mode (lower overhead).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor


def _n_sequences(k, state, cu_seqlens):
    if state is not None:
        return state.shape[0]
    return cu_seqlens.shape[0] - 1 if cu_seqlens is not None else k.shape[0]


@torch.library.custom_op("rwkv_backends::wkv7", mutates_args=())
def wkv7_op(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Optional[Tensor],
            cu_seqlens: Optional[Tensor], w_form: str, scale: float, backend: Optional[str]) -> tuple[Tensor, Tensor]:
    from .api import eager_wkv7
    with torch.no_grad():
        return eager_wkv7(r, w, k, v, a, b, state, w_form=w_form, scale=scale, cu_seqlens=cu_seqlens,
                          output_final_state=True, backend=backend)


@wkv7_op.register_fake
def _(r, w, k, v, a, b, state, cu_seqlens, w_form, scale, backend):
    B, T, H, K = k.shape
    N = _n_sequences(k, state, cu_seqlens)
    state_dtype = state.dtype if state is not None else torch.float32
    return v.new_empty(B, T, H, v.shape[-1]), k.new_empty(N, H, K, v.shape[-1], dtype=state_dtype)


@torch.library.custom_op("rwkv_backends::wkv7_backward", mutates_args=())
def wkv7_backward_op(do: Tensor, dstate: Tensor, r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                     state: Optional[Tensor], cu_seqlens: Optional[Tensor], w_form: str, scale: float,
                     backend: Optional[str]) -> list[Tensor]:
    """Gradients of r, w, k, v, a, b and state (an empty tensor when there is no state)."""
    from .device import detect
    from .problem import validate
    from .registry import plan as make_plan
    problem = validate(r, w, k, v, a, b, state, w_form=w_form, scale=scale, cu_seqlens=cu_seqlens,
                       output_final_state=True)
    problem = dataclasses.replace(problem, needs_grad=True)
    plan = make_plan(problem, detect(k.device), backend)
    grads = plan.variant.backward(r, w, k, v, a, b, state, do, dstate, problem=problem, plan=plan,
                                  cu_seqlens=cu_seqlens)
    out = [g.contiguous() for g in grads[:6]]
    out.append(grads[6].to(state.dtype) if state is not None else k.new_empty(0, dtype=torch.float32))
    return out


@wkv7_backward_op.register_fake
def _(do, dstate, r, w, k, v, a, b, state, cu_seqlens, w_form, scale, backend):
    out = [torch.empty_like(x, memory_format=torch.contiguous_format) for x in (r, w, k, v, a, b)]
    out.append(torch.empty_like(state) if state is not None else k.new_empty(0, dtype=torch.float32))
    return out


def _setup_context(ctx, inputs, output):
    r, w, k, v, a, b, state, cu_seqlens, w_form, scale, backend = inputs
    ctx.save_for_backward(r, w, k, v, a, b, state, cu_seqlens)
    ctx.opts = (w_form, scale, backend)


def _backward(ctx, do, dstate):
    r, w, k, v, a, b, state, cu_seqlens = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(v)
    if dstate is None:
        dstate = k.new_zeros(_n_sequences(k, state, cu_seqlens), k.shape[2], k.shape[3], v.shape[-1],
                             dtype=state.dtype if state is not None else torch.float32)
    grads = wkv7_backward_op(do, dstate, r, w, k, v, a, b, state, cu_seqlens, *ctx.opts)
    return (*grads[:6], grads[6] if state is not None else None, None, None, None, None)


wkv7_op.register_autograd(_backward, setup_context=_setup_context)
