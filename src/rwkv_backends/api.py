"""The public op: `wkv7` and `explain` (SPEC §1)."""

from __future__ import annotations

import sys
import warnings

import torch

from . import registry
from .problem import argument_error, call_key, validate, values_unreadable
from .settings import Settings

# Layout mistakes that shapes or values make likely (warnings, listed in wkv7's docstring). The
# texts are constant, so Python shows each once per call site.
LIKELY_MAX_HEADS = 128   # RWKV-7 models have tens of heads: a longer dim 2 is more likely the time axis
RAW_W_MAX = (-5.0, -0.5)  # RWKV-LM's raw w is -softplus(.) - 0.5: at most -0.5, its largest about -0.5 to -3
WARN_HEADS_FIRST = (
    "wkv7: r, w, k, v, a, b look like [B, H, T, K] (no state, dim 1 shorter than dim 2, and dim 2 longer "
    f"than {LIKELY_MAX_HEADS} heads): wkv7 takes [B, T, H, K]; if they are [B, H, T, K], pass "
    "x.transpose(1, 2) for each")
WARN_RAW_AS_LOG = (
    "wkv7: w looks like RWKV-LM's raw w (every value <= -0.5, the largest above -5), which w_form='log' "
    "reads as the log-decay (decay exp(w)); if it is raw w (decay exp(-exp(w))), pass w_form='raw'")
WARN_ABOVE_ZERO = (
    "wkv7: w has values > 0, which w_form='log' reads as a decay exp(w) > 1 that grows the state "
    "(outside the contract); for RWKV-LM's raw w pass w_form='raw', for the w of its clampw kernels "
    "w_form='clampw'")

# A call's problem and plan follow from its metadata (call_key), the backend asked for, the
# settings snapshot (settings.Settings: simulation, backend, Gluon, the interpreter), and the
# registered variants. A decode loop repeats
# the same call every token, and at B=1 the host's time is the step's time (NOTES changes 22 and
# 27): a repeated call skips validation and planning. Only successes are kept.
_PLANNED: dict = {}
_PLANNED_MAX = 256


def _plan(r, w, k, v, a, b, state, w_form, scale, cu_seqlens, output_final_state, backend):
    settings = Settings.read()
    key = call_key(r, w, k, v, a, b, state, w_form=w_form, scale=scale, cu_seqlens=cu_seqlens,
                   output_final_state=output_final_state)
    if key is not None:
        key = (key, backend, settings, registry.generation())
        try:
            planned = _PLANNED.get(key)
        except TypeError:                # an unhashable w_form, scale or backend: the full check names it
            key = planned = None
        if planned is not None:
            return planned
    problem = validate(r, w, k, v, a, b, state, w_form=w_form, scale=scale, cu_seqlens=cu_seqlens,
                       output_final_state=output_final_state)
    _check_backend(backend)
    if k.is_meta:
        raise ValueError("k: expected tensors on a device to plan for, got meta tensors "
                         "(wkv7 takes them for shape inference; explain needs the real device)")
    planned = problem, registry.plan(problem, settings.device(k.device), backend, settings=settings)
    if key is not None:
        if len(_PLANNED) >= _PLANNED_MAX:
            _PLANNED.clear()
        _PLANNED[key] = planned
    return planned


def _warn(message):
    """warnings.warn, attributed to the first caller outside rwkv_backends."""
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "rwkv_backends":
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def _warn_likely_mistakes(problem, w):
    """Warnings for layouts that shapes (any device) or values (CPU tensors only, where reading
    them costs no device sync) make likely; they never refuse the call."""
    if (not problem.has_state and not problem.varlen and 1 < problem.T < problem.H
            and problem.H > LIKELY_MAX_HEADS):
        _warn(WARN_HEADS_FIRST)
    if problem.w_form == "log" and problem.device_type == "cpu" and w.numel() and not values_unreadable(w):
        top = float(w.detach().max())
        if top > 0:
            _warn(WARN_ABOVE_ZERO)
        elif RAW_W_MAX[0] <= top <= RAW_W_MAX[1]:
            _warn(WARN_RAW_AS_LOG)


def _check_backend(backend):
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend: expected a backend name (str) or None, got {type(backend).__name__}")


