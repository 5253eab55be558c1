"""What the Gluon kernels share: the shared-memory layouts, sequence and segment bounds, the decay
forms (kernels/common.py's, compiled by Gluon's frontend), the in-chunk matrices and the pieces of
the gradient kernels."""

from __future__ import annotations

from .. import common
from .api import barrier, gl, gluon, mma_v2

SAFE_RANGE = common.SAFE_RANGE

# Every shared buffer is swizzled: unswizzled ones made the gradient kernel 1.6x slower (bank
# conflicts of the operand loads).
SHARED16 = gl.constexpr(gl.SwizzledSharedLayout(8, 1, 8, [1, 0]))
SHARED32 = gl.constexpr(gl.SwizzledSharedLayout(4, 1, 8, [1, 0]))

# The decay forms are kernels/common.py's, compiled by Gluon's frontend (their tl.* calls are
# the builtins Gluon shares with Triton).
_log_decay = gluon.jit(common._log_decay.fn)
_dlog_decay = gluon.jit(common._dlog_decay.fn)


@gluon.jit
def _sequence(cu_seqlens, chunk_offsets, i_n, T, BT: gl.constexpr, IS_VARLEN: gl.constexpr):
    """Sequence i_n's first and end token, its first chunk's index in the chunk buffers, and its
    chunk count (kernels/common.py _seq_bounds and _chunk_base)."""
    if IS_VARLEN:
        bos = gl.load(cu_seqlens + i_n).to(gl.int64)
        eos = gl.load(cu_seqlens + i_n + 1).to(gl.int64)
        c0 = gl.load(chunk_offsets + i_n).to(gl.int64)
    else:
        bos = i_n.to(gl.int64) * T
        eos = bos + T
        c0 = i_n.to(gl.int64) * gl.cdiv(T, BT)
    return bos, eos, c0, gl.cdiv(eos - bos, BT).to(gl.int32)


@gluon.jit
def _tf32_head(x):
    """x cut to tf32's 10 mantissa bits: x - head is exact in float32, so a tf32 product with the
    head plus one with the remainder loses about 2^-21 of x, not 2^-11."""
    return (x.to(gl.int32, bitcast=True) & -8192).to(gl.float32, bitcast=True)


@gluon.jit
def _triangle_scan(sm_tri, raw_w, t0, eos, W_FORM: gl.constexpr, BT: gl.constexpr, K: gl.constexpr,
                   MMA: gl.constexpr):
    """The 0/1 triangle in sm_tri times the log-decays L of the chunk landed in raw_w (rows from token
    t0, zero from eos on): L's cumulative sums over the rows, inclusive prefix or suffix as the
    triangle says, [BT, K] in MMA. L is taken in the product's operand layout straight from raw_w
    (no round trip), as a tf32 head and its exact remainder."""
    A32: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=1)
    B32: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=1)
    t_b = t0 + gl.arange(0, BT, layout=gl.SliceLayout(1, B32))
    L_b = gl.where((t_b < eos)[:, None], _log_decay(raw_w.load(B32).to(gl.float32), W_FORM), 0.0)
    L_b_hi = _tf32_head(L_b)
    tri = sm_tri.load(A32)
    acc = mma_v2(tri, L_b_hi, gl.zeros([BT, K], gl.float32, MMA), input_precision="tf32")
    return mma_v2(tri, L_b - L_b_hi, acc, input_precision="tf32")


@gluon.jit
def _segment_base(seg_offsets, i_n, T, seg_chunks, BT: gl.constexpr, IS_VARLEN: gl.constexpr):
    """Sequence i_n's first segment in the segment buffers (kernels/common.py _segment_base)."""
    if IS_VARLEN:
        s0 = gl.load(seg_offsets + i_n).to(gl.int64)
    else:
        s0 = i_n.to(gl.int64) * gl.cdiv(T, BT * seg_chunks)
    return s0


