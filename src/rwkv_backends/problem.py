"""Argument validation for `wkv7` / `explain`, and the `Problem` every backend plans against.

Every message names the argument, what was expected and what came (SPEC §1 "Errors").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import is_fake

from .reference import W_FORMS

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The state is float32 (SPEC §1). A 16-bit state is an opt-in for decode: it halves the bytes a
# decode step moves, at the accuracy measured in benchmarks/RESULTS.md; variants that cannot keep
# one say so (registry reasons).
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Up to this many tokens per sequence, a call without gradients counts as decode.
DECODE_MAX_TOKENS = 16


@dataclass(frozen=True)
class Problem:
    """What a backend needs to know to say whether it can take a call, and to plan it."""

    B: int
    T: int
    H: int
    K: int
    V: int
    N: int                 # number of sequences (B, or len(cu_seqlens) - 1)
    dtype: torch.dtype     # of r, k, v, a, b
    w_dtype: torch.dtype
    device_type: str       # "cpu", "cuda", "xpu", "musa", ...
    w_form: str
    scale: float
    varlen: bool
    has_state: bool
    output_final_state: bool
    state_dtype: torch.dtype   # float32 unless the caller passes a 16-bit state
    needs_grad: bool

    @property
    def problem_class(self) -> str:
        """"training" when gradients are wanted, else "decode" (few tokens per sequence) or "prefill"."""
        if self.needs_grad:
            return "training"
        tokens_per_sequence = self.T / max(self.N, 1)
        return "decode" if tokens_per_sequence <= DECODE_MAX_TOKENS else "prefill"

    def describe(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        parts = [f"B={self.B} T={self.T} H={self.H} K={self.K} V={self.V}", dt, f"w_form={self.w_form}"]
        if self.varlen:
            parts.append(f"varlen N={self.N}")
        return " ".join(parts) + f" ({self.problem_class})"


def argument_error(r, w, k, v, a, b, state, *, w_form, scale, cu_seqlens, output_final_state, backend=None):
    """What validate() rejects without looking at any tensor, as (exception class, message), or
    None. The messages are constants of the call, so a torch.compile trace can carry them into
    the graph (ops.py); validate() raises the same ones."""
    named = {"r": r, "w": w, "k": k, "v": v, "a": a, "b": b}
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            return TypeError, f"{name}: expected a torch.Tensor, got {type(x).__name__}"
    for name, x in (("state", state), ("cu_seqlens", cu_seqlens)):
        if x is not None and not isinstance(x, torch.Tensor):
            return TypeError, f"{name}: expected a torch.Tensor or None, got {type(x).__name__}"
    if not isinstance(w_form, str) or w_form not in W_FORMS:
        shown = repr(w_form) if isinstance(w_form, (str, int, float, type(None))) else type(w_form).__name__
        return ValueError, f"w_form: expected one of {', '.join(repr(f) for f in W_FORMS)}, got {shown}"
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(float(scale)):
        shown = repr(scale) if isinstance(scale, (str, int, float, type(None))) else type(scale).__name__
        return TypeError, f"scale: expected a finite Python number, got {shown}"
    if not isinstance(output_final_state, bool):
        return TypeError, f"output_final_state: expected a bool, got {type(output_final_state).__name__}"
    if backend is not None and not isinstance(backend, str):
        return TypeError, f"backend: expected a backend name (str) or None, got {type(backend).__name__}"
    return None


def values_unreadable(x: torch.Tensor) -> bool:
    """True while torch.compile traces (fake tensors), for meta tensors, or while a CUDA graph is
    being captured: then the host may not read tensor values, and only shapes and dtypes are checked."""
    if torch.compiler.is_compiling() or x.is_meta or is_fake(x):
        return True
    device = x.device
    if device.type != "cuda":
        return False
    try:
        return torch.cuda.is_current_stream_capturing()
    except Exception:  # pragma: no cover - no CUDA runtime
        return False


def call_key(r, w, k, v, a, b, state, *, w_form, scale, cu_seqlens, output_final_state):
    """What validate() reads, as a hashable key, for callers that cache its result: without
    cu_seqlens (whose values it reads) it sees only metadata, so the Problem is a function of this
    key. None when the call must be checked in full: packed sequences, torch.compile tracing
    (symbolic shapes), or arguments that are not tensors."""
    if (cu_seqlens is not None or torch.compiler.is_compiling()
            or not all(isinstance(x, torch.Tensor) for x in (r, w, k, v, a, b))
            or not (state is None or isinstance(state, torch.Tensor))):
        return None
    # The types next to scale and output_final_state keep look-alikes apart: scale=True hashes
    # like 1.0, output_final_state=1 like True, and both must still be rejected.
    return (tuple(None if x is None else (x.shape, x.dtype, x.device, x.requires_grad)
                  for x in (r, w, k, v, a, b, state)),
            torch.is_grad_enabled(), w_form, type(scale), scale, type(output_final_state), output_final_state)


def validate(r, w, k, v, a, b, state, *, w_form, scale, cu_seqlens, output_final_state) -> Problem:
    """The full check of SPEC §1: the Problem, or an exception that names the argument."""
    error = argument_error(r, w, k, v, a, b, state, w_form=w_form, scale=scale, cu_seqlens=cu_seqlens,
                           output_final_state=output_final_state)
    if error is not None:
        raise error[0](error[1])
    named = {"r": r, "w": w, "k": k, "v": v, "a": a, "b": b}
    for name, x in named.items():
        if x.dim() != 4:
            want = "[B, T, H, V]" if name == "v" else "[B, T, H, K]"
            raise ValueError(f"{name}: expected a 4-D tensor {want}, got shape {tuple(x.shape)}")

    B, T, H, K = k.shape
    for name in ("r", "w", "a", "b"):
        if tuple(named[name].shape) != (B, T, H, K):
            raise ValueError(
                f"{name}: expected shape [B, T, H, K] = {(B, T, H, K)} to match k, got {tuple(named[name].shape)}")
    if tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"v: expected shape [B, T, H, V] with B, T, H = {(B, T, H)} as in k, got {tuple(v.shape)}")
    V = v.shape[3]
    if K < 1 or V < 1 or H < 1:
        raise ValueError(f"k, v: head sizes and head count must be positive, got H={H} K={K} V={V}")

    dtype = k.dtype
    if dtype not in INPUT_DTYPES:
        raise TypeError(f"k: expected dtype float32, bfloat16 or float16, got {dtype}")
    for name in ("r", "v", "a", "b"):
        if named[name].dtype != dtype:
            raise TypeError(f"{name}: expected dtype {dtype} (the dtype of k), got {named[name].dtype}")
    if w.dtype not in (dtype, torch.float32):
        raise TypeError(f"w: expected dtype {dtype} (as k) or float32, got {w.dtype}")

    device = k.device
    for name, x in named.items():
        if x.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} (the device of k), got one on {x.device}")

    N = B
    if cu_seqlens is not None:
        N = _validate_cu_seqlens(cu_seqlens, B, T, device)

    if state is not None:
        if tuple(state.shape) != (N, H, K, V):
            hint = _state_layout_hint(tuple(state.shape), N, T, H, K, V)
            raise ValueError(f"state: expected shape [N, H, K, V] = {(N, H, K, V)}, got {tuple(state.shape)}{hint}")
        if state.dtype not in STATE_DTYPES:
            raise TypeError(f"state: expected dtype float32 (or bfloat16/float16 for a 16-bit decode state), "
                            f"got {state.dtype}")
        if state.device != device:
            raise ValueError(f"state: expected a tensor on {device} (the device of k), got one on {state.device}")

    needs_grad = torch.is_grad_enabled() and any(
        x.requires_grad for x in (r, w, k, v, a, b, state) if x is not None)
    return Problem(
        B=B, T=T, H=H, K=K, V=V, N=N, dtype=dtype, w_dtype=w.dtype, device_type=device.type,
        w_form=w_form, scale=float(scale), varlen=cu_seqlens is not None, has_state=state is not None,
        output_final_state=output_final_state, needs_grad=needs_grad,
        state_dtype=state.dtype if state is not None else torch.float32,
    )


def _state_layout_hint(shape, N, T, H, K, V) -> str:
    """Why a state of this shape is refused, where the shape tells a known layout mistake."""
    if shape == (N, H, V, K):
        return ("; that is RWKV-LM's [N, H, V, K] layout: pass state.transpose(-1, -2) "
                "(and transpose state_out back for RWKV-LM)")
    if shape == (N, T, K, V):
        return ("; r, w, k, v, a, b look like [B, H, T, K] (their dim 1 is the state's head count): "
                "wkv7 takes [B, T, H, K], so pass x.transpose(1, 2) for each")
    return ""


def _validate_cu_seqlens(cu_seqlens, B, T, device) -> int:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected a 1-D tensor [N+1] with N >= 1, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens: expected dtype int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens: expected a tensor on {device} (the device of k), got one on {cu_seqlens.device}")
    if B != 1:
        raise ValueError(f"cu_seqlens: packed sequences need B == 1, got B={B}")
    if not values_unreadable(cu_seqlens):
        vals = cu_seqlens.tolist()
        if vals[0] != 0:
            raise ValueError(f"cu_seqlens: expected it to start at 0, got {vals[0]}")
        if vals[-1] != T:
            raise ValueError(f"cu_seqlens: expected it to end at T={T}, got {vals[-1]}")
        if any(y < x for x, y in zip(vals, vals[1:])):
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got {vals}")
    return cu_seqlens.numel() - 1
