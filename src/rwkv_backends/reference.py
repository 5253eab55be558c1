"""The float64 ground truth: WKV7 as a plain sequential recurrence (SPEC §1).

Every backend is judged against this file, so it is written to be read, not to be fast:
one time step at a time, in float64, differentiable through ordinary torch autograd.

    h_t = diag(exp(L_t)) h_{t-1} + b_t (a_t^T h_{t-1}) + k_t v_t^T
    o_t = scale * h_t^T r_t
"""

from __future__ import annotations

import math

import torch

# exp(-0.5): RWKV-LM's clampw kernels bound the log-decay to (-exp(-0.5), 0).
CLAMPW_BOUND = math.exp(-0.5)

W_FORMS = ("log", "raw", "clampw")


def log_decay(w: torch.Tensor, w_form: str) -> torch.Tensor:
    """L = log of the per-channel decay, from w in the given form (SPEC §1 table)."""
    if w_form == "log":
        return w
    if w_form == "raw":
        return -torch.exp(w)
    if w_form == "clampw":
        return -CLAMPW_BOUND * torch.sigmoid(w)
    raise ValueError(f"w_form: expected one of {W_FORMS}, got {w_form!r}")


def dlog_decay_dw(w: torch.Tensor, L: torch.Tensor, w_form: str) -> torch.Tensor:
    """dL/dw, elementwise, for the forms of log_decay (L given to save recomputing it)."""
    if w_form == "log":
        return torch.ones_like(w)
    if w_form == "raw":
        return L                                   # d(-exp(w))/dw = -exp(w) = L
    if w_form == "clampw":
        return L * (1.0 - torch.sigmoid(w))        # L = -c sigmoid(w)
    raise ValueError(f"w_form: expected one of {W_FORMS}, got {w_form!r}")


def wkv7_reference(
    r, w, k, v, a, b, state=None, *,
    w_form: str = "log",
    scale: float = 1.0,
    cu_seqlens=None,
    output_final_state: bool = True,
):
    """Returns (o, state_out) in float64. Shapes as SPEC §1; no validation beyond the math."""
    r, w, k, v, a, b = (x.to(torch.float64) for x in (r, w, k, v, a, b))
    L = log_decay(w, w_form)
    B, T, H, K = k.shape
    V = v.shape[-1]
    if cu_seqlens is None:
        bounds = None
        N = B
    else:
        bounds = [int(x) for x in cu_seqlens.tolist()]
        N = len(bounds) - 1
    if state is None:
        state = torch.zeros(N, H, K, V, dtype=torch.float64, device=k.device)
    state = state.to(torch.float64)

    if bounds is None:
        o, h = _run(r, L, k, v, a, b, state, scale)
        return o, (h if output_final_state else None)

    outs, finals = [], []
    for n in range(N):
        lo, hi = bounds[n], bounds[n + 1]
        seg = [x[:, lo:hi] for x in (r, L, k, v, a, b)]
        o_n, h_n = _run(*seg, state[n:n + 1], scale)
        outs.append(o_n)
        finals.append(h_n)
    o = torch.cat(outs, dim=1) if outs else v.new_zeros(1, 0, H, V)
    return o, (torch.cat(finals, dim=0) if output_final_state else None)


def _run(r, L, k, v, a, b, h, scale):
    """One batch of sequences of equal length; h is [B, H, K, V]."""
    outs = []
    for t in range(k.shape[1]):
        decay = torch.exp(L[:, t]).unsqueeze(-1)                    # [B, H, K, 1]
        a_read = (a[:, t].unsqueeze(-1) * h).sum(dim=-2, keepdim=True)  # a^T h: [B, H, 1, V]
        h = decay * h + b[:, t].unsqueeze(-1) * a_read + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        outs.append(scale * (h * r[:, t].unsqueeze(-1)).sum(dim=-2))   # h^T r: [B, H, V]
    if outs:
        o = torch.stack(outs, dim=1)
    else:
        o = v.new_zeros(v.shape)
    return o, h