@gluon.jit
def _chunk_rows(bos, eos, i_c, i_h, col0, H: gl.constexpr, N: gl.constexpr, BT: gl.constexpr,
                NCOLS: gl.constexpr, LAYOUT: gl.constexpr):
    """Offsets and mask of chunk i_c's rows, columns [col0, col0 + NCOLS), of a [tokens, H, N]
    tensor, in LAYOUT (what the cp.async copies are laid out in)."""
    o_t = bos + i_c * BT + gl.arange(0, BT, layout=gl.SliceLayout(1, LAYOUT))
    o_n = col0 + gl.arange(0, NCOLS, layout=gl.SliceLayout(0, LAYOUT))
    return (o_t[:, None] * H + i_h) * N + o_n[None, :], (o_t < eos)[:, None] & (o_n < N)[None, :]


@gluon.jit
def _intra(safe, sm_ah, sm_rh, sm_bf, sm_kf, G, Gm, r_c, k_c, a_c, b_c, BT: gl.constexpr, MMA: gl.constexpr):
    """A chunk's A_ab, A_ak (strictly lower) and A_rb, A_rk (lower), [BT, BT] in MMA (kernels/chunk_math.py
    _intra): where safe, four products of Â, R̂ (in sm_ah, sm_rh) with b e^{-G}, k e^{-G} (in sm_bf,
    sm_kf), float32 at tf32; otherwise pair by pair from the register tiles."""
    A32: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=1)
    B32: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=1)
    rows = gl.arange(0, BT, layout=gl.SliceLayout(1, MMA))[:, None]
    cols = gl.arange(0, BT, layout=gl.SliceLayout(0, MMA))[None, :]
    z_tt = gl.zeros([BT, BT], gl.float32, MMA)
    if safe:
        ah_a = sm_ah.load(A32)
        rh_a = sm_rh.load(A32)
        bft_b = sm_bf.permute((1, 0)).load(B32)
        kft_b = sm_kf.permute((1, 0)).load(B32)
        A_ab = mma_v2(ah_a, bft_b, z_tt, input_precision="tf32")
        A_ak = mma_v2(ah_a, kft_b, z_tt, input_precision="tf32")
        A_rb = mma_v2(rh_a, bft_b, z_tt, input_precision="tf32")
        A_rk = mma_v2(rh_a, kft_b, z_tt, input_precision="tf32")
    else:
        A_ab = z_tt
        A_ak = z_tt
        A_rb = z_tt
        A_rk = z_tt
        for s in range(BT):
            at_s = rows == s
            G_s = gl.sum(gl.where(at_s, G, 0.0), 0)
            b_s = gl.sum(gl.where(at_s, b_c, 0.0), 0)
            k_s = gl.sum(gl.where(at_s, k_c, 0.0), 0)
            E = gl.exp(gl.where(rows > s, Gm - G_s[None, :], float("-inf")))
            F = gl.exp(gl.where(rows >= s, G - G_s[None, :], float("-inf")))
            aE = a_c * E
            rF = r_c * F
            col_s = cols == s
            A_ab = gl.where(col_s, gl.sum(aE * b_s[None, :], 1)[:, None], A_ab)
            A_ak = gl.where(col_s, gl.sum(aE * k_s[None, :], 1)[:, None], A_ak)
            A_rb = gl.where(col_s, gl.sum(rF * b_s[None, :], 1)[:, None], A_rb)
            A_rk = gl.where(col_s, gl.sum(rF * k_s[None, :], 1)[:, None], A_rk)
    A_ab = gl.where(rows > cols, A_ab, 0.0)
    A_ak = gl.where(rows > cols, A_ak, 0.0)
    A_rb = gl.where(rows >= cols, A_rb, 0.0)
    A_rk = gl.where(rows >= cols, A_rk, 0.0)
    return A_ab, A_ak, A_rb, A_rk


