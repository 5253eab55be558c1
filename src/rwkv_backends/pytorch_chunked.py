"""WKV7 in plain PyTorch, chunked: matrix products inside a chunk, one small scan across chunks.

Serves CPU tensors and any device without Triton. Float32 throughout, whatever the input dtype.

Within a chunk of C steps with start state S (K x V), G = inclusive cumulative log-decay,
G⁻ = exclusive (G⁻_t = G_{t-1}). With all exponents <= 0 on the lower triangle:

    A_ab[t,s] = Σ_k a_t b_s exp(G⁻_t - G_s)   (s < t)      A_ak: the same with k_s
    A_rb[t,s] = Σ_k r_t b_s exp(G_t  - G_s)   (s <= t)     A_rk: the same with k_s
    U  = (I - A_ab)^-1 (Â S + A_ak V)          Â_t = a_t exp(G⁻_t)   (U_t = a_tᵀ h_{t-1})
    O  = scale (R̂ S + A_rb U + A_rk V)         R̂_t = r_t exp(G_t)
    S' = exp(G_C) S + B̃ᵀ U + K̃ᵀ V              B̃_s = b_s exp(G_C - G_s), K̃ likewise

Folding the S-independent parts (W = (I - A_ab)^-1 Â, U0, P, Q, ...) leaves two C x K by K x V
products per chunk as the only sequential work; everything else is batched over all chunks.
The forward runs in segments at its own chunk size (pytorch_segments.segmented_forward: one
stacked in-chunk product, exp2 decays, a kept workspace); the maps here serve the backward, the
forward's segments whose decay needs the exact form, and the tests' reference (_chunked_forward_maps).
The step-by-step path for short sequences is pytorch_steps.

The products exp(P_t - Q_s) are never formed by dividing by a cumulative decay that can underflow:
rows carry exp(G_t) <= 1 and columns exp(-G_s), which is bounded because a chunk takes this form
only while its decay range is at most SAFE_RANGE; a chunk with stronger decay makes the call use
the exact pairwise form, where each pair's exponent is the sum of L over the pair's own span (never
a difference of cumulative sums, which loses |G| * eps and is NaN once L = -inf).

Backward (`ChunkedWKV7.backward`) runs the adjoint scan across chunks (dS_c = γ dS_{c+1} +
Wᵀ B̃ dS_{c+1} + Pᵀ dO_c), then `chunk_local_grads` computes every chunk's input gradients at once
from its start state and end-state gradient, by hand-derived formulas (no autograd inside).

Packed sequences (cu_seqlens) run as a few padded batches, one per length class (`_Packing`), so
padding stays below the tokens' own count whatever the mix of lengths.

Autocast is off inside: the products run in float32 (float64 for gradcheck) in any autocast region.
"""

from __future__ import annotations

import torch

from .pytorch_segments import SAFE_RANGE, forward_chunk, segmented_forward  # noqa: F401
from .pytorch_steps import (StepWKV7, _batch_major, _compute_dtype, _float32_math, _time_major,  # noqa: F401
                            step_backward, step_decode, step_forward)

# Largest in-chunk decay range (in log units) that the factorised form takes: column factors
# are at most exp(SAFE_RANGE) ~ 1e26, far from float32 overflow (3e38).
DEFAULT_CHUNK = 32
# Sequences of at most this many tokens run step by step (step_forward), longer ones by chunks.
SHORT_MAX = 16


def chunk_for(T):
    """The chunk size for T tokens: 16 below 64 tokens (less padding, the C x C work still small),
    DEFAULT_CHUNK above (measured on one CPU thread; benchmarks/NOTES.md)."""
    return 16 if T < 64 else DEFAULT_CHUNK


