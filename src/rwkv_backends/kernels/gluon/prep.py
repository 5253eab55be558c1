"""The Gluon chunk-matrix build of the two-pass path at K = 128 (chunk_prep), and its launcher."""

from __future__ import annotations

from ..common import W_FORM_CODES, _aligned16, _cdiv, _launch
from ..roles import ROLES
from .api import async_load, barrier, cp, gl, gluon, mma_v2
from .common import SAFE_RANGE, SHARED16, SHARED32, _chunk_rows, _intra, _log_decay, _sequence, _triangle_scan


@gluon.jit
def _issue_prep_copies(r, w, k, a, b, raw, stage, i_c, bos, eos, i_h, H: gl.constexpr, K: gl.constexpr,
                       BT: gl.constexpr, NW: gl.constexpr):
    """cp.async of chunk i_c's r, w, k, a, b into raw buffer `stage`."""
    ROWS: gl.constexpr = gl.BlockedLayout([1, 4], [32 // (K // 4), K // 4], [NW, 1], [1, 0])
    p, m = _chunk_rows(bos, eos, i_c, i_h, 0, H, K, BT, K, ROWS)
    async_load(raw.index(stage * 5 + 0), r + p, mask=m)
    async_load(raw.index(stage * 5 + 1), w + p, mask=m)
    async_load(raw.index(stage * 5 + 2), k + p, mask=m)
    async_load(raw.index(stage * 5 + 3), a + p, mask=m)
    async_load(raw.index(stage * 5 + 4), b + p, mask=m)
    cp.commit_group()


@gluon.jit
def chunk_prep_gluon_kernel(
    r, w, k, a, b, mats, chunk_offsets, cu_seqlens, T, c_lo, c_hi,
    H: gl.constexpr, K: gl.constexpr, BT: gl.constexpr, W_FORM: gl.constexpr, IS_VARLEN: gl.constexpr,
    NW: gl.constexpr,
):
    """kernels/twopass.py chunk_prep_kernel, tf32 products: program (i_p, i_nh) builds and stores the
    chunk matrices of chunks c_lo + i_p, c_lo + i_p + P, ... below c_hi of its sequence (P = the
    grid's first size), with the next one's inputs arriving by cp.async; the inverse as
    chunk_fwd_gluon_kernel squares it."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NW], instr_shape=[16, 8])
    ROW: gl.constexpr = gl.SliceLayout(1, MMA)
    COL: gl.constexpr = gl.SliceLayout(0, MMA)
    A32: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=1)
    B32: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=1)
    i_p = gl.program_id(0)
    n_p = gl.num_programs(0)
    i_nh = gl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos, eos, c0, n_chunks = _sequence(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)
    t_idx = gl.arange(0, BT, layout=ROW)
    kk = gl.arange(0, K, layout=COL)
    tc = gl.arange(0, BT, layout=COL)
    rows = t_idx[:, None]
    cols = tc[None, :]
    m_off = rows * BT + cols
    z_tt = gl.zeros([BT, BT], gl.float32, MMA)
    eye = gl.where(rows == cols, 1.0, 0.0) + z_tt
    raw = gl.allocate_shared_memory(r.dtype.element_ty, [10, BT, K], SHARED16)   # r w k a b, two stages
    sm_tri = gl.allocate_shared_memory(gl.float32, [BT, BT], SHARED32)
    sm_ah = gl.allocate_shared_memory(gl.float32, [BT, K], SHARED32)
    sm_rh = gl.allocate_shared_memory(gl.float32, [BT, K], SHARED32)
    sm_bf = gl.allocate_shared_memory(gl.float32, [BT, K], SHARED32)
    sm_kf = gl.allocate_shared_memory(gl.float32, [BT, K], SHARED32)
    sm_n = gl.allocate_shared_memory(gl.float32, [BT, BT], SHARED32)          # N = A_ab
    sm_p = gl.allocate_shared_memory(gl.float32, [3, BT, BT], SHARED32)       # N^2, N^4, N^8
    sm_x = gl.allocate_shared_memory(gl.float32, [3, BT, BT], SHARED32)       # I + N, then its products
    sm_tri.store(gl.where(rows >= cols, 1.0, 0.0) + z_tt)                    # [t, s]: s <= t
    n_mine = gl.cdiv(gl.maximum(gl.minimum(n_chunks, c_hi) - c_lo - i_p, 0), n_p)
    if n_mine > 0:
        _issue_prep_copies(r, w, k, a, b, raw, 0, c_lo + i_p, bos, eos, i_h, H, K, BT, NW)
    for j in range(0, n_mine):
        i_c = c_lo + i_p + j * n_p
        st = j % 2
        cp.wait_group(0)
        barrier()          # every thread's copies have landed; all are done with the last chunk
        if j + 1 < n_mine:
            _issue_prep_copies(r, w, k, a, b, raw, 1 - st, i_c + n_p, bos, eos, i_h, H, K, BT, NW)
        o_t = bos + i_c * BT + t_idx
        m_k = (o_t < eos)[:, None] & (kk < K)[None, :]
        G = _triangle_scan(sm_tri, raw.index(st * 5 + 1), bos + i_c * BT, eos, W_FORM, BT, K, MMA)
        L = gl.where(m_k, _log_decay(raw.index(st * 5 + 1).load(MMA).to(gl.float32), W_FORM), 0.0)
        Gm = G - L
        G_last = gl.sum(gl.where(rows == BT - 1, G, 0.0), 0)
        r_c = gl.where(m_k, raw.index(st * 5 + 0).load(MMA).to(gl.float32), 0.0)
        k_c = gl.where(m_k, raw.index(st * 5 + 2).load(MMA).to(gl.float32), 0.0)
        a_c = gl.where(m_k, raw.index(st * 5 + 3).load(MMA).to(gl.float32), 0.0)
        b_c = gl.where(m_k, raw.index(st * 5 + 4).load(MMA).to(gl.float32), 0.0)
        e_neg = gl.exp(-G)                          # inf past SAFE_RANGE: only the safe path reads it
        safe = gl.min(G_last, 0) >= -SAFE_RANGE
        sm_ah.store(a_c * gl.exp(Gm))
        sm_rh.store(r_c * gl.exp(G))
        sm_bf.store(b_c * e_neg)
        sm_kf.store(k_c * e_neg)
        barrier()
        A_ab, A_ak, A_rb, A_rk = _intra(safe, sm_ah, sm_rh, sm_bf, sm_kf, G, Gm, r_c, k_c, a_c, b_c, BT, MMA)
        # Tinv = (I + N)(I + N^2)(I + N^4)(I + N^8), N = A_ab (kernels/chunk_math.py _unit_lower_inverse).
        X = eye + A_ab
        sm_n.store(A_ab)
        sm_x.index(0).store(X)
        barrier()
        P = mma_v2(sm_n.load(A32), sm_n.load(B32), z_tt, input_precision="tf32")
        sm_p.index(0).store(P)
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
        mbase = mats + ((c0 + i_c) * H + i_h) * 4 * BT * BT       # kernels/common.py MAT_TINV, MAT_AK, MAT_RB, MAT_RK
        gl.store(mbase + m_off, Tinv)
        gl.store(mbase + BT * BT + m_off, A_ak)
        gl.store(mbase + 2 * BT * BT + m_off, A_rb)
        gl.store(mbase + 3 * BT * BT + m_off, A_rk)


def chunk_prepare_gluon(pairs, r, w, k, a, b, mats, offsets, cu_seqlens, *, programs, T, BT, chunks, w_form):
    """kernels/twopass.py chunk_prepare in Gluon: `programs` programs per (sequence, head), each
    building every programs-th chunk of chunks [chunks[0], chunks[1]) into `mats`."""
    H, K = k.shape[-2:]
    r, w, k, a, b = _aligned16(r, w, k, a, b)
    warps = ROLES["chunk_prep"].gluon.num_warps
    _launch(
        chunk_prep_gluon_kernel, (programs, pairs.N * H), pairs,
        (*(pairs.tokens(x) for x in (r, w, k, a, b)), pairs.chunks(mats, _cdiv(T, BT)),
         pairs.bounds(offsets, k), pairs.bounds(cu_seqlens, k), T, *chunks),
        H=H, K=K, BT=BT, W_FORM=W_FORM_CODES[w_form], IS_VARLEN=cu_seqlens is not None, NW=warps, num_warps=warps,
    )