@gluon.jit
def _gradient_decays(L, r_c, k_c, a_c, b_c, sm_l, sm_tri, BT: gl.constexpr, MMA: gl.constexpr):
    """The gradient kernels' chunk decays from L: G = cumsum(L) over the rows as a product of the
    inclusive 0/1 triangle (sm_tri.index(0)) with L's tf32 head and remainder (through sm_l, with a
    barrier), G_last from G's own last row (as the Triton kernel's comment on tail says: taken from
    a separate sum, tail rounds to 1 +- 3e-5), and what the gradients are taken through."""
    A32: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=1)
    B32: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=1)
    rows = gl.arange(0, BT, layout=gl.SliceLayout(1, MMA))[:, None]
    L_hi = _tf32_head(L)
    sm_l.index(0).store(L_hi)
    sm_l.index(1).store(L - L_hi)
    barrier()
    incl = sm_tri.index(0).load(A32)
    G = mma_v2(incl, sm_l.index(0).load(B32), gl.zeros_like(L), input_precision="tf32")
    G = mma_v2(incl, sm_l.index(1).load(B32), G, input_precision="tf32")
    Gm = G - L
    G_last = gl.sum(gl.where(rows == BT - 1, G, 0.0), 0)
    a_hat = a_c * gl.exp(Gm)
    r_hat = r_c * gl.exp(G)
    tail = gl.exp(G_last[None, :] - G)
    gamma = gl.exp(G_last)
    b_t = b_c * tail
    k_t = k_c * tail
    e_neg = gl.exp(-G)                          # inf past SAFE_RANGE: only the safe path reads it
    b_f = b_c * e_neg
    k_f = k_c * e_neg
    safe = gl.min(G_last, 0) >= -SAFE_RANGE
    return G, Gm, a_hat, r_hat, tail, gamma, b_t, k_t, e_neg, b_f, k_f, safe


@gluon.jit
def _empty_span_pairs(dA, LAG: gl.constexpr, rows, cols):
    """kernels/chunk_math.py _empty_span_pairs: the pairs s = t - LAG of dA (decay e^0), their values at
    row t and at row s, [BT, 1]."""
    on = gl.where(rows == cols + LAG, dA, 0.0)
    at_s = gl.sum(gl.where(rows == cols, gl.sum(on, 0)[None, :], 0.0), 1)[:, None]
    return gl.sum(on, 1)[:, None], at_s


@gluon.jit
def _pair_matrix_grads(sm_dz, sm_do, sm_u, sm_v, sm_da, BT: gl.constexpr, MMA: gl.constexpr):
    """The gradients of the four in-chunk matrices (dA_ab = dZ Uᵀ, dA_ak = dZ Vᵀ strictly lower;
    dA_rb = dO Uᵀ, dA_rk = dO Vᵀ lower; bf16 operands from shared memory), and dZ, dO as A
    operands. sm_da takes them without their pairs of decay e^0 (_empty_span_pairs), which
    _input_grads takes apart."""
    A16: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B16: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    rows = gl.arange(0, BT, layout=gl.SliceLayout(1, MMA))[:, None]
    cols = gl.arange(0, BT, layout=gl.SliceLayout(0, MMA))[None, :]
    z_tt = gl.zeros([BT, BT], gl.float32, MMA)
    dz_a = sm_dz.load(A16)
    do_a = sm_do.load(A16)
    ut_b = sm_u.permute((1, 0)).load(B16)
    vt_b = sm_v.permute((1, 0)).load(B16)
    dA_ab = gl.where(rows > cols, mma_v2(dz_a, ut_b, z_tt), 0.0)
    dA_ak = gl.where(rows > cols, mma_v2(dz_a, vt_b, z_tt), 0.0)
    dA_rb = gl.where(rows >= cols, mma_v2(do_a, ut_b, z_tt), 0.0)
    dA_rk = gl.where(rows >= cols, mma_v2(do_a, vt_b, z_tt), 0.0)
    sm_da.index(0).store(gl.where(rows > cols + 1, dA_ab, 0.0))
    sm_da.index(1).store(gl.where(rows > cols + 1, dA_ak, 0.0))
    sm_da.index(2).store(gl.where(rows > cols, dA_rb, 0.0))
    sm_da.index(3).store(gl.where(rows > cols, dA_rk, 0.0))
    return dz_a, do_a, dA_ab, dA_ak, dA_rb, dA_rk


