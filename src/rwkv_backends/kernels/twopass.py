"""The two-pass path: every chunk's matrices built at once (chunk_prepare), the forward that loads
them (chunk.py's kernel with MATS_LOAD), and the segmented backward's state-gradient sweep over
them (dstate_sweep), with their launchers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import KernelConfig
from .chunk import chunk_forward
from .chunk_math import (_chunk_decays, _grad_start_state, _grad_u_z, _intra_by_column_blocks, _load_chunk, _mat_ptrs,
                         _unit_lower_inverse)
from .common import (MAT_AK, MAT_RB, MAT_RK, MAT_TINV, W_FORM_CODES, _Pairs, _cdiv, _check_gluon, _chunk_base,
                     _chunk_offsets, _chunks_per_segment, _contiguous, _dot, _dot_precision, _launch, _launch_options,
                     _num_sequences, _pow2, _segment_base, _segment_launch, _seq_bounds, _side_stream, _state_block,
                     _v_rows, empty_mats)
from .roles import ROLES


# ---------------------------------------------------------------------------------------------
# Chunk matrices for every chunk at once (prefill): nothing here depends on the state, so the
# chunks of a sequence need not wait for each other. Program (i_p, i_nh) takes chunks i_p,
# i_p + P, i_p + 2P, ... of sequence i_nh // H (P = the grid's first size).

@triton.jit
def chunk_prep_kernel(
    r, w, k, a, b, mats, chunk_offsets, cu_seqlens, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BKK: tl.constexpr,
    W_FORM: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_p, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    c0 = _chunk_base(chunk_offsets, i_n, T, BT, IS_VARLEN)
    for i_c in range(i_p, tl.cdiv(eos - bos, BT), tl.num_programs(0)):
        A_ab, A_ak, A_rb, A_rk = _intra_by_column_blocks(r, w, k, a, b, bos + i_c * BT, eos, i_h, H, K, BT, BKK,
                                                         W_FORM, DOT_PRECISION)
        c = c0 + i_c
        tl.store(_mat_ptrs(mats, c, i_h, MAT_TINV, H, BT, False), _unit_lower_inverse(A_ab, BT, DOT_PRECISION))
        tl.store(_mat_ptrs(mats, c, i_h, MAT_AK, H, BT, False), A_ak)
        tl.store(_mat_ptrs(mats, c, i_h, MAT_RB, H, BT, False), A_rb)
        tl.store(_mat_ptrs(mats, c, i_h, MAT_RK, H, BT, False), A_rk)


# ---------------------------------------------------------------------------------------------
# State-gradient sweep for the segmented backward: one program per (V block, sequence, head) walks
# the chunks last to first carrying only dS (no S, no U, no input gradients: _grad_u_z and
# _grad_start_state alone), and stores dS at the end of every segment; the gradient kernel then
# runs all segments at once.
#
# With STORE_DZ_DV it also stores every chunk's dZ (in dz's dtype) and the whole of dv: neither
# needs S or U, and both are sums over K. That is what lets the head-128 Gluon gradient kernel
# split K over two programs (kernels/gluon/backward_ksplit.py chunk_bwd_ksplit_gluon_kernel): with dZ
# given, the rest of a chunk's gradients and the dS walk are per K row. The added products are off
# the sweep's dependent chain (dv does not feed dS).

@triton.jit
def chunk_dstate_kernel(
    r, w, k, a, b, do, dht, mats, seg_ds, dh0, dz, dv, chunk_offsets, seg_offsets, cu_seqlens, scale, T,
    seg_chunks, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, W_FORM: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
    IS_VARLEN: tl.constexpr, STORE_DZ_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    o_k, o_v, m_kv, s_tile = _state_block(i_v, K, V, BK, BV)
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dS += tl.load(dht + i_nh.to(tl.int64) * K * V + s_tile, mask=m_kv, other=0.0)
    c0 = _chunk_base(chunk_offsets, i_n, T, BT, IS_VARLEN)
    n_chunks = tl.cdiv(eos - bos, BT)
    s0 = _segment_base(seg_offsets, i_n, T, seg_chunks, BT, IS_VARLEN)
    for j in range(0, n_chunks):
        i_c = n_chunks - 1 - j
        if ((i_c + 1) % seg_chunks == 0) | (j == 0):                 # the last chunk of its segment
            tl.store(seg_ds + ((s0 + i_c // seg_chunks) * H + i_h) * K * V + s_tile, dS, mask=m_kv)
        tok0 = bos + i_c * BT
        # Without STORE_DZ_DV k is not needed: b stands in for it (the unused copy's load is dropped).
        r_c, w_c, k_c, a_c, b_c, L, p_k, m_k = _load_chunk(r, w, k if STORE_DZ_DV else b, a, b, tok0, eos, i_h,
                                                           H, K, BT, BK, W_FORM, K)
        p_v, m_tv = _v_rows(tok0, eos, i_h, o_v, H, V, BT)
        dO = tl.load(do + p_v, mask=m_tv, other=0.0).to(tl.float32) * scale
        G, Gm, G_last, a_hat, r_hat, tail = _chunk_decays(r_c, a_c, L)
        c = c0 + i_c
        Tinv_t = tl.load(_mat_ptrs(mats, c, i_h, MAT_TINV, H, BT, True))
        A_rb_t = tl.load(_mat_ptrs(mats, c, i_h, MAT_RB, H, BT, True))
        dU, dZ = _grad_u_z(A_rb_t, Tinv_t, dO, b_c, tail, dS, DOT_PRECISION)
        if STORE_DZ_DV:
            A_ak_t = tl.load(_mat_ptrs(mats, c, i_h, MAT_AK, H, BT, True))
            A_rk_t = tl.load(_mat_ptrs(mats, c, i_h, MAT_RK, H, BT, True))
            dv_c = _dot(A_ak_t, dZ, DOT_PRECISION) + _dot(A_rk_t, dO, DOT_PRECISION) \
                + _dot(k_c * tail, dS, DOT_PRECISION)
            tl.store(dv + p_v, dv_c.to(dv.dtype.element_ty), mask=m_tv)
            tl.store(dz + p_v, dZ.to(dz.dtype.element_ty), mask=m_tv)
        dS = _grad_start_state(r_hat, a_hat, G_last, dO, dS, dZ, DOT_PRECISION)
    if STORE_DH0:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + s_tile, dS, mask=m_kv)


def chunk_prepare(r, w, k, a, b, *, cu_seqlens, w_form, cfg: KernelConfig, programs_per_sequence: int = 1,
                  mats=None, chunks=(0, None)):
    """The chunk matrices of every chunk, in one launch over (chunk group, sequence x head): for a
    forward that then loads them (mats_mode="load"). Each program walks every
    `programs_per_sequence`-th chunk of its sequence. The Gluon build can take only the chunks
    [chunks[0], chunks[1]) of each sequence (None: to its end), into `mats`."""
    r, w, k, a, b, cu_seqlens = _contiguous(r, w, k, a, b, cu_seqlens)
    B, T, H, K = k.shape
    N = _num_sequences(B, cu_seqlens)
    BT = cfg.chunk_size
    mats = empty_mats(k, cu_seqlens, BT) if mats is None else mats
    offsets = _chunk_offsets(cu_seqlens, N, BT, k.device)
    c_lo, c_hi = chunks[0], _cdiv(T, BT) if chunks[1] is None else chunks[1]
    if (c_lo, c_hi) != (0, _cdiv(T, BT)) and not cfg.gluon:
        raise ValueError("chunks: only the Gluon build takes a chunk range")
    P = max(1, min(programs_per_sequence, _cdiv(T, BT)))
    pairs = _Pairs(N, H, cu_seqlens is not None)
    if cfg.gluon:
        _check_gluon("cfg", "chunk_prep", K=K, V=K, chunk_size=BT, block_v=K, dtype=k.dtype,
                     dot_precision=_dot_precision(cfg, k.dtype), T=T)
        from .gluon.prep import chunk_prepare_gluon
        chunk_prepare_gluon(pairs, r, w, k, a, b, mats, offsets, cu_seqlens, programs=P, T=T, BT=BT,
                            chunks=(c_lo, c_hi), w_form=w_form)
        return mats
    _launch(
        chunk_prep_kernel, (P, N * H), pairs,
        (*(pairs.tokens(x) for x in (r, w, k, a, b)), pairs.chunks(mats, _cdiv(T, BT)), pairs.bounds(offsets, k),
         pairs.bounds(cu_seqlens, k), T),
        H=H, K=K, BT=BT, BKK=min(_pow2(K), cfg.block_k), W_FORM=W_FORM_CODES[w_form], IS_VARLEN=cu_seqlens is not None,
        DOT_PRECISION=_dot_precision(cfg, k.dtype), **_launch_options(cfg),
    )
    return mats


def twopass_forward(r, w, k, v, a, b, h0, *, scale, cu_seqlens, w_form, cfg_prep: KernelConfig,
                    cfg_fwd: KernelConfig, programs_per_sequence: int, store_o=True, store_final=True,
                    seg_states=None, seg_len=0, u=None):
    """Pass 1 builds every chunk's matrices (chunk_prepare), pass 2 walks the chunks loading them,
    both at cfg_prep's chunk size; with `seg_states`, pass 2 also stores the start state of each
    segment of `seg_len` steps there. Returns (o or None, final state or None, the chunk matrices)."""
    cfg_fwd = cfg_fwd.with_(chunk_size=cfg_prep.chunk_size)
    walk = dict(scale=scale, cu_seqlens=cu_seqlens, w_form=w_form, cfg=cfg_fwd, store_o=store_o, mats_mode="load",
                seg_states=seg_states, seg_len=seg_len, seg_mode="none" if seg_states is None else "store", u=u)
    prep = dict(cu_seqlens=cu_seqlens, w_form=w_form, cfg=cfg_prep, programs_per_sequence=programs_per_sequence)
    split = _prep_split(k, cu_seqlens, cfg_prep, cfg_fwd)
    if not split:
        mats = chunk_prepare(r, w, k, a, b, **prep)
        o, ht, _ = chunk_forward(r, w, k, v, a, b, h0, **walk, store_final=store_final, mats=mats)
        return o, ht, mats
    # The first chunks' matrices, then the walk over them while the rest are built beside it (on a
    # side stream: the walk is a dependent chain over few programs and leaves the device room); the
    # walk goes on from the state where it stopped.
    r, w, k, v, a, b = _contiguous(r, w, k, v, a, b)
    mats = empty_mats(k, cu_seqlens, cfg_prep.chunk_size)
    chunk_prepare(r, w, k, a, b, **prep, mats=mats, chunks=(0, split))
    side = _side_stream(k.device)
    side.wait_stream(torch.cuda.current_stream(k.device))
    with torch.cuda.stream(side):
        chunk_prepare(r, w, k, a, b, **prep, mats=mats, chunks=(split, None))
    o, mid, _ = chunk_forward(r, w, k, v, a, b, h0, **walk, store_final=True, mats=mats, chunks=(0, split))
    torch.cuda.current_stream(k.device).wait_stream(side)
    o, ht, _ = chunk_forward(r, w, k, v, a, b, mid, **walk, store_final=store_final, mats=mats, chunks=(split, None),
                             o=o)
    return o, ht, mats


# The split two-pass forward builds 1 / PREP_SPLIT of each sequence's chunk matrices before its walk
# starts (2, 4 and 8 measured within 0.6% of each other in training, 4 best in prefill).
PREP_SPLIT = 4


def _prep_split(k, cu_seqlens, cfg_prep, cfg_fwd) -> int:
    """Where twopass_forward splits the chunk-matrix build (0: it does not): the Gluon build and loaded
    forward on CUDA, whole sequences (packed ones have no common chunk count without a host sync), a
    few chunks at least, and no CUDA graph being captured (graph trees cannot replay side streams)."""
    n_chunks = _cdiv(k.shape[1], cfg_prep.chunk_size)
    if not (cfg_prep.gluon and cfg_fwd.gluon and k.is_cuda and cu_seqlens is None and n_chunks >= 2 * PREP_SPLIT) \
            or torch.cuda.is_current_stream_capturing():
        return 0
    return _cdiv(n_chunks, PREP_SPLIT)


def dstate_sweep(r, w, k, a, b, do, dht, mats, seg_ds, dh0, *, scale, cu_seqlens, w_form, cfg: KernelConfig,
                 seg_len: int, dz=None, dv=None, gluon=False, ds_bf16=False):
    """The segmented backward's state-gradient sweep over the chunk matrices `mats`, at their chunk size
    and cfg's launch shape: stores the state gradient at every segment's end into `seg_ds` (from
    segment_states), and into `dh0` unless it is None. With `dz` and `dv` (v's shape), also every
    chunk's dZ and the gradient of v (what the K-split Gluon gradient kernel needs). `gluon`: the
    Gluon sweep (kernels/gluon/loaded_walks.py; it stores dZ and dv, and takes its own launch shape), whose
    products with dS take bf16 operands if `ds_bf16` (the gradient kernel's precision), else tf32's."""
    B, T, H, K = k.shape
    V = do.shape[-1]
    N = _num_sequences(B, cu_seqlens)
    BT = mats.shape[-1]
    cfg = cfg.with_(chunk_size=BT)
    BV = min(_pow2(V), cfg.block_v)
    offsets = _chunk_offsets(cu_seqlens, N, BT, k.device)
    _, seg_offsets, _ = _segment_launch(cu_seqlens, N, T, seg_len, BT, k.device)
    if (dz is None) != (dv is None):
        raise ValueError("dz, dv: the sweep stores both or neither")
    P = _Pairs(N, H, cu_seqlens is not None)
    if gluon:
        _check_gluon("gluon", "chunk_dstate", K=K, V=V, chunk_size=BT, block_v=ROLES["chunk_dstate"].gluon.block_v,
                     dtype=k.dtype, dot_precision=_dot_precision(cfg, k.dtype), T=T, segmented=True)
        if dz is None:
            raise ValueError("dz, dv: the Gluon sweep stores both; pass them")
        from .gluon.loaded_walks import dstate_sweep_gluon
        dstate_sweep_gluon(P, r, w, k, a, b, do, dht, mats, seg_ds, dh0, dz, dv, offsets, seg_offsets, cu_seqlens,
                           scale=scale, T=T, seg_chunks=_chunks_per_segment(seg_len, BT), w_form=w_form,
                           ds_bf16=ds_bf16)
        return
    _launch(
        chunk_dstate_kernel, (_cdiv(V, BV), N * H), P,
        (*(P.tokens(x) for x in (r, w, k, a, b, do)), P.rows(dht, do), P.chunks(mats, _cdiv(T, BT)),
         P.chunks(seg_ds, _cdiv(T, seg_len)), P.rows(dh0, seg_ds), P.tokens(dz, do), P.tokens(dv, do),
         P.bounds(offsets, do), P.bounds(seg_offsets, do), P.bounds(cu_seqlens, do), float(scale), T,
         _chunks_per_segment(seg_len, BT)),
        H=H, K=K, V=V, BT=BT, BK=_pow2(K), BV=BV, W_FORM=W_FORM_CODES[w_form], HAS_DHT=dht is not None,
        STORE_DH0=dh0 is not None, IS_VARLEN=cu_seqlens is not None, STORE_DZ_DV=dz is not None,
        DOT_PRECISION=_dot_precision(cfg, k.dtype), **_launch_options(cfg),
    )
