"""The chunk pieces the chunked kernels share: loading a chunk, its decays, its in-chunk matrices
and their inverse, the state update, and the state-gradient recurrence through a chunk.

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

from .common import N_MATS, SAFE_RANGE, _dot, _log_decay


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
