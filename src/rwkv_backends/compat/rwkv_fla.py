"""rwkv-fla's RWKV-7 ops (`rwkvfla.ops.rwkv7`): keyword `w=` (raw: log-decay = -exp(w)) or `log_w=`."""

from __future__ import annotations

from ..api import wkv7
from ._common import default_scale, float_state, reject


def _decay(w, log_w):
    if (w is None) == (log_w is None):
        raise ValueError("w, log_w: expected exactly one of them (w raw, log_w = -exp(w)), got "
                         + ("both" if w is not None else "neither"))
    return (w, "raw") if w is not None else (log_w, "log")


def chunk_rwkv7(r, k, v, a, b, w=None, log_w=None, scale=1.0, initial_state=None, output_final_state=True,
                cu_seqlens=None, head_first=False):
    reject("head_first", head_first, "deprecated in rwkv-fla; pass [B, T, H, *] tensors")
    decay, form = _decay(w, log_w)
    return wkv7(r, decay, k, v, a, b, float_state(initial_state), w_form=form, scale=scale, cu_seqlens=cu_seqlens,
                output_final_state=output_final_state)


def fused_recurrent_rwkv7(r, k, v, a, b, w=None, log_w=None, scale=None, initial_state=None,
                          output_final_state=True, cu_seqlens=None, head_first=False):
    reject("head_first", head_first, "deprecated in rwkv-fla; pass [B, T, H, *] tensors")
    decay, form = _decay(w, log_w)
    return wkv7(r, decay, k, v, a, b, float_state(initial_state), w_form=form, scale=default_scale(scale, k),
                cu_seqlens=cu_seqlens, output_final_state=output_final_state)


def fused_mul_recurrent_rwkv7(r, w, k, v, kk, a, scale=1.0, initial_state=None, output_final_state=False,
                              reverse=False, cu_seqlens=None, head_first=False):
    """rwkv-fla's decode op as its RWKV-7 layer calls it: w is the log-decay, and the transition
    vectors are a = -kk, b = kk * a."""
    reject("reverse", reverse, "a reversed recurrence is not part of WKV7")
    reject("head_first", head_first, "deprecated in rwkv-fla; pass [B, T, H, *] tensors")
    return wkv7(r, w, k, v, -kk, kk * a, float_state(initial_state), w_form="log", scale=scale,
                cu_seqlens=cu_seqlens, output_final_state=output_final_state)
