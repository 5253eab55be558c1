"""The one-pass chunked forward (which also serves as the loaded forward of the two-pass path and
the backward's state recompute) and the chunk start states from the forward's U, with their
launchers. Where a config asks for it (`gluon`), the same math runs in Gluon (kernels/gluon/)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import KernelConfig
from .chunk_math import _advance_state, _chunk_decays, _chunk_prepare, _load_chunk, _mat_ptrs
from .common import (MATS_LOAD, MATS_MODES, MATS_STORE, MAT_AK, MAT_RB, MAT_RK, MAT_TINV, SEG_MODES, SEG_STORE,
                     W_FORM_CODES, _Pairs, _cdiv, _check_gluon, _chunk_base, _chunk_offsets, _contiguous, _dot,
                     _dot_precision, _launch, _launch_options, _num_sequences, _pow2, _segment_base, _segment_launch,
                     _seq_bounds, _state_block, _v_rows, _walk_start, empty_states)
from .roles import ROLES

@triton.jit
def chunk_fwd_kernel(
    r, w, k, v, a, b, o, h0, ht, states, mats, chunk_offsets, cu_seqlens, seg_states, seg_offsets, u, scale, T,
    seg_chunks,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    W_FORM: tl.constexpr, HAS_STATE: tl.constexpr, STORE_FINAL: tl.constexpr, STORE_O: tl.constexpr,
    STORE_STATES: tl.constexpr, MATS: tl.constexpr, SEGMENTS: tl.constexpr, STORE_U: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """With STORE_U (training), U (float32, v's layout) is stored as well: the backward then
    rebuilds the chunk states from it without the chunk matrices (chunk_states_kernel) and the
    gradient kernel loads it instead of recomputing it."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    o_k, o_v, m_kv, s_tile = _state_block(i_v, K, V, BK, BV)
    c0 = _chunk_base(chunk_offsets, i_n, T, BT, IS_VARLEN)
    n_chunks = tl.cdiv(eos - bos, BT)
    # SEG_WALK: one segment, from the start state the forward stored
    c_begin, c_end, S = _walk_start(h0, seg_states, seg_offsets, i_n, i_h, i_nh, T, n_chunks, seg_chunks, m_kv, s_tile,
                                    H, K, V, BT, BK, BV, HAS_STATE, SEGMENTS, IS_VARLEN)
    if SEGMENTS == SEG_STORE:
        s0 = _segment_base(seg_offsets, i_n, T, seg_chunks, BT, IS_VARLEN)
    for i_c in range(c_begin, c_end):
        tok0 = bos + i_c * BT
        if STORE_STATES:
            tl.store(states + ((c0 + i_c) * H + i_h) * K * V + s_tile, S, mask=m_kv)
        if SEGMENTS == SEG_STORE:
            if i_c % seg_chunks == 0:
                tl.store(seg_states + ((s0 + i_c // seg_chunks) * H + i_h) * K * V + s_tile, S, mask=m_kv)
        r_c, w_c, k_c, a_c, b_c, L, p_k, m_k = _load_chunk(r, w, k, a, b, tok0, eos, i_h, H, K, BT, BK, W_FORM, K)
        p_v, m_tv = _v_rows(tok0, eos, i_h, o_v, H, V, BT)
        v_c = tl.load(v + p_v, mask=m_tv, other=0.0).to(tl.float32)
        c = c0 + i_c
        if MATS == MATS_LOAD:
            G, Gm, G_last, a_hat, r_hat, tail = _chunk_decays(r_c, a_c, L)
            Tinv = tl.load(_mat_ptrs(mats, c, i_h, MAT_TINV, H, BT, False))
            A_ak = tl.load(_mat_ptrs(mats, c, i_h, MAT_AK, H, BT, False))
            A_rb = tl.load(_mat_ptrs(mats, c, i_h, MAT_RB, H, BT, False))
            A_rk = tl.load(_mat_ptrs(mats, c, i_h, MAT_RK, H, BT, False))
        else:
            G, Gm, G_last, safe, a_hat, r_hat, tail, A_ab, A_ak, A_rb, A_rk, Tinv = _chunk_prepare(
                r_c, k_c, a_c, b_c, L, BT, DOT_PRECISION)
            if MATS == MATS_STORE:
                if i_v == 0:                     # one V block stores them for all
                    tl.store(_mat_ptrs(mats, c, i_h, MAT_TINV, H, BT, False), Tinv)
                    tl.store(_mat_ptrs(mats, c, i_h, MAT_AK, H, BT, False), A_ak)
                    tl.store(_mat_ptrs(mats, c, i_h, MAT_RB, H, BT, False), A_rb)
                    tl.store(_mat_ptrs(mats, c, i_h, MAT_RK, H, BT, False), A_rk)
        Z = _dot(a_hat, S, DOT_PRECISION) + _dot(A_ak, v_c, DOT_PRECISION)
        U = _dot(Tinv, Z, DOT_PRECISION)                           # U_t = a_tᵀ h_{t-1}
        if STORE_U:
            tl.store(u + p_v, U, mask=m_tv)
        if STORE_O:
            O = _dot(r_hat, S, DOT_PRECISION) + _dot(A_rb, U, DOT_PRECISION) \
                + _dot(A_rk, v_c, DOT_PRECISION)
            tl.store(o + p_v, (O * scale).to(o.dtype.element_ty), mask=m_tv)
        S = _advance_state(S, G_last, b_c, k_c, tail, U, v_c, DOT_PRECISION)
    if STORE_FINAL:
        tl.store(ht + i_nh.to(tl.int64) * K * V + s_tile, S, mask=m_kv)


# ---------------------------------------------------------------------------------------------
# Chunk start states from the forward's U (the backward's recompute, when the forward stored U):
# S' = γ ⊙ S + B̃ᵀ U + K̃ᵀ V. Neither product takes S, so the chain from chunk to chunk is one
# multiply-add, and no chunk matrix is read: the loaded forward's recompute has three dependent
# products per chunk (Z, U, S') and reads the inverse and A_ak.

@triton.jit
def chunk_states_kernel(
    w, k, v, b, u, h0, states, chunk_offsets, cu_seqlens, seg_states, seg_offsets, T, seg_chunks,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    W_FORM: tl.constexpr, HAS_STATE: tl.constexpr, SEGMENTS: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Stores every chunk's start state, as chunk_fwd_kernel with STORE_STATES. SEGMENTS is
    SEG_NONE (one program walks the sequence from h0) or SEG_WALK (program (i_v, i_nh, i_seg)
    walks segment i_seg from the start state the forward stored)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    o_k, o_v, m_kv, s_tile = _state_block(i_v, K, V, BK, BV)
    c0 = _chunk_base(chunk_offsets, i_n, T, BT, IS_VARLEN)
    n_chunks = tl.cdiv(eos - bos, BT)
    c_begin, c_end, S = _walk_start(h0, seg_states, seg_offsets, i_n, i_h, i_nh, T, n_chunks, seg_chunks, m_kv, s_tile,
                                    H, K, V, BT, BK, BV, HAS_STATE, SEGMENTS, IS_VARLEN)
    for i_c in range(c_begin, c_end):
        tok0 = bos + i_c * BT
        tl.store(states + ((c0 + i_c) * H + i_h) * K * V + s_tile, S, mask=m_kv)
        # r and a are not needed: k and b stand in for them (the unused loads are dropped).
        r_c, w_c, k_c, a_c, b_c, L, p_k, m_k = _load_chunk(k, w, k, b, b, tok0, eos, i_h, H, K, BT, BK, W_FORM, K)
        p_v, m_tv = _v_rows(tok0, eos, i_h, o_v, H, V, BT)
        v_c = tl.load(v + p_v, mask=m_tv, other=0.0).to(tl.float32)
        U = tl.load(u + p_v, mask=m_tv, other=0.0)
        G, Gm, G_last, a_hat, r_hat, tail = _chunk_decays(r_c, a_c, L)     # Â, R̂: unused, dropped
        S = _advance_state(S, G_last, b_c, k_c, tail, U, v_c, DOT_PRECISION)


def chunk_states(w, k, v, b, u, h0, *, cu_seqlens, cfg: KernelConfig, w_form, states, seg_states=None, seg_len=0):
    """Fills `states` (from `empty_states` at cfg's chunk size) with every chunk's start state, from
    the forward's U: one program per (V block, sequence, head) walking from h0, or with
    `seg_states` one per segment as well, walking from the segment's start state."""
    w, k, v, b, u, h0, cu_seqlens = _contiguous(w, k, v, b, u, h0, cu_seqlens)
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = _num_sequences(B, cu_seqlens)
    BT, BV = cfg.chunk_size, min(_pow2(V), cfg.block_v)
    offsets = _chunk_offsets(cu_seqlens, N, BT, k.device)
    if cfg.gluon:
        _check_gluon("cfg", "chunk_states", K=K, V=V, chunk_size=BT, block_v=BV, dtype=k.dtype,
                     dot_precision=_dot_precision(cfg, k.dtype), T=T, segmented=seg_states is not None)
        BV = ROLES["chunk_states"].gluon.block_v     # the Gluon kernel's own V blocks
    grid, seg_offsets, seg_chunks = (_cdiv(V, BV), N * H), None, 1
    if seg_states is not None:
        seg_chunks, seg_offsets, n_segments = _segment_launch(cu_seqlens, N, T, seg_len, BT, k.device)
        grid = grid + (n_segments,)
    P = _Pairs(N, H, cu_seqlens is not None)
    if cfg.gluon:
        from .gluon.states import chunk_states_gluon
        chunk_states_gluon(grid, P, w, k, v, b, u, h0, states, offsets, cu_seqlens, seg_states, seg_offsets, T=T,
                           BT=BT, seg_len=seg_len, seg_chunks=seg_chunks, w_form=w_form)
        return states
    args = (*(P.tokens(x) for x in (w, k, v, b, u)), P.rows(h0, v), P.chunks(states, _cdiv(T, BT)),
            P.bounds(offsets, v), P.bounds(cu_seqlens, v), P.chunks(seg_states, _cdiv(T, seg_len or 1), v),
            P.bounds(seg_offsets, v), T, seg_chunks)
    common = dict(H=H, K=K, V=V, BV=BV, BT=BT, W_FORM=W_FORM_CODES[w_form], HAS_STATE=h0 is not None,
                  IS_VARLEN=cu_seqlens is not None)
    _launch(chunk_states_kernel, grid, P, args, **common, BK=_pow2(K),
            SEGMENTS=SEG_MODES["none" if seg_states is None else "walk"],
            DOT_PRECISION=_dot_precision(cfg, k.dtype), **_launch_options(cfg))
    return states


def chunk_forward(r, w, k, v, a, b, h0, *, scale, cu_seqlens, w_form, cfg: KernelConfig,
                  store_o=True, store_final=True, store_states=False, mats=None, mats_mode="build",
                  seg_states=None, seg_len=0, seg_mode="none", states=None, u=None, chunks=(0, None), o=None):
    """(o, final state, chunk start states or None). `states`: with store_states, the buffer to
    fill (from `empty_states`) instead of a new one. `u`: a float32 buffer shaped like v (from
    `empty_u`) to store U in, for the backward (chunk_states, chunk_backward's `u`). `mats_mode`:
    "build" the chunk matrices in the loop, or also "store" them into `mats` (from `empty_mats`), or
    "load" them from `mats`.
    `seg_mode`: "store" the start state of each segment of `seg_len` steps into `seg_states` (from
    `empty_states`), or "walk" every segment at once from those states (the backward's
    recompute; no o, no final state)."""
    r, w, k, v, a, b, h0, cu_seqlens = _contiguous(r, w, k, v, a, b, h0, cu_seqlens)
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = _num_sequences(B, cu_seqlens)
    BT, BK = cfg.chunk_size, _pow2(K)
    BV = min(_pow2(V), cfg.block_v)
    o = (torch.empty_like(v) if o is None else o) if store_o else None
    ht = torch.empty(N, H, K, V, dtype=torch.float32, device=k.device) if store_final else None
    c_lo, c_hi = chunks[0], _cdiv(T, BT) if chunks[1] is None else chunks[1]
    if (c_lo, c_hi) != (0, _cdiv(T, BT)) and not (cfg.gluon and mats_mode == "load"):
        raise ValueError("chunks: only the Gluon loaded forward takes a chunk range")
    offsets = _chunk_offsets(cu_seqlens, N, BT, k.device)
    if store_states and states is None:
        states = empty_states(k, v, cu_seqlens, BT)
    elif not store_states:
        states = None
    if (mats is None) != (mats_mode == "build"):
        raise ValueError(f"mats: mode {mats_mode!r} {'needs' if mats is None else 'takes no'} a buffer")
    if (seg_states is None) != (seg_mode == "none"):
        raise ValueError(f"seg_states: mode {seg_mode!r} {'needs' if seg_states is None else 'takes no'} a buffer")
    if seg_mode == "walk" and (store_o or store_final):
        raise ValueError("seg_mode: 'walk' recomputes chunk states only (store_o and store_final must be False)")
    P = _Pairs(N, H, cu_seqlens is not None)
    n_chunks = _cdiv(T, BT)
    if cfg.gluon and mats_mode == "load":      # head 128's loaded forward
        _check_gluon("cfg", "chunk_fwd_loaded", K=K, V=V, chunk_size=BT, block_v=BV, dtype=k.dtype,
                     dot_precision=_dot_precision(cfg, k.dtype), T=T, segmented=seg_mode == "walk",
                     store_states=store_states)
        from .gluon.loaded_walks import chunk_forward_loaded_gluon
        chunk_forward_loaded_gluon(P, r, w, k, v, a, b, o, h0, ht, mats, offsets, cu_seqlens, seg_states, u,
                                   scale=scale, T=T, BT=BT, seg_len=seg_len, w_form=w_form, chunks=(c_lo, c_hi))
        return o, ht, None
    if cfg.gluon:
        _check_gluon("cfg", "chunk_fwd", K=K, V=V, chunk_size=BT, block_v=BV, dtype=k.dtype,
                     dot_precision=_dot_precision(cfg, k.dtype), T=T, segmented=seg_mode != "none", mats_mode=mats_mode,
                     store_states=store_states)
        from .gluon.forward import chunk_forward_gluon
        chunk_forward_gluon(P, r, w, k, v, a, b, o, h0, ht, mats, offsets, cu_seqlens, u, scale=scale, T=T, BT=BT,
                            w_form=w_form, store_mats=mats_mode == "store")
        return o, ht, None
    grid = (_cdiv(V, BV), N * H)
    seg_offsets, seg_chunks = None, 1
    if seg_mode != "none":
        seg_chunks, seg_offsets, n_segments = _segment_launch(cu_seqlens, N, T, seg_len, BT, k.device)
        if seg_mode == "walk":
            grid = grid + (n_segments,)
    _launch(
        chunk_fwd_kernel, grid, P,
        (*(P.tokens(x) for x in (r, w, k, v, a, b)), P.tokens(o, v), P.rows(h0, v), P.rows(ht, v),
         P.chunks(states, n_chunks, v), P.chunks(mats, n_chunks, v),
         P.bounds(offsets, v), P.bounds(cu_seqlens, v), P.chunks(seg_states, _cdiv(T, seg_len or 1), v),
         P.bounds(seg_offsets, v), P.tokens(u, v), float(scale), T, seg_chunks),
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, W_FORM=W_FORM_CODES[w_form], HAS_STATE=h0 is not None,
        STORE_FINAL=store_final, STORE_O=store_o, STORE_STATES=store_states, MATS=MATS_MODES[mats_mode],
        SEGMENTS=SEG_MODES[seg_mode], STORE_U=u is not None, IS_VARLEN=cu_seqlens is not None,
        DOT_PRECISION=_dot_precision(cfg, k.dtype), **_launch_options(cfg),
    )
    return o, ht, states
