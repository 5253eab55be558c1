"""`wkv7` as torch.library custom ops, so torch.compile traces it as one node, forward and
backward, with no graph break. This follows PyTorch's guidance for Triton kernels:
- each op's real implementation calls the dispatcher;
- a fake implementation gives the output shapes;
- autograd is registered with a second op for the backward, which calls the chosen variant's own
  backward (no autograd graph is built inside an op).

`rwkv_backends.wkv7` routes through these ops while torch.compile traces and for meta tensors (the
fake implementation infers the shapes), and calls the dispatcher directly in eager mode (lower
overhead).

A bad argument raises the same ValueError/TypeError under torch.compile as in eager. An exception
raised while dynamo traces surfaces as torch._dynamo.exc.Unsupported or TorchRuntimeError instead,
so a rejected call traces into a node that raises eager's error when the graph runs:
wkv7_argument_error for an argument of the wrong Python type (the op's schema cannot carry it),
wkv7_rejected for shapes, dtypes or devices that the checks refuse.
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
    from .problem import validate
    p = validate(r, w, k, v, a, b, state, w_form=w_form, scale=scale, cu_seqlens=cu_seqlens,
                 output_final_state=True)
    return v.new_empty(p.B, p.T, p.H, p.V), k.new_empty(p.N, p.H, p.K, p.V, dtype=p.state_dtype)


@torch.library.custom_op("rwkv_backends::wkv7_rejected", mutates_args=())
def wkv7_rejected(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Optional[Tensor],
                  cu_seqlens: Optional[Tensor], w_form: str, scale: float,
                  backend: Optional[str]) -> tuple[Tensor, Tensor]:
    """A call that the checks refused while torch.compile traced: they raise again when the graph
    runs (the graph is guarded on the metadata that made them fail)."""
    from .problem import validate
    validate(r, w, k, v, a, b, state, w_form=w_form, scale=scale, cu_seqlens=cu_seqlens, output_final_state=True)
    raise RuntimeError("wkv7: the argument checks refused this call while torch.compile traced it, "
                       "and pass on the tensors it runs with; call rwkv_backends.wkv7 outside torch.compile")


@wkv7_rejected.register_fake
def _(r, w, k, v, a, b, state, cu_seqlens, w_form, scale, backend):
    """Outputs shaped as wkv7's would be, as far as the arguments' shapes allow."""
    o = v.new_empty(v.shape)
    if state is not None:
        return o, state.new_empty(state.shape)
    if k.dim() == 4 and v.dim() == 4:
        N = _n_sequences(k, None, cu_seqlens if cu_seqlens is not None and cu_seqlens.dim() == 1 else None)
        return o, k.new_empty(N, k.shape[2], k.shape[3], v.shape[-1], dtype=torch.float32)
    return o, k.new_empty(0, dtype=torch.float32)


_ERRORS = {"TypeError": TypeError, "ValueError": ValueError}


@torch.library.custom_op("rwkv_backends::wkv7_argument_error", mutates_args=())
def wkv7_argument_error(o_like: Tensor, state_like: Tensor, error: str, message: str) -> tuple[Tensor, Tensor]:
    """Raises `error(message)`: a wkv7 call that torch.compile traced with an argument of the
    wrong Python type fails when the graph runs, as it does in eager."""
    raise _ERRORS[error](message)


@wkv7_argument_error.register_fake
def _(o_like, state_like, error, message):
    return torch.empty_like(o_like), torch.empty_like(state_like)


# The outputs of a rejected call may go unused: the graph keeps its node all the same, so it raises.
torch.fx.node.has_side_effect(torch.ops.rwkv_backends.wkv7_argument_error.default)
torch.fx.node.has_side_effect(torch.ops.rwkv_backends.wkv7_rejected.default)


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
    if problem.B == 0 or problem.T == 0:
        out = [torch.zeros_like(x, memory_format=torch.contiguous_format) for x in (r, w, k, v, a, b)]
        out.append(dstate.to(state.dtype, copy=True) if state is not None else k.new_empty(0, dtype=torch.float32))
        return out
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
