"""The Gluon gradient kernel of one-pass training at K = V = 64 (chunk_bwd), and its launcher."""

from __future__ import annotations

from ..common import W_FORM_CODES, _aligned16, _cdiv, _launch
from ..roles import ROLES
from .api import async_load, barrier, cp, gl, gluon, mma_v2
from .common import (SHARED16, SHARED32, _chunk_rows, _gradient_decays, _input_grads, _log_decay, _pair_matrix_grads,
                     _sequence)


@gluon.jit
def _issue_copies(r, w, k, a, b, v, do, u, states, mats, raw16, raw_u, raw_s, raw_m, stage, i_c, bos, eos, c0,
                  i_h, H: gl.constexpr, K: gl.constexpr, BT: gl.constexpr):
    """cp.async of chunk i_c's inputs into raw buffer `stage`: no registers are held while they fly."""
    V: gl.constexpr = K
    ROWS: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [8, 1], [1, 0])   # [16, 64] in 4-element pieces
    MATS: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [8, 1], [1, 0])   # [64, 16]: the four matrices
    o_k = gl.arange(0, K, layout=gl.SliceLayout(0, ROWS))
    p, m = _chunk_rows(bos, eos, i_c, i_h, 0, H, K, BT, K, ROWS)
    base = stage * 7
    async_load(raw16.index(base + 0), r + p, mask=m)
    async_load(raw16.index(base + 1), w + p, mask=m)
    async_load(raw16.index(base + 2), k + p, mask=m)
    async_load(raw16.index(base + 3), a + p, mask=m)
    async_load(raw16.index(base + 4), b + p, mask=m)
    async_load(raw16.index(base + 5), v + p, mask=m)
    async_load(raw16.index(base + 6), do + p, mask=m)
    async_load(raw_u.index(stage), u + p, mask=m)
    c = c0 + i_c
    o_r = gl.arange(0, K, layout=gl.SliceLayout(1, ROWS))
    async_load(raw_s.index(stage), states + (c * H + i_h) * K * V + o_r[:, None] * V + o_k[None, :])
    m_r = gl.arange(0, 4 * BT, layout=gl.SliceLayout(1, MATS))
    m_c = gl.arange(0, BT, layout=gl.SliceLayout(0, MATS))
    async_load(raw_m.index(stage), mats + (c * H + i_h) * 4 * BT * BT + m_r[:, None] * BT + m_c[None, :])
    cp.commit_group()