def _unit_lower_inverse(N):
    """(I - N)^-1 for strictly lower-triangular N [Z, C, C]. Above 16 rows, by 2 x 2 blocks:
    [[T11, 0], [T22 N21 T11, T22]] with both diagonal blocks inverted in one batch (a third of the
    doubling's work at C = 32); at 16 rows and below, by nilpotent doubling:
    (I + N)(I + N^2)(I + N^4)... stops once the power passes C (N^C = 0)."""
    C = N.shape[-1]
    if C > 16:
        h, Z = C // 2, N.shape[0]
        diag = _unit_lower_inverse(torch.cat((N[:, :h, :h], N[:, h:, h:])))
        T11, T22 = diag[:Z], diag[Z:]
        T = N.new_zeros(Z, C, C)
        T[:, :h, :h] = T11
        T[:, h:, h:] = T22
        torch.bmm(T22, N[:, h:, :h] @ T11, out=T[:, h:, :h])
        return T
    T = N + torch.eye(C, dtype=N.dtype, device=N.device)
    power, span = N, 1
    while 2 * span < C:
        power = power @ power
        span *= 2
        T = T + T @ power
    return T


def _factorable(Glast) -> bool:
    """True when every chunk's decay range is at most SAFE_RANGE, so the factored form is safe."""
    return bool(((-Glast).amax(dim=(-1, -2)) <= SAFE_RANGE).all())


def _intra_factored(a_hat, r_hat, b_f, k_f):
    """A_ab, A_ak (strictly lower) and A_rb, A_rk (lower) from rows carrying e^{G} and columns
    e^{-G}: each row x column product is a true in-chunk decay <= 1."""
    return ((a_hat @ b_f.transpose(1, 2)).tril_(-1), (a_hat @ k_f.transpose(1, 2)).tril_(-1),
            (r_hat @ b_f.transpose(1, 2)).tril_(), (r_hat @ k_f.transpose(1, 2)).tril_())


def _log_decay_sums(L, after=True):
    """G (inclusive cumulative log-decay), Gm (exclusive: Gm_t = G_{t-1}, Gm_0 = 0) and R (the decay
    still to come in the chunk: the sum of L_u over u > t; None without `after`), along dim 1. Each
    is summed from its own terms: a difference such as G - L or G_C - G loses |G| * eps (|G| reaches
    hundreds under strong decay) and is NaN where L = -inf."""
    G = L.cumsum(dim=1)
    Gm = torch.zeros_like(G)
    Gm[:, 1:] = G[:, :-1]
    return G, Gm, (_after_sum(L) if after else None)


def _pair_decays(L):
    """F[z,t,s,k] = exp(sum of L_j over s < j <= t) for s <= t (1 at s = t) and E[z,t,s,k] = F[z,t-1,s,k]
    for s < t (1 at s = t-1), zero elsewhere: the exact path's [Z, C, C, K] per-pair decays. Each
    exponent is summed over the pair's own span, so it is exact for neighbours, holds no rounding
    of far-away steps, and is -inf (decay 0) rather than NaN across a step with L = -inf."""
    C = L.shape[1]
    later = torch.ones(C, C, dtype=torch.bool, device=L.device).tril(-1)[..., None]     # t > s
    F = torch.where(later, L[:, :, None, :], 0.0).cumsum_(1)
    F = F.masked_fill_(later.transpose(0, 1), float("-inf")).exp_()                     # zero where t < s
    E = torch.zeros_like(F)
    E[:, 1:] = F[:, :-1]
    return E, F


def _intra_exact(r, L, k, a, b):
    """The same four matrices with every decay formed pairwise: [Z, C, C, K] work."""
    return _intra_from_pairs(*_pair_decays(L), r, k, a, b)


def _intra_from_pairs(E, F, r, k, a, b):
    """A_ab, A_ak, A_rb, A_rk from the per-pair decays, one [Z, C, C, K] product alive at a time."""
    aE = a[:, :, None, :] * E
    A_ab, A_ak = torch.einsum("ztsk,zsk->zts", aE, b), torch.einsum("ztsk,zsk->zts", aE, k)
    del aE
    rF = r[:, :, None, :] * F
    return A_ab, A_ak, torch.einsum("ztsk,zsk->zts", rF, b), torch.einsum("ztsk,zsk->zts", rF, k)


def _spanned_sum(X):
    """y_j = sum of X[z,t,s,k] over s < j <= t, for X [Z, C, C, K] zero where s >= t: what the pairs
    whose span (s, t] holds step j contribute to dL_j. Only those pairs enter (overwrites X)."""
    C = X.shape[1]
    later = torch.ones(C, C, dtype=torch.bool, device=X.device).tril(-1)[..., None]     # t > s
    inner = X.cumsum_(2).masked_fill_(~later, 0.0).sum(1)        # [Z, C, K]: j - 1 in place of s
    y = torch.zeros_like(inner)
    y[:, 1:] = inner[:, :-1]
    return y


