"""The public op: `wkv7` and `explain` (SPEC §1)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .dispatch import (LIKELY_MAX_HEADS, RAW_W_MAX, WARN_ABOVE_ZERO, WARN_HEADS_FIRST,  # noqa: F401
                       WARN_RAW_AS_LOG, check_backend, plan_call, run, traced_checks_pass, warn_likely_mistakes)
from .problem import argument_error, validate
from .registry import training_split

_plan = plan_call
# The custom ops, which rwkv_backends.ops registers (the package imports it before this module).
_ops = torch.ops.rwkv_backends


def wkv7(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Optional[Tensor] = None, *,
         w_form: str = "log", scale: float = 1.0, cu_seqlens: Optional[Tensor] = None,
         output_final_state: bool = True, backend: Optional[str] = None) -> tuple[Tensor, Optional[Tensor]]:
    """RWKV-7's WKV7 recurrence (SPEC §1): per head, h_t = diag(exp(L_t)) h_{t-1} + b_t (a_tᵀ h_{t-1})
    + k_t v_tᵀ and o_t = scale h_tᵀ r_t, with L_t the log-decay that w gives.

    Args:
        r, k, a, b: [B, T, H, K], float32, bfloat16 or float16, all of one dtype and device.
        w: [B, T, H, K], in k's dtype or float32, read as `w_form` says.
        v: [B, T, H, V], in k's dtype.
        state: the initial state [N, H, K, V], float32 (bfloat16 or float16 opts into a 16-bit
            decode state), or None for zeros. N is B, or the number of packed sequences.
        w_form: "log" (w is the log-decay: decay exp(w)), "raw" (RWKV-LM's w: decay
            exp(-exp(w))) or "clampw" (the w of RWKV-LM's clampw kernels: log-decay
            -CLAMPW_BOUND sigmoid(w)).
        scale: a finite Python number that multiplies o.
        cu_seqlens: packed sequences, int32 or int64 [N + 1] offsets from 0 to T (non-decreasing),
            with B = 1; None for B sequences of T tokens.
        output_final_state: False returns None in place of the final state.
        backend: a backend ("triton", "pytorch") or variant ("triton.chunk", ...) to force; None
            lets the dispatcher choose (RWKV_BACKENDS_BACKEND forces one for every call).

    Returns:
        (o [B, T, H, V] in v's dtype, the final state [N, H, K, V] in the state's dtype, float32
        without a state; or None without output_final_state). Differentiable with respect to r,
        w, k, v, a, b and state, eagerly and under torch.compile (fullgraph, no graph break).

    Raises:
        TypeError: an argument of the wrong type or dtype (the message names it).
        ValueError: a wrong shape, device, w_form, cu_seqlens or backend name (the message names
            the argument); under torch.compile the same error raises when the graph runs.
        NoBackendError: no registered variant can take the call (a ValueError; the message gives
            every candidate's reasons).

    A call without tokens (B = 0 or T = 0) returns an empty o and the initial state (zeros without
    one). Meta tensors give outputs of the right shapes and dtypes, forward and backward, without
    computing.

    Likely layout mistakes warn (UserWarning, once per call site and kind) and still run:
    - inputs that look like [B, H, T, K]: no state, 1 < T < H and H > 128 (T = 1 reads the same
      either way; with a state, the state's shape error says so);
    - RWKV-LM's raw w passed in the log form: every value <= -0.5 and the largest in [-5, -0.5]
      (pass w_form="raw");
    - w > 0 in the log form, a decay above 1 (outside the contract).
    The two checks on w read its values, and run on CPU tensors only (no device sync elsewhere).
    RWKV-LM's [N, H, V, K] state is refused by its shape when K != V, with the transpose named in
    the error; when K == V its values cannot tell it from [N, H, K, V], so transpose it yourself.

    Example:
        >>> import torch, rwkv_backends
        >>> B, T, H, K = 1, 8, 2, 16
        >>> r, k, v = (torch.randn(B, T, H, K) for _ in range(3))
        >>> w = -torch.rand(B, T, H, K) - 0.1            # log-decay < 0
        >>> kk = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1)
        >>> a, b = -kk, kk * torch.rand(B, T, H, K)       # RWKV-7's a = -kk, b = kk * in-context rate
        >>> o, state = rwkv_backends.wkv7(r, w, k, v, a, b)
        >>> o.shape, state.shape
        (torch.Size([1, 8, 2, 16]), torch.Size([1, 2, 16, 16]))
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


def explain(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Optional[Tensor] = None, *,
            w_form: str = "log", scale: float = 1.0, cu_seqlens: Optional[Tensor] = None,
            output_final_state: bool = True, backend: Optional[str] = None) -> dict:
    """What `wkv7` would do with these arguments, without computing anything.

    Args:
        The arguments of `wkv7`, on the device the call would run on (not meta tensors).

    Returns:
        A dict: "backend", "variant", "problem_class" ("training", "decode" or "prefill"),
        "problem" (the shapes in words), "config" (each kernel's launch config), "config_source"
        (the tuning table entry each came from), "adjusted_by_known_issues", "rejected" (every other
        variant with the reasons it was passed over), "device" and "known_issues_active".

    Raises:
        The errors of `wkv7` for the same arguments, and ValueError for meta tensors.

    Example:
        >>> import torch, rwkv_backends
        >>> x = [torch.randn(1, 8, 2, 16) for _ in range(6)]
        >>> x[1] = -x[1].abs() - 0.1                      # w: a log-decay < 0
        >>> rwkv_backends.explain(*x)["backend"]
        'pytorch'
    """
    problem, plan = plan_call(r, w, k, v, a, b, state, w_form, scale, cu_seqlens, output_final_state, backend)
    return plan.explain(problem)
