"""The chunked forward in segments, with few and large products and a reused workspace (CPU).

`segmented_forward` computes what `chunked_forward` returns (o, the final state, the chunk start
states) for equal-length sequences [B, T, H, *]. The time axis runs in segments of whole chunks;
within a segment every chunk is formed at once, then one scan walks the chunks. Per chunk of C
steps with start state S (notation of pytorch_chunked's docstring):

    [Â; R̂] [B_f; K_f]ᵀ = [[A_ab, A_ak], [A_rb, A_rk]]   one [2C, K] x [K, 2C] product
    W = T Â, U0 = T (A_ak V), T = (I - A_ab)^-1         (doubling, `_unit_lower_inverse`)
    scan:  U = W S + U0,  S' = γ S + B̃ᵀ U + K̃ᵀ V         (K̃ᵀ V formed for all chunks at once)
    O = scale (R̂ S + A_rb U + A_rk V)                   for all chunks at once, after the scan

about 4KV + 9CK multiply-adds per token and head (26 K at C = 16), against the five KV of a step.
The decays: G = cumulative log-decay in log2 units (a product with a triangle of log2(e), on the
inputs' own layout), e^G = exp2(G) (torch's exp2 runs 3.5x its exp on this CPU), e^-G its
reciprocal. A segment takes this factored form only while every chunk's decay range is at most
SAFE_RANGE (anything else, -inf and NaN included, fails the test); otherwise it runs the exact
pairwise form of `chunk_maps` for that segment alone.

Tokens past the last whole chunk run step by step from the last chunk's end state: no padding.
Scratch buffers come from a per-thread workspace that outlives the call (a few MB; freeing and
re-faulting multi-MB buffers costs this CPU as much as the arithmetic, NOTES "Allocation costs").
"""

from __future__ import annotations

import threading

import torch

LOG2E = 1.4426950408889634
SAFE_RANGE = 60.0
FORWARD_CHUNK = 16
# Rows (chunk tokens x sequences x heads) per segment: a segment's [rows, 64] float32 maps are
# 256 KB each at 1024 rows; 512 and 2048 rows were within the noise or slower (benchmarks/NOTES.md, C1).
FORWARD_SEGMENT_ROWS = 1024
WORKSPACE_MAX_BYTES = 64 << 20      # a larger call allocates its scratch afresh and keeps none

_local = threading.local()
_masks: dict = {}


def forward_chunk(T, chunk):
    """The chunk size the forward runs at, for T tokens whose backward runs at `chunk`: 8 below 64
    tokens, FORWARD_CHUNK (16) from 64, each where it divides `chunk` (the start states the
    backward needs are then every (chunk / size)-th of the forward's), else `chunk` itself.
    Measured at one thread, B1 H16 K64, no gradients (ms; benchmarks/NOTES.md, C1): T24 C8 0.81
    / C16 1.07, T32 0.97 / 1.01, T48 1.40 / 1.47; T512 12.7 / 12.2; T4096 H8 57.3 / 51.2."""
    for size in ((8, FORWARD_CHUNK) if T < 64 else (FORWARD_CHUNK,)):
        if chunk % size == 0:
            return size
    return chunk


def _workspace(numel, dtype, device):
    """A flat scratch tensor of at least numel elements, reused by the next call on this thread.
    Kept for CPU tensors only (elsewhere a kept buffer would hold device memory and could be
    reused across streams), and per inference mode: a buffer made under torch.inference_mode is
    an inference tensor, which the ops' out= may not write outside it."""
    key = (dtype, torch.is_inference_mode_enabled())
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    buf = cache.get(key) if device.type == "cpu" else None
    if buf is not None and buf.numel() >= numel:
        return buf
    buf = torch.empty(numel, dtype=dtype, device=device)
    if device.type == "cpu" and numel * buf.element_size() <= WORKSPACE_MAX_BYTES:
        cache[key] = buf
    return buf


class _Arena:
    """Consecutive views of one flat buffer."""

    def __init__(self, flat):
        self.flat, self.used = flat, 0

    def take(self, *shape):
        n = 1
        for s in shape:
            n *= s
        view = self.flat[self.used:self.used + n].view(*shape)
        self.used += n
        return view


def _arena_size(Zs, C, K, V, ns, Z):
    return (Zs * C * K * 3          # G, E, W
            + Zs * 2 * C * K * 2    # AR, BK
            + Zs * 4 * C * C        # the in-chunk matrices
            + Zs * C * V * 5        # V, A_ak V, U0, U, O
            + Zs * K * V            # K̃ᵀ V
            + (ns + 1) * Z * K * V)  # the segment's chunk states


def _intra_mask(C, dtype, device):
    """1 where [[A_ab, A_ak], [A_rb, A_rk]] keeps its entry (s < t in the top blocks, s <= t below), else 0."""
    key = (C, dtype, str(device), torch.is_inference_mode_enabled())
    m = _masks.get(key)
    if m is None:
        t = torch.arange(2 * C, device=device)
        tt, ss = (t % C)[:, None], (t % C)[None, :]
        top = (t < C)[:, None]
        m = _masks[key] = torch.where(top, ss < tt, ss <= tt).to(dtype)
    return m