@gluon.jit
def chunk_bwd_gluon_kernel(
    r, w, k, v, a, b, do, dht, states, mats, chunk_offsets, cu_seqlens, u,
    dr, dw, dk, dv, da, db, dh0, scale, T,
    H: gl.constexpr, K: gl.constexpr, BT: gl.constexpr, W_FORM: gl.constexpr,
    HAS_DHT: gl.constexpr, STORE_DH0: gl.constexpr, IS_VARLEN: gl.constexpr,
):
    """kernels/backward.py chunk_bwd_kernel with HAS_U, one V block, no segments; program (0, i_nh)."""
    V: gl.constexpr = K
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 8], instr_shape=[16, 8])
    ROW: gl.constexpr = gl.SliceLayout(1, MMA)
    COL: gl.constexpr = gl.SliceLayout(0, MMA)
    A16: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B16: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)

    i_nh = gl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos, eos, c0, n_chunks = _sequence(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)

    t_idx = gl.arange(0, BT, layout=ROW)
    kk = gl.arange(0, K, layout=COL)
    kr = gl.arange(0, K, layout=ROW)
    tc = gl.arange(0, BT, layout=COL)
    rows = t_idx[:, None]
    cols = tc[None, :]
    s_tile = kr[:, None] * V + kk[None, :]
    z_tv = gl.zeros([BT, V], gl.float32, MMA)
    z_tt = gl.zeros([BT, BT], gl.float32, MMA)

    # Raw inputs, two stages (this chunk's and the next one's, arriving by cp.async).
    raw16 = gl.allocate_shared_memory(r.dtype.element_ty, [14, BT, K], SHARED16)  # r w k a b v do, per stage
    raw_u = gl.allocate_shared_memory(gl.float32, [2, BT, V], SHARED32)
    raw_s = gl.allocate_shared_memory(gl.float32, [2, K, V], SHARED32)
    raw_m = gl.allocate_shared_memory(gl.float32, [2, 4 * BT, BT], SHARED32)
    # Operands of the products, written once per chunk.
    sm_do = gl.allocate_shared_memory(gl.bfloat16, [BT, V], SHARED16)
    sm_u = gl.allocate_shared_memory(gl.bfloat16, [BT, V], SHARED16)
    sm_v = gl.allocate_shared_memory(gl.bfloat16, [BT, V], SHARED16)
    sm_s = gl.allocate_shared_memory(gl.bfloat16, [K, V], SHARED16)
    sm_ds = gl.allocate_shared_memory(gl.bfloat16, [K, V], SHARED16)
    sm_bt = gl.allocate_shared_memory(gl.bfloat16, [BT, K], SHARED16)
    sm_kt = gl.allocate_shared_memory(gl.bfloat16, [BT, K], SHARED16)
    sm_rh = gl.allocate_shared_memory(gl.bfloat16, [BT, K], SHARED16)
    sm_ah = gl.allocate_shared_memory(gl.bfloat16, [BT, K], SHARED16)
    sm_du = gl.allocate_shared_memory(gl.bfloat16, [BT, V], SHARED16)
    sm_dz = gl.allocate_shared_memory(gl.bfloat16, [BT, V], SHARED16)
    sm_mat = gl.allocate_shared_memory(gl.bfloat16, [4, BT, BT], SHARED16)       # Tinv, A_ak, A_rb, A_rk
    sm_bf = gl.allocate_shared_memory(gl.float32, [BT, K], SHARED32)             # pair products: tf32
    sm_kf = gl.allocate_shared_memory(gl.float32, [BT, K], SHARED32)
    sm_ah32 = gl.allocate_shared_memory(gl.float32, [BT, K], SHARED32)
    sm_rh32 = gl.allocate_shared_memory(gl.float32, [BT, K], SHARED32)
    sm_da = gl.allocate_shared_memory(gl.float32, [4, BT, BT], SHARED32)        # dA_ab, dA_ak, dA_rb, dA_rk
    # Scans over a chunk's rows as products with 0/1 triangles (the mma layout has no scan).
    sm_tri = gl.allocate_shared_memory(gl.float32, [2, BT, BT], SHARED32)       # [t, s]: s <= t, s < t
    sm_l = gl.allocate_shared_memory(gl.float32, [2, BT, K], SHARED32)          # L's tf32 head, remainder
    sm_dl = gl.allocate_shared_memory(gl.float32, [4, BT, K], SHARED32)         # dG's and dGm's
    sm_shift = gl.allocate_shared_memory(r.dtype.element_ty, [BT, BT], SHARED16)  # [t, t - 1]
    sm_tri.index(0).store(gl.where(rows >= cols, 1.0, 0.0) + z_tt)
    sm_tri.index(1).store(gl.where(rows > cols, 1.0, 0.0) + z_tt)
    sm_shift.store((gl.where(rows == cols + 1, 1.0, 0.0) + z_tt).to(r.dtype.element_ty))

    dS = gl.zeros([K, V], gl.float32, MMA)      # the gradient of the current chunk's end state
    if HAS_DHT:
        dS += gl.load(dht + i_nh.to(gl.int64) * K * V + s_tile)
    if n_chunks > 0:
        _issue_copies(r, w, k, a, b, v, do, u, states, mats, raw16, raw_u, raw_s, raw_m, 0, n_chunks - 1,
                      bos, eos, c0, i_h, H, K, BT)
    for j in range(0, n_chunks):
        i_c = n_chunks - 1 - j
        o_t = bos + i_c * BT + t_idx
        m_t = (o_t < eos)[:, None] & (kk < K)[None, :]
        p = (o_t[:, None] * H + i_h) * K + kk[None, :]
        st = j % 2
        cp.wait_group(0)
        barrier()          # every thread's copies have landed; all are done with chunk j - 1
        if j + 1 < n_chunks:
            _issue_copies(r, w, k, a, b, v, do, u, states, mats, raw16, raw_u, raw_s, raw_m, 1 - st, i_c - 1,
                          bos, eos, c0, i_h, H, K, BT)
        r_c = gl.where(m_t, raw16.index(st * 7 + 0).load(MMA).to(gl.float32), 0.0)
        w_c = gl.where(m_t, raw16.index(st * 7 + 1).load(MMA).to(gl.float32), 0.0)
        k_c = gl.where(m_t, raw16.index(st * 7 + 2).load(MMA).to(gl.float32), 0.0)
        a_c = gl.where(m_t, raw16.index(st * 7 + 3).load(MMA).to(gl.float32), 0.0)
        b_c = gl.where(m_t, raw16.index(st * 7 + 4).load(MMA).to(gl.float32), 0.0)
        v_c = gl.where(m_t, raw16.index(st * 7 + 5).load(MMA).to(gl.float32), 0.0)
        dO = gl.where(m_t, raw16.index(st * 7 + 6).load(MMA).to(gl.float32), 0.0) * scale
        U = gl.where(m_t, raw_u.index(st).load(MMA), 0.0)
        S = raw_s.index(st).load(MMA)
        L = gl.where(m_t, _log_decay(w_c, W_FORM), 0.0)

        G, Gm, a_hat, r_hat, tail, gamma, b_t, k_t, e_neg, b_f, k_f, safe = _gradient_decays(
            L, r_c, k_c, a_c, b_c, sm_l, sm_tri, BT, MMA)

        sm_do.store(dO.to(gl.bfloat16))
        sm_u.store(U.to(gl.bfloat16))
        sm_v.store(v_c.to(gl.bfloat16))
        sm_s.store(S.to(gl.bfloat16))
        sm_ds.store(dS.to(gl.bfloat16))
        sm_bt.store(b_t.to(gl.bfloat16))
        sm_kt.store(k_t.to(gl.bfloat16))
        sm_rh.store(r_hat.to(gl.bfloat16))
        sm_ah.store(a_hat.to(gl.bfloat16))
        for i in gl.static_range(4):
            sm_mat.index(i).store(raw_m.index(st).slice(i * BT, BT, 0).load(MMA).to(gl.bfloat16))
        sm_bf.store(b_f)
        sm_kf.store(k_f)
        sm_ah32.store(a_hat)
        sm_rh32.store(r_hat)
        barrier()

        # The chain to the previous chunk: dU = A_rbᵀ dO + B̃ dS, dZ = Tinvᵀ dU.
        dU = mma_v2(sm_mat.index(2).permute((1, 0)).load(A16), sm_do.load(B16), z_tv)
        dU = mma_v2(sm_bt.load(A16), sm_ds.load(B16), dU)
        sm_du.store(dU.to(gl.bfloat16))
        barrier()
        dZ = mma_v2(sm_mat.index(0).permute((1, 0)).load(A16), sm_du.load(B16), z_tv)
        sm_dz.store(dZ.to(gl.bfloat16))
        barrier()

        dz_a, do_a, dA_ab, dA_ak, dA_rb, dA_rk = _pair_matrix_grads(sm_dz, sm_do, sm_u, sm_v, sm_da, BT, MMA)
        dz_b = sm_dz.load(B16)
        do_b = sm_do.load(B16)
        dv_c = mma_v2(sm_mat.index(1).permute((1, 0)).load(A16), dz_b, z_tv)
        dv_c = mma_v2(sm_mat.index(3).permute((1, 0)).load(A16), do_b, dv_c)
        dv_c = mma_v2(sm_kt.load(A16), sm_ds.load(B16), dv_c)
        st_b = sm_s.permute((1, 0)).load(B16)
        d_ahat = mma_v2(dz_a, st_b, z_tv)
        d_rhat = mma_v2(do_a, st_b, z_tv)
        dst_b = sm_ds.permute((1, 0)).load(B16)
        d_bt = mma_v2(sm_u.load(A16), dst_b, z_tv)
        d_kt = mma_v2(sm_v.load(A16), dst_b, z_tv)
        d_gamma = gl.convert_layout(gl.sum(dS * S, 1), COL)
        gamma_k = gl.convert_layout(gamma, ROW)
        dS_prev = mma_v2(sm_rh.permute((1, 0)).load(A16), do_b, gamma_k[:, None] * dS)
        dS_prev = mma_v2(sm_ah.permute((1, 0)).load(A16), dz_b, dS_prev)
        barrier()

        dr_c, dw_c, dk_c, da_c, db_c = _input_grads(
            safe, dA_ab, dA_ak, dA_rb, dA_rk, d_ahat, d_rhat, d_bt, d_kt, d_gamma, r_c, w_c, k_c, a_c, b_c, L, G,
            Gm, a_hat, r_hat, tail, gamma, b_t, k_t, e_neg, b_f, k_f, sm_da, sm_bf, sm_kf, sm_ah32, sm_rh32,
            sm_tri, sm_dl, raw16.index(st * 7 + 3), raw16.index(st * 7 + 4), raw16.index(st * 7 + 2), sm_shift, m_t,
            (rows < BT - 1) & (o_t[:, None] + 1 < eos), W_FORM, BT, MMA)
        gl.store(dr + p, dr_c.to(dr.dtype.element_ty), mask=m_t)
        gl.store(dw + p, dw_c.to(dw.dtype.element_ty), mask=m_t)
        gl.store(dk + p, dk_c.to(dk.dtype.element_ty), mask=m_t)
        gl.store(da + p, da_c.to(da.dtype.element_ty), mask=m_t)
        gl.store(db + p, db_c.to(db.dtype.element_ty), mask=m_t)
        gl.store(dv + p, dv_c.to(dv.dtype.element_ty), mask=m_t)
        dS = dS_prev
    if STORE_DH0:
        gl.store(dh0 + i_nh.to(gl.int64) * K * V + s_tile, dS)


def chunk_backward_gluon(P, r, w, k, v, a, b, do, dht, states, mats, offsets, cu_seqlens, u, grads, dh0, *, scale, T,
                         BT, w_form):
    """kernels/backward.py chunk_backward's gradient kernel in Gluon (one program per sequence and
    head): `grads` are dr, dw, dk, dv, da, db; dh0 is None where not stored."""
    H, K = k.shape[-2:]
    r, w, k, v, a, b, do = _aligned16(r, w, k, v, a, b, do)
    _launch(
        chunk_bwd_gluon_kernel, (1, P.N * H), P,
        (*(P.tokens(x) for x in (r, w, k, v, a, b, do)), P.rows(dht, v), P.chunks(states, _cdiv(T, BT)),
         P.chunks(mats, _cdiv(T, BT)), P.bounds(offsets, v), P.bounds(cu_seqlens, v), P.tokens(u),
         *(P.tokens(g) for g in grads), P.rows(dh0, v), float(scale), T),
        H=H, K=K, BT=BT, W_FORM=W_FORM_CODES[w_form], HAS_DHT=dht is not None, STORE_DH0=dh0 is not None,
        IS_VARLEN=cu_seqlens is not None, num_warps=ROLES["chunk_bwd"].gluon.num_warps,
    )
