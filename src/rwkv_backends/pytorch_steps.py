"""WKV7 in plain PyTorch for short sequences: the recurrence step by step (forward and backward).

Serves sequences of at most SHORT_MAX tokens (pytorch_chunked), decode at T = 1, and the tokens
past a chunked forward's last whole chunk (pytorch_segments).
"""

from __future__ import annotations

import contextlib

import torch


def _compute_dtype(x):
    """Float32 for the op's dtypes; float64 stays float64 (gradcheck runs the backend in it)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _float32_math(device):
    """Autocast off for the op's own arithmetic: its products stay in the compute dtype and the
    scan's in-place float32 state writes see float32 operands."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# --- short sequences: the recurrence step by step ----------------------------------------------
#
# Per step, with sa_t = a_tᵀ h_{t-1} (the state's read through a):
#     h_t = diag(d_t) h_{t-1} + b_t sa_tᵀ + k_t v_tᵀ,   d_t = exp(L_t),   o_t = scale h_tᵀ r_t
# five ATen calls per step and no padding, against a chunk's ~100 calls padded to
# DEFAULT_CHUNK tokens. The backward walks the same steps in reverse with dh = ∂/∂h_t:
#     dh_t = dS (t = T) or dh'_{t+1};  dh_t += scale r_t do_tᵀ
#     dsa_t = dh_tᵀ b_t,   dh'_t = diag(d_t) dh_t + a_t dsa_tᵀ   (the gradient of h_{t-1})
# and, from the stored states, every input gradient at once:
#     dr_t = scale h_t do_t, dk_t = dh_t v_t, dv_t = dh_tᵀ k_t, db_t = dh_t sa_t, da_t = h_{t-1} dsa_t,
#     dL_t = d_t Σ_v dh_t ⊙ h_{t-1}
# Every term is a product of its own factors (no difference of sums), so strong decay and decay
# exactly 0 (d = 0, dL = 0) need nothing special.


def _time_major(x, dt):
    """[B, T, H, D] -> [T, B*H, D] in the compute dtype (a view where the layout allows)."""
    B, T, H, D = x.shape
    x = x[0] if B == 1 else x.transpose(0, 1)
    return x.reshape(T, B * H, D).to(dt)


def _batch_major(y, B, H):
    """[T, B*H, D] -> [B, T, H, D], contiguous."""
    T, _, D = y.shape
    y = y.view(T, B, H, D)
    return y[None, :, 0] if B == 1 else y.transpose(0, 1).contiguous()


def step_decode(r, L, k, v, a, b, state, scale):
    """One token, no gradients: o [B, 1, H, V] and the new state [B, H, K, V], in six ATen calls.
    State [B, H, K, V]; inputs [B, 1, H, *]; any float dtypes (computed in _compute_dtype(k))."""
    B, _, H, K = k.shape
    V = v.shape[-1]
    Z = B * H
    dt = _compute_dtype(k)
    if k.dtype != dt or L.dtype != dt or state.dtype != dt or v.dtype != dt or r.dtype != dt:
        r, L, k, v, a, b, state = (x.to(dt) for x in (r, L, k, v, a, b, state))
    h = state.reshape(Z, K, V)
    sa = torch.bmm(a.reshape(Z, 1, K), h)                                         # a_tᵀ h_{t-1}
    h = h * L.reshape(Z, K, 1).exp()
    # The two rank-1 terms as broadcast products (addcmul_): 8-9 µs each against baddbmm_'s 12-20
    # at H16 K64 on one thread (benchmarks/NOTES.md, change C1).
    h.addcmul_(b.reshape(Z, K, 1), sa).addcmul_(k.reshape(Z, K, 1), v.reshape(Z, 1, V))
    o = torch.bmm(r.reshape(Z, 1, K), h)
    if scale != 1.0:
        o.mul_(scale)
    return o.view(B, 1, H, V), h.view(B, H, K, V)


