"""Vendor-neutral Triton kernels for WKV7. Launch parameters come from the vendor tables through
`KernelConfig`; nothing in here knows which vendor runs it.

Layout: every [B, T, H, D] input is read as a flat token axis (B*T tokens) so that packed sequences
(cu_seqlens) and batches share one code path: sequence n covers tokens [bos, eos). States are
[N, H, K, V] float32. All arithmetic is float32 (tl.exp only: no libdevice, so the interpreter
runs it); tl.dot takes DOT_PRECISION ("ieee" for float32 inputs: no silent TF32).

Chunk math (C = BT steps, start state S, G inclusive cumulative log-decay, Gm = G - L):
    Â = a ⊙ e^{Gm}, R̂ = r ⊙ e^{G}, B̃ = b ⊙ e^{G_C - G}, K̃ = k ⊙ e^{G_C - G}, γ = e^{G_C}
    A_ab[t,s] = Σ_k a_t b_s e^{Gm_t - G_s} (s < t), A_ak likewise with k; A_rb, A_rk with r, e^{G_t - G_s} (s <= t)
    U = (I - A_ab)^-1 (Â S + A_ak V);  O = scale (R̂ S + A_rb U + A_rk V);  S' = γ ⊙ S + B̃ᵀ U + K̃ᵀ V
The four in-chunk matrices come from two products when the chunk's decay range is at most
SAFE_RANGE (columns carry e^{-G} <= e^{SAFE_RANGE}); otherwise every e^{P_t - Q_s} is formed per
pair. Nothing divides by a cumulative decay.

The state-independent matrices of a chunk ((I - A_ab)^-1, A_ak, A_rb, A_rk: "mats") are built by
the forward and can be stored (4 x BT x BT float32 per chunk and head); the backward and the state
recompute load them instead of rebuilding them, which also keeps the strong-decay path out of both.
"""

from __future__ import annotations

import triton
import triton.language as tl

SAFE_RANGE = tl.constexpr(60.0)
CLAMPW_BOUND = tl.constexpr(0.6065306597126334)   # exp(-0.5); jit globals must be constexpr
# The kernels take L below L_FLOOR as L_FLOOR: decay 0 (L = -inf, or raw w past exp's float32
# range) would make G_t - G_s = -inf - -inf = NaN. A decay of e^-40 = 4e-18 is lost in float32
# next to any term it is added to; dw is rescaled for it in _dlog_decay.
L_FLOOR = tl.constexpr(-40.0)


@triton.jit
def _dot(x, y, DOT_PRECISION: tl.constexpr):
    """x @ y, float32 result. "bf16" rounds both operands to bfloat16 first (16-bit inputs only):
    half the tensor-core k-steps and half the registers for each operand tile, at 2^-9 relative
    rounding of float32 intermediates such as the state."""
    if DOT_PRECISION == "bf16":
        out = tl.dot(x.to(tl.bfloat16), y.to(tl.bfloat16))
    else:
        out = tl.dot(x, y, input_precision=DOT_PRECISION)
    return out


@triton.jit
def _pair_dot(x, y, DOT_PRECISION: tl.constexpr):
    """The gradient kernel's in-chunk pair products (dA_* against the decayed rows): tf32 where the
    rest of the kernel takes bf16. dw sums their terms, which cancel pairwise (e^{G_t} against
    e^{-G_s}); bf16 operands here tripled dw's error on the H100 (2.0e-3 -> 6.1e-3, bf16 inputs),
    tf32 here kept it at 2.2e-3, for 0.24 ms more at B8 T4096 H32 (NOTES change 43)."""
    if DOT_PRECISION == "bf16":
        out = tl.dot(x, y, input_precision="tf32")
    else:
        out = tl.dot(x, y, input_precision=DOT_PRECISION)
    return out


@triton.jit
def _log_decay(w, W_FORM: tl.constexpr):
    """L from w: 0 = log (L = w), 1 = raw (L = -exp(w)), 2 = clampw (L = -e^-0.5 sigmoid(w)); no
    lower than L_FLOOR (clampw's L never is). A NaN stays NaN."""
    if W_FORM == 1:
        L = -tl.exp(w)
        L = tl.where(L < L_FLOOR, L_FLOOR, L)
    elif W_FORM == 2:
        L = -CLAMPW_BOUND / (1.0 + tl.exp(-w))
    else:
        L = tl.where(w < L_FLOOR, L_FLOOR, w)
    return L


