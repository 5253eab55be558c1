"""The chunked backward: the gradient kernel (one program per V block, sequence and head, or with
segments per segment as well) and `chunk_backward`, which recomputes the chunk start states and,
for the segmented backward, sweeps the state gradient first (twopass.py, transition.py)."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..config import KernelConfig
from .chunk import chunk_forward, chunk_states
from .chunk_math import (_chunk_decays, _col, _empty_span_pairs, _factorable, _grad_start_state, _grad_u_z,
                         _load_chunk, _mat_ptrs, _pair_terms)
from .common import (MAT_AK, MAT_RB, MAT_RK, MAT_TINV, SEG_MODES, SEG_WALK, W_FORM_CODES, _Pairs, _cdiv, _check_gluon,
                     _chunk_base, _chunk_count, _chunk_offsets, _contiguous, _dlog_decay, _dot, _dot_precision,
                     _launch, _launch_options, _num_sequences, _pair_dot, _pow2, _segment_launch, _seq_bounds,
                     _side_stream, _state_block, _v_rows, _walk_start, empty_mats, empty_states)
from .transition import transition_dstate
from .twopass import dstate_sweep

# ---------------------------------------------------------------------------------------------
# Chunked backward: one program per (V block, sequence, head) walks its chunks last to first,
# carrying its columns of the state gradient on chip; chunk start states come from the forward
# recompute (`states`), the chunk matrices from the forward (`mats`). The gradients of v and of
# the initial state split by V columns exactly; those of r, w, k, a, b are sums over V, so with
# several V blocks each program writes its share at offset i_v * part_stride of a float32 buffer
# and the launcher adds the shares in a fixed order (no atomics: results stay bitwise repeatable).

@triton.jit
def chunk_bwd_kernel(
    r, w, k, v, a, b, do, dht, states, mats, chunk_offsets, cu_seqlens, seg_ds, seg_offsets, u,
    dr, dw, dk, dv, da, db, dh0, scale, T, part_stride, seg_chunks,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    W_FORM: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr,
    SPLIT_V: tl.constexpr, SEGMENTS: tl.constexpr, HAS_U: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """With SEGMENTS == SEG_WALK, program (i_v, i_nh, i_seg) walks segment i_seg only, from the
    state gradient chunk_dstate_kernel stored at its end; that sweep also writes dh0. With HAS_U,
    U comes from the forward (`u`) instead of from S: three products and two matrix loads fewer."""
    i_nh = tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    if SPLIT_V:
        i_v = tl.program_id(0)
        part = i_v.to(tl.int64) * part_stride
    else:                       # one block: constants, so the offsets and masks fold away
        i_v = 0
        part = 0
    o_k, o_v, m_kv, s_tile = _state_block(i_v, K, V, BK, BV)
    rows = tl.arange(0, BT)[:, None]
    cols = tl.arange(0, BT)[None, :]
    c0 = _chunk_base(chunk_offsets, i_n, T, BT, IS_VARLEN)
    n_chunks = tl.cdiv(eos - bos, BT)
    # dS: the gradient of the chunk's end state, from the sweep's at the segment's end (SEG_WALK) or dht
    c_begin, c_end, dS = _walk_start(dht, seg_ds, seg_offsets, i_n, i_h, i_nh, T, n_chunks, seg_chunks, m_kv, s_tile,
                                     H, K, V, BT, BK, BV, HAS_DHT, SEGMENTS, IS_VARLEN)
    for j in range(0, c_end - c_begin):
        i_c = c_end - 1 - j
        tok0 = bos + i_c * BT
        S = tl.load(states + ((c0 + i_c) * H + i_h) * K * V + s_tile, mask=m_kv, other=0.0)
        r_c, w_c, k_c, a_c, b_c, L, p_k, m_k = _load_chunk(r, w, k, a, b, tok0, eos, i_h, H, K, BT, BK, W_FORM, K)
        p_v, m_tv = _v_rows(tok0, eos, i_h, o_v, H, V, BT)
        v_c = tl.load(v + p_v, mask=m_tv, other=0.0).to(tl.float32)
        dO = tl.load(do + p_v, mask=m_tv, other=0.0).to(tl.float32) * scale
        G, Gm, G_last, a_hat, r_hat, tail = _chunk_decays(r_c, a_c, L)
        safe = _factorable(G_last)
        c = c0 + i_c
        Tinv_t = tl.load(_mat_ptrs(mats, c, i_h, MAT_TINV, H, BT, True))
        A_ak_t = tl.load(_mat_ptrs(mats, c, i_h, MAT_AK, H, BT, True))
        A_rb_t = tl.load(_mat_ptrs(mats, c, i_h, MAT_RB, H, BT, True))
        A_rk_t = tl.load(_mat_ptrs(mats, c, i_h, MAT_RK, H, BT, True))
        gamma = tl.exp(G_last)
        b_t = b_c * tail
        k_t = k_c * tail
        if HAS_U:
            U = tl.load(u + p_v, mask=m_tv, other=0.0)
        else:
            Tinv = tl.load(_mat_ptrs(mats, c, i_h, MAT_TINV, H, BT, False))
            A_ak = tl.load(_mat_ptrs(mats, c, i_h, MAT_AK, H, BT, False))
            Z = _dot(a_hat, S, DOT_PRECISION) + _dot(A_ak, v_c, DOT_PRECISION)
            U = _dot(Tinv, Z, DOT_PRECISION)

        # Through O = R̂ S + A_rb U + A_rk V and S' = γ S + B̃ᵀ U + K̃ᵀ V, then U = (I - A_ab)^-1 Z.
        dU, dZ = _grad_u_z(A_rb_t, Tinv_t, dO, b_c, tail, dS, DOT_PRECISION)
        dA_ab = tl.where(rows > cols, _dot(dZ, tl.trans(U), DOT_PRECISION), 0.0)
        dA_ak = tl.where(rows > cols, _dot(dZ, tl.trans(v_c), DOT_PRECISION), 0.0)
        dA_rb = tl.where(rows >= cols, _dot(dO, tl.trans(U), DOT_PRECISION), 0.0)
        dA_rk = tl.where(rows >= cols, _dot(dO, tl.trans(v_c), DOT_PRECISION), 0.0)
        dv_c = _dot(A_ak_t, dZ, DOT_PRECISION) \
            + _dot(A_rk_t, dO, DOT_PRECISION) \
            + _dot(k_t, dS, DOT_PRECISION)
        d_ahat = _dot(dZ, tl.trans(S), DOT_PRECISION)
        d_rhat = _dot(dO, tl.trans(S), DOT_PRECISION)
        d_bt = _dot(U, tl.trans(dS), DOT_PRECISION)
        d_kt = _dot(v_c, tl.trans(dS), DOT_PRECISION)
        d_gamma = tl.sum(dS * S, axis=1)
        dS_prev = _grad_start_state(r_hat, a_hat, G_last, dO, dS, dZ, DOT_PRECISION)

        # The four in-chunk matrices back to a, r, b, k and the cumulative decays, their pairs of
        # decay e^0 (_empty_span_pairs) left out here and taken apart after.
        if safe:
            e_neg = tl.exp(-G)
            b_f = b_c * e_neg
            k_f = k_c * e_neg
            dA_ab_x = tl.where(rows > cols + 1, dA_ab, 0.0)
            dA_ak_x = tl.where(rows > cols + 1, dA_ak, 0.0)
            dA_rb_x = tl.where(rows > cols, dA_rb, 0.0)
            dA_rk_x = tl.where(rows > cols, dA_rk, 0.0)
            d_ahat += _pair_dot(dA_ab_x, b_f, DOT_PRECISION) + _pair_dot(dA_ak_x, k_f, DOT_PRECISION)
            d_rhat += _pair_dot(dA_rb_x, b_f, DOT_PRECISION) + _pair_dot(dA_rk_x, k_f, DOT_PRECISION)
            d_bf = _pair_dot(tl.trans(dA_ab_x), a_hat, DOT_PRECISION) \
                + _pair_dot(tl.trans(dA_rb_x), r_hat, DOT_PRECISION)
            d_kf = _pair_dot(tl.trans(dA_ak_x), a_hat, DOT_PRECISION) \
                + _pair_dot(tl.trans(dA_rk_x), r_hat, DOT_PRECISION)
            db_c = d_bf * e_neg
            dk_c = d_kf * e_neg
            dG = -(d_bf * b_f + d_kf * k_f)
            dGm = tl.zeros([BT, BK], dtype=tl.float32)
            da_pair = tl.zeros([BT, BK], dtype=tl.float32)      # already inside d_ahat / d_rhat
            dr_pair = tl.zeros([BT, BK], dtype=tl.float32)
        else:
            db_c = tl.zeros([BT, BK], dtype=tl.float32)
            dk_c = tl.zeros([BT, BK], dtype=tl.float32)
            dG = tl.zeros([BT, BK], dtype=tl.float32)
            dGm = tl.zeros([BT, BK], dtype=tl.float32)
            da_pair = tl.zeros([BT, BK], dtype=tl.float32)
            dr_pair = tl.zeros([BT, BK], dtype=tl.float32)
            for s in range(BT):                      # a runtime loop: unrolled, it dominates compile time
                b_s, k_s, E, F = _pair_terms(G, Gm, b_c, k_c, s, BT, False)
                g_ab = _col(dA_ab, s, BT)[:, None]
                g_ak = _col(dA_ak, s, BT)[:, None]
                g_rb = _col(dA_rb, s, BT)[:, None]
                g_rk = _col(dA_rk, s, BT)[:, None]
                da_pair += (g_ab * b_s[None, :] + g_ak * k_s[None, :]) * E
                dr_pair += (g_rb * b_s[None, :] + g_rk * k_s[None, :]) * F
                aE = a_c * E
                rF = r_c * F
                db_s = tl.sum(g_ab * aE + g_rb * rF, axis=0)
                dk_s = tl.sum(g_ak * aE + g_rk * rF, axis=0)
                at_s = rows == s
                db_c = tl.where(at_s, db_s[None, :], db_c)
                dk_c = tl.where(at_s, dk_s[None, :], dk_c)
                dG = tl.where(at_s, dG - (b_s * db_s + k_s * dk_s)[None, :], dG)
            # e^{Gm_t - G_s} and e^{G_t - G_s}: the row exponents take x_t ⊙ (their share of dx_t).
            dGm += a_c * da_pair
            dG += r_c * dr_pair
        # The e^0 pairs: (t, t) of A_rb, A_rk and (t, t - 1) of A_ab, A_ak. The latter join rows
        # t and t - 1: one-row shifts within the chunk, as products with a 0/1 matrix (exact for a,
        # in the inputs' precision; da's terms round to tf32 where the dots take 16-bit inputs).
        ab_s = _empty_span_pairs(dA_ab, 1, BT)
        ak_s = _empty_span_pairs(dA_ak, 1, BT)
        rb_tt = _empty_span_pairs(dA_rb, 0, BT)
        rk_tt = _empty_span_pairs(dA_rk, 0, BT)
        shift = (rows == cols + 1).to(tl.float32)                        # [t, t - 1]
        a_next = _pair_dot(tl.trans(shift), a_c, DOT_PRECISION)
        dr_pair += rb_tt * b_c + rk_tt * k_c
        da_pair += _pair_dot(shift, ab_s * b_c + ak_s * k_c, DOT_PRECISION)
        db_c += rb_tt * r_c + ab_s * a_next
        dk_c += rk_tt * r_c + ak_s * a_next
        # Direct terms: Â = a e^{Gm}, R̂ = r e^{G}, B̃ = b e^{G_C - G}, K̃ = k e^{G_C - G}, γ = e^{G_C}.
        da_c = d_ahat * tl.exp(Gm) + da_pair
        dr_c = d_rhat * tl.exp(G) + dr_pair
        dGm += d_ahat * a_hat
        dG += d_rhat * r_hat
        db_c += d_bt * tail
        dk_c += d_kt * tail
        # The last token's tail e^{G_C - G_t} spans no L either (rows past eos carry zeros), nor
        # does Â's first row e^{Gm_0}: both stay out of dL.
        tail_terms = tl.where((rows < BT - 1) & (tok0 + rows + 1 < eos), d_bt * b_t + d_kt * k_t, 0.0)
        dG -= tail_terms
        dG_last = tl.sum(tail_terms, axis=0) + d_gamma * gamma
        dGm = tl.where(rows > 0, dGm, 0.0)
        # L_t enters G_s (s >= t), Gm_s (s > t) and G_last: suffix sums, each term entered at its
        # end of a span (a difference of totals would cancel to the rounding of the largest).
        dL = tl.cumsum(dG + dGm, axis=0, reverse=True) - dGm + dG_last[None, :]
        dw_c = _dlog_decay(dL, w_c, L, W_FORM)
        tl.store(dr + part + p_k, dr_c.to(dr.dtype.element_ty), mask=m_k)
        tl.store(dw + part + p_k, dw_c.to(dw.dtype.element_ty), mask=m_k)
        tl.store(dk + part + p_k, dk_c.to(dk.dtype.element_ty), mask=m_k)
        tl.store(da + part + p_k, da_c.to(da.dtype.element_ty), mask=m_k)
        tl.store(db + part + p_k, db_c.to(db.dtype.element_ty), mask=m_k)
        tl.store(dv + p_v, dv_c.to(dv.dtype.element_ty), mask=m_tv)
        dS = dS_prev
    if STORE_DH0 and SEGMENTS != SEG_WALK:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + s_tile, dS, mask=m_kv)


def chunk_backward(r, w, k, v, a, b, h0, do, dht, *, scale, cu_seqlens, w_form,
                   cfg_fwd: KernelConfig, cfg_bwd: KernelConfig, mats=None, seg_states=None, seg_len=0,
                   cfg_recompute: KernelConfig | None = None, transitions=None, u=None,
                   cfg_states: KernelConfig | None = None):
    """Gradients (dr, dw, dk, dv, da, db, dh0). `mats`: the chunk matrices a forward stored, or None
    to build them here; they are rebuilt (in the state recompute) unless they have the backward's
    chunk size.

    `seg_states`: the start state of every segment of `seg_len` steps, stored by the forward along
    with `mats`. Then a sweep stores the state gradient at every segment's end (chunk_dstate_kernel,
    at `mats`' chunk size and cfg_fwd's launch shape), and the state recompute and the gradient
    kernel run all segments at once. `cfg_recompute`: the segmented recompute's launch shape
    (default cfg_fwd's), always at the backward's chunk size.

    `transitions`: (M, R̃) from transition_twopass, in place of `mats`: the sweep walks them
    (transition_dstate, at cfg_fwd's chunk size and launch shape).

    `u`: the U the forward stored (chunk_forward's `u`). The gradient kernel loads it; and where
    `mats` has the backward's chunk size, the state recompute is chunk_states (no matrices), with
    `cfg_states`' launch shape (default: the recompute's)."""
    r, w, k, v, a, b, h0, do, dht, cu_seqlens = _contiguous(r, w, k, v, a, b, h0, do, dht, cu_seqlens)
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = _num_sequences(B, cu_seqlens)
    segmented = seg_states is not None and (mats is not None or transitions is not None)
    fwd_mats = mats
    # The backward walks the chunks with its own chunk size.
    # (The Gluon forward neither loads matrices nor stores chunk states: the recompute runs in Triton.)
    cfg_rebuild = (cfg_recompute if segmented and cfg_recompute else cfg_fwd).with_(chunk_size=cfg_bwd.chunk_size,
                                                                                     gluon=False)
    have = mats is not None and mats.shape[-1] == cfg_bwd.chunk_size
    if not have:
        mats = empty_mats(k, cu_seqlens, cfg_bwd.chunk_size)
    # With segments, the recompute (all segments at once) and the sweep (one program per pair and V
    # block, a latency-bound walk that leaves most of the device idle) need nothing from each other:
    # on CUDA the recompute runs on a side stream beside the sweep. What it writes
    # is allocated here, on this stream, which waits for it before the gradients read it. Not while
    # a CUDA graph is captured: graph trees cannot replay side-stream allocations.
    side = (_side_stream(k.device) if segmented and k.is_cuda and not torch.cuda.is_current_stream_capturing()
            else None)
    states = empty_states(k, v, cu_seqlens, cfg_bwd.chunk_size)
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(k.device))
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        if u is not None and have:
            chunk_states(w, k, v, b, u, h0, cu_seqlens=cu_seqlens, w_form=w_form, states=states,
                         cfg=(cfg_states or cfg_rebuild).with_(chunk_size=cfg_bwd.chunk_size),
                         seg_states=seg_states if segmented else None, seg_len=seg_len)
        else:
            chunk_forward(r, w, k, v, a, b, h0, scale=scale, cu_seqlens=cu_seqlens, w_form=w_form, cfg=cfg_rebuild,
                          store_o=False, store_final=False, store_states=True, states=states, mats=mats,
                          mats_mode="load" if have else "store", seg_states=seg_states if segmented else None,
                          seg_len=seg_len, seg_mode="walk" if segmented else "none")
    BT, BK = cfg_bwd.chunk_size, _pow2(K)
    BV = min(_pow2(V), cfg_bwd.block_v)
    NV = _cdiv(V, BV)
    offsets = _chunk_offsets(cu_seqlens, N, BT, k.device)
    if NV == 1:
        dr, dw, dk, da, db = (torch.empty_like(x) for x in (r, w, k, a, b))
    else:   # each V block's share of the r, w, k, a, b gradients, added below in a fixed order
        dr, dw, dk, da, db = (torch.empty(NV, *x.shape, dtype=torch.float32, device=x.device) for x in (r, w, k, a, b))
    dv = torch.empty_like(v)
    dh0 = torch.empty(N, H, K, V, dtype=torch.float32, device=k.device) if h0 is not None else None
    grid, seg_ds, seg_offsets, seg_chunks = (NV, N * H), None, None, 1
    P = _Pairs(N, H, cu_seqlens is not None)
    n_chunks = _cdiv(T, BT)
    # Head size 128's Gluon gradient kernel splits K over two programs; the sweep gives it dZ and
    # writes dv (kernels/twopass.py chunk_dstate_kernel's STORE_DZ_DV).
    ksplit = cfg_bwd.gluon and segmented
    dz = None
    if ksplit:
        if transitions is not None:
            raise ValueError("cfg_bwd: gluon is set, but the Gluon K-split gradient kernel takes dZ from the "
                             "chunk-matrix sweep, and this backward walks chunk transitions")
        _check_gluon("cfg_bwd", "chunk_bwd_split", K=K, V=V, chunk_size=BT, block_v=BV, dtype=k.dtype,
                     dot_precision=_dot_precision(cfg_bwd, k.dtype), T=T, has_u=u is not None, segmented=True,
                     sweep_chunk_size=fwd_mats.shape[-1])
        dz = torch.empty_like(v)         # rounded to bfloat16 by the gradient kernel's products anyway
    if segmented:
        seg_chunks, seg_offsets, n_segments = _segment_launch(cu_seqlens, N, T, seg_len, BT, k.device)
        seg_ds = torch.empty_like(seg_states)
        grid = grid + (n_segments,)
        if transitions is not None:
            if transitions[0].shape[0] != _chunk_count(cu_seqlens, N, T, cfg_fwd.chunk_size):
                raise ValueError(f"transitions: {transitions[0].shape[0]} chunk transitions per head, but cfg_fwd's "
                                 f"chunk size {cfg_fwd.chunk_size} makes {_chunk_count(cu_seqlens, N, T, cfg_fwd.chunk_size)}"
                                 " (they must be walked at the chunk size they were built at)")
            transition_dstate(do, dht, *transitions, seg_ds, dh0, scale=scale,
                              cu_seqlens=cu_seqlens, cfg=cfg_fwd, chunk_size=cfg_fwd.chunk_size, seg_len=seg_len,
                              seg_offsets=seg_offsets)
        else:
            dstate_sweep(r, w, k, a, b, do, dht, fwd_mats, seg_ds, dh0, scale=scale,
                         cu_seqlens=cu_seqlens, w_form=w_form, cfg=cfg_fwd, seg_len=seg_len,
                         dz=dz, dv=dv if ksplit else None, gluon=ksplit,
                         ds_bf16=_dot_precision(cfg_bwd, k.dtype) == "bf16")
    if side is not None:                 # the gradients need the recomputed states (and rebuilt matrices)
        torch.cuda.current_stream(k.device).wait_stream(side)
    if ksplit:
        from .gluon.backward_ksplit import chunk_backward_ksplit_gluon
        chunk_backward_ksplit_gluon(P, grid[2], r, w, k, v, a, b, do, dz, states, seg_ds, offsets, seg_offsets,
                                    cu_seqlens, u, (dr, dw, dk, da, db), scale=scale, T=T, BT=BT, seg_len=seg_len,
                                    seg_chunks=seg_chunks, w_form=w_form)
        return dr, dw, dk, dv, da, db, dh0
    if cfg_bwd.gluon:
        _check_gluon("cfg_bwd", "chunk_bwd", K=K, V=V, chunk_size=BT, block_v=BV, dtype=k.dtype,
                     dot_precision=_dot_precision(cfg_bwd, k.dtype), T=T, has_u=u is not None, segmented=segmented)
        from .gluon.backward import chunk_backward_gluon
        chunk_backward_gluon(P, r, w, k, v, a, b, do, dht, states, mats, offsets, cu_seqlens, u,
                             (dr, dw, dk, dv, da, db), dh0, scale=scale, T=T, BT=BT,
                             w_form=w_form)
        return dr, dw, dk, dv, da, db, dh0
    # With several V blocks the r, w, k, a, b gradients are [NV, B, T, H, K]: the shares lie r.numel() apart
    # (the whole call's, whichever slice of sequences a launch takes).
    _launch(
        chunk_bwd_kernel, grid, P,
        (*(P.tokens(x) for x in (r, w, k, v, a, b, do)), P.rows(dht, v), P.chunks(states, n_chunks),
         P.chunks(mats, n_chunks), P.bounds(offsets, v), P.bounds(cu_seqlens, v),
         P.chunks(seg_ds, _cdiv(T, seg_len or 1), v), P.bounds(seg_offsets, v), P.tokens(u, v),
         *(P.tokens(g, dim=1 if NV > 1 and g is not dv else 0) for g in (dr, dw, dk, dv, da, db)),
         P.rows(dh0, v), float(scale), T, 0 if NV == 1 else r.numel(), seg_chunks),
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, W_FORM=W_FORM_CODES[w_form], HAS_DHT=dht is not None,
        STORE_DH0=h0 is not None, IS_VARLEN=cu_seqlens is not None, SPLIT_V=NV > 1,
        SEGMENTS=SEG_MODES["walk" if segmented else "none"], HAS_U=u is not None,
        DOT_PRECISION=_dot_precision(cfg_bwd, k.dtype), **_launch_options(cfg_bwd),
    )
    if NV > 1:
        dr, dw, dk, da, db = (g.sum(0).to(x.dtype) for g, x in zip((dr, dw, dk, da, db), (r, w, k, a, b)))
    return dr, dw, dk, dv, da, db, dh0
