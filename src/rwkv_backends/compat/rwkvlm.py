"""RWKV-LM's calling conventions: [B, T, C] tensors with C = H * head_size, w in the raw form
(decay = exp(-exp(w))), and a state laid out [B, H, V, K] (the transpose of wkv7's [N, H, K, V])."""

from __future__ import annotations

from ..api import wkv7


def _heads(x, head_size):
    B, T, C = x.shape
    if C % head_size:
        raise ValueError(f"r/w/k/v/a/b: expected the channel count {C} to be a multiple of head_size={head_size}")
    return x.view(B, T, C // head_size, head_size)


def _run(r, w, k, v, a, b, state, head_size, w_form):
    B, T, C = r.shape
    ins = [_heads(x, head_size) for x in (r, w, k, v, a, b)]
    s_in = None if state is None else state.transpose(-1, -2).float()      # [B, H, V, K] -> [B, H, K, V]
    o, s = wkv7(*ins, s_in, w_form=w_form, scale=1.0, output_final_state=state is not None)
    return o.reshape(B, T, C), (None if s is None else s.transpose(-1, -2))


def RUN_CUDA_RWKV7g(r, w, k, v, a, b, head_size=64):
    """RWKV-LM's training op: o [B, T, C] from a zero state."""
    return _run(r, w, k, v, a, b, None, head_size, "raw")[0]


def RUN_RWKV7_STATE(r, w, k, v, a, b, state, head_size=64):
    """State-carrying form: state [B, H, V, K] float32 in RWKV-LM's layout; returns (o, new state)."""
    return _run(r, w, k, v, a, b, state, head_size, "raw")


def RUN_CUDA_RWKV7_CLAMPW(r, w, k, v, a, b, head_size=64):
    """The clampw form of RWKV-LM's 2026 kernels: log-decay = -exp(-0.5) * sigmoid(w)."""
    return _run(r, w, k, v, a, b, None, head_size, "clampw")[0]
