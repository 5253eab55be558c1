"""The Gluon forward of one-pass training and prefill at K = V = 64 (chunk_fwd), and its launcher."""

from __future__ import annotations

from ..common import W_FORM_CODES, _aligned16, _cdiv, _launch
from ..roles import ROLES
from .api import async_load, barrier, cp, gl, gluon, mma_v2
from .common import SAFE_RANGE, SHARED16, SHARED32, _chunk_rows, _intra, _log_decay, _sequence, _tf32_head


@gluon.jit
def _issue_forward_copies(r, w, k, a, b, v, raw, stage, i_c, bos, eos, i_h, H: gl.constexpr, K: gl.constexpr,
                          BT: gl.constexpr, NW: gl.constexpr):
    """cp.async of chunk i_c's r, w, k, a, b, v into raw buffer `stage`."""
    ROWS: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [NW, 1], [1, 0])
    p, m = _chunk_rows(bos, eos, i_c, i_h, 0, H, K, BT, K, ROWS)
    base = stage * 6
    async_load(raw.index(base + 0), r + p, mask=m)
    async_load(raw.index(base + 1), w + p, mask=m)
    async_load(raw.index(base + 2), k + p, mask=m)
    async_load(raw.index(base + 3), a + p, mask=m)
    async_load(raw.index(base + 4), b + p, mask=m)
    async_load(raw.index(base + 5), v + p, mask=m)
    cp.commit_group()