def _tri_log2e(C, dtype, device):
    key = ("tri", C, dtype, str(device), torch.is_inference_mode_enabled())
    m = _masks.get(key)
    if m is None:
        m = _masks[key] = torch.ones(C, C, dtype=dtype, device=device).tril_().mul_(LOG2E)
    return m


def _chunk_view(x, B, ns, C, H):
    """[B, ns*C, H, D] -> [ns, B, H, C, D]: the chunk layout as a view (the ops' out= writes it)."""
    try:
        return x.view(B, ns, C, H, x.shape[-1]).permute(1, 0, 3, 2, 4)
    except RuntimeError:                 # a layout that a view cannot split
        return x.reshape(B, ns, C, H, x.shape[-1]).permute(1, 0, 3, 2, 4)


def segmented_forward(r, L, k, v, a, b, state, scale, chunk=FORWARD_CHUNK, keep_every=0,
                      segment_rows=FORWARD_SEGMENT_ROWS):
    """o [B, T, H, V], the final state [B, H, K, V] and, with keep_every = m > 0, the start state
    of every m-th chunk ([ceil(T / (m C)), B*H, K, V]; None otherwise). L is the log-decay; any
    float dtypes, computed in float32 (float64 stays float64)."""
    from .pytorch_chunked import _compute_dtype, _unit_lower_inverse
    from .pytorch_steps import step_forward
    B, T, H, K = k.shape
    V = v.shape[-1]
    Z, C = B * H, chunk
    dt = _compute_dtype(k)
    dev = k.device
    n_full = T // C
    o = torch.empty(B, T, H, V, dtype=dt, device=dev)
    starts = None
    if keep_every:
        starts = torch.empty(max(1, -(-T // (keep_every * C))), Z, K, V, dtype=dt, device=dev)
        starts[0] = state.reshape(Z, K, V)
    h, h_in_ws = state.reshape(Z, K, V), False
    ns_max = max(1, min(n_full, segment_rows // (Z * C)))
    flat = _workspace(_arena_size(ns_max * Z, C, K, V, ns_max, Z), dt, dev) if n_full else None
    mask, tri = _intra_mask(C, dt, dev), _tri_log2e(C, dt, dev)
    safe2 = SAFE_RANGE * LOG2E
    for c0 in range(0, n_full, ns_max):
        ns = min(ns_max, n_full - c0)
        Zs, t0, t1 = ns * Z, c0 * C, (c0 + ns) * C
        ws = _Arena(flat)
        S = ws.take(ns + 1, Z, K, V)
        S[0] = h
        part = [x[:, t0:t1] for x in (r, L, k, v, a, b)]
        rs, Ls, ks, vs, as_, bs = part
        # G in log2 units on the inputs' layout [B, ns, C, H*K]: a chunk's last row is its range.
        Lv = Ls.reshape(B, ns, C, H * K)
        G = torch.matmul(tri, Lv if Lv.dtype == dt else Lv.to(dt), out=ws.take(B, ns, C, H * K))
        if not bool((-G[:, :, C - 1]).amax() <= safe2):
            _segment_exact(part, S, scale, C, o, t0, t1, B, H)
        else:
            _segment_factored(ws, G, part, S, scale, C, o, t0, t1, B, H, mask, _unit_lower_inverse)
        h, h_in_ws = S[ns], True
        _keep(starts, keep_every, S, c0, ns)
    if T > n_full * C:
        tail = [x[:, n_full * C:] for x in (r, L, k, v, a, b)]
        o_t, h_t, _ = step_forward(*tail, h.view(B, H, K, V), scale)
        o[:, n_full * C:] = o_t
        h, h_in_ws = h_t.reshape(Z, K, V), False
    final = h.clone() if h_in_ws or h.data_ptr() == state.data_ptr() else h
    return o, final.view(B, H, K, V), starts


def _segment_factored(ws, G, part, S, scale, C, o, t0, t1, B, H, mask, unit_lower_inverse):
    """One segment of whole chunks in the factored form: its chunk states into S[1:], o's rows."""
    rs, Ls, ks, vs, as_, bs = part
    ns, Z = S.shape[0] - 1, S.shape[1]
    K, V = S.shape[-2], S.shape[-1]
    Zs = ns * Z
    E = ws.take(ns, B, H, C, K)
    torch.exp2(G.view(B, ns, C, H, K).permute(1, 0, 3, 2, 4), out=E)          # e^{G_t} <= 1
    E3 = E.view(Zs, C, K)
    gamma = E3[:, C - 1:]                                                      # e^{G_C}: [Zs, 1, K]
    AR = ws.take(ns, B, H, 2 * C, K)
    a_c = _chunk_view(as_, B, ns, C, H)
    AR[..., 0, :] = a_c[..., 0, :]
    torch.mul(a_c[..., 1:, :], E[..., :-1, :], out=AR[..., 1:C, :])            # Â_t = a_t e^{G_{t-1}}
    torch.mul(_chunk_view(rs, B, ns, C, H), E, out=AR[..., C:, :])              # R̂_t = r_t e^{G_t}
    BK = ws.take(ns, B, H, 2 * C, K)
    torch.div(_chunk_view(bs, B, ns, C, H), E, out=BK[..., :C, :])             # e^{-G} <= e^SAFE_RANGE
    torch.div(_chunk_view(ks, B, ns, C, H), E, out=BK[..., C:, :])
    AR3, BK3 = AR.view(Zs, 2 * C, K), BK.view(Zs, 2 * C, K)
    A = ws.take(Zs, 2 * C, 2 * C)
    torch.bmm(AR3, BK3.transpose(1, 2), out=A)             # [[A_ab, A_ak], [A_rb, A_rk]] unmasked
    # Zero above the diagonals by a 0/1 product (a tenth of masked_fill_'s time); an entry there
    # is at most e^SAFE_RANGE |a||b|, so it overflows (0 * inf = NaN) only for vectors past 1e12,
    # which the sum catches (then masked_fill_ on the product formed again).
    A.mul_(mask)
    if not bool(torch.isfinite(A.sum())):
        torch.bmm(AR3, BK3.transpose(1, 2), out=A).masked_fill_(mask == 0, 0.0)
    BK3.mul_(gamma)                                        # B̃, K̃ = b, k e^{G_C - G_s}
    Vc = ws.take(ns, B, H, C, V)
    Vc.copy_(_chunk_view(vs, B, ns, C, H))
    V3 = Vc.view(Zs, C, V)
    Nt = ws.take(Zs, K, V)
    torch.bmm(BK3[:, C:].transpose(1, 2), V3, out=Nt)      # K̃ᵀ V
    Tinv = unit_lower_inverse(A[:, :C, :C])
    W = ws.take(Zs, C, K)
    torch.bmm(Tinv, AR3[:, :C], out=W)
    AkV = ws.take(Zs, C, V)
    torch.bmm(A[:, :C, C:], V3, out=AkV)
    U0 = ws.take(Zs, C, V)
    torch.bmm(Tinv, AkV, out=U0)
    U = ws.take(Zs, C, V)
    # Per-chunk views made once (indexing inside the loop costs about 1 µs a view).
    Ws, U0s, Us = W.view(ns, Z, C, K).unbind(0), U0.view(ns, Z, C, V).unbind(0), U.view(ns, Z, C, V).unbind(0)
    Bts = BK3.view(ns, Z, 2 * C, K)[:, :, :C].transpose(2, 3).unbind(0)       # [Z, K, C] each
    Nts = Nt.view(ns, Z, K, V).unbind(0)
    gs = gamma.view(ns, Z, 1, K).transpose(2, 3).unbind(0)                     # [Z, K, 1] each
    Ss = S.unbind(0)
    for c in range(ns):
        Uc = torch.baddbmm(U0s[c], Ws[c], Ss[c], out=Us[c])                    # U = W S + U0
        torch.addcmul(Nts[c], Ss[c], gs[c], out=Ss[c + 1]).baddbmm_(Bts[c], Uc)  # γ S + K̃ᵀ V + B̃ᵀ U
    O = ws.take(ns, B, H, C, V)
    O3 = O.view(Zs, C, V)
    torch.bmm(AR3[:, C:], S[:ns].view(Zs, K, V), out=O3)
    O3.baddbmm_(A[:, C:, :C], U).baddbmm_(A[:, C:, C:], V3)
    o_c = _chunk_view(o[:, t0:t1], B, ns, C, H)
    if scale != 1.0:
        torch.mul(O, scale, out=o_c)
    else:
        o_c.copy_(O)


def _keep(starts, every, S, c0, ns):
    """Copy the segment's start states of every `every`-th chunk (global index) into starts."""
    if not every:
        return
    first = -(-c0 // every) * every
    for c in range(first, c0 + ns + 1, every):
        if 0 < c and c // every < starts.shape[0]:
            starts[c // every] = S[c - c0]


def _segment_exact(part, S, scale, C, o, t0, t1, B, H):
    """A segment with a chunk past SAFE_RANGE: chunk_maps' exact pairwise form, its K x K scan."""
    from .pytorch_chunked import _to_chunks, chunk_maps, chunk_transitions
    K, V = S.shape[-2], S.shape[-1]
    Z, ns = B * H, (t1 - t0) // C
    W, U0, Bt, Nt, gamma, P, Q = chunk_maps(*(_to_chunks(x, C, fresh=True) for x in part), scale, owned=True)
    M, N = (x.view(ns, Z, *x.shape[1:]) for x in chunk_transitions(W, U0, Bt, Nt, gamma))
    for c in range(ns):
        torch.baddbmm(N[c], M[c], S[c], out=S[c + 1])
    O = torch.baddbmm(Q, P, S[:ns].reshape(-1, K, V))
    _chunk_view(o[:, t0:t1], B, ns, C, H).copy_(O.view(ns, B, H, C, V))
