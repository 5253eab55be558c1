"""What `api` and `ops` share: a call's checks, warnings and plan (cached), and the eager run.

Neither api nor ops imports the other: both import this module.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings

import torch

from . import registry
from .problem import Problem, call_key, validate, values_unreadable
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
# registered variants. A decode loop repeats the same call every token, and at B=1 the host's time
# is the step's time: a repeated call skips validation and planning.
# Only successes are kept.
_PLANNED: dict = {}
_PLANNED_MAX = 256


def plan_call(r, w, k, v, a, b, state, w_form, scale, cu_seqlens, output_final_state, backend,
              needs_grad: bool | None = None) -> tuple:
    """(Problem, Plan) for a call, from the cache where it can. `needs_grad` overrides what the grad
    mode and the inputs say (the custom ops run below autograd, where they cannot tell)."""
    settings = Settings.read()
    key = call_key(r, w, k, v, a, b, state, w_form=w_form, scale=scale, cu_seqlens=cu_seqlens,
                   output_final_state=output_final_state)
    if key is not None:
        key = (key, backend, needs_grad, settings, registry.generation())
        try:
            planned = _PLANNED.get(key)
        except TypeError:                # an unhashable w_form, scale or backend: the full check names it
            key = planned = None
        if planned is not None:
            return planned
    problem = validate(r, w, k, v, a, b, state, w_form=w_form, scale=scale, cu_seqlens=cu_seqlens,
                       output_final_state=output_final_state)
    if needs_grad is not None and problem.needs_grad != needs_grad:
        problem = dataclasses.replace(problem, needs_grad=needs_grad)
    check_backend(backend)
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


def warn_likely_mistakes(problem: Problem, w) -> None:
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


def check_backend(backend) -> None:
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend: expected a backend name (str) or None, got {type(backend).__name__}")


def traced_checks_pass(r, w, k, v, a, b, state, w_form, scale, cu_seqlens) -> bool:
    """validate() under torch.compile: dynamo traces it, guarding on what it reads."""
    try:
        validate(r, w, k, v, a, b, state, w_form=w_form, scale=scale, cu_seqlens=cu_seqlens,
                 output_final_state=True)
    except (TypeError, ValueError):
        return False
    return True


def n_sequences(k, state, cu_seqlens) -> int:
    if state is not None:
        return state.shape[0]
    return cu_seqlens.shape[0] - 1 if cu_seqlens is not None else k.shape[0]


def no_tokens(k, v, state, N):
    """wkv7 of a call without tokens (B = 0 or T = 0): an empty o, and a copy of the initial state
    (zeros without one) as the final state."""
    o = v.new_zeros(v.shape)
    if state is not None:
        return o, state.clone()
    return o, k.new_zeros(N, k.shape[2], k.shape[3], v.shape[3], dtype=torch.float32)


def _cast(o, state_out, problem, v):
    if o.dtype != v.dtype:
        o = o.to(v.dtype)
    if state_out is not None and state_out.dtype != problem.state_dtype:
        state_out = state_out.to(problem.state_dtype)
    return o, state_out


def run(problem: Problem, plan, r, w, k, v, a, b, state, cu_seqlens) -> tuple:
    """(o in v's dtype, final state in the state's dtype or None): the planned variant's `run`,
    which builds the variant's own autograd graph where the problem needs gradients."""
    if problem.B == 0 or problem.T == 0:
        return no_tokens(k, v, state, problem.N)
    o, state_out = plan.variant.run(r, w, k, v, a, b, state, problem=problem, plan=plan, cu_seqlens=cu_seqlens)
    return _cast(o, state_out, problem, v)


def run_training(problem: Problem, plan, r, w, k, v, a, b, state, cu_seqlens) -> tuple:
    """(o, final state, kept) from the planned variant's training split, without an autograd graph:
    the custom op's forward (ops.py). `kept` holds registry.KEPT_SLOTS tensors or None."""
    kept = ()
    if problem.B == 0 or problem.T == 0:
        o, state_out = no_tokens(k, v, state, problem.N)
    else:
        o, state_out, kept = registry.training_split(plan.variant).train_forward(
            r, w, k, v, a, b, state, problem=problem, plan=plan, cu_seqlens=cu_seqlens)
        o, state_out = _cast(o, state_out, problem, v)
    if len(kept) > registry.KEPT_SLOTS:
        raise RuntimeError(f"{plan.variant.name}: train_forward kept {len(kept)} tensors, over the "
                           f"{registry.KEPT_SLOTS} the op carries")
    return o, state_out, tuple(kept) + (None,) * (registry.KEPT_SLOTS - len(kept))


def run_backward(problem: Problem, plan, r, w, k, v, a, b, state, do, dstate, kept, cu_seqlens) -> list:
    """Gradients of r, w, k, v, a, b and state (an empty tensor without one), contiguous: the
    custom backward op (ops.py). `kept`: run_training's tensors, each flattened to 1-D (empty for
    None); an empty list, when the forward kept nothing, has the training forward run first."""
    if problem.B == 0 or problem.T == 0:
        out = [torch.zeros_like(x, memory_format=torch.contiguous_format) for x in (r, w, k, v, a, b)]
        out.append(dstate.to(state.dtype, copy=True) if state is not None else k.new_empty(0, dtype=torch.float32))
        return out
    split = registry.training_split(plan.variant)
    if not kept and split.keeps_for_backward:
        kept = flat_kept(run_training(problem, plan, r, w, k, v, a, b, state, cu_seqlens)[2], k)
    grads = split.train_backward(r, w, k, v, a, b, state, do, dstate, kept, problem=problem, plan=plan,
                                 cu_seqlens=cu_seqlens)
    out = [g.contiguous() for g in grads[:6]]
    out.append(grads[6].to(state.dtype) if state is not None else k.new_empty(0, dtype=torch.float32))
    return out


def flat_kept(kept, like) -> list:
    """The kept tensors as the op returns them: each 1-D float32, an empty one for None."""
    return [like.new_empty(0, dtype=torch.float32) if x is None else x.reshape(-1).to(torch.float32)
            for x in kept]