def chunk_maps(r, L, k, v, a, b, scale, owned=False):
    """Everything about a chunk that does not depend on its start state S, for chunks [Z, C, *]:
    U = W S + U0,  S' = gamma * S + Btᵀ U + Nt,  O = P S + Q. `owned`: r, k, a, b are the
    caller's scratch copies and may be overwritten (fewer 8 MB allocations, which on a CPU cost
    page faults as much as arithmetic)."""
    G, Gm, _ = _log_decay_sums(L, after=False)
    Glast = G[:, -1:, :]
    gamma = torch.exp(Glast)                                                          # [Z, 1, K]
    factored = _factorable(Glast)
    inplace = owned and factored                     # the exact path needs the raw vectors
    e_Gm = Gm.exp_()
    e_G = torch.exp(G)
    a_hat = a.mul_(e_Gm) if inplace else a * e_Gm    # a_t exp(G⁻_t) <= |a_t|
    r_hat = r.mul_(e_G) if inplace else r * e_G      # r_t exp(G_t)  <= |r_t|
    if factored:
        # Columns carry exp(-G_s) <= exp(SAFE_RANGE): nothing overflows and nothing is divided.
        e_negG = e_G.reciprocal_()
        b_f = b.mul_(e_negG) if inplace else b * e_negG
        k_f = k.mul_(e_negG) if inplace else k * e_negG
        A_ab, A_ak, A_rb, A_rk = _intra_factored(a_hat, r_hat, b_f, k_f)
        Nt = (k_f.transpose(1, 2) @ v).mul_(gamma.transpose(1, 2))
        Bt = b_f.mul_(gamma)                         # b_f is not needed past the products above
    else:
        # Strong decay: form every exp(P_t - Q_s) pairwise. Rare (real RWKV-7 layers keep
        # L > -0.61, a range under 40 for 64 steps), so it is done for all chunks alike.
        A_ab, A_ak, A_rb, A_rk = _intra_exact(r, L, k, a, b)
        tail = _after_sum(L).exp_()
        Bt = b * tail
        Nt = (k * tail).transpose(1, 2) @ v
    T = _unit_lower_inverse(A_ab)
    W = T @ a_hat
    U0 = T @ (A_ak @ v)
    P = torch.baddbmm(r_hat, A_rb, W)
    Q = torch.baddbmm(A_rk @ v, A_rb, U0)
    if scale != 1.0:
        P, Q = P * scale, Q * scale
    return W, U0, Bt, Nt, gamma.transpose(1, 2), P, Q


def _to_chunks(x, C, fresh=False):
    """[B, T, H, D] -> [n*B*H, C, D] float32, chunk-major (chunk c of every head is contiguous,
    which the scan walks), T zero-padded to a multiple of C. `fresh`: never a view of x (the
    caller overwrites it; with one head or one chunk the reshape alone can be a view)."""
    B, T, H, D = x.shape
    n = max(1, -(-T // C))
    src = x
    if n * C != T:
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, n * C - T))
    x = x.view(B, n, C, H, D).permute(1, 0, 3, 2, 4)
    y = x.to(_compute_dtype(x)).reshape(n * B * H, C, D)
    if fresh and y.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
        y = y.clone()
    return y


def _from_chunks(y, B, H, T):
    """[n*B*H, C, V] -> [B, T, H, V], contiguous like every other backend's output."""
    Z, C, V = y.shape
    return y.view(-1, B, H, C, V).permute(1, 0, 3, 2, 4).reshape(B, -1, H, V)[:, :T].contiguous()


def _reverse_cumsum(x):
    """y_t = sum of x_u for u >= t, along dim 1."""
    return x.flip(1).cumsum(1).flip(1)


def _after_sum(x):
    """y_t = sum of x_u for u > t, along dim 1: summed as such, not as a difference of two sums."""
    y = torch.zeros_like(x)
    y[:, :-1] = _reverse_cumsum(x[:, 1:])
    return y


def _before_sum(x):
    """y_t = sum of x_u for u < t, along dim 1."""
    y = torch.zeros_like(x)
    y[:, 1:] = x[:, :-1].cumsum(1)
    return y