def step_forward(r, L, k, v, a, b, state, scale, keep=False):
    """Equal-length sequences [B, T, H, *], state [B, H, K, V], step by step. Returns o [B, T, H, V],
    the final state [B, H, K, V] and, with `keep`, what step_backward needs: every state
    [T + 1, B*H, K, V] (the initial one first) and every sa [T, B*H, 1, V]; else None."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    Z = B * H
    dt = _compute_dtype(k)
    r_, k_, v_, a_, b_ = (_time_major(x, dt) for x in (r, k, v, a, b))
    d = _time_major(L, dt).exp().unsqueeze_(-1).unbind(0)                         # T x [Z, K, 1]
    ks, bs = k_.unsqueeze(-1).unbind(0), b_.unsqueeze(-1).unbind(0)                  # T x [Z, K, 1]
    vs, as_ = v_.unsqueeze(2).unbind(0), a_.unsqueeze(2).unbind(0)                   # T x [Z, 1, *]
    h = state.reshape(Z, K, V).to(dt)
    if keep:
        states = torch.empty(T + 1, Z, K, V, dtype=dt, device=k.device)
        states[0] = h
        sa_all = torch.empty(T, Z, 1, V, dtype=dt, device=k.device)
        slots, sas = states.unbind(0)[1:], sa_all.unbind(0)
        for t in range(T):
            sa = torch.bmm(as_[t], h, out=sas[t])
            h = torch.mul(h, d[t], out=slots[t])
            h.addcmul_(bs[t], sa).addcmul_(ks[t], vs[t])
        o = torch.bmm(r_.reshape(T * Z, 1, K), states[1:].view(T * Z, K, V))
        final, saved = h.clone(), (states, sa_all)
    else:
        o = torch.empty(T, Z, 1, V, dtype=dt, device=k.device)
        outs, rs = o.unbind(0), r_.unsqueeze(2).unbind(0)
        for t in range(T):
            sa = torch.bmm(as_[t], h)
            h = h * d[t]
            h.addcmul_(bs[t], sa).addcmul_(ks[t], vs[t])
            torch.bmm(rs[t], h, out=outs[t])
        final, saved = h, None
    if scale != 1.0:
        o.mul_(scale)
    return _batch_major(o.view(T, Z, V), B, H), final.view(B, H, K, V), saved


def step_backward(r, L, k, v, a, b, saved, dO, dS_final, scale):
    """Gradients (dr, dL, dk, dv, da, db, dstate) from step_forward's saved states; dO or dS_final
    may be None (zero)."""
    states, sa_all = saved
    B, T, H, K = k.shape
    V = v.shape[-1]
    Z = B * H
    dt = states.dtype
    r_, k_, a_, b_ = (_time_major(x, dt) for x in (r, k, a, b))
    v_ = _time_major(v, dt)
    d = _time_major(L, dt).exp()                                                   # [T, Z, K]
    if dO is not None:
        dO_ = _time_major(dO, dt)
        dH = torch.bmm(r_.reshape(T * Z, K, 1), dO_.reshape(T * Z, 1, V)).view(T, Z, K, V)
        if scale != 1.0:
            dH.mul_(scale)
    else:
        dH = torch.zeros(T, Z, K, V, dtype=dt, device=k.device)
    dsa_all = torch.empty(T, Z, 1, V, dtype=dt, device=k.device)
    dHs, dsas = dH.unbind(0), dsa_all.unbind(0)
    ds, as_, bs = d.unsqueeze(-1).unbind(0), a_.unsqueeze(-1).unbind(0), b_.unsqueeze(2).unbind(0)
    g = None if dS_final is None else dS_final.reshape(Z, K, V).to(dt)
    for t in range(T - 1, -1, -1):
        dh = dHs[t] if g is None else dHs[t].add_(g)
        dsa = torch.bmm(bs[t], dh, out=dsas[t])                                     # dh_tᵀ b_t
        g = torch.mul(dh, ds[t]).baddbmm_(as_[t], dsa)
    dHf = dH.view(T * Z, K, V)
    prev = states[:-1].reshape(T * Z, K, V)
    dk = torch.bmm(dHf, v_.reshape(T * Z, V, 1))
    db = torch.bmm(dHf, sa_all.view(T * Z, V, 1))
    dv = torch.bmm(k_.reshape(T * Z, 1, K), dHf)
    da = torch.bmm(prev, dsa_all.view(T * Z, V, 1))
    dL = (dHf * prev).sum(-1).view(T, Z, K).mul_(d)
    if dO is not None:
        dr = torch.bmm(states[1:].view(T * Z, K, V), dO_.reshape(T * Z, V, 1))
        if scale != 1.0:
            dr.mul_(scale)
    else:
        dr = torch.zeros(T * Z, K, 1, dtype=dt, device=k.device)
    grads = [_batch_major(x.view(T, Z, -1), B, H) for x in (dr, dL, dk, dv, da, db)]
    return (*grads, g.view(B, H, K, V))


class StepWKV7(torch.autograd.Function):
    """step_forward / step_backward as an autograd Function (L is the log-decay)."""

    @staticmethod
    def forward(ctx, r, L, k, v, a, b, state, scale):
        keep = any(ctx.needs_input_grad)
        with _float32_math(k.device):
            o, final, saved = step_forward(r, L, k, v, a, b, state, scale, keep=keep)
        if keep:
            ctx.save_for_backward(r, L, k, v, a, b, *saved)
        ctx.scale = scale
        return o, final

    @staticmethod
    def backward(ctx, dO, dS_final):
        r, L, k, v, a, b, states, sa_all = ctx.saved_tensors
        with _float32_math(k.device):
            grads = step_backward(r, L, k, v, a, b, (states, sa_all), dO, dS_final, ctx.scale)
        grads = [gr.to(x.dtype) for gr, x in zip(grads[:6], (r, L, k, v, a, b))] + [grads[6]]
        return (*grads, None)