@triton.jit
def _dlog_decay(dL, w, L, W_FORM: tl.constexpr):
    """dw from dL, the gradient of the kernels' L (_log_decay's, floored). dL_t = e^{L_t} <h_{t-1},
    dh_t> with neither factor depending on L_t, so below the floor the true gradient is dL times
    e^{L_true - L_FLOOR}: 0 for L_true = -inf."""
    if W_FORM == 1:
        x = tl.exp(w)                                   # -L_true
        dw = dL * tl.where(x > -L_FLOOR, -tl.exp(w - x - L_FLOOR), -x)
    elif W_FORM == 2:
        dw = dL * L * (1.0 - 1.0 / (1.0 + tl.exp(-w)))
    else:
        dw = tl.where(w < L_FLOOR, dL * tl.exp(w - L_FLOOR), dL)
    return dw


@triton.jit
def _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN: tl.constexpr):
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return bos, eos


@triton.jit
def _chunk_base(chunk_offsets, i_n, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Index of sequence i_n's first chunk in the chunk-state and chunk-matrix buffers."""
    if IS_VARLEN:
        c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        c0 = i_n.to(tl.int64) * tl.cdiv(T, BT)
    return c0


@triton.jit
def _segment_base(seg_offsets, i_n, T, seg_chunks, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Index of sequence i_n's first segment in the segment buffers. A segment is `seg_chunks`
    consecutive chunks."""
    if IS_VARLEN:
        s0 = tl.load(seg_offsets + i_n).to(tl.int64)
    else:
        seg_tokens = BT * seg_chunks
        s0 = i_n.to(tl.int64) * ((T + seg_tokens - 1) // seg_tokens)
    return s0


@triton.jit
def _segment_range(seg_offsets, i_n, i_seg, T, n_chunks, seg_chunks, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Segment i_seg of sequence i_n: its index in the segment buffers and its chunks [begin, end)
    (empty past the sequence's end)."""
    s0 = _segment_base(seg_offsets, i_n, T, seg_chunks, BT, IS_VARLEN)
    begin = i_seg * seg_chunks
    return s0 + i_seg, begin, tl.minimum(begin + seg_chunks, n_chunks)


@triton.jit
def _walk_start(start, seg_start, seg_offsets, i_n, i_h, i_nh, T, n_chunks, seg_chunks, m_kv, s_tile,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, HAS_START: tl.constexpr, SEGMENTS: tl.constexpr, IS_VARLEN: tl.constexpr):
    """The chunks [begin, end) a walking program takes and the [BK, BV] tile it starts from. With
    SEG_WALK: segment program_id(2), from the tile stored for that segment in `seg_start`. Otherwise
    the whole sequence, from `start` (one [K, V] per sequence and head) if HAS_START, else zeros."""
    if SEGMENTS == SEG_WALK:
        i_s, c_begin, c_end = _segment_range(seg_offsets, i_n, tl.program_id(2), T, n_chunks, seg_chunks, BT,
                                             IS_VARLEN)
        # An empty segment (past its sequence's end) loads nothing. The scalar test is folded into a
        # tensor comparison: a block mask and'ed with a scalar predicate is rejected by Triton
        # 3.9's interpreter ("mask has unsupported dtype").
        live = tl.where(c_begin < c_end, K * V, 0)
        X = tl.load(seg_start + (i_s * H + i_h) * K * V + s_tile, mask=m_kv & (s_tile < live), other=0.0)
    else:
        c_begin = 0
        c_end = n_chunks
        X = tl.zeros([BK, BV], dtype=tl.float32)
        if HAS_START:
            X += tl.load(start + i_nh.to(tl.int64) * K * V + s_tile, mask=m_kv, other=0.0)
    return c_begin, c_end, X


@triton.jit
def _state_block(i_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Columns o_v of V block i_v, and the offsets and mask of that block of a [K, V] state."""
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    return o_k, o_v, (o_k < K)[:, None] & (o_v < V)[None, :], o_k[:, None] * V + o_v[None, :]


@triton.jit
def _v_rows(tok0, eos, i_h, o_v, H: tl.constexpr, V: tl.constexpr, BT: tl.constexpr):
    """Offsets and mask of rows [tok0, tok0+BT), columns o_v, of a [tokens, H, V] tensor."""
    o_t = tok0 + tl.arange(0, BT)
    return (o_t[:, None] * H + i_h) * V + o_v[None, :], (o_t < eos)[:, None] & (o_v < V)[None, :]


# ---------------------------------------------------------------------------------------------
# Recurrent forward: one step at a time. Decode and short sequences.

@triton.jit
def recurrent_fwd_kernel(
    r, w, k, v, a, b, o, h0, ht, cu_seqlens, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    W_FORM: tl.constexpr, HAS_STATE: tl.constexpr, STORE_FINAL: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    s_off = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_STATE:
        S += tl.load(h0 + s_off, mask=m_kv, other=0.0).to(tl.float32)       # float32, or a 16-bit state
    for t in range(bos, eos):
        p_k = (t * H + i_h) * K + o_k
        p_v = (t * H + i_h) * V + o_v
        r_t = tl.load(r + p_k, mask=m_k, other=0.0).to(tl.float32)
        w_t = tl.load(w + p_k, mask=m_k, other=0.0).to(tl.float32)
        k_t = tl.load(k + p_k, mask=m_k, other=0.0).to(tl.float32)
        a_t = tl.load(a + p_k, mask=m_k, other=0.0).to(tl.float32)
        b_t = tl.load(b + p_k, mask=m_k, other=0.0).to(tl.float32)
        v_t = tl.load(v + p_v, mask=m_v, other=0.0).to(tl.float32)
        d_t = tl.exp(_log_decay(w_t, W_FORM))
        u_t = tl.sum(a_t[:, None] * S, axis=0)                                # a_tᵀ h_{t-1}
        S = S * d_t[:, None] + b_t[:, None] * u_t[None, :] + k_t[:, None] * v_t[None, :]
        o_t = tl.sum(S * r_t[:, None], axis=0) * scale
        tl.store(o + p_v, o_t.to(o.dtype.element_ty), mask=m_v)
    if STORE_FINAL:
        tl.store(ht + s_off, S.to(ht.dtype.element_ty), mask=m_kv)


# ---------------------------------------------------------------------------------------------
# Shared chunk pieces

@triton.jit
def _load_chunk(r, w, k, a, b, tok0, eos, i_h, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                BK: tl.constexpr, W_FORM: tl.constexpr, n_cols):
    """Rows [tok0, tok0+BT) of r, w, k, a, b as float32 [BT, BK]; L = 0 and zeros outside. The
    first `n_cols` columns are read (K, or fewer for a column block)."""
    o_t = tok0 + tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m = (o_t < eos)[:, None] & (o_k < n_cols)[None, :]
    p = (o_t[:, None] * H + i_h) * K + o_k[None, :]
    r_c = tl.load(r + p, mask=m, other=0.0).to(tl.float32)
    w_c = tl.load(w + p, mask=m, other=0.0).to(tl.float32)
    k_c = tl.load(k + p, mask=m, other=0.0).to(tl.float32)
    a_c = tl.load(a + p, mask=m, other=0.0).to(tl.float32)
    b_c = tl.load(b + p, mask=m, other=0.0).to(tl.float32)
    L = tl.where(m, _log_decay(w_c, W_FORM), 0.0)
    return r_c, w_c, k_c, a_c, b_c, L, p, m


@triton.jit
def _row(x, s, BT: tl.constexpr):
    """Row s of a [BT, BK] register tile, as [BK]."""
    return tl.sum(tl.where((tl.arange(0, BT) == s)[:, None], x, 0.0), axis=0)


@triton.jit
def _col(x, s, BT: tl.constexpr):
    """Column s of a [BT, BT] register tile, as [BT]."""
    return tl.sum(tl.where((tl.arange(0, BT) == s)[None, :], x, 0.0), axis=1)


@triton.jit
def _pair_terms(G, Gm, b_c, k_c, s, BT: tl.constexpr, EMPTY_SPANS: tl.constexpr):
    """For column s of the exact (strong-decay) path: b_s, k_s and the per-pair decays
    E[t] = e^{Gm_t - G_s} (t > s) and F[t] = e^{G_t - G_s} (t >= s), zero elsewhere. Without
    EMPTY_SPANS the pairs whose decay spans no L, E[s + 1] and F[s], are 0 as well: the backward
    takes them apart (_empty_span_pairs)."""
    rows = tl.arange(0, BT)[:, None]
    G_s = _row(G, s, BT)
    if EMPTY_SPANS:
        E = tl.exp(tl.where(rows > s, Gm - G_s[None, :], float("-inf")))
        F = tl.exp(tl.where(rows >= s, G - G_s[None, :], float("-inf")))
    else:
        E = tl.exp(tl.where(rows > s + 1, Gm - G_s[None, :], float("-inf")))
        F = tl.exp(tl.where(rows > s, G - G_s[None, :], float("-inf")))
    return _row(b_c, s, BT), _row(k_c, s, BT), E, F


@triton.jit
def _intra(r_c, k_c, a_c, b_c, G, Gm, a_hat, r_hat, safe, BT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """A_ab, A_ak (strictly lower) and A_rb, A_rk (lower), [BT, BT] each."""
    rows = tl.arange(0, BT)[:, None]
    cols = tl.arange(0, BT)[None, :]
    if safe:
        e_neg = tl.exp(-G)
        b_f = b_c * e_neg
        k_f = k_c * e_neg
        A_ab = _dot(a_hat, tl.trans(b_f), DOT_PRECISION)
        A_ak = _dot(a_hat, tl.trans(k_f), DOT_PRECISION)
        A_rb = _dot(r_hat, tl.trans(b_f), DOT_PRECISION)
        A_rk = _dot(r_hat, tl.trans(k_f), DOT_PRECISION)
    else:
        A_ab = tl.zeros([BT, BT], dtype=tl.float32)
        A_ak = tl.zeros([BT, BT], dtype=tl.float32)
        A_rb = tl.zeros([BT, BT], dtype=tl.float32)
        A_rk = tl.zeros([BT, BT], dtype=tl.float32)
        for s in range(BT):                      # a runtime loop: unrolled, it dominates compile time
            b_s, k_s, E, F = _pair_terms(G, Gm, b_c, k_c, s, BT, True)
            aE = a_c * E
            rF = r_c * F
            at_s = cols == s
            A_ab = tl.where(at_s, tl.sum(aE * b_s[None, :], axis=1)[:, None], A_ab)
            A_ak = tl.where(at_s, tl.sum(aE * k_s[None, :], axis=1)[:, None], A_ak)
            A_rb = tl.where(at_s, tl.sum(rF * b_s[None, :], axis=1)[:, None], A_rb)
            A_rk = tl.where(at_s, tl.sum(rF * k_s[None, :], axis=1)[:, None], A_rk)
    A_ab = tl.where(rows > cols, A_ab, 0.0)
    A_ak = tl.where(rows > cols, A_ak, 0.0)
    A_rb = tl.where(rows >= cols, A_rb, 0.0)
    A_rk = tl.where(rows >= cols, A_rk, 0.0)
    return A_ab, A_ak, A_rb, A_rk


@triton.jit
def _unit_lower_inverse(N, BT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(I - N)^-1 for strictly lower N: (I + N)(I + N^2)(I + N^4)... up to N^(BT-1)."""
    eye = (tl.arange(0, BT)[:, None] == tl.arange(0, BT)[None, :]).to(tl.float32)
    Tinv = eye + N
    P = N
    # log2(BT) - 1 squarings: BT = 16 -> N^2, N^4, N^8.
    for _ in tl.static_range(1 if BT <= 4 else (2 if BT <= 8 else (3 if BT <= 16 else (4 if BT <= 32 else 5)))):
        P = _dot(P, P, DOT_PRECISION)
        Tinv = Tinv + _dot(Tinv, P, DOT_PRECISION)
    return Tinv


@triton.jit
def _chunk_decays(r_c, a_c, L):
    """Cumulative decays of a chunk and the decayed rows built from them (elementwise, cheap)."""
    G = tl.cumsum(L, axis=0)
    Gm = G - L
    G_last = tl.sum(L, axis=0)                                       # rows past eos carry L = 0
    a_hat = a_c * tl.exp(Gm)
    r_hat = r_c * tl.exp(G)
    tail = tl.exp(G_last[None, :] - G)
    return G, Gm, G_last, a_hat, r_hat, tail


@triton.jit
def _advance_state(S, G_last, b_c, k_c, tail, U, v_c, DOT_PRECISION: tl.constexpr):
    """The chunk's end state S' = γ ⊙ S + B̃ᵀ U + K̃ᵀ V (γ = e^{G_last}, B̃ = b ⊙ tail, K̃ = k ⊙ tail).
    The forward and the state rebuild from U (chunk_states_kernel) take this one step, so that
    the rebuilt states are the forward's."""
    return S * tl.exp(G_last)[:, None] \
        + _dot(tl.trans(b_c * tail), U, DOT_PRECISION) \
        + _dot(tl.trans(k_c * tail), v_c, DOT_PRECISION)


@triton.jit
def _factorable(G_last):
    """True when the chunk's decay range is at most SAFE_RANGE, so the factored e^{G} / e^{-G}
    form is safe; otherwise the exact pairwise path runs."""
    return tl.min(G_last, axis=0) >= -SAFE_RANGE


@triton.jit
def _chunk_prepare(r_c, k_c, a_c, b_c, L, BT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Everything in a chunk that does not depend on its start state."""
    G, Gm, G_last, a_hat, r_hat, tail = _chunk_decays(r_c, a_c, L)
    safe = _factorable(G_last)
    A_ab, A_ak, A_rb, A_rk = _intra(r_c, k_c, a_c, b_c, G, Gm, a_hat, r_hat, safe, BT, DOT_PRECISION)
    Tinv = _unit_lower_inverse(A_ab, BT, DOT_PRECISION)
    return G, Gm, G_last, safe, a_hat, r_hat, tail, A_ab, A_ak, A_rb, A_rk, Tinv


# Stored chunk matrices, in this order per (chunk, head).
MAT_TINV = tl.constexpr(0)     # (I - A_ab)^-1
MAT_AK = tl.constexpr(1)
MAT_RB = tl.constexpr(2)
MAT_RK = tl.constexpr(3)
N_MATS = tl.constexpr(4)
# What the forward does with them (its MATS argument).
MATS_BUILD = tl.constexpr(0)   # build in the loop, keep nothing (inference)
MATS_STORE = tl.constexpr(1)   # build in the loop and store them (training: the backward loads them)
MATS_LOAD = tl.constexpr(2)    # load stored ones (the backward's state recompute)
# Segments: runs of `seg_chunks` chunks of a sequence. The training forward stores each segment's
# start state (SEG_STORE); the backward's recompute then walks every segment at once (SEG_WALK),
# and the gradient kernel walks every segment at once from the state gradient at its end, which
# a light sweep (chunk_dstate_kernel) stored. For few (sequence, head) pairs: parallel over time.
SEG_NONE = tl.constexpr(0)
SEG_STORE = tl.constexpr(1)
SEG_WALK = tl.constexpr(2)


@triton.jit
def _mat_ptrs(mats, c, i_h, j, H: tl.constexpr, BT: tl.constexpr, TRANSPOSE: tl.constexpr):
    """Pointers to matrix j of global chunk c, head i_h, as [BT, BT]; transposed on request (a
    transposed load costs nothing, a transposed register tile is a layout conversion)."""
    rows = tl.arange(0, BT)[:, None]
    cols = tl.arange(0, BT)[None, :]
    base = mats + ((c * H + i_h) * N_MATS + j) * BT * BT
    if TRANSPOSE:
        return base + cols * BT + rows
    return base + rows * BT + cols


# ---------------------------------------------------------------------------------------------
# Chunk matrices for every chunk at once (prefill): nothing here depends on the state, so the
# chunks of a sequence need not wait for each other. Program (i_p, i_nh) takes chunks i_p,
# i_p + P, i_p + 2P, ... of sequence i_nh // H (P = the grid's first size).

@triton.jit
def _intra_by_column_blocks(r, w, k, a, b, tok0, eos, i_h, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                            BKK: tl.constexpr, W_FORM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """A_ab, A_ak, A_rb, A_rk of the chunk at tok0, BKK columns of K at a time. The in-chunk products
    are sums over K and every decay is per K column, so small column blocks give small live tiles;
    the factored or the exact path is chosen per column block."""
    A_ab = tl.zeros([BT, BT], dtype=tl.float32)
    A_ak = tl.zeros([BT, BT], dtype=tl.float32)
    A_rb = tl.zeros([BT, BT], dtype=tl.float32)
    A_rk = tl.zeros([BT, BT], dtype=tl.float32)
    for k0 in range(0, K, BKK):
        r_c, w_c, k_c, a_c, b_c, L, p_k, m_k = _load_chunk(r + k0, w + k0, k + k0, a + k0, b + k0, tok0, eos, i_h,
                                                          H, K, BT, BKK, W_FORM, K - k0)
        G, Gm, G_last, a_hat, r_hat, tail = _chunk_decays(r_c, a_c, L)
        d_ab, d_ak, d_rb, d_rk = _intra(r_c, k_c, a_c, b_c, G, Gm, a_hat, r_hat, _factorable(G_last), BT,
                                        DOT_PRECISION)
        A_ab += d_ab
        A_ak += d_ak
        A_rb += d_rb
        A_rk += d_rk
    return A_ab, A_ak, A_rb, A_rk


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


# ---------------------------------------------------------------------------------------------
# Chunked forward: one program walks the chunks of one (sequence, head, V block), state on chip.

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


# ---------------------------------------------------------------------------------------------
# The state-gradient recurrence through one chunk, shared by the backward and the sweep. Through
# O = R̂ S + A_rb U + A_rk V, S' = γ S + B̃ᵀ U + K̃ᵀ V and U = (I - A_ab)^-1 Z, with dS the gradient
# of the chunk's end state:  dU = A_rbᵀ dO + B̃ dS,  dZ = Tinvᵀ dU,  dS_prev = R̂ᵀ dO + γ ⊙ dS + Âᵀ dZ.

@triton.jit
def _grad_u_z(A_rb_t, Tinv_t, dO, b_c, tail, dS, DOT_PRECISION: tl.constexpr):
    """dU and dZ of a chunk (B̃ = b ⊙ tail)."""
    dU = _dot(A_rb_t, dO, DOT_PRECISION) + _dot(b_c * tail, dS, DOT_PRECISION)
    return dU, _dot(Tinv_t, dU, DOT_PRECISION)


@triton.jit
def _grad_start_state(r_hat, a_hat, G_last, dO, dS, dZ, DOT_PRECISION: tl.constexpr):
    """The gradient of the chunk's start state (γ = e^{G_last})."""
    return _dot(tl.trans(r_hat), dO, DOT_PRECISION) + tl.exp(G_last)[:, None] * dS \
        + _dot(tl.trans(a_hat), dZ, DOT_PRECISION)


@triton.jit
def _empty_span_pairs(dA, LAG: tl.constexpr, BT: tl.constexpr):
    """The pairs (s + LAG, s) of an in-chunk matrix's gradient dA, whose decay is e^0 ((t, t) of
    A_rb, A_rk: e^{G_t - G_t}; (t, t - 1) of A_ab, A_ak: e^{Gm_t - G_{t-1}}), at row s as [BT, 1].
    Such a pair moves no L, but in dL it would enter once at each end and cancel only to the
    float32 rounding of its O(1) size, far above dL itself when every decay in the chunk is small
    (dL_t carries e^{L_t}): the backward takes these pairs to a, r, b, k alone."""
    rows = tl.arange(0, BT)[:, None]
    cols = tl.arange(0, BT)[None, :]
    on = tl.where(rows == cols + LAG, dA, 0.0)
    if LAG == 0:
        at_s = tl.sum(on, axis=1)[:, None]
    else:                                   # column sums, moved onto the rows by the diagonal
        at_s = tl.sum(tl.where(rows == cols, tl.sum(on, axis=0)[None, :], 0.0), axis=1)[:, None]
    return at_s


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


# ---------------------------------------------------------------------------------------------
# State-gradient sweep for the segmented backward: one program per (V block, sequence, head) walks
# the chunks last to first carrying only dS (no S, no U, no input gradients: _grad_u_z and
# _grad_start_state alone), and stores dS at the end of every segment; the gradient kernel then
# runs all segments at once.
#
# With STORE_DZ_DV it also stores every chunk's dZ (in dz's dtype) and the whole of dv: neither
# needs S or U, and both are sums over K. That is what lets the head-128 Gluon gradient kernel
# split K over two programs (kernels/gluon_nvidia.py chunk_bwd_ksplit_gluon_kernel): with dZ
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
