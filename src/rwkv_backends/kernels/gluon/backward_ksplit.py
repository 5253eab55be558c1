"""The Gluon gradient kernel of the segmented two-pass backward at K = V = 128, split over two
programs of KSPLIT_BLOCK_K columns of K (chunk_bwd_split), and its launcher."""

from __future__ import annotations

from ..common import W_FORM_CODES, _aligned16, _cdiv, _launch
from ..roles import ROLES
from . import KSPLIT_BLOCK_K
from .api import async_load, barrier, cp, gl, gluon, mma_v2
from .common import (SHARED16, SHARED32, _chunk_rows, _gradient_decays, _input_grads, _log_decay, _pair_matrix_grads,
                     _segment_base, _sequence)


@gluon.jit
def _issue_ksplit_copies(r, w, k, a, b, v, do, dz, u, states, raw_k, raw_v, raw_u, raw_s, stage, i_c, bos, eos,
                         c0, i_h, k0, H: gl.constexpr, K: gl.constexpr, V: gl.constexpr, BK: gl.constexpr,
                         BT: gl.constexpr):
    """cp.async of chunk i_c's inputs for the K-split gradient kernel into buffer `stage`: columns
    [k0, k0 + BK) of r, w, k, a, b; all of v, do, dZ and U; rows [k0, k0 + BK) of the start state."""
    KROWS: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [8, 1], [1, 0])    # [16, 64]
    VROWS: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [8, 1], [1, 0])    # [16, 128] and [64, 128]
    pk, mk = _chunk_rows(bos, eos, i_c, i_h, k0, H, K, BT, BK, KROWS)
    async_load(raw_k.index(stage * 5 + 0), r + pk, mask=mk)
    async_load(raw_k.index(stage * 5 + 1), w + pk, mask=mk)
    async_load(raw_k.index(stage * 5 + 2), k + pk, mask=mk)
    async_load(raw_k.index(stage * 5 + 3), a + pk, mask=mk)
    async_load(raw_k.index(stage * 5 + 4), b + pk, mask=mk)
    pv, mv = _chunk_rows(bos, eos, i_c, i_h, 0, H, V, BT, V, VROWS)
    async_load(raw_v.index(stage * 3 + 0), v + pv, mask=mv)
    async_load(raw_v.index(stage * 3 + 1), do + pv, mask=mv)
    async_load(raw_v.index(stage * 3 + 2), dz + pv, mask=mv)
    async_load(raw_u.index(stage), u + pv, mask=mv)
    o_r = k0 + gl.arange(0, BK, layout=gl.SliceLayout(1, VROWS))
    o_v = gl.arange(0, V, layout=gl.SliceLayout(0, VROWS))
    async_load(raw_s.index(stage), states + ((c0 + i_c) * H + i_h) * K * V
                                   + o_r[:, None] * V + o_v[None, :])
    cp.commit_group()


