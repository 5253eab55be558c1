"""`wkv7` as torch.library custom ops, forward and backward, so torch.compile traces it as one node
each way, with no graph break. This follows PyTorch's guidance for Triton kernels:
- each op's real implementation calls the dispatcher (dispatch.py);
- a fake implementation gives the output shapes;
- autograd is registered (register_autograd with setup_context) with a second op for the
  backward; no autograd graph is built inside an op.

One autograd path: with `training`, the forward op runs the planned variant's training forward
(registry.Variant.train_forward) and returns, beside o and the final state, what its backward
keeps, as registry.KEPT_SLOTS 1-D float32 tensors (empty where the plan keeps nothing). The
backward op takes them, so no forward runs in the backward, eager or compiled. Their sizes depend
on the plan, so the fake implementation gives them sizes of their own (unbacked symbols), and the
backward views them again by the plan (kernels/training.py's kept_layout for the Triton variants).

`rwkv_backends.wkv7` routes through the forward op while torch.compile traces, for meta tensors
(the fake implementation infers the shapes), and in eager training where the variant keeps what
its backward needs; eager calls without gradients call the dispatcher directly (lower overhead).

A bad argument raises the same ValueError/TypeError under torch.compile as in eager. An exception
raised while dynamo traces surfaces as torch._dynamo.exc.Unsupported or TorchRuntimeError instead,
so a rejected call traces into a node that raises eager's error when the graph runs:
wkv7_argument_error for an argument of the wrong Python type (the op's schema cannot carry it),
wkv7_rejected for shapes, dtypes or devices that the checks refuse.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .dispatch import flat_kept, n_sequences, plan_call, run, run_backward, run_training
from .problem import validate
from .registry import KEPT_SLOTS


@torch.library.custom_op("rwkv_backends::wkv7", mutates_args=())
def wkv7_op(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Optional[Tensor],
            cu_seqlens: Optional[Tensor], w_form: str, scale: float, backend: Optional[str],
            training: bool) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(o, final state, kept): kept holds KEPT_SLOTS tensors, empty without `training`."""
    with torch.no_grad():
        problem, plan = plan_call(r, w, k, v, a, b, state, w_form, scale, cu_seqlens, True, backend,
                                  needs_grad=training)
        if not training:
            return (*run(problem, plan, r, w, k, v, a, b, state, cu_seqlens), flat_kept((None,) * KEPT_SLOTS, k))
        o, state_out, kept = run_training(problem, plan, r, w, k, v, a, b, state, cu_seqlens)
        return o, state_out, flat_kept(kept, k)


@wkv7_op.register_fake
def _(r, w, k, v, a, b, state, cu_seqlens, w_form, scale, backend, training):
    p = validate(r, w, k, v, a, b, state, w_form=w_form, scale=scale, cu_seqlens=cu_seqlens,
                 output_final_state=True)
    o, state_out = v.new_empty(p.B, p.T, p.H, p.V), k.new_empty(p.N, p.H, p.K, p.V, dtype=p.state_dtype)
    if training and k.device.type != "meta":
        ctx = torch.library.get_ctx()
        return o, state_out, [k.new_empty(ctx.new_dynamic_size(), dtype=torch.float32) for _ in range(KEPT_SLOTS)]
    # Meta tensors never reach the real implementation, and their backward needs no kept tensors.
    return o, state_out, [k.new_empty(0, dtype=torch.float32) for _ in range(KEPT_SLOTS)]


@torch.library.custom_op("rwkv_backends::wkv7_rejected", mutates_args=())
def wkv7_rejected(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Optional[Tensor],
                  cu_seqlens: Optional[Tensor], w_form: str, scale: float,
                  backend: Optional[str]) -> tuple[Tensor, Tensor]:
    """A call that the checks refused while torch.compile traced: they raise again when the graph
    runs (the graph is guarded on the metadata that made them fail)."""
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
        N = n_sequences(k, None, cu_seqlens if cu_seqlens is not None and cu_seqlens.dim() == 1 else None)
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
                     state: Optional[Tensor], cu_seqlens: Optional[Tensor], kept: list[Tensor], w_form: str,
                     scale: float, backend: Optional[str]) -> list[Tensor]:
    """Gradients of r, w, k, v, a, b and state (an empty tensor when there is no state), from the
    forward op's kept tensors (an empty list: the training forward runs first)."""
    with torch.no_grad():
        problem, plan = plan_call(r, w, k, v, a, b, state, w_form, scale, cu_seqlens, True, backend, needs_grad=True)
        return run_backward(problem, plan, r, w, k, v, a, b, state, do, dstate, kept, cu_seqlens)


@wkv7_backward_op.register_fake
def _(do, dstate, r, w, k, v, a, b, state, cu_seqlens, kept, w_form, scale, backend):
    out = [torch.empty_like(x, memory_format=torch.contiguous_format) for x in (r, w, k, v, a, b)]
    out.append(torch.empty_like(state) if state is not None else k.new_empty(0, dtype=torch.float32))
    return out


def _setup_context(ctx, inputs, output):
    r, w, k, v, a, b, state, cu_seqlens, w_form, scale, backend, training = inputs
    kept = output[2] if training else []
    ctx.mark_non_differentiable(*output[2])
    ctx.save_for_backward(r, w, k, v, a, b, state, cu_seqlens, *kept)
    ctx.opts = (w_form, scale, backend)


def _backward(ctx, do, dstate, dkept):
    r, w, k, v, a, b, state, cu_seqlens, *kept = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(v)
    if dstate is None:
        dstate = k.new_zeros(n_sequences(k, state, cu_seqlens), k.shape[2], k.shape[3], v.shape[-1],
                             dtype=state.dtype if state is not None else torch.float32)
    grads = wkv7_backward_op(do, dstate, r, w, k, v, a, b, state, cu_seqlens, kept, *ctx.opts)
    return (*grads[:6], grads[6] if state is not None else None, None, None, None, None, None)


wkv7_op.register_autograd(_backward, setup_context=_setup_context)