def chunk_local_grads(r, L, k, v, a, b, S, dS, dO, scale):
    """Input gradients of chunks [Z, C, *] given each chunk's start state S and the gradient dS of
    its end state (both [Z, K, V]) and dO [Z, C, V]: the same formulas as the Triton backward,
    written out by hand (no autograd), batched over every chunk at once.
    Returns dr, dL, dk, dv, da, db."""
    G, Gm, R = _log_decay_sums(L)
    Glast = G[:, -1:, :]
    gamma = torch.exp(Glast)
    e_G, e_Gm = torch.exp(G), torch.exp(Gm)
    a_hat, r_hat = a * e_Gm, r * e_G
    tail = torch.exp(R)                                          # e^{G_C - G_t}
    b_t, k_t = b * tail, k * tail
    safe = _factorable(Glast)
    if safe:
        e_neg = torch.reciprocal(e_G)
        b_f, k_f = b * e_neg, k * e_neg
        A_ab, A_ak, A_rb, A_rk = _intra_factored(a_hat, r_hat, b_f, k_f)
    else:
        E, F = _pair_decays(L)
        A_ab, A_ak, A_rb, A_rk = _intra_from_pairs(E, F, r, k, a, b)
    T = _unit_lower_inverse(A_ab)
    U = T @ torch.baddbmm(A_ak @ v, a_hat, S)
    dOs = dO * scale
    # Through O = R̂ S + A_rb U + A_rk V and S' = γ S + B̃ᵀ U + K̃ᵀ V, then U = (I - A_ab)^-1 Z.
    dZ = T.transpose(1, 2) @ torch.baddbmm(b_t @ dS, A_rb.transpose(1, 2), dOs)
    dA_ab = (dZ @ U.transpose(1, 2)).tril_(-1)
    dA_ak = (dZ @ v.transpose(1, 2)).tril_(-1)
    dA_rb = (dOs @ U.transpose(1, 2)).tril_()
    dA_rk = (dOs @ v.transpose(1, 2)).tril_()
    dv = A_ak.transpose(1, 2) @ dZ + A_rk.transpose(1, 2) @ dOs + k_t @ dS
    d_ahat = dZ @ S.transpose(1, 2)
    d_rhat = dOs @ S.transpose(1, 2)
    d_bt = U @ dS.transpose(1, 2)
    d_kt = v @ dS.transpose(1, 2)
    d_gamma = (dS * S).sum(-1)                                                     # [Z, K]
    # Unit pairs: the a-read at t sees b_{t-1} and k_{t-1}, and o_t sees b_t and k_t, with decay
    # e^0 whatever L is. Their gradients go to a, r, b, k alone. Kept in the decayed products they
    # reach dL as a term and its opposite, which cancel only to rounding noise of size |a b|: all
    # of dL once every channel decays strongly (there the true dL carries a factor e^{L} << 1).
    u_ab = dA_ab.diagonal(-1, 1, 2).clone()[..., None]                               # [Z, C-1, 1]
    u_ak = dA_ak.diagonal(-1, 1, 2).clone()[..., None]
    u_rb = dA_rb.diagonal(0, 1, 2).clone()[..., None]                                # [Z, C, 1]
    u_rk = dA_rk.diagonal(0, 1, 2).clone()[..., None]
    dA_ab, dA_ak = dA_ab.tril_(-2), dA_ak.tril_(-2)
    dA_rb, dA_rk = dA_rb.tril_(-1), dA_rk.tril_(-1)
    # The decayed pairs back to a, r, b, k and the cumulative decays.
    if safe:
        d_ahat = d_ahat + dA_ab @ b_f + dA_ak @ k_f
        d_rhat = d_rhat + dA_rb @ b_f + dA_rk @ k_f
        d_bf = dA_ab.transpose(1, 2) @ a_hat + dA_rb.transpose(1, 2) @ r_hat
        d_kf = dA_ak.transpose(1, 2) @ a_hat + dA_rk.transpose(1, 2) @ r_hat
        db, dk = d_bf * e_neg, d_kf * e_neg
        dG = -(d_bf * b_f + d_kf * k_f)
        da_pair = dr_pair = 0.0
        dL_pairs = 0.0
    else:
        # Y[t, s] is the pair's gradient with respect to a_t (E) or r_t (F), per channel. A pair's
        # decay spans (s, t] for F and (s, t-1] for E; its term a_t Y or r_t Y belongs to dL_j for
        # exactly the j in that span, and is added there alone (no term and its opposite).
        # The order keeps at most three [Z, C, C, K] tensors alive.
        db = torch.einsum("zts,ztk,ztsk->zsk", dA_ab, a, E)
        dk = torch.einsum("zts,ztk,ztsk->zsk", dA_ak, a, E)
        Y_E = (dA_ab[..., None] * b[:, None]).addcmul_(dA_ak[..., None], k[:, None]).mul_(E)
        del E
        da_pair = Y_E.sum(2)
        db = db + torch.einsum("zts,ztk,ztsk->zsk", dA_rb, r, F)
        dk = dk + torch.einsum("zts,ztk,ztsk->zsk", dA_rk, r, F)
        X = (dA_rb[..., None] * b[:, None]).addcmul_(dA_rk[..., None], k[:, None]).mul_(F)
        del F
        dr_pair = X.sum(2)
        X.mul_(r[:, :, None, :])
        X[:, :-1].addcmul_(Y_E[:, 1:], a[:, 1:, None, :])        # E's span ends one step earlier
        del Y_E
        dL_pairs = _spanned_sum(X)
        dG = torch.zeros_like(G)
    # Direct terms: Â = a e^{Gm}, R̂ = r e^{G}, B̃ = b e^{G_C - G}, K̃ = k e^{G_C - G}, γ = e^{G_C}.
    da = d_ahat * e_Gm + da_pair
    dr = d_rhat * e_G + dr_pair
    dGm = d_ahat * a_hat
    dG = dG + d_rhat * r_hat
    db = db + d_bt * tail
    dk = dk + d_kt * tail
    # The unit pairs, undecayed.
    da[:, 1:] += u_ab * b[:, :-1] + u_ak * k[:, :-1]
    dr += u_rb * b + u_rk * k
    db += u_rb * r
    dk += u_rk * r
    db[:, :-1] += u_ab * a[:, 1:]
    dk[:, :-1] += u_ak * a[:, 1:]
    # L_t enters G_u for u >= t, Gm_u for u > t, and γ = e^{G_C} for every t. The tail decay
    # e^{G_C - G_u} depends on L_t for t > u only, so its terms reach dL_t as a sum over u < t. Each
    # sum is formed as such: written as a total minus a partial sum, the two cancel to rounding
    # noise where decay is strong, and raw w (dw = dL * L, |L| up to 30) magnifies that noise.
    tail_terms = d_bt * b_t + d_kt * k_t
    dL = (_reverse_cumsum(dG) + _after_sum(dGm) + _before_sum(tail_terms)
          + (d_gamma * gamma[:, 0, :])[:, None, :] + dL_pairs)
    return dr, dL, dk, dv, da, db