@gluon.jit
def chunk_fwd_gluon_kernel(
    r, w, k, v, a, b, o, h0, ht, mats, chunk_offsets, cu_seqlens, u, scale, T,
    H: gl.constexpr, K: gl.constexpr, BT: gl.constexpr, W_FORM: gl.constexpr, HAS_STATE: gl.constexpr,
    STORE_FINAL: gl.constexpr, STORE_O: gl.constexpr, STORE_MATS: gl.constexpr, STORE_U: gl.constexpr,
    IS_VARLEN: gl.constexpr, NW: gl.constexpr,
):
    """kernels/chunk.py chunk_fwd_kernel building (and with STORE_MATS storing) the chunk matrices, one
    V block, no segments, tf32 products; program (0, i_nh). The inverse's squarings run with
    Z = Â S + A_ak V beside them; 9 barriers per chunk."""
    V: gl.constexpr = K
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NW], instr_shape=[16, 8])
    ROW: gl.constexpr = gl.SliceLayout(1, MMA)
    COL: gl.constexpr = gl.SliceLayout(0, MMA)
    A32: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=1)
    B32: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=1)

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
    m_off = rows * BT + cols
    z_tv = gl.zeros([BT, V], gl.float32, MMA)
    z_tt = gl.zeros([BT, BT], gl.float32, MMA)

    raw = gl.allocate_shared_memory(r.dtype.element_ty, [12, BT, K], SHARED16)   # r w k a b v, two stages
    sm_s = gl.allocate_shared_memory(gl.float32, [K, V], SHARED32)
    sm_v = gl.allocate_shared_memory(gl.float32, [BT, V], SHARED32)
    sm_ah = gl.allocate_shared_memory(gl.float32, [BT, K], SHARED32)
    sm_rh = gl.allocate_shared_memory(gl.float32, [BT, K], SHARED32)
    sm_bf = gl.allocate_shared_memory(gl.float32, [BT, K], SHARED32)
    sm_kf = gl.allocate_shared_memory(gl.float32, [BT, K], SHARED32)
    sm_bt = gl.allocate_shared_memory(gl.float32, [BT, K], SHARED32)
    sm_kt = gl.allocate_shared_memory(gl.float32, [BT, K], SHARED32)
    sm_l = gl.allocate_shared_memory(gl.float32, [2, BT, K], SHARED32)
    sm_tri = gl.allocate_shared_memory(gl.float32, [BT, BT], SHARED32)
    sm_m = gl.allocate_shared_memory(gl.float32, [3, BT, BT], SHARED32)       # A_ak, A_rb, A_rk
    sm_n = gl.allocate_shared_memory(gl.float32, [BT, BT], SHARED32)          # N = A_ab
    sm_p = gl.allocate_shared_memory(gl.float32, [3, BT, BT], SHARED32)       # N^2, N^4, N^8
    sm_x = gl.allocate_shared_memory(gl.float32, [3, BT, BT], SHARED32)       # I + N, then its products
    sm_z = gl.allocate_shared_memory(gl.float32, [BT, V], SHARED32)
    sm_u = gl.allocate_shared_memory(gl.float32, [BT, V], SHARED32)
    sm_tinv = gl.allocate_shared_memory(gl.float32, [BT, BT], SHARED32)
    sm_tri.store(gl.where(rows >= cols, 1.0, 0.0) + z_tt)
    eye = gl.where(rows == cols, 1.0, 0.0) + z_tt

    S = gl.zeros([K, V], gl.float32, MMA)
    if HAS_STATE:
        S += gl.load(h0 + i_nh.to(gl.int64) * K * V + s_tile)
    if n_chunks > 0:
        _issue_forward_copies(r, w, k, a, b, v, raw, 0, 0, bos, eos, i_h, H, K, BT, NW)
    for i_c in range(0, n_chunks):
        o_t = bos + i_c * BT + t_idx
        m_t = (o_t < eos)[:, None] & (kk < K)[None, :]
        p = (o_t[:, None] * H + i_h) * K + kk[None, :]
        st = i_c % 2
        cp.wait_group(0)
        barrier()          # every thread's copies have landed; all are done with chunk i_c - 1
        if i_c + 1 < n_chunks:
            _issue_forward_copies(r, w, k, a, b, v, raw, 1 - st, i_c + 1, bos, eos, i_h, H, K, BT, NW)
        r_c = gl.where(m_t, raw.index(st * 6 + 0).load(MMA).to(gl.float32), 0.0)
        w_c = gl.where(m_t, raw.index(st * 6 + 1).load(MMA).to(gl.float32), 0.0)
        k_c = gl.where(m_t, raw.index(st * 6 + 2).load(MMA).to(gl.float32), 0.0)
        a_c = gl.where(m_t, raw.index(st * 6 + 3).load(MMA).to(gl.float32), 0.0)
        b_c = gl.where(m_t, raw.index(st * 6 + 4).load(MMA).to(gl.float32), 0.0)
        v_c = gl.where(m_t, raw.index(st * 6 + 5).load(MMA).to(gl.float32), 0.0)
        L = gl.where(m_t, _log_decay(w_c, W_FORM), 0.0)
        L_hi = _tf32_head(L)
        sm_l.index(0).store(L_hi)
        sm_l.index(1).store(L - L_hi)
        barrier()
        incl = sm_tri.load(A32)
        G = mma_v2(incl, sm_l.index(0).load(B32), z_tv, input_precision="tf32")
        G = mma_v2(incl, sm_l.index(1).load(B32), G, input_precision="tf32")
        Gm = G - L
        G_last = gl.sum(gl.where(rows == BT - 1, G, 0.0), 0)
        a_hat = a_c * gl.exp(Gm)
        r_hat = r_c * gl.exp(G)
        tail = gl.exp(G_last[None, :] - G)
        e_neg = gl.exp(-G)                          # inf past SAFE_RANGE: only the safe path reads it
        safe = gl.min(G_last, 0) >= -SAFE_RANGE
        sm_s.store(S)
        sm_v.store(v_c)
        sm_ah.store(a_hat)
        sm_rh.store(r_hat)
        sm_bf.store(b_c * e_neg)
        sm_kf.store(k_c * e_neg)
        sm_bt.store(b_c * tail)
        sm_kt.store(k_c * tail)
        barrier()

        # The in-chunk matrices (kernels/chunk_math.py _intra): factored where safe, pair by pair otherwise.
        A_ab, A_ak, A_rb, A_rk = _intra(safe, sm_ah, sm_rh, sm_bf, sm_kf, G, Gm, r_c, k_c, a_c, b_c, BT, MMA)
        # Tinv = (I + N)(I + N^2)(I + N^4)(I + N^8), N = A_ab (kernels/chunk_math.py _unit_lower_inverse's
        # products in its order), with Z = Â S + A_ak V beside the first squaring.
        X = eye + A_ab
        sm_n.store(A_ab)
        sm_x.index(0).store(X)
        sm_m.index(0).store(A_ak)
        sm_m.index(1).store(A_rb)
        sm_m.index(2).store(A_rk)
        barrier()
        P = mma_v2(sm_n.load(A32), sm_n.load(B32), z_tt, input_precision="tf32")
        Z = mma_v2(sm_ah.load(A32), sm_s.load(B32), z_tv, input_precision="tf32")
        Z = mma_v2(sm_m.index(0).load(A32), sm_v.load(B32), Z, input_precision="tf32")
        sm_p.index(0).store(P)
        sm_z.store(Z)
        barrier()
        X = mma_v2(sm_x.index(0).load(A32), sm_p.index(0).load(B32), X, input_precision="tf32")
        P = mma_v2(sm_p.index(0).load(A32), sm_p.index(0).load(B32), z_tt, input_precision="tf32")
        sm_x.index(1).store(X)
        sm_p.index(1).store(P)
        barrier()
        X = mma_v2(sm_x.index(1).load(A32), sm_p.index(1).load(B32), X, input_precision="tf32")
        P = mma_v2(sm_p.index(1).load(A32), sm_p.index(1).load(B32), z_tt, input_precision="tf32")
        sm_x.index(2).store(X)
        sm_p.index(2).store(P)
        barrier()
        Tinv = mma_v2(sm_x.index(2).load(A32), sm_p.index(2).load(B32), X, input_precision="tf32")
        sm_tinv.store(Tinv)
        if STORE_MATS:               # kernels/common.py MAT_TINV, MAT_AK, MAT_RB, MAT_RK
            mbase = mats + ((c0 + i_c) * H + i_h) * 4 * BT * BT
            gl.store(mbase + m_off, Tinv)
            gl.store(mbase + BT * BT + m_off, A_ak)
            gl.store(mbase + 2 * BT * BT + m_off, A_rb)
            gl.store(mbase + 3 * BT * BT + m_off, A_rk)
        barrier()
        U = mma_v2(sm_tinv.load(A32), sm_z.load(B32), z_tv, input_precision="tf32")     # U_t = a_tᵀ h_{t-1}
        if STORE_U:
            gl.store(u + p, U, mask=m_t)
        sm_u.store(U)
        barrier()
        u_b = sm_u.load(B32)
        v_b = sm_v.load(B32)
        if STORE_O:
            O = mma_v2(sm_rh.load(A32), sm_s.load(B32), z_tv, input_precision="tf32")
            O = mma_v2(sm_m.index(1).load(A32), u_b, O, input_precision="tf32")
            O = mma_v2(sm_m.index(2).load(A32), v_b, O, input_precision="tf32")
            gl.store(o + p, (O * scale).to(o.dtype.element_ty), mask=m_t)
        gamma = gl.convert_layout(gl.exp(G_last), ROW)
        S = mma_v2(sm_bt.permute((1, 0)).load(A32), u_b, S * gamma[:, None], input_precision="tf32")
        S = mma_v2(sm_kt.permute((1, 0)).load(A32), v_b, S, input_precision="tf32")
    if STORE_FINAL:
        gl.store(ht + i_nh.to(gl.int64) * K * V + s_tile, S)


