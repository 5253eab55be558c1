"""The Gluon walks of two-pass training at K = V = 128 over the stored chunk matrices: the loaded
forward (chunk_fwd_loaded) and the state-gradient sweep storing dZ and dv (chunk_dstate), and their
launchers."""

from __future__ import annotations

from ..common import W_FORM_CODES, _aligned16, _cdiv, _launch, _segment_launch
from ..roles import ROLES
from .api import async_load, barrier, cp, gl, gluon, mma_v2
from .common import SHARED16, SHARED32, _chunk_rows, _log_decay, _segment_base, _sequence, _triangle_scan


@gluon.jit
def _issue_sweep_copies(r, w, k, a, b, do, mats, raw_k, raw_do, raw_m, stage, i_c, bos, eos, c0, i_h, i_v,
                        H: gl.constexpr, K: gl.constexpr, V: gl.constexpr, BV: gl.constexpr, BT: gl.constexpr,
                        NW: gl.constexpr):
    """cp.async of chunk i_c's r, w, k, a, b (all K columns), V block i_v of `do` (the sweep) or of v
    (the loaded forward), and the chunk matrices."""
    KROWS: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [NW, 1], [1, 0])   # [16, 128]
    VROWS: gl.constexpr = gl.BlockedLayout([1, 4], [32 // (BV // 4), BV // 4], [NW, 1], [1, 0])   # [16, BV]
    MATS: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [NW, 1], [1, 0])     # [64, 16]: the four matrices
    pk, mk = _chunk_rows(bos, eos, i_c, i_h, 0, H, K, BT, K, KROWS)
    async_load(raw_k.index(stage * 5 + 0), r + pk, mask=mk)
    async_load(raw_k.index(stage * 5 + 1), w + pk, mask=mk)
    async_load(raw_k.index(stage * 5 + 2), k + pk, mask=mk)
    async_load(raw_k.index(stage * 5 + 3), a + pk, mask=mk)
    async_load(raw_k.index(stage * 5 + 4), b + pk, mask=mk)
    pv, mv = _chunk_rows(bos, eos, i_c, i_h, i_v * BV, H, V, BT, BV, VROWS)
    async_load(raw_do.index(stage), do + pv, mask=mv)
    m_r = gl.arange(0, 4 * BT, layout=gl.SliceLayout(1, MATS))
    m_c = gl.arange(0, BT, layout=gl.SliceLayout(0, MATS))
    async_load(raw_m.index(stage), mats + ((c0 + i_c) * H + i_h) * 4 * BT * BT
                                   + m_r[:, None] * BT + m_c[None, :])
    cp.commit_group()


@gluon.jit
def chunk_dstate_gluon_kernel(
    r, w, k, a, b, do, dht, mats, seg_ds, dh0, dz, dv, chunk_offsets, seg_offsets, cu_seqlens, scale, T,
    seg_chunks, H: gl.constexpr, K: gl.constexpr, V: gl.constexpr, BV: gl.constexpr, BT: gl.constexpr,
    W_FORM: gl.constexpr, HAS_DHT: gl.constexpr, STORE_DH0: gl.constexpr, IS_VARLEN: gl.constexpr,
    NW: gl.constexpr, DS_BF16: gl.constexpr,
):
    """kernels/twopass.py chunk_dstate_kernel with STORE_DZ_DV, tf32 products (DS_BF16: those with dS
    on bf16 operands, as the gradient kernels take them); program (i_v, i_nh). The sweep is a
    dependent walk (dS -> dU -> dZ -> dS_prev each chunk) over few programs: what it costs is the
    chain's latency, so the decays come straight from the landed inputs (G as a product with a
    0/1 triangle on L loaded in the operand's layout), and the chain takes three barriers per
    chunk."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NW], instr_shape=[16, 8])
    ROW: gl.constexpr = gl.SliceLayout(1, MMA)
    COL: gl.constexpr = gl.SliceLayout(0, MMA)
    A32: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=1)
    B32: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=1)
    A16: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B16: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    i_v = gl.program_id(0)
    i_nh = gl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos, eos, c0, n_chunks = _sequence(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)
    s0 = _segment_base(seg_offsets, i_n, T, seg_chunks, BT, IS_VARLEN)
    t_idx = gl.arange(0, BT, layout=ROW)
    kk = gl.arange(0, K, layout=COL)
    kr = gl.arange(0, K, layout=ROW)
    vv = i_v * BV + gl.arange(0, BV, layout=COL)
    tc = gl.arange(0, BT, layout=COL)
    rows = t_idx[:, None]
    cols = tc[None, :]
    s_tile = kr[:, None] * V + vv[None, :]
    z_tv = gl.zeros([BT, BV], gl.float32, MMA)

    raw_k = gl.allocate_shared_memory(r.dtype.element_ty, [10, BT, K], SHARED16)   # r w k a b, two stages
    raw_do = gl.allocate_shared_memory(do.dtype.element_ty, [2, BT, BV], SHARED16)
    raw_m = gl.allocate_shared_memory(gl.float32, [2, 4 * BT, BT], SHARED32)      # Tinv, A_ak, A_rb, A_rk
    sm_tri = gl.allocate_shared_memory(gl.float32, [BT, BT], SHARED32)
    # DS_BF16: the products with dS (B̃ dS, K̃ dS) on bf16 operands, as the gradient kernels take them.
    DS_TYPE: gl.constexpr = gl.bfloat16 if DS_BF16 else gl.float32
    DS_SHARED: gl.constexpr = SHARED16 if DS_BF16 else SHARED32
    sm_bt = gl.allocate_shared_memory(DS_TYPE, [BT, K], DS_SHARED)
    sm_kt = gl.allocate_shared_memory(DS_TYPE, [BT, K], DS_SHARED)
    sm_rh = gl.allocate_shared_memory(gl.float32, [BT, K], SHARED32)
    sm_ah = gl.allocate_shared_memory(gl.float32, [BT, K], SHARED32)
    sm_ds = gl.allocate_shared_memory(DS_TYPE, [K, BV], DS_SHARED)
    sm_do = gl.allocate_shared_memory(gl.float32, [BT, BV], SHARED32)
    sm_du = gl.allocate_shared_memory(gl.float32, [BT, BV], SHARED32)
    sm_dz = gl.allocate_shared_memory(gl.float32, [BT, BV], SHARED32)
    sm_tri.store(gl.where(rows >= cols, 1.0, 0.0) + gl.zeros([BT, BT], gl.float32, MMA))   # [t, s]: s <= t

    dS = gl.zeros([K, BV], gl.float32, MMA)
    if HAS_DHT:
        dS += gl.load(dht + i_nh.to(gl.int64) * K * V + s_tile)
    if n_chunks > 0:
        _issue_sweep_copies(r, w, k, a, b, do, mats, raw_k, raw_do, raw_m, 0, n_chunks - 1, bos, eos, c0, i_h,
                            i_v, H, K, V, BV, BT, NW)
    for j in range(0, n_chunks):
        i_c = n_chunks - 1 - j
        st = j % 2
        cp.wait_group(0)
        barrier()          # every thread's copies have landed; all are done with chunk j - 1
        if j + 1 < n_chunks:
            _issue_sweep_copies(r, w, k, a, b, do, mats, raw_k, raw_do, raw_m, 1 - st, i_c - 1, bos, eos, c0,
                                i_h, i_v, H, K, V, BV, BT, NW)
        if ((i_c + 1) % seg_chunks == 0) | (j == 0):            # the last chunk of its segment
            gl.store(seg_ds + ((s0 + i_c // seg_chunks) * H + i_h) * K * V + s_tile, dS)
        o_t = bos + i_c * BT + t_idx
        m_k = (o_t < eos)[:, None] & (kk < K)[None, :]
        m_v = (o_t < eos)[:, None] & (vv < V)[None, :]
        # G = cumsum(L) over the rows, L loaded in the product's operand layout (no round trip).
        G = _triangle_scan(sm_tri, raw_k.index(st * 5 + 1), bos + i_c * BT, eos, W_FORM, BT, K, MMA)
        L = gl.where(m_k, _log_decay(raw_k.index(st * 5 + 1).load(MMA).to(gl.float32), W_FORM), 0.0)
        G_last = gl.sum(gl.where(rows == BT - 1, G, 0.0), 0)
        tail = gl.exp(G_last[None, :] - G)
        r_c = gl.where(m_k, raw_k.index(st * 5 + 0).load(MMA).to(gl.float32), 0.0)
        sm_rh.store(r_c * gl.exp(G))
        a_c = gl.where(m_k, raw_k.index(st * 5 + 3).load(MMA).to(gl.float32), 0.0)
        sm_ah.store(a_c * gl.exp(G - L))
        b_c = gl.where(m_k, raw_k.index(st * 5 + 4).load(MMA).to(gl.float32), 0.0)
        sm_bt.store((b_c * tail).to(DS_TYPE))
        k_c = gl.where(m_k, raw_k.index(st * 5 + 2).load(MMA).to(gl.float32), 0.0)
        sm_kt.store((k_c * tail).to(DS_TYPE))
        gamma = gl.convert_layout(gl.exp(G_last), ROW)
        dO = gl.where(m_v, raw_do.index(st).load(MMA).to(gl.float32), 0.0) * scale
        sm_do.store(dO)
        sm_ds.store(dS.to(DS_TYPE))
        barrier()

        # The chain: dU = A_rbᵀ dO + B̃ dS, dZ = Tinvᵀ dU, dS_prev = R̂ᵀ dO + γ dS + Âᵀ dZ.
        mats_c = raw_m.index(st)
        dU = mma_v2(mats_c.slice(2 * BT, BT, 0).permute((1, 0)).load(A32), sm_do.load(B32), z_tv,
                    input_precision="tf32")
        if DS_BF16:
            dU = mma_v2(sm_bt.load(A16), sm_ds.load(B16), dU)
        else:
            dU = mma_v2(sm_bt.load(A32), sm_ds.load(B32), dU, input_precision="tf32")
        sm_du.store(dU)
        barrier()
        dZ = mma_v2(mats_c.slice(0, BT, 0).permute((1, 0)).load(A32), sm_du.load(B32), z_tv,
                    input_precision="tf32")
        sm_dz.store(dZ)
        barrier()
        dz_b = sm_dz.load(B32)
        do_b = sm_do.load(B32)
        dS = mma_v2(sm_rh.permute((1, 0)).load(A32), do_b, gamma[:, None] * dS, input_precision="tf32")
        dS = mma_v2(sm_ah.permute((1, 0)).load(A32), dz_b, dS, input_precision="tf32")
        # Off the chain: dv = A_akᵀ dZ + A_rkᵀ dO + K̃ dS (this chunk's end-state gradient, still in sm_ds).
        dv_c = mma_v2(mats_c.slice(BT, BT, 0).permute((1, 0)).load(A32), dz_b, z_tv, input_precision="tf32")
        dv_c = mma_v2(mats_c.slice(3 * BT, BT, 0).permute((1, 0)).load(A32), do_b, dv_c, input_precision="tf32")
        if DS_BF16:
            dv_c = mma_v2(sm_kt.load(A16), sm_ds.load(B16), dv_c)
        else:
            dv_c = mma_v2(sm_kt.load(A32), sm_ds.load(B32), dv_c, input_precision="tf32")
        p_v = (o_t[:, None] * H + i_h) * V + vv[None, :]
        gl.store(dv + p_v, dv_c.to(dv.dtype.element_ty), mask=m_v)
        gl.store(dz + p_v, dZ.to(dz.dtype.element_ty), mask=m_v)
    if STORE_DH0:
        gl.store(dh0 + i_nh.to(gl.int64) * K * V + s_tile, dS)


@gluon.jit
def chunk_fwd_loaded_gluon_kernel(
    r, w, k, v, a, b, o, h0, ht, mats, chunk_offsets, cu_seqlens, seg_states, seg_offsets, u, scale, T,
    seg_chunks, c_lo, c_hi, H: gl.constexpr, K: gl.constexpr, V: gl.constexpr, BV: gl.constexpr,
    BT: gl.constexpr, W_FORM: gl.constexpr, HAS_STATE: gl.constexpr, STORE_FINAL: gl.constexpr,
    STORE_O: gl.constexpr, STORE_SEGMENTS: gl.constexpr, STORE_U: gl.constexpr, IS_VARLEN: gl.constexpr,
    NW: gl.constexpr,
):
    """kernels/chunk.py chunk_fwd_kernel loading the chunk matrices (MATS_LOAD; with STORE_SEGMENTS,
    SEG_STORE), tf32 products; program (i_v, i_nh) walks V block i_v at K = V = 128, chunks c_lo up
    to c_hi (h0: the state at c_lo; ht: the state where it stops). As the sweep
    (chunk_dstate_gluon_kernel), a dependent walk over few programs: the decays come from the
    landed inputs, and the chain (Z = Â S + A_ak V, U = Tinv Z, S' = γ S + B̃ᵀ U + K̃ᵀ V) takes
    three barriers per chunk."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NW], instr_shape=[16, 8])
    ROW: gl.constexpr = gl.SliceLayout(1, MMA)
    COL: gl.constexpr = gl.SliceLayout(0, MMA)
    A32: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=1)
    B32: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=1)
    i_v = gl.program_id(0)
    i_nh = gl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos, eos, c0, n_chunks = _sequence(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)
    if STORE_SEGMENTS:
        s0 = _segment_base(seg_offsets, i_n, T, seg_chunks, BT, IS_VARLEN)
    t_idx = gl.arange(0, BT, layout=ROW)
    kk = gl.arange(0, K, layout=COL)
    kr = gl.arange(0, K, layout=ROW)
    vv = i_v * BV + gl.arange(0, BV, layout=COL)
    tc = gl.arange(0, BT, layout=COL)
    rows = t_idx[:, None]
    cols = tc[None, :]
    s_tile = kr[:, None] * V + vv[None, :]
    z_tv = gl.zeros([BT, BV], gl.float32, MMA)

    raw_k = gl.allocate_shared_memory(r.dtype.element_ty, [10, BT, K], SHARED16)   # r w k a b, two stages
    raw_v = gl.allocate_shared_memory(v.dtype.element_ty, [2, BT, BV], SHARED16)
    raw_m = gl.allocate_shared_memory(gl.float32, [2, 4 * BT, BT], SHARED32)      # Tinv, A_ak, A_rb, A_rk
    sm_tri = gl.allocate_shared_memory(gl.float32, [BT, BT], SHARED32)
    sm_ah = gl.allocate_shared_memory(gl.float32, [BT, K], SHARED32)
    sm_rh = gl.allocate_shared_memory(gl.float32, [BT, K], SHARED32)
    sm_bt = gl.allocate_shared_memory(gl.float32, [BT, K], SHARED32)
    sm_kt = gl.allocate_shared_memory(gl.float32, [BT, K], SHARED32)
    sm_s = gl.allocate_shared_memory(gl.float32, [K, BV], SHARED32)
    sm_v = gl.allocate_shared_memory(gl.float32, [BT, BV], SHARED32)
    sm_z = gl.allocate_shared_memory(gl.float32, [BT, BV], SHARED32)
    sm_u = gl.allocate_shared_memory(gl.float32, [BT, BV], SHARED32)
    sm_tri.store(gl.where(rows >= cols, 1.0, 0.0) + gl.zeros([BT, BT], gl.float32, MMA))   # [t, s]: s <= t

    S = gl.zeros([K, BV], gl.float32, MMA)
    if HAS_STATE:
        S += gl.load(h0 + i_nh.to(gl.int64) * K * V + s_tile)
    c_end = gl.minimum(n_chunks, c_hi)
    if c_lo < c_end:
        _issue_sweep_copies(r, w, k, a, b, v, mats, raw_k, raw_v, raw_m, 0, c_lo, bos, eos, c0, i_h, i_v,
                            H, K, V, BV, BT, NW)
    for i_c in range(c_lo, c_end):
        st = (i_c - c_lo) % 2
        cp.wait_group(0)
        barrier()          # every thread's copies have landed; all are done with chunk i_c - 1
        if i_c + 1 < c_end:
            _issue_sweep_copies(r, w, k, a, b, v, mats, raw_k, raw_v, raw_m, 1 - st, i_c + 1, bos, eos, c0,
                                i_h, i_v, H, K, V, BV, BT, NW)
        if STORE_SEGMENTS:
            if i_c % seg_chunks == 0:
                gl.store(seg_states + ((s0 + i_c // seg_chunks) * H + i_h) * K * V + s_tile, S)
        o_t = bos + i_c * BT + t_idx
        m_k = (o_t < eos)[:, None] & (kk < K)[None, :]
        m_v = (o_t < eos)[:, None] & (vv < V)[None, :]
        G = _triangle_scan(sm_tri, raw_k.index(st * 5 + 1), bos + i_c * BT, eos, W_FORM, BT, K, MMA)
        L = gl.where(m_k, _log_decay(raw_k.index(st * 5 + 1).load(MMA).to(gl.float32), W_FORM), 0.0)
        G_last = gl.sum(gl.where(rows == BT - 1, G, 0.0), 0)
        tail = gl.exp(G_last[None, :] - G)
        a_c = gl.where(m_k, raw_k.index(st * 5 + 3).load(MMA).to(gl.float32), 0.0)
        sm_ah.store(a_c * gl.exp(G - L))
        r_c = gl.where(m_k, raw_k.index(st * 5 + 0).load(MMA).to(gl.float32), 0.0)
        sm_rh.store(r_c * gl.exp(G))
        b_c = gl.where(m_k, raw_k.index(st * 5 + 4).load(MMA).to(gl.float32), 0.0)
        sm_bt.store(b_c * tail)
        k_c = gl.where(m_k, raw_k.index(st * 5 + 2).load(MMA).to(gl.float32), 0.0)
        sm_kt.store(k_c * tail)
        gamma = gl.convert_layout(gl.exp(G_last), ROW)
        sm_v.store(gl.where(m_v, raw_v.index(st).load(MMA).to(gl.float32), 0.0))
        sm_s.store(S)
        barrier()

        mats_c = raw_m.index(st)
        s_b = sm_s.load(B32)
        v_b = sm_v.load(B32)
        Z = mma_v2(sm_ah.load(A32), s_b, z_tv, input_precision="tf32")
        Z = mma_v2(mats_c.slice(BT, BT, 0).load(A32), v_b, Z, input_precision="tf32")          # + A_ak V
        sm_z.store(Z)
        barrier()
        U = mma_v2(mats_c.slice(0, BT, 0).load(A32), sm_z.load(B32), z_tv, input_precision="tf32")  # U_t = a_tᵀ h_{t-1}
        sm_u.store(U)
        p_v = (o_t[:, None] * H + i_h) * V + vv[None, :]
        if STORE_U:
            gl.store(u + p_v, U, mask=m_v)
        barrier()
        u_b = sm_u.load(B32)
        if STORE_O:
            O = mma_v2(sm_rh.load(A32), s_b, z_tv, input_precision="tf32")
            O = mma_v2(mats_c.slice(2 * BT, BT, 0).load(A32), u_b, O, input_precision="tf32")     # + A_rb U
            O = mma_v2(mats_c.slice(3 * BT, BT, 0).load(A32), v_b, O, input_precision="tf32")     # + A_rk V
            gl.store(o + p_v, (O * scale).to(o.dtype.element_ty), mask=m_v)
        S = mma_v2(sm_bt.permute((1, 0)).load(A32), u_b, S * gamma[:, None], input_precision="tf32")
        S = mma_v2(sm_kt.permute((1, 0)).load(A32), v_b, S, input_precision="tf32")
    if STORE_FINAL:
        gl.store(ht + i_nh.to(gl.int64) * K * V + s_tile, S)


def dstate_sweep_gluon(P, r, w, k, a, b, do, dht, mats, seg_ds, dh0, dz, dv, offsets, seg_offsets, cu_seqlens, *,
                       scale, T, seg_chunks, w_form, ds_bf16):
    """kernels/twopass.py dstate_sweep in Gluon, storing dZ and dv; its products with dS take bf16
    operands if `ds_bf16`, else tf32's."""
    H, K = k.shape[-2:]
    V = do.shape[-1]
    BT = mats.shape[-1]
    spec = ROLES["chunk_dstate"].gluon
    r, w, k, a, b, do = _aligned16(r, w, k, a, b, do)
    _launch(
        chunk_dstate_gluon_kernel, (_cdiv(V, spec.block_v), P.N * H), P,
        (*(P.tokens(x) for x in (r, w, k, a, b, do)), P.rows(dht, do), P.chunks(mats, _cdiv(T, BT)),
         P.chunks(seg_ds, _cdiv(T, seg_chunks * BT)), P.rows(dh0, seg_ds), P.tokens(dz), P.tokens(dv),
         P.bounds(offsets, do), P.bounds(seg_offsets, do), P.bounds(cu_seqlens, do), float(scale), T, seg_chunks),
        H=H, K=K, V=V, BV=spec.block_v, BT=BT, W_FORM=W_FORM_CODES[w_form], HAS_DHT=dht is not None,
        STORE_DH0=dh0 is not None, IS_VARLEN=cu_seqlens is not None, NW=spec.num_warps,
        DS_BF16=ds_bf16, num_warps=spec.num_warps,
    )


def chunk_forward_loaded_gluon(P, r, w, k, v, a, b, o, h0, ht, mats, offsets, cu_seqlens, seg_states, u, *, scale, T,
                               BT, seg_len, w_form, chunks):
    """kernels/chunk.py chunk_forward loading the chunk matrices (mats_mode "load") in Gluon, over the
    chunks [chunks[0], chunks[1]): `o` and `ht` are None where not stored; with `seg_states`, each
    segment's start state is stored there."""
    H, K = k.shape[-2:]
    V = v.shape[-1]
    spec = ROLES["chunk_fwd_loaded"].gluon
    seg_chunks, seg_offsets = 1, None
    if seg_states is not None:
        seg_chunks, seg_offsets, _ = _segment_launch(cu_seqlens, P.N, T, seg_len, BT, k.device)
    r, w, k, v, a, b = _aligned16(r, w, k, v, a, b)
    _launch(
        chunk_fwd_loaded_gluon_kernel, (_cdiv(V, spec.block_v), P.N * H), P,
        (*(P.tokens(x) for x in (r, w, k, v, a, b)), P.tokens(o, v), P.rows(h0, v), P.rows(ht, v),
         P.chunks(mats, _cdiv(T, BT)), P.bounds(offsets, v), P.bounds(cu_seqlens, v),
         P.chunks(seg_states, _cdiv(T, seg_len or 1), v), P.bounds(seg_offsets, v), P.tokens(u, v), float(scale), T,
         seg_chunks, *chunks),
        H=H, K=K, V=V, BV=spec.block_v, BT=BT, W_FORM=W_FORM_CODES[w_form], HAS_STATE=h0 is not None,
        STORE_FINAL=ht is not None, STORE_O=o is not None, STORE_SEGMENTS=seg_states is not None,
        STORE_U=u is not None, IS_VARLEN=cu_seqlens is not None, NW=spec.num_warps, num_warps=spec.num_warps,
    )