def chunk_transitions(W, U0, Bt, Nt, gamma):
    """Each chunk as one affine map of its start state: S' = M S + N with M = diag(gamma) + Btᵀ W
    [Z, K, K] and N = Btᵀ U0 + Nt [Z, K, V], formed for all chunks at once, so that the sequential
    scan is one product per chunk (forward M S, backward Mᵀ dS)."""
    Btt = Bt.transpose(1, 2)
    M = torch.bmm(Btt, W)
    M.diagonal(dim1=1, dim2=2).add_(gamma[..., 0])
    return M, torch.baddbmm(Nt, Btt, U0)


def chunked_forward(r, L, k, v, a, b, state, scale, chunk, keep=True):
    """Equal-length sequences [B, T, H, *], state [B, H, K, V]. Returns o, the final state and, with
    `keep`, every chunk's start state ([n, B*H, K, V], what the backward at this chunk size needs;
    None without). The forward itself runs at the chunk size forward_chunk picks, which divides
    chunk (the start states are every (chunk / size)-th of its own), in segments
    (pytorch_segments.segmented_forward)."""
    fc = forward_chunk(k.shape[1], chunk)
    return segmented_forward(r, L, k, v, a, b, state, scale, fc, keep_every=chunk // fc if keep else 0)


def _chunked_forward_maps(r, L, k, v, a, b, state, scale, chunk):
    """The forward as one batch of chunk maps and a K x K scan (no segments): the form the
    backward's formulas follow, kept as the reference for segmented_forward in the tests."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    n = max(1, -(-T // chunk))
    states = torch.empty(n + 1, B * H, K, V, dtype=_compute_dtype(k), device=k.device)
    states[0] = state.reshape(B * H, K, V)
    W, U0, Bt, Nt, gamma, P, Q = chunk_maps(*(_to_chunks(x, chunk) for x in (r, L, k, v, a, b)), scale)
    M, N = (x.view(n, B * H, *x.shape[1:]) for x in chunk_transitions(W, U0, Bt, Nt, gamma))
    for c in range(n):
        torch.baddbmm(N[c], M[c], states[c], out=states[c + 1])
    O = torch.baddbmm(Q, P, states[:n].reshape(-1, K, V))
    return _from_chunks(O, B, H, T), states[n].clone().view(B, H, K, V), states[:n]


def chunked_backward(r, L, k, v, a, b, starts, dO, dS_final, scale, chunk):
    """Gradients (dr, dL, dk, dv, da, db, dstate) from the chunk start states of chunked_forward;
    dO or dS_final may be None (zero)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    n = starts.shape[0]
    chunks = [_to_chunks(x, chunk) for x in (r, L, k, v, a, b)]
    W, U0, Bt, Nt, gamma, P, Q = chunk_maps(*chunks, scale)
    M, _ = chunk_transitions(W, U0, Bt, Nt, gamma)
    M = M.view(n, B * H, K, K)
    if dO is None:
        dO = torch.zeros(B, T, H, V, dtype=W.dtype, device=k.device)
    dQ = _to_chunks(dO, chunk)                                           # [Z, C, V]
    PdO = torch.bmm(P.transpose(1, 2), dQ).view(n, B * H, K, V)
    # Adjoint scan: dS_c = Mᵀ dS_{c+1} + Pᵀ dO_c, each written into its slot of d_next.
    d_next = torch.empty_like(starts)                                    # dS_{c+1} for every chunk
    if dS_final is None:
        d_next[n - 1].zero_()
    else:
        d_next[n - 1] = dS_final.reshape(B * H, K, V)
    slots = d_next.unbind(0)
    for c in range(n - 1, 0, -1):
        torch.baddbmm(PdO[c], M[c].transpose(1, 2), slots[c], out=slots[c - 1])
    g = torch.baddbmm(PdO[0], M[0].transpose(1, 2), slots[0])
    grads = chunk_local_grads(*chunks, starts.view(-1, K, V), d_next.view(-1, K, V), dQ, scale)
    grads = [_from_chunks(gr, B, H, T).to(x.dtype) for gr, x in zip(grads, (r, L, k, v, a, b))]
    return (*grads, g.view(B, H, K, V))


class ChunkedWKV7(torch.autograd.Function):
    """chunked_forward / chunked_backward as an autograd Function. L is the log-decay (padding
    steps carry L = 0 and zero vectors, which leave the state unchanged)."""

    @staticmethod
    def forward(ctx, r, L, k, v, a, b, state, scale, chunk):
        with _float32_math(k.device):
            o, final, starts = chunked_forward(r, L, k, v, a, b, state, scale, chunk,
                                               keep=any(ctx.needs_input_grad))
        ctx.save_for_backward(r, L, k, v, a, b, starts)
        ctx.meta = (scale, chunk)
        return o, final

    @staticmethod
    def backward(ctx, dO, dS_final):
        r, L, k, v, a, b, starts = ctx.saved_tensors
        scale, chunk = ctx.meta
        with _float32_math(k.device):
            grads = chunked_backward(r, L, k, v, a, b, starts, dO, dS_final, scale, chunk)
        return (*grads, None, None)


class _LengthClass:
    """The sequences of one length class: their ids [n], their tokens' positions in the packed
    stream and the same tokens' slots in the padded [n * Tp] layout, and the chunk size."""

    def __init__(self, ids, tokens, slots, n, Tp, chunk):
        self.ids, self.tokens, self.slots, self.n, self.Tp, self.chunk = ids, tokens, slots, n, Tp, chunk


class _Packing:
    """Packed sequences (cu_seqlens) as one padded batch per length class: the sequences of length
    in (2^(j-1), 2^j] form class j, padded at their ends to the class's longest (a multiple of its
    chunk, at most min(chunk, 2^j)). Each class pads to under twice its tokens, so one long sequence
    among many short ones costs about what it costs alone, not N x Tmax. Padding is written as zeros
    (L = 0 and zero vectors leave a state unchanged), never computed from another sequence's values:
    an Inf or NaN stays in its own sequence. Empty sequences belong to no class."""

    def __init__(self, cu_seqlens, device, chunk):
        offsets = [int(x) for x in cu_seqlens.tolist()]
        lens = [hi - lo for lo, hi in zip(offsets, offsets[1:])]
        self.N = len(lens)
        by_class = {}
        for n, length in enumerate(lens):
            if length > 0:
                by_class.setdefault((length - 1).bit_length(), []).append(n)
        self.classes = []
        for j in sorted(by_class):
            ids = by_class[j]
            c = min(chunk, 1 << j)
            Tp = -(-max(lens[n] for n in ids) // c) * c
            pos = torch.arange(Tp, device=device)
            valid = pos[None, :] < torch.tensor([lens[n] for n in ids], device=device)[:, None]
            tokens = (torch.tensor([offsets[n] for n in ids], device=device)[:, None] + pos[None, :])[valid]
            slots = (torch.arange(len(ids), device=device)[:, None] * Tp + pos[None, :])[valid]
            self.classes.append(_LengthClass(torch.tensor(ids, device=device), tokens, slots, len(ids), Tp, c))

    @staticmethod
    def gather(g, x):
        """[1, T, H, D] -> [n, Tp, H, D] in the compute dtype: class g's sequences, zeros past each end."""
        H, D = x.shape[2], x.shape[3]
        out = torch.zeros(g.n * g.Tp, H, D, dtype=_compute_dtype(x), device=x.device)
        out.index_copy_(0, g.slots, x[0].index_select(0, g.tokens).to(out.dtype))
        return out.view(g.n, g.Tp, H, D)

    @staticmethod
    def scatter(g, y, out):
        """Class g's [n, Tp, H, D] into its tokens' rows of out [T, H, D] (the padding is dropped)."""
        out.index_copy_(0, g.tokens, y.reshape(g.n * g.Tp, *y.shape[2:]).index_select(0, g.slots))


def packed_forward(pack, r, L, k, v, a, b, state, scale, keep=True):
    """o [1, T, H, V], the final states [N, H, K, V] and, per length class, what its backward needs:
    the chunk start states, or for a class of short sequences (run step by step) every state
    (None without `keep`)."""
    T, H = k.shape[1], k.shape[2]
    dt = _compute_dtype(k)
    o = torch.zeros(T, H, v.shape[-1], dtype=dt, device=k.device)
    final = state.to(dt).clone()                     # an empty sequence keeps its initial state
    starts = []
    for g in pack.classes:
        ins = [pack.gather(g, x) for x in (r, L, k, v, a, b)]
        st = state.index_select(0, g.ids).to(dt)
        if g.Tp <= SHORT_MAX:
            o_g, final_g, starts_g = step_forward(*ins, st, scale, keep=keep)
        else:
            o_g, final_g, starts_g = chunked_forward(*ins, st, scale, g.chunk, keep=keep)
        pack.scatter(g, o_g, o)
        final.index_copy_(0, g.ids, final_g.to(dt))
        starts.append(starts_g)
    return o.unsqueeze(0), final, starts


def packed_backward(pack, r, L, k, v, a, b, starts, dO, dS_final, scale):
    """Gradients (dr, dL, dk, dv, da, db, dstate) from packed_forward's start states; dO or
    dS_final may be None (zero)."""
    T, H, K, V = k.shape[1], k.shape[2], k.shape[3], v.shape[-1]
    dt = _compute_dtype(k)
    ins_all = (r, L, k, v, a, b)
    grads = [torch.zeros(T, H, x.shape[-1], dtype=dt, device=k.device) for x in ins_all]
    dstate = (torch.zeros(pack.N, H, K, V, dtype=dt, device=k.device) if dS_final is None
              else dS_final.to(dt).clone())          # an empty sequence passes its gradient through
    for g, starts_g in zip(pack.classes, starts):
        ins = [pack.gather(g, x) for x in ins_all]
        d_o = None if dO is None else pack.gather(g, dO)
        dS = None if dS_final is None else dS_final.index_select(0, g.ids).to(dt)
        if g.Tp <= SHORT_MAX:
            grads_g = step_backward(*ins, starts_g, d_o, dS, scale)
        else:
            grads_g = chunked_backward(*ins, starts_g, d_o, dS, scale, g.chunk)
        for acc, gr in zip(grads, grads_g[:6]):
            pack.scatter(g, gr, acc)
        dstate.index_copy_(0, g.ids, grads_g[6])
    return (*(gr.unsqueeze(0).to(x.dtype) for gr, x in zip(grads, ins_all)), dstate)


class PackedWKV7(torch.autograd.Function):
    """packed_forward / packed_backward as an autograd Function (B = 1, sequences by cu_seqlens)."""

    @staticmethod
    def forward(ctx, r, L, k, v, a, b, state, scale, pack):
        with _float32_math(k.device):
            o, final, starts = packed_forward(pack, r, L, k, v, a, b, state, scale, keep=any(ctx.needs_input_grad))
        ctx.save_for_backward(r, L, k, v, a, b)
        ctx.starts = starts                          # intermediates, one tensor per length class
        ctx.meta = (scale, pack)
        return o, final

    @staticmethod
    def backward(ctx, dO, dS_final):
        scale, pack = ctx.meta
        k = ctx.saved_tensors[2]
        with _float32_math(k.device):
            grads = packed_backward(pack, *ctx.saved_tensors, ctx.starts, dO, dS_final, scale)
        return (*grads, None, None)


def run_chunked(r, L, k, v, a, b, state, *, scale, cu_seqlens, chunk=None):
    """o [B, T, H, V] float32 and the final state [N, H, K, V] float32. L is the log-decay."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    chunk = chunk or (DEFAULT_CHUNK if cu_seqlens is not None else chunk_for(T))
    pack = _Packing(cu_seqlens, k.device, chunk) if cu_seqlens is not None else None
    N = pack.N if pack else B
    if state is None:
        state = torch.zeros(N, H, K, V, dtype=torch.float32, device=k.device)
    if T == 0 or (pack and not pack.classes):
        return v.new_zeros(B, T, H, V, dtype=torch.float32), state.float().clone()
    if pack is None:
        if T <= SHORT_MAX:
            return StepWKV7.apply(r, L, k, v, a, b, state, scale)
        return ChunkedWKV7.apply(r, L, k, v, a, b, state, scale, chunk)
    return PackedWKV7.apply(r, L, k, v, a, b, state, scale, pack)


def run_chunked_backward(r, L, k, v, a, b, state, do, dstate, *, scale, cu_seqlens, chunk=None):
    """Gradients (dr, dL, dk, dv, da, db, dstate) without autograd: the forward runs again for its
    chunk start states, then the backward. What a custom op's backward calls."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    chunk = chunk or (DEFAULT_CHUNK if cu_seqlens is not None else chunk_for(T))
    pack = _Packing(cu_seqlens, k.device, chunk) if cu_seqlens is not None else None
    N = pack.N if pack else B
    st = state if state is not None else torch.zeros(N, H, K, V, dtype=torch.float32, device=k.device)
    if T == 0 or (pack and not pack.classes):
        zeros = [torch.zeros_like(x) for x in (r, L, k, v, a, b)]
        return (*zeros, dstate.clone() if dstate is not None else torch.zeros_like(st))
    with _float32_math(k.device):
        if pack is None and T <= SHORT_MAX:
            _, _, saved = step_forward(r, L, k, v, a, b, st, scale, keep=True)
            return tuple(step_backward(r, L, k, v, a, b, saved, do, dstate, scale))
        if pack is None:
            _, _, starts = chunked_forward(r, L, k, v, a, b, st, scale, chunk)
            return tuple(chunked_backward(r, L, k, v, a, b, starts, do, dstate, scale, chunk))
        _, _, starts = packed_forward(pack, r, L, k, v, a, b, st, scale)
        return tuple(packed_backward(pack, r, L, k, v, a, b, starts, do, dstate, scale))
