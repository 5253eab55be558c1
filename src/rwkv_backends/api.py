"""The public op: `wkv7` and `explain` (SPEC §1)."""

from __future__ import annotations

import torch

from .dispatch import (LIKELY_MAX_HEADS, RAW_W_MAX, WARN_ABOVE_ZERO, WARN_HEADS_FIRST,  # noqa: F401
                       WARN_RAW_AS_LOG, check_backend, plan_call, run, traced_checks_pass, warn_likely_mistakes)
from .problem import argument_error, validate
from .registry import training_split

_plan = plan_call
# The custom ops, which rwkv_backends.ops registers (the package imports it before this module).
_ops = torch.ops.rwkv_backends


def wkv7(r, w, k, v, a, b, state=None, *, w_form="log", scale=1.0, cu_seqlens=None,
         output_final_state=True, backend=None):
    """RWKV-7's WKV7 recurrence (SPEC §1).

    r, w, k, a, b: [B, T, H, K]; v: [B, T, H, V]; state: [N, H, K, V] float32 or None (bfloat16 or
    float16 opts into a 16-bit decode state). Returns (o [B, T, H, V] in v's dtype, state_out
    [N, H, K, V] in the state's dtype, float32 without a state; or None).
    Differentiable with respect to r, w, k, v, a, b and state.

    A call without tokens (B = 0 or T = 0) returns an empty o and the initial state (zeros without
    one). Meta tensors give outputs of the right shapes and dtypes, forward and backward, without
    computing. A bad argument raises a ValueError or TypeError naming it, under torch.compile too.

    Likely layout mistakes warn (UserWarning, once per call site and kind) and still run:
    - inputs that look like [B, H, T, K]: no state, 1 < T < H and H > 128 (T = 1 reads the same
      either way; with a state, the state's shape error says so);
    - RWKV-LM's raw w passed in the log form: every value <= -0.5 and the largest in [-5, -0.5]
      (pass w_form="raw");
    - w > 0 in the log form, a decay above 1 (outside the contract).
    The two checks on w read its values, and run on CPU tensors only (no device sync elsewhere).
    RWKV-LM's [N, H, V, K] state is refused by its shape when K != V, with the transpose named in
    the error; when K == V its values cannot tell it from [N, H, K, V], so transpose it yourself.
    """
    if torch.compiler.is_compiling():
        # One custom-op node for torch.compile, forward and backward (ops.py). Nothing raises
        # while dynamo traces (that would surface as a dynamo error): a call the checks refuse
        # becomes a node that raises eager's error when the graph runs.
        error = argument_error(r, w, k, v, a, b, state, w_form=w_form, scale=scale, cu_seqlens=cu_seqlens,
                               output_final_state=output_final_state, backend=backend)
        if error is not None:
            like = next((x for x in (v, k, r, w, a, b) if isinstance(x, torch.Tensor)), torch.empty(0))
            o_like = v.detach() if isinstance(v, torch.Tensor) else like.new_empty(0)
            state_like = state.detach() if isinstance(state, torch.Tensor) else like.new_empty(0, dtype=torch.float32)
            return _ops.wkv7_argument_error(o_like, state_like, error[0].__name__, error[1])
        if not traced_checks_pass(r, w, k, v, a, b, state, w_form, scale, cu_seqlens):
            args = [x.detach() if x is not None else None for x in (r, w, k, v, a, b, state, cu_seqlens)]
            return _ops.wkv7_rejected(*args, w_form, float(scale), backend)
        training = torch.is_grad_enabled() and any(x.requires_grad for x in (r, w, k, v, a, b, state) if x is not None)
        o, state_out, _ = _ops.wkv7(r, w, k, v, a, b, state, cu_seqlens, w_form, float(scale), backend, training)
        return o, (state_out if output_final_state else None)
    if isinstance(k, torch.Tensor) and k.is_meta:
        # Shape inference: the op's fake implementation gives the outputs, forward and backward.
        problem = validate(r, w, k, v, a, b, state, w_form=w_form, scale=scale, cu_seqlens=cu_seqlens,
                           output_final_state=output_final_state)
        check_backend(backend)
        warn_likely_mistakes(problem, w)
        o, state_out, _ = _ops.wkv7(r, w, k, v, a, b, state, cu_seqlens, w_form, float(scale), backend,
                                      problem.needs_grad)
        return o, (state_out if output_final_state else None)
    problem, plan = plan_call(r, w, k, v, a, b, state, w_form, scale, cu_seqlens, output_final_state, backend)
    warn_likely_mistakes(problem, w)
    if problem.needs_grad and (problem.B == 0 or problem.T == 0 or training_split(plan.variant).keeps_for_backward):
        # Training through the custom op: the same autograd as under torch.compile.
        o, state_out, _ = _ops.wkv7(r, w, k, v, a, b, state, cu_seqlens, w_form, float(scale), backend, True)
    else:
        o, state_out = run(problem, plan, r, w, k, v, a, b, state, cu_seqlens)
    return o, (state_out if output_final_state else None)


def explain(r, w, k, v, a, b, state=None, *, w_form="log", scale=1.0, cu_seqlens=None,
            output_final_state=True, backend=None) -> dict:
    """What `wkv7` would do with these arguments, without computing anything: the backend, the
    variant, its tuned launch configs and every other candidate with the reasons it was passed over."""
    problem, plan = plan_call(r, w, k, v, a, b, state, w_form, scale, cu_seqlens, output_final_state, backend)
    return plan.explain(problem)