def _traced_checks_pass(r, w, k, v, a, b, state, w_form, scale, cu_seqlens) -> bool:
    """validate() under torch.compile: dynamo traces it, guarding on what it reads."""
    try:
        validate(r, w, k, v, a, b, state, w_form=w_form, scale=scale, cu_seqlens=cu_seqlens,
                 output_final_state=True)
    except (TypeError, ValueError):
        return False
    return True


class _NoTokens(torch.autograd.Function):
    """wkv7 of a call without tokens (B = 0 or T = 0): an empty o, and the initial state (zeros
    without one) as the final state. Gradients: zeros, and dstate for the state."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, state, N):
        ctx.has_state = state is not None
        ctx.save_for_backward(r, w, k, v, a, b)        # empty tensors
        o = v.new_zeros(v.shape)
        if state is not None:
            return o, state.clone()
        return o, k.new_zeros(N, k.shape[2], k.shape[3], v.shape[3], dtype=torch.float32)

    @staticmethod
    def backward(ctx, do, dstate):
        zeros = [torch.zeros_like(x) for x in ctx.saved_tensors]
        return (*zeros, dstate if ctx.has_state else None, None)


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
        from .ops import wkv7_argument_error, wkv7_op, wkv7_rejected
        error = argument_error(r, w, k, v, a, b, state, w_form=w_form, scale=scale, cu_seqlens=cu_seqlens,
                               output_final_state=output_final_state, backend=backend)
        if error is not None:
            like = next((x for x in (v, k, r, w, a, b) if isinstance(x, torch.Tensor)), torch.empty(0))
            o_like = v.detach() if isinstance(v, torch.Tensor) else like.new_empty(0)
            state_like = state.detach() if isinstance(state, torch.Tensor) else like.new_empty(0, dtype=torch.float32)
            return wkv7_argument_error(o_like, state_like, error[0].__name__, error[1])
        if not _traced_checks_pass(r, w, k, v, a, b, state, w_form, scale, cu_seqlens):
            args = [x.detach() if x is not None else None for x in (r, w, k, v, a, b, state, cu_seqlens)]
            return wkv7_rejected(*args, w_form, float(scale), backend)
        o, state_out = wkv7_op(r, w, k, v, a, b, state, cu_seqlens, w_form, float(scale), backend)
        return o, (state_out if output_final_state else None)
    if isinstance(k, torch.Tensor) and k.is_meta:
        # Shape inference: the op's fake implementation gives the outputs, forward and backward.
        problem = validate(r, w, k, v, a, b, state, w_form=w_form, scale=scale, cu_seqlens=cu_seqlens,
                           output_final_state=output_final_state)
        _check_backend(backend)
        _warn_likely_mistakes(problem, w)
        from .ops import wkv7_op
        o, state_out = wkv7_op(r, w, k, v, a, b, state, cu_seqlens, w_form, float(scale), backend)
        return o, (state_out if output_final_state else None)
    return eager_wkv7(r, w, k, v, a, b, state, w_form=w_form, scale=scale, cu_seqlens=cu_seqlens,
                      output_final_state=output_final_state, backend=backend)


def eager_wkv7(r, w, k, v, a, b, state=None, *, w_form="log", scale=1.0, cu_seqlens=None,
               output_final_state=True, backend=None):
    """wkv7 without the torch.compile detour: validate, dispatch (cached), run."""
    problem, plan = _plan(r, w, k, v, a, b, state, w_form, scale, cu_seqlens, output_final_state, backend)
    _warn_likely_mistakes(problem, w)
    if problem.B == 0 or problem.T == 0:
        o, state_out = _NoTokens.apply(r, w, k, v, a, b, state, problem.N)
        return o, (state_out if output_final_state else None)
    o, state_out = plan.variant.run(r, w, k, v, a, b, state, problem=problem, plan=plan, cu_seqlens=cu_seqlens)
    if o.dtype != v.dtype:
        o = o.to(v.dtype)
    if state_out is not None and state_out.dtype != problem.state_dtype:
        state_out = state_out.to(problem.state_dtype)
    return o, (state_out if output_final_state else None)


def explain(r, w, k, v, a, b, state=None, *, w_form="log", scale=1.0, cu_seqlens=None,
            output_final_state=True, backend=None) -> dict:
    """What `wkv7` would do with these arguments, without computing anything: the backend, the
    variant, its tuned launch configs and every other candidate with the reasons it was passed over."""
    problem, plan = _plan(r, w, k, v, a, b, state, w_form, scale, cu_seqlens, output_final_state, backend)
    return plan.explain(problem)