def chunk_forward_gluon(P, r, w, k, v, a, b, o, h0, ht, mats, offsets, cu_seqlens, u, *, scale, T, BT, w_form,
                        store_mats):
    """kernels/chunk.py chunk_forward in Gluon, building the chunk matrices (and storing them into
    `mats` if `store_mats`): `o` and `ht` are None where not stored."""
    H, K = k.shape[-2:]
    warps = ROLES["chunk_fwd"].gluon.num_warps
    r, w, k, v, a, b = _aligned16(r, w, k, v, a, b)
    _launch(
        chunk_fwd_gluon_kernel, (1, P.N * H), P,
        (*(P.tokens(x) for x in (r, w, k, v, a, b)), P.tokens(o, v), P.rows(h0, v), P.rows(ht, v),
         P.chunks(mats, _cdiv(T, BT), v), P.bounds(offsets, v), P.bounds(cu_seqlens, v), P.tokens(u, v),
         float(scale), T),
        H=H, K=K, BT=BT, W_FORM=W_FORM_CODES[w_form], HAS_STATE=h0 is not None, STORE_FINAL=ht is not None,
        STORE_O=o is not None, STORE_MATS=store_mats, STORE_U=u is not None, IS_VARLEN=cu_seqlens is not None,
        NW=warps, num_warps=warps,
    )