@gluon.jit
def _input_grads(safe, dA_ab, dA_ak, dA_rb, dA_rk, d_ahat, d_rhat, d_bt, d_kt, d_gamma, r_c, w_c, k_c, a_c, b_c,
                 L, G, Gm, a_hat, r_hat, tail, gamma, b_t, k_t, e_neg, b_f, k_f, sm_da, sm_bf, sm_kf, sm_ah32,
                 sm_rh32, sm_tri, sm_dl, raw_a, raw_b, raw_k, sm_shift, m, has_next, W_FORM: gl.constexpr,
                 BT: gl.constexpr, MMA: gl.constexpr):
    """A chunk's gradients of r, w, k, a, b (the gradient kernels' common end): the four in-chunk
    matrices' gradients (dA_*, in sm_da without their e^0 pairs) back to a, r, b, k and the
    cumulative decays, then the e^0 pairs and the direct terms and L's suffix sums (as
    kernels/backward.py chunk_bwd_kernel). d_ahat, d_rhat, d_bt, d_kt: the gradients of Â, R̂, B̃, K̃
    through the state products; d_gamma: of γ. sm_bf, sm_kf, sm_ah32, sm_rh32 hold b_f, k_f, Â, R̂
    (float32), sm_tri the 0/1 triangles; sm_dl is scratch. [BT, N] tiles in MMA (rows in the
    sequence: m). raw_a, raw_b, raw_k hold the chunk's a, b, k as loaded, sm_shift the 0/1 matrix
    [t, t - 1] in their dtype; has_next: [BT, 1], the row has a next token in the chunk."""
    A32: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=1)
    B32: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=1)
    rows = gl.arange(0, BT, layout=gl.SliceLayout(1, MMA))[:, None]
    cols = gl.arange(0, BT, layout=gl.SliceLayout(0, MMA))[None, :]
    z_tk = gl.zeros_like(d_ahat)
    # The four in-chunk matrices back to a, r, b, k and the cumulative decays.
    if safe:
        bf_b = sm_bf.load(B32)
        kf_b = sm_kf.load(B32)
        d_ahat = mma_v2(sm_da.index(0).load(A32), bf_b, d_ahat, input_precision="tf32")
        d_ahat = mma_v2(sm_da.index(1).load(A32), kf_b, d_ahat, input_precision="tf32")
        d_rhat = mma_v2(sm_da.index(2).load(A32), bf_b, d_rhat, input_precision="tf32")
        d_rhat = mma_v2(sm_da.index(3).load(A32), kf_b, d_rhat, input_precision="tf32")
        ah_b = sm_ah32.load(B32)
        rh_b = sm_rh32.load(B32)
        d_bf = mma_v2(sm_da.index(0).permute((1, 0)).load(A32), ah_b, z_tk, input_precision="tf32")
        d_bf = mma_v2(sm_da.index(2).permute((1, 0)).load(A32), rh_b, d_bf, input_precision="tf32")
        d_kf = mma_v2(sm_da.index(1).permute((1, 0)).load(A32), ah_b, z_tk, input_precision="tf32")
        d_kf = mma_v2(sm_da.index(3).permute((1, 0)).load(A32), rh_b, d_kf, input_precision="tf32")
        db_c = d_bf * e_neg
        dk_c = d_kf * e_neg
        dG = -(d_bf * b_f + d_kf * k_f)
        dGm = z_tk
        da_pair = z_tk
        dr_pair = z_tk
    else:
        # The exact per-pair path.
        db_c = z_tk
        dk_c = z_tk
        dG = z_tk
        dGm = z_tk
        da_pair = z_tk
        dr_pair = z_tk
        for s in range(BT):
            at_s = rows == s
            G_s = gl.sum(gl.where(at_s, G, 0.0), 0)
            b_s = gl.sum(gl.where(at_s, b_c, 0.0), 0)
            k_s = gl.sum(gl.where(at_s, k_c, 0.0), 0)
            # Without the pairs of decay e^0 (t = s + 1 in E, t = s in F), taken apart below.
            E = gl.exp(gl.where(rows > s + 1, Gm - G_s[None, :], float("-inf")))
            F = gl.exp(gl.where(rows > s, G - G_s[None, :], float("-inf")))
            col_s = cols == s
            g_ab = gl.sum(gl.where(col_s, dA_ab, 0.0), 1)[:, None]
            g_ak = gl.sum(gl.where(col_s, dA_ak, 0.0), 1)[:, None]
            g_rb = gl.sum(gl.where(col_s, dA_rb, 0.0), 1)[:, None]
            g_rk = gl.sum(gl.where(col_s, dA_rk, 0.0), 1)[:, None]
            da_pair += (g_ab * b_s[None, :] + g_ak * k_s[None, :]) * E
            dr_pair += (g_rb * b_s[None, :] + g_rk * k_s[None, :]) * F
            aE = a_c * E
            rF = r_c * F
            db_s = gl.sum(g_ab * aE + g_rb * rF, 0)
            dk_s = gl.sum(g_ak * aE + g_rk * rF, 0)
            db_c = gl.where(at_s, db_s[None, :], db_c)
            dk_c = gl.where(at_s, dk_s[None, :], dk_c)
            dG = gl.where(at_s, dG - (b_s * db_s + k_s * dk_s)[None, :], dG)
        dGm += a_c * da_pair
        dG += r_c * dr_pair
    # The e^0 pairs; the partners one token back (b, k) and on (a) as products of the inputs
    # with the 0/1 shift (exact), masked to rows in the sequence.
    ab_t, ab_s = _empty_span_pairs(dA_ab, 1, rows, cols)
    ak_t, ak_s = _empty_span_pairs(dA_ak, 1, rows, cols)
    rb_tt, _ = _empty_span_pairs(dA_rb, 0, rows, cols)
    rk_tt, _ = _empty_span_pairs(dA_rk, 0, rows, cols)
    A16: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B16: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    shift_a = sm_shift.load(A16)
    b_prev = gl.where(m, mma_v2(shift_a, raw_b.load(B16), z_tk), 0.0)
    k_prev = gl.where(m, mma_v2(shift_a, raw_k.load(B16), z_tk), 0.0)
    a_next = gl.where(m & has_next, mma_v2(sm_shift.permute((1, 0)).load(A16), raw_a.load(B16), z_tk), 0.0)
    dr_pair += rb_tt * b_c + rk_tt * k_c
    da_pair += ab_t * b_prev + ak_t * k_prev
    db_c += rb_tt * r_c + ab_s * a_next
    dk_c += rk_tt * r_c + ak_s * a_next
    da_c = d_ahat * gl.exp(Gm) + da_pair
    dr_c = d_rhat * gl.exp(G) + dr_pair
    dGm += d_ahat * a_hat
    dG += d_rhat * r_hat
    db_c += d_bt * tail
    dk_c += d_kt * tail
    # The last token's tail spans no L: out of dL (Â's first row is, by the strict triangle).
    tail_terms = gl.where(has_next, d_bt * b_t + d_kt * k_t, 0.0)
    dG -= tail_terms
    dG_last = gl.sum(tail_terms, 0) + d_gamma * gamma

    # dL_t = Σ_{s >= t} dG_s + Σ_{s > t} dGm_s + dG_last (L enters G, Gm and G_last).
    dG_hi = _tf32_head(dG)
    dGm_hi = _tf32_head(dGm)
    sm_dl.index(0).store(dG_hi)
    sm_dl.index(1).store(dG - dG_hi)
    sm_dl.index(2).store(dGm_hi)
    sm_dl.index(3).store(dGm - dGm_hi)
    barrier()
    incl_t = sm_tri.index(0).permute((1, 0)).load(A32)
    strict_t = sm_tri.index(1).permute((1, 0)).load(A32)
    dL = mma_v2(incl_t, sm_dl.index(0).load(B32), dG_last[None, :] + z_tk, input_precision="tf32")
    dL = mma_v2(incl_t, sm_dl.index(1).load(B32), dL, input_precision="tf32")
    dL = mma_v2(strict_t, sm_dl.index(2).load(B32), dL, input_precision="tf32")
    dL = mma_v2(strict_t, sm_dl.index(3).load(B32), dL, input_precision="tf32")
    dw_c = _dlog_decay(dL, w_c, L, W_FORM)
    return dr_c, dw_c, dk_c, da_c, db_c