@gluon.jit
def chunk_bwd_ksplit_gluon_kernel(
    r, w, k, v, a, b, do, dz, states, seg_ds, chunk_offsets, seg_offsets, cu_seqlens, u,
    dr, dw, dk, da, db, scale, T, seg_chunks,
    H: gl.constexpr, K: gl.constexpr, V: gl.constexpr, BK: gl.constexpr, BT: gl.constexpr,
    W_FORM: gl.constexpr, IS_VARLEN: gl.constexpr,
):
    """The segmented gradient kernel for K = V = 128, split over K: program (i_k, i_nh, i_seg) walks
    segment i_seg of pair i_nh for the K columns [i_k BK, (i_k + 1) BK). The sweep
    (kernels/twopass.py chunk_dstate_kernel with STORE_DZ_DV) gave every chunk's dZ, dv and the state
    gradient at each segment's end; with dZ given, dS_prev = R̂ᵀ dO + γ dS + Âᵀ dZ and every gradient
    of r, w, k, a, b are per K column or sums over V, so the two halves need nothing from each
    other. Every tile is [16, 64] (K side), [16, 128] (V side) or [64, 128] (state rows), as the
    K = 64 kernel's layout takes them; at K = 128 in one program the tiles would not fit 255
    registers."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 8], instr_shape=[16, 8])
    ROW: gl.constexpr = gl.SliceLayout(1, MMA)
    COL: gl.constexpr = gl.SliceLayout(0, MMA)
    A16: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B16: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)

    i_k = gl.program_id(0)
    i_nh = gl.program_id(1)
    i_seg = gl.program_id(2)
    i_n = i_nh // H
    i_h = i_nh % H
    k0 = i_k * BK
    bos, eos, c0, n_chunks = _sequence(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)
    # The segment's chunks [c_begin, c_end) (kernels/common.py _segment_range); none past the end.
    s0 = _segment_base(seg_offsets, i_n, T, seg_chunks, BT, IS_VARLEN)
    c_begin = i_seg * seg_chunks
    c_end = gl.minimum(c_begin + seg_chunks, n_chunks)
    n_walk = c_end - c_begin

    t_idx = gl.arange(0, BT, layout=ROW)
    kk = gl.arange(0, BK, layout=COL)
    vv = gl.arange(0, V, layout=COL)
    kr = gl.arange(0, BK, layout=ROW)
    tc = gl.arange(0, BT, layout=COL)
    rows = t_idx[:, None]
    cols = tc[None, :]
    s_tile = (k0 + kr)[:, None] * V + vv[None, :]
    z_tk = gl.zeros([BT, BK], gl.float32, MMA)
    z_tt = gl.zeros([BT, BT], gl.float32, MMA)

    # Raw inputs, two stages (this chunk's and the next one's, arriving by cp.async).
    raw_k = gl.allocate_shared_memory(r.dtype.element_ty, [10, BT, BK], SHARED16)   # r w k a b, per stage
    raw_v = gl.allocate_shared_memory(v.dtype.element_ty, [6, BT, V], SHARED16)     # v do dz, per stage
    raw_u = gl.allocate_shared_memory(gl.float32, [2, BT, V], SHARED32)
    raw_s = gl.allocate_shared_memory(gl.float32, [2, BK, V], SHARED32)
    # Operands of the products, written once per chunk.
    sm_do = gl.allocate_shared_memory(gl.bfloat16, [BT, V], SHARED16)
    sm_u = gl.allocate_shared_memory(gl.bfloat16, [BT, V], SHARED16)
    sm_v = gl.allocate_shared_memory(gl.bfloat16, [BT, V], SHARED16)
    sm_dz = gl.allocate_shared_memory(gl.bfloat16, [BT, V], SHARED16)
    sm_s = gl.allocate_shared_memory(gl.bfloat16, [BK, V], SHARED16)
    sm_ds = gl.allocate_shared_memory(gl.bfloat16, [BK, V], SHARED16)
    sm_rh = gl.allocate_shared_memory(gl.bfloat16, [BT, BK], SHARED16)
    sm_ah = gl.allocate_shared_memory(gl.bfloat16, [BT, BK], SHARED16)
    sm_bf = gl.allocate_shared_memory(gl.float32, [BT, BK], SHARED32)             # pair products: tf32
    sm_kf = gl.allocate_shared_memory(gl.float32, [BT, BK], SHARED32)
    sm_ah32 = gl.allocate_shared_memory(gl.float32, [BT, BK], SHARED32)
    sm_rh32 = gl.allocate_shared_memory(gl.float32, [BT, BK], SHARED32)
    sm_da = gl.allocate_shared_memory(gl.float32, [4, BT, BT], SHARED32)        # dA_ab, dA_ak, dA_rb, dA_rk
    sm_tri = gl.allocate_shared_memory(gl.float32, [2, BT, BT], SHARED32)       # [t, s]: s <= t, s < t
    # L's tf32 head and remainder at the top of a chunk, dG's and dGm's at its end (shared memory is
    # what limits this kernel: 219 KB of the H100's 227).
    sm_scan = gl.allocate_shared_memory(gl.float32, [4, BT, BK], SHARED32)
    sm_shift = gl.allocate_shared_memory(r.dtype.element_ty, [BT, BT], SHARED16)  # [t, t - 1]
    sm_tri.index(0).store(gl.where(rows >= cols, 1.0, 0.0) + z_tt)
    sm_tri.index(1).store(gl.where(rows > cols, 1.0, 0.0) + z_tt)
    sm_shift.store((gl.where(rows == cols + 1, 1.0, 0.0) + z_tt).to(r.dtype.element_ty))

    # The gradient of the segment's end state, from the sweep.
    dS = gl.load(seg_ds + ((s0 + i_seg) * H + i_h) * K * V + s_tile, mask=(s_tile >= 0) & (n_walk > 0),
                 other=0.0)
    if n_walk > 0:
        _issue_ksplit_copies(r, w, k, a, b, v, do, dz, u, states, raw_k, raw_v, raw_u, raw_s, 0, c_end - 1,
                             bos, eos, c0, i_h, k0, H, K, V, BK, BT)
    for j in range(0, n_walk):
        i_c = c_end - 1 - j
        o_t = bos + i_c * BT + t_idx
        m_k = (o_t < eos)[:, None] & (kk < BK)[None, :]
        m_v = (o_t < eos)[:, None] & (vv < V)[None, :]
        p = (o_t[:, None] * H + i_h) * K + (k0 + kk)[None, :]
        st = j % 2
        cp.wait_group(0)
        barrier()          # every thread's copies have landed; all are done with chunk j - 1
        if j + 1 < n_walk:
            _issue_ksplit_copies(r, w, k, a, b, v, do, dz, u, states, raw_k, raw_v, raw_u, raw_s, 1 - st,
                                 i_c - 1, bos, eos, c0, i_h, k0, H, K, V, BK, BT)
        r_c = gl.where(m_k, raw_k.index(st * 5 + 0).load(MMA).to(gl.float32), 0.0)
        w_c = gl.where(m_k, raw_k.index(st * 5 + 1).load(MMA).to(gl.float32), 0.0)
        k_c = gl.where(m_k, raw_k.index(st * 5 + 2).load(MMA).to(gl.float32), 0.0)
        a_c = gl.where(m_k, raw_k.index(st * 5 + 3).load(MMA).to(gl.float32), 0.0)
        b_c = gl.where(m_k, raw_k.index(st * 5 + 4).load(MMA).to(gl.float32), 0.0)
        L = gl.where(m_k, _log_decay(w_c, W_FORM), 0.0)
        S = raw_s.index(st).load(MMA)
        d_gamma = gl.convert_layout(gl.sum(dS * S, 1), COL)
        sm_s.store(S.to(gl.bfloat16))
        sm_ds.store(dS.to(gl.bfloat16))
        sm_v.store(gl.where(m_v, raw_v.index(st * 3 + 0).load(MMA).to(gl.float32), 0.0).to(gl.bfloat16))
        sm_do.store((gl.where(m_v, raw_v.index(st * 3 + 1).load(MMA).to(gl.float32), 0.0) * scale).to(gl.bfloat16))
        sm_dz.store(gl.where(m_v, raw_v.index(st * 3 + 2).load(MMA).to(gl.float32), 0.0).to(gl.bfloat16))
        sm_u.store(gl.where(m_v, raw_u.index(st).load(MMA), 0.0).to(gl.bfloat16))

        G, Gm, a_hat, r_hat, tail, gamma, b_t, k_t, e_neg, b_f, k_f, safe = _gradient_decays(
            L, r_c, k_c, a_c, b_c, sm_scan, sm_tri, BT, MMA)
        sm_rh.store(r_hat.to(gl.bfloat16))
        sm_ah.store(a_hat.to(gl.bfloat16))
        sm_bf.store(b_f)
        sm_kf.store(k_f)
        sm_ah32.store(a_hat)
        sm_rh32.store(r_hat)
        barrier()

        dz_a, do_a, dA_ab, dA_ak, dA_rb, dA_rk = _pair_matrix_grads(sm_dz, sm_do, sm_u, sm_v, sm_da, BT, MMA)
        st_b = sm_s.permute((1, 0)).load(B16)
        d_ahat = mma_v2(dz_a, st_b, z_tk)
        d_rhat = mma_v2(do_a, st_b, z_tk)
        dst_b = sm_ds.permute((1, 0)).load(B16)
        d_bt = mma_v2(sm_u.load(A16), dst_b, z_tk)
        d_kt = mma_v2(sm_v.load(A16), dst_b, z_tk)
        gamma_k = gl.convert_layout(gamma, ROW)
        dS = mma_v2(sm_rh.permute((1, 0)).load(A16), sm_do.load(B16), gamma_k[:, None] * dS)
        dS = mma_v2(sm_ah.permute((1, 0)).load(A16), sm_dz.load(B16), dS)
        barrier()

        dr_c, dw_c, dk_c, da_c, db_c = _input_grads(
            safe, dA_ab, dA_ak, dA_rb, dA_rk, d_ahat, d_rhat, d_bt, d_kt, d_gamma, r_c, w_c, k_c, a_c, b_c, L, G,
            Gm, a_hat, r_hat, tail, gamma, b_t, k_t, e_neg, b_f, k_f, sm_da, sm_bf, sm_kf, sm_ah32, sm_rh32,
            sm_tri, sm_scan, raw_k.index(st * 5 + 3), raw_k.index(st * 5 + 4), raw_k.index(st * 5 + 2), sm_shift,
            m_k, (rows < BT - 1) & (o_t[:, None] + 1 < eos), W_FORM, BT, MMA)
        gl.store(dr + p, dr_c.to(dr.dtype.element_ty), mask=m_k)
        gl.store(dw + p, dw_c.to(dw.dtype.element_ty), mask=m_k)
        gl.store(dk + p, dk_c.to(dk.dtype.element_ty), mask=m_k)
        gl.store(da + p, da_c.to(da.dtype.element_ty), mask=m_k)
        gl.store(db + p, db_c.to(db.dtype.element_ty), mask=m_k)


def chunk_backward_ksplit_gluon(P, n_segments, r, w, k, v, a, b, do, dz, states, seg_ds, offsets, seg_offsets,
                                cu_seqlens, u, grads, *, scale, T, BT, seg_len, seg_chunks, w_form):
    """The gradients of r, w, k, a, b (`grads`) of kernels/backward.py chunk_backward's segmented form
    in Gluon, from the dZ that the state-gradient sweep stored: KSPLIT_BLOCK_K columns of K per program."""
    H, K = k.shape[-2:]
    V = v.shape[-1]
    r, w, k, v, a, b, do, dz = _aligned16(r, w, k, v, a, b, do, dz)
    _launch(
        chunk_bwd_ksplit_gluon_kernel, (K // KSPLIT_BLOCK_K, P.N * H, n_segments), P,
        (*(P.tokens(x) for x in (r, w, k, v, a, b, do, dz)), P.chunks(states, _cdiv(T, BT)),
         P.chunks(seg_ds, _cdiv(T, seg_len)), P.bounds(offsets, v), P.bounds(seg_offsets, v),
         P.bounds(cu_seqlens, v), P.tokens(u), *(P.tokens(g) for g in grads), float(scale), T, seg_chunks),
        H=H, K=K, V=V, BK=KSPLIT_BLOCK_K, BT=BT, W_FORM=W_FORM_CODES[w_form], IS_VARLEN=cu_seqlens is not None,
        num_warps=ROLES["chunk_bwd_split"].gluon.num_warps,
    )
