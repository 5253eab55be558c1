"""The transition variant of the two-pass path: every chunk's transition built at once, the walk over
them, and the state-gradient sweep back over them, with their launchers (K, V <= 64)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import KernelConfig
from .chunk_math import _chunk_decays, _intra_by_column_blocks, _load_chunk, _unit_lower_inverse
from .common import (SEG_MODES, SEG_STORE, W_FORM_CODES, _Pairs, _cdiv, _chunk_base, _chunk_count, _chunk_offsets,
                     _chunks_per_segment, _contiguous, _dot, _dot_precision, _launch, _launch_options, _num_sequences,
                     _pow2, _segment_base, _segment_launch, _seq_bounds, _state_block, _v_rows)

# ---------------------------------------------------------------------------------------------
# Chunk transitions (two-pass prefill and training): a chunk maps its start state S to
#     O = R̃ S + Q V,   S' = M S + P V,   where, with W = (I - A_ab)^-1 Â and X = (I - A_ab)^-1 A_ak,
#     R̃ = R̂ + A_rb W,  Q = A_rk + A_rb X,  M = diag(γ) + B̃ᵀ W,  P = K̃ᵀ + B̃ᵀ X.
# None of them depends on S or on V, so chunk_transition_kernel builds them for every chunk at once;
# the walk then has one K x K product per chunk on its dependent chain (S' = M S + P V), where the
# loaded forward has three. The state gradient walks back the same way: dS ← Mᵀ dS + R̃ᵀ dO.
# Per chunk and head: M [K, K], P [K, C], Q [C, C]; R̃ is float32 in r's layout.

@triton.jit
def chunk_transition_kernel(
    r, w, k, a, b, trans, p_mat, q_mat, r_eff, chunk_offsets, cu_seqlens, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BKK: tl.constexpr,
    W_FORM: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (i_p, i_nh) takes chunks i_p, i_p + P, ... of sequence i_nh // H, as chunk_prep."""
    i_p, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    c0 = _chunk_base(chunk_offsets, i_n, T, BT, IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_t = tl.arange(0, BT)
    m_k = o_k < K
    for i_c in range(i_p, tl.cdiv(eos - bos, BT), tl.num_programs(0)):
        tok0 = bos + i_c * BT
        ch = (c0 + i_c) * H + i_h
        A_ab, A_ak, A_rb, A_rk = _intra_by_column_blocks(r, w, k, a, b, tok0, eos, i_h, H, K, BT, BKK, W_FORM,
                                                         DOT_PRECISION)
        Tinv = _unit_lower_inverse(A_ab, BT, DOT_PRECISION)
        r_c, w_c, k_c, a_c, b_c, L, p_k, m_tk = _load_chunk(r, w, k, a, b, tok0, eos, i_h, H, K, BT, BK, W_FORM, K)
        G, Gm, G_last, a_hat, r_hat, tail = _chunk_decays(r_c, a_c, L)
        W_ = _dot(Tinv, a_hat, DOT_PRECISION)
        X = _dot(Tinv, A_ak, DOT_PRECISION)
        b_t = tl.trans(b_c * tail)
        M = _dot(b_t, W_, DOT_PRECISION) \
            + tl.where(o_k[:, None] == o_k[None, :], tl.exp(G_last)[:, None], 0.0)
        tl.store(trans + ch * K * K + o_k[:, None] * K + o_k[None, :], M, mask=m_k[:, None] & m_k[None, :])
        P = tl.trans(k_c * tail) + _dot(b_t, X, DOT_PRECISION)
        tl.store(p_mat + ch * K * BT + o_k[:, None] * BT + o_t[None, :], P, mask=m_k[:, None])
        tl.store(r_eff + p_k, r_hat + _dot(A_rb, W_, DOT_PRECISION), mask=m_tk)
        tl.store(q_mat + ch * BT * BT + o_t[:, None] * BT + o_t[None, :],
                 A_rk + _dot(A_rb, X, DOT_PRECISION))


@triton.jit
def chunk_transition_fwd_kernel(
    v, trans, p_mat, q_mat, r_eff, o, h0, ht, chunk_offsets, cu_seqlens, seg_states, seg_offsets, scale, T,
    seg_chunks,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_STATE: tl.constexpr, STORE_FINAL: tl.constexpr, STORE_O: tl.constexpr, SEGMENTS: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per (V block, sequence, head) walks the chunks: O = R̃ S + Q V, S ← M S + P V.
    With SEGMENTS == SEG_STORE it also stores each segment's start state (for the segmented
    backward)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    o_k, o_v, m_kv, s_tile = _state_block(i_v, K, V, BK, BV)
    o_t = tl.arange(0, BT)
    m_k = o_k < K
    c0 = _chunk_base(chunk_offsets, i_n, T, BT, IS_VARLEN)
    n_chunks = tl.cdiv(eos - bos, BT)
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_STATE:
        S += tl.load(h0 + i_nh.to(tl.int64) * K * V + s_tile, mask=m_kv, other=0.0)
    if SEGMENTS == SEG_STORE:
        s0 = _segment_base(seg_offsets, i_n, T, seg_chunks, BT, IS_VARLEN)
    else:
        seg_chunks = tl.maximum(n_chunks, 1)
    # Segments outside, chunks inside: each segment's start state is stored once, with no test
    # inside the chunk loop.
    for i_s in range(0, tl.cdiv(n_chunks, seg_chunks)):
        if SEGMENTS == SEG_STORE:
            tl.store(seg_states + ((s0 + i_s) * H + i_h) * K * V + s_tile, S, mask=m_kv)
        for i_c in range(i_s * seg_chunks, tl.minimum(i_s * seg_chunks + seg_chunks, n_chunks)):
            ch = (c0 + i_c) * H + i_h
            tok0 = bos + i_c * BT
            p_v, m_tv = _v_rows(tok0, eos, i_h, o_v, H, V, BT)
            v_c = tl.load(v + p_v, mask=m_tv, other=0.0).to(tl.float32)
            M = tl.load(trans + ch * K * K + o_k[:, None] * K + o_k[None, :], mask=m_k[:, None] & m_k[None, :], other=0.0)
            P = tl.load(p_mat + ch * K * BT + o_k[:, None] * BT + o_t[None, :], mask=m_k[:, None], other=0.0)
            if STORE_O:
                R = tl.load(r_eff + ((tok0 + o_t)[:, None] * H + i_h) * K + o_k[None, :],
                            mask=(tok0 + o_t < eos)[:, None] & m_k[None, :], other=0.0)
                Q = tl.load(q_mat + ch * BT * BT + o_t[:, None] * BT + o_t[None, :])
                O = _dot(R, S, DOT_PRECISION) + _dot(Q, v_c, DOT_PRECISION)
                tl.store(o + p_v, (O * scale).to(o.dtype.element_ty), mask=m_tv)
            S = _dot(M, S, DOT_PRECISION) + _dot(P, v_c, DOT_PRECISION)
    if STORE_FINAL:
        tl.store(ht + i_nh.to(tl.int64) * K * V + s_tile, S, mask=m_kv)


@triton.jit
def chunk_transition_dstate_kernel(
    trans, r_eff, do, dht, seg_ds, dh0, chunk_offsets, seg_offsets, cu_seqlens, scale, T, seg_chunks,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The state-gradient sweep on chunk transitions: dS ← Mᵀ dS + R̃ᵀ dO (scaled), last chunk to
    first; stores dS at the end of every segment, as chunk_dstate_kernel does."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    o_k, o_v, m_kv, s_tile = _state_block(i_v, K, V, BK, BV)
    m_kk = (o_k < K)[:, None] & (o_k < K)[None, :]
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dS += tl.load(dht + i_nh.to(tl.int64) * K * V + s_tile, mask=m_kv, other=0.0)
    c0 = _chunk_base(chunk_offsets, i_n, T, BT, IS_VARLEN)
    n_chunks = tl.cdiv(eos - bos, BT)
    s0 = _segment_base(seg_offsets, i_n, T, seg_chunks, BT, IS_VARLEN)
    n_segs = tl.cdiv(n_chunks, seg_chunks)
    for j_s in range(0, n_segs):                 # segments last to first, their chunks inside
        i_s = n_segs - 1 - j_s
        tl.store(seg_ds + ((s0 + i_s) * H + i_h) * K * V + s_tile, dS, mask=m_kv)
        c_begin = i_s * seg_chunks
        c_last = tl.minimum(c_begin + seg_chunks, n_chunks) - 1
        for j in range(0, c_last - c_begin + 1):
            i_c = c_last - j
            ch = (c0 + i_c) * H + i_h
            tok0 = bos + i_c * BT
            M_t = tl.load(trans + ch * K * K + o_k[None, :] * K + o_k[:, None], mask=m_kk, other=0.0)
            p_v, m_tv = _v_rows(tok0, eos, i_h, o_v, H, V, BT)
            dO = tl.load(do + p_v, mask=m_tv, other=0.0).to(tl.float32) * scale
            o_t = tok0 + tl.arange(0, BT)
            R_t = tl.load(r_eff + (o_t[None, :] * H + i_h) * K + o_k[:, None],
                          mask=(o_t < eos)[None, :] & (o_k < K)[:, None], other=0.0)
            dS = _dot(M_t, dS, DOT_PRECISION) + _dot(R_t, dO, DOT_PRECISION)
    if STORE_DH0:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + s_tile, dS, mask=m_kv)


def chunk_transitions(r, w, k, a, b, *, cu_seqlens, w_form, cfg: KernelConfig, programs_per_sequence: int = 1):
    """Every chunk's transition at cfg's chunk size C (the kernels above), all
    chunks in parallel: (M [chunks, H, K, K], P [chunks, H, K, C], Q [chunks, H, C, C], R̃ float32
    in r's layout)."""
    r, w, k, a, b, cu_seqlens = _contiguous(r, w, k, a, b, cu_seqlens)
    B, T, H, K = k.shape
    N = _num_sequences(B, cu_seqlens)
    BT = cfg.chunk_size
    n = _chunk_count(cu_seqlens, N, T, BT)
    trans = torch.empty(n, H, K, K, dtype=torch.float32, device=k.device)
    p_mat = torch.empty(n, H, K, BT, dtype=torch.float32, device=k.device)
    q_mat = torch.empty(n, H, BT, BT, dtype=torch.float32, device=k.device)
    r_eff = torch.empty(r.shape, dtype=torch.float32, device=r.device)
    offsets = _chunk_offsets(cu_seqlens, N, BT, k.device)
    P = max(1, min(programs_per_sequence, _cdiv(T, BT)))
    pairs = _Pairs(N, H, cu_seqlens is not None)
    _launch(
        chunk_transition_kernel, (P, N * H), pairs,
        (*(pairs.tokens(x) for x in (r, w, k, a, b)), *(pairs.chunks(x, _cdiv(T, BT)) for x in (trans, p_mat, q_mat)),
         pairs.tokens(r_eff), pairs.bounds(offsets, k), pairs.bounds(cu_seqlens, k), T),
        H=H, K=K, BT=BT, BK=_pow2(K), BKK=min(_pow2(K), cfg.block_k), W_FORM=W_FORM_CODES[w_form],
        IS_VARLEN=cu_seqlens is not None, DOT_PRECISION=_dot_precision(cfg, k.dtype), **_launch_options(cfg),
    )
    return trans, p_mat, q_mat, r_eff


def transition_forward(v, h0, trans, p_mat, q_mat, r_eff, *, scale, cu_seqlens, cfg: KernelConfig, store_o=True,
                       store_final=True, seg_states=None, seg_len=0):
    """(o or None, final state or None): the walk over chunk transitions, one program per (V block,
    sequence, head); with `seg_states`, each segment's start state is stored there as well."""
    v, h0, cu_seqlens = _contiguous(v, h0, cu_seqlens)
    B, T, H, V = v.shape
    K, BT = p_mat.shape[-2:]
    N = _num_sequences(B, cu_seqlens)
    BV = min(_pow2(V), cfg.block_v)
    o = torch.empty_like(v) if store_o else None
    ht = torch.empty(N, H, K, V, dtype=torch.float32, device=v.device) if store_final else None
    offsets = _chunk_offsets(cu_seqlens, N, BT, v.device)
    seg_offsets, seg_chunks = None, 1
    if seg_states is not None:
        seg_chunks, seg_offsets, _ = _segment_launch(cu_seqlens, N, T, seg_len, BT, v.device)
    P = _Pairs(N, H, cu_seqlens is not None)
    _launch(
        chunk_transition_fwd_kernel, (_cdiv(V, BV), N * H), P,
        (P.tokens(v), *(P.chunks(x, _cdiv(T, BT)) for x in (trans, p_mat, q_mat)), P.tokens(r_eff),
         P.tokens(o, v), P.rows(h0, v), P.rows(ht, v), P.bounds(offsets, v), P.bounds(cu_seqlens, v),
         P.chunks(seg_states, _cdiv(T, seg_len or 1), v), P.bounds(seg_offsets, v), float(scale), T, seg_chunks),
        H=H, K=K, V=V, BT=BT, BK=_pow2(K), BV=BV, HAS_STATE=h0 is not None, STORE_FINAL=store_final,
        STORE_O=store_o, SEGMENTS=SEG_MODES["none" if seg_states is None else "store"],
        IS_VARLEN=cu_seqlens is not None, DOT_PRECISION=_dot_precision(cfg, v.dtype), **_launch_options(cfg),
    )
    return o, ht


def transition_twopass(r, w, k, v, a, b, h0, *, scale, cu_seqlens, w_form, cfg_trans: KernelConfig,
                       cfg_walk: KernelConfig, programs_per_sequence: int, store_o=True, store_final=True,
                       seg_states=None, seg_len=0):
    """Chunk transitions for every chunk (chunk_transitions), then the walk over them
    (transition_forward). Returns (o or None, final state or None, (M, R̃)): what the
    state-gradient sweep of training needs (transition_dstate)."""
    trans, p_mat, q_mat, r_eff = chunk_transitions(r, w, k, a, b, cu_seqlens=cu_seqlens, w_form=w_form,
                                                   cfg=cfg_trans, programs_per_sequence=programs_per_sequence)
    o, ht = transition_forward(v, h0, trans, p_mat, q_mat, r_eff, scale=scale, cu_seqlens=cu_seqlens, cfg=cfg_walk,
                               store_o=store_o, store_final=store_final, seg_states=seg_states, seg_len=seg_len)
    return o, ht, (trans, r_eff)


def transition_dstate(do, dht, trans, r_eff, seg_ds, dh0, *, scale, cu_seqlens, cfg: KernelConfig, chunk_size: int,
                      seg_len: int, seg_offsets=None):
    """The state-gradient sweep over chunk transitions: fills `seg_ds` (the state gradient at each
    segment's end) and, if given, `dh0`. `seg_offsets`: packed sequences' offsets into the segment
    buffers, when the caller has them already (`_chunk_offsets` at seg_len)."""
    B, T, H, V = do.shape
    K = trans.shape[-1]
    N = _num_sequences(B, cu_seqlens)
    BT, BV = chunk_size, min(_pow2(V), cfg.block_v)
    offsets = _chunk_offsets(cu_seqlens, N, BT, do.device)
    if seg_offsets is None:
        seg_offsets = _chunk_offsets(cu_seqlens, N, seg_len, do.device)
    P = _Pairs(N, H, cu_seqlens is not None)
    _launch(
        chunk_transition_dstate_kernel, (_cdiv(V, BV), N * H), P,
        (P.chunks(trans, _cdiv(T, BT)), P.tokens(r_eff), P.tokens(do), P.rows(dht, do),
         P.chunks(seg_ds, _cdiv(T, seg_len)), P.rows(dh0, do), P.bounds(offsets, do), P.bounds(seg_offsets, do),
         P.bounds(cu_seqlens, do), float(scale), T, _chunks_per_segment(seg_len, BT)),
        H=H, K=K, V=V, BT=BT, BK=_pow2(K), BV=BV, HAS_DHT=dht is not None, STORE_DH0=dh0 is not None,
        IS_VARLEN=cu_seqlens is not None, DOT_PRECISION=_dot_precision(cfg, do.dtype), **_launch_options(cfg),
    )
