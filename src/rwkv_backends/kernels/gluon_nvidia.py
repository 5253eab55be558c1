"""The chunked paths' kernels written in Gluon, Triton's layout-explicit dialect, for NVIDIA sm80 and
later (mma.sync and cp.async). What `KernelConfig.gluon` selects for each kernel; the kernels of
kernels/wkv7.py are the same math and the reference for them.

- One-pass training and prefill at K = V = 64: the gradient kernel (chunk_bwd), the forward
  (chunk_fwd) and the state rebuild from U (chunk_states).
- Two-pass training and prefill at K = V = 128 (few pairs): the chunk-matrix build (chunk_prep), the
  loaded forward (chunk_fwd_loaded), the state-gradient sweep (with dZ and dv), the state rebuild
  over segments (chunk_states), and the segmented gradient kernel split over K (chunk_bwd_split):
  with dZ from the sweep, the rest of a chunk's gradients and the dS walk are per K row or sums
  over V, so each half of K is a program of its own, in the K = 64 gradient kernel's layout.

Why a second implementation: the Triton kernels are latency-bound. In the gradient kernel every
tl.dot whose operand was computed in registers, every store and every decay scan changes layout
through shared memory with all eight warps synchronised: about 89 barriers per 16-step chunk, one
8-warp program per multiprocessor (255 registers), 8 us per chunk. Here every register tile lives
in one mma.sync accumulator layout (the warps side by side along the columns, so that reductions
and scans over a chunk's 16 rows stay inside a warp), every product takes its operands from shared
memory, the decays' scans are products with 0/1 triangles, and the next chunk's inputs arrive by
cp.async while this one computes: seven barriers per chunk in the gradient kernel. The walks of the
two-pass path (forward, sweep) are dependent chains over few programs, so there the decays come
straight from the landed inputs and the chain takes three barriers per chunk.

Scope (`unsupported()` says why a launch does not fit): the head sizes above, chunk 16, 16-bit
inputs, the tables' dot precision for that kernel ("bf16" for the gradients, whose in-chunk pair
products stay tf32 as in the Triton kernel; "tf32" elsewhere), no one-step sequences; varlen works.
Not under TRITON_INTERPRET=1: the interpreter cannot run Gluon, so CI compiles these kernels for
sm90 (ptxas) and only a card runs them.
"""

from __future__ import annotations

import torch

from . import wkv7 as kern
from .gluon_api import IMPORT_ERROR as GLUON_IMPORT_ERROR
from .gluon_api import async_load, barrier, cp, gl, gluon, mma_v2

HEAD = 64
CHUNK = 16
# Head size 128's two-pass training: the loaded forward (chunk_fwd_loaded_gluon_kernel), the
# state-gradient sweep (chunk_dstate_gluon_kernel), and the gradient kernel split over two programs
# of KSPLIT_BLOCK_K columns of K (chunk_bwd_ksplit_gluon_kernel).
KSPLIT_HEAD = 128
KSPLIT_BLOCK_K = 64
_HEAD128 = ("chunk_prep", "chunk_fwd_loaded", "chunk_bwd_split", "chunk_dstate")
_SEGMENTED = ("chunk_bwd_split", "chunk_dstate")          # the segmented backward's only
_OWN_V_BLOCKS = ("chunk_states", "chunk_dstate", "chunk_fwd_loaded", "chunk_prep")   # V blocks of their own, or none
# The launch each Gluon kernel takes whatever its config says (the tune tool folds its candidates to
# these): warps, and the V columns of one program.
LAUNCH = {"chunk_bwd": dict(num_warps=8, block_v=64), "chunk_fwd": dict(num_warps=4, block_v=64),
          "chunk_states": dict(num_warps=4, block_v=64), "chunk_bwd_split": dict(num_warps=8, block_v=128),
          "chunk_dstate": dict(num_warps=4, block_v=64), "chunk_fwd_loaded": dict(num_warps=4, block_v=64),
          "chunk_prep": dict(num_warps=4)}
NUM_WARPS = LAUNCH["chunk_bwd"]["num_warps"]
_PRECISION = {"chunk_bwd": "bf16", "chunk_fwd": "tf32", "chunk_states": "tf32", "chunk_bwd_split": "bf16",
              "chunk_dstate": "tf32", "chunk_fwd_loaded": "tf32", "chunk_prep": "tf32"}
_NAMES = {"chunk_bwd": "gradient kernel", "chunk_fwd": "forward", "chunk_states": "state rebuild",
          "chunk_bwd_split": "K-split gradient kernel", "chunk_dstate": "state-gradient sweep",
          "chunk_fwd_loaded": "loaded forward", "chunk_prep": "chunk-matrix build"}


def unsupported(kernel: str, *, K: int, V: int, chunk_size: int, block_v: int, dtype: torch.dtype,
                dot_precision: str, T: int = 2, has_u: bool = True, segmented: bool = False,
                mats_mode: str = "build", store_states: bool = False, sweep_chunk_size: int | None = None) -> str | None:
    """Why `kernel`'s Gluon implementation cannot take a launch (None: it can). Device and
    Triton-release checks are known_issues' "gluon-experimental". `segmented`: the launch walks
    segments (the recompute, the segmented backward); `sweep_chunk_size`: for chunk_bwd_split, the
    chunk size of the state-gradient sweep that gives it dZ (the two-pass forward's)."""
    if kernel not in LAUNCH:
        return f"{kernel} has no Gluon implementation"
    name = f"the Gluon {_NAMES[kernel]}"
    if GLUON_IMPORT_ERROR:
        return GLUON_IMPORT_ERROR
    if T == 1:
        # Triton compiles an integer argument equal to 1 as a constant; with T = 1 the kernels' masked
        # cp.async fails to lower (Triton 3.6, found by the H100 conformance run; NOTES change 57).
        return f"T = 1: {name} is not compiled for one-step sequences"
    heads = (HEAD, KSPLIT_HEAD) if kernel == "chunk_states" else (KSPLIT_HEAD,) if kernel in _HEAD128 else (HEAD,)
    if K != V or K not in heads:
        return f"K = {K}, V = {V}: {name} is laid out for K = V = {' or '.join(map(str, heads))}"
    head = K
    if chunk_size != CHUNK:
        return f"chunk_size {chunk_size}: {name} takes chunks of {CHUNK}"
    if kernel not in _OWN_V_BLOCKS and block_v < head:
        return f"block_v {block_v}: {name} takes all {head} V columns in one program"
    if dtype not in (torch.bfloat16, torch.float16) or dot_precision != _PRECISION[kernel]:
        return (f"{str(dtype).replace('torch.', '')} inputs with dot precision {dot_precision!r}: {name} takes "
                f"16-bit inputs at dot precision {_PRECISION[kernel]!r}")
    if kernel in ("chunk_bwd", "chunk_bwd_split") and not has_u:
        return f"keep_u is off: {name} loads the U the forward kept"
    if kernel == "chunk_fwd_loaded":
        if segmented or store_states:
            return f"{name} stores segment start states but walks no segments and stores no chunk states"
        return None
    if kernel in _SEGMENTED:
        if not segmented:
            return f"no segments: {name} runs the segments of the two-pass backward"
        if sweep_chunk_size is not None and sweep_chunk_size != CHUNK:
            return (f"the state-gradient sweep walks chunks of {sweep_chunk_size}: {name} takes its dZ at "
                    f"chunks of {CHUNK}")
        return None
    if segmented and kernel != "chunk_states":
        return f"segments: {name} walks whole sequences"
    if kernel == "chunk_fwd" and (mats_mode == "load" or store_states):
        return f"{name} builds the chunk matrices and stores no chunk states (the recompute runs in Triton)"
    return None


if GLUON_IMPORT_ERROR is None:
    SAFE_RANGE = kern.SAFE_RANGE
    # Every shared buffer is swizzled: unswizzled ones made the gradient kernel 1.6x slower (bank
    # conflicts of the operand loads).
    SHARED16 = gl.constexpr(gl.SwizzledSharedLayout(8, 1, 8, [1, 0]))
    SHARED32 = gl.constexpr(gl.SwizzledSharedLayout(4, 1, 8, [1, 0]))

    # The decay forms are kernels/wkv7.py's, compiled by Gluon's frontend (their tl.* calls are
    # the builtins Gluon shares with Triton).
    _log_decay = gluon.jit(kern._log_decay.fn)
    _dlog_decay = gluon.jit(kern._dlog_decay.fn)

    @gluon.jit
    def _sequence(cu_seqlens, chunk_offsets, i_n, T, BT: gl.constexpr, IS_VARLEN: gl.constexpr):
        """Sequence i_n's first and end token, its first chunk's index in the chunk buffers, and its
        chunk count (kernels/wkv7.py _seq_bounds and _chunk_base)."""
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
        """Sequence i_n's first segment in the segment buffers (kernels/wkv7.py _segment_base)."""
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
    def _intra(safe, sm_ah, sm_rh, sm_bf, sm_kf, G, Gm, r_c, k_c, a_c, b_c, BT: gl.constexpr, MMA: gl.constexpr):
        """A chunk's A_ab, A_ak (strictly lower) and A_rb, A_rk (lower), [BT, BT] in MMA (kernels/wkv7.py
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
        """kernels/wkv7.py _empty_span_pairs: the pairs s = t - LAG of dA (decay e^0), their values at
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
        kernels/wkv7.py chunk_bwd_kernel). d_ahat, d_rhat, d_bt, d_kt: the gradients of Â, R̂, B̃, K̃
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

    @gluon.jit
    def chunk_bwd_gluon_kernel(
        r, w, k, v, a, b, do, dht, states, mats, chunk_offsets, cu_seqlens, u,
        dr, dw, dk, dv, da, db, dh0, scale, T,
        H: gl.constexpr, K: gl.constexpr, BT: gl.constexpr, W_FORM: gl.constexpr,
        HAS_DHT: gl.constexpr, STORE_DH0: gl.constexpr, IS_VARLEN: gl.constexpr,
    ):
        """kernels/wkv7.py chunk_bwd_kernel with HAS_U, one V block, no segments; program (0, i_nh)."""
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
        (kernels/wkv7.py chunk_dstate_kernel with STORE_DZ_DV) gave every chunk's dZ, dv and the state
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
        # The segment's chunks [c_begin, c_end) (kernels/wkv7.py _segment_range); none past the end.
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
        """kernels/wkv7.py chunk_dstate_kernel with STORE_DZ_DV, tf32 products (DS_BF16: those with dS
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
        """kernels/wkv7.py chunk_fwd_kernel loading the chunk matrices (MATS_LOAD; with STORE_SEGMENTS,
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
        """kernels/wkv7.py chunk_prep_kernel, tf32 products: program (i_p, i_nh) builds and stores the
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
            # Tinv = (I + N)(I + N^2)(I + N^4)(I + N^8), N = A_ab (kernels/wkv7.py _unit_lower_inverse).
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
            mbase = mats + ((c0 + i_c) * H + i_h) * 4 * BT * BT       # kernels/wkv7.py MAT_TINV, MAT_AK, MAT_RB, MAT_RK
            gl.store(mbase + m_off, Tinv)
            gl.store(mbase + BT * BT + m_off, A_ak)
            gl.store(mbase + 2 * BT * BT + m_off, A_rb)
            gl.store(mbase + 3 * BT * BT + m_off, A_rk)

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
        """kernels/wkv7.py chunk_fwd_kernel building (and with STORE_MATS storing) the chunk matrices, one
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

            # The in-chunk matrices (kernels/wkv7.py _intra): factored where safe, pair by pair otherwise.
            A_ab, A_ak, A_rb, A_rk = _intra(safe, sm_ah, sm_rh, sm_bf, sm_kf, G, Gm, r_c, k_c, a_c, b_c, BT, MMA)
            # Tinv = (I + N)(I + N^2)(I + N^4)(I + N^8), N = A_ab (kernels/wkv7.py _unit_lower_inverse's
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
            if STORE_MATS:               # kernels/wkv7.py MAT_TINV, MAT_AK, MAT_RB, MAT_RK
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

    @gluon.jit
    def _issue_states_copies(w, k, b, v, u, raw16, raw_u, stage, i_c, bos, eos, i_h, i_v, H: gl.constexpr,
                             K: gl.constexpr, V: gl.constexpr, BV: gl.constexpr, BT: gl.constexpr, NW: gl.constexpr):
        """cp.async of chunk i_c's w, k, b (all K columns) and v, U (V block i_v) into buffer `stage`."""
        ROWS: gl.constexpr = gl.BlockedLayout([1, 4], [32 // (K // 4), K // 4], [NW, 1], [1, 0])
        p, m = _chunk_rows(bos, eos, i_c, i_h, 0, H, K, BT, K, ROWS)
        base = stage * 4
        async_load(raw16.index(base + 0), w + p, mask=m)
        async_load(raw16.index(base + 1), k + p, mask=m)
        async_load(raw16.index(base + 2), b + p, mask=m)
        VROWS: gl.constexpr = gl.BlockedLayout([1, 4], [32 // (BV // 4), BV // 4], [NW, 1], [1, 0])
        pv, mv = _chunk_rows(bos, eos, i_c, i_h, i_v * BV, H, V, BT, BV, VROWS)
        async_load(raw16.index(base + 3).slice(0, BV, 1), v + pv, mask=mv)
        async_load(raw_u.index(stage), u + pv, mask=mv)
        cp.commit_group()

    @gluon.jit
    def chunk_states_gluon_kernel(
        w, k, v, b, u, h0, states, chunk_offsets, cu_seqlens, seg_states, seg_offsets, T, seg_chunks,
        H: gl.constexpr, K: gl.constexpr, V: gl.constexpr, BV: gl.constexpr, BT: gl.constexpr,
        W_FORM: gl.constexpr, HAS_STATE: gl.constexpr, SEGMENTED: gl.constexpr, IS_VARLEN: gl.constexpr,
        NW: gl.constexpr,
    ):
        """kernels/wkv7.py chunk_states_kernel: S' = γ S + B̃ᵀ U + K̃ᵀ V, storing every chunk's start
        state; program (i_v, i_nh), and with SEGMENTED (SEG_WALK) program (i_v, i_nh, i_seg) walks
        segment i_seg from the start state the forward stored. The decays' suffix sums come from a
        product with a 0/1 triangle on L taken straight from the landed w (no round trip): 3
        barriers per chunk."""
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
        t_idx = gl.arange(0, BT, layout=ROW)
        kk = gl.arange(0, K, layout=COL)
        kr = gl.arange(0, K, layout=ROW)
        vv = i_v * BV + gl.arange(0, BV, layout=COL)
        tc = gl.arange(0, BT, layout=COL)
        rows = t_idx[:, None]
        cols = tc[None, :]
        s_tile = kr[:, None] * V + vv[None, :]
        raw16 = gl.allocate_shared_memory(w.dtype.element_ty, [8, BT, K], SHARED16)   # w k b v, two stages
        raw_u = gl.allocate_shared_memory(gl.float32, [2, BT, BV], SHARED32)
        sm_tri = gl.allocate_shared_memory(gl.float32, [BT, BT], SHARED32)
        sm_bt = gl.allocate_shared_memory(gl.float32, [BT, K], SHARED32)
        sm_kt = gl.allocate_shared_memory(gl.float32, [BT, K], SHARED32)
        sm_v = gl.allocate_shared_memory(gl.float32, [BT, BV], SHARED32)
        sm_tri.store(gl.where(rows <= cols, 1.0, 0.0) + gl.zeros([BT, BT], gl.float32, MMA))   # [t, s]: s >= t
        if SEGMENTED:            # kernels/wkv7.py _segment_range: the segment's chunks, none past the end
            s0 = _segment_base(seg_offsets, i_n, T, seg_chunks, BT, IS_VARLEN)
            i_seg = gl.program_id(2)
            c_begin = i_seg * seg_chunks
            c_end = gl.minimum(c_begin + seg_chunks, n_chunks)
            S = gl.load(seg_states + ((s0 + i_seg) * H + i_h) * K * V + s_tile,
                        mask=(s_tile >= 0) & (c_begin < c_end), other=0.0)
        else:
            c_begin = 0
            c_end = n_chunks
            S = gl.zeros([K, BV], gl.float32, MMA)
            if HAS_STATE:
                S += gl.load(h0 + i_nh.to(gl.int64) * K * V + s_tile)
        if c_begin < c_end:
            _issue_states_copies(w, k, b, v, u, raw16, raw_u, 0, c_begin, bos, eos, i_h, i_v, H, K, V, BV, BT, NW)
        for i_c in range(c_begin, c_end):
            st = (i_c - c_begin) % 2
            cp.wait_group(0)
            barrier()
            if i_c + 1 < c_end:
                _issue_states_copies(w, k, b, v, u, raw16, raw_u, 1 - st, i_c + 1, bos, eos, i_h, i_v, H, K, V, BV,
                                     BT, NW)
            gl.store(states + ((c0 + i_c) * H + i_h) * K * V + s_tile, S)
            o_t = bos + i_c * BT + t_idx
            m_t = (o_t < eos)[:, None] & (kk < K)[None, :]
            L = gl.where(m_t, _log_decay(raw16.index(st * 4 + 0).load(MMA).to(gl.float32), W_FORM), 0.0)
            suffix = _triangle_scan(sm_tri, raw16.index(st * 4 + 0), bos + i_c * BT, eos, W_FORM, BT, K, MMA)   # Σ_{s >= t} L_s
            G_last = gl.sum(gl.where(rows == 0, suffix, 0.0), 0)
            tail = gl.exp(suffix - L)                                           # e^{G_last - G_t}
            k_c = gl.where(m_t, raw16.index(st * 4 + 1).load(MMA).to(gl.float32), 0.0)
            b_c = gl.where(m_t, raw16.index(st * 4 + 2).load(MMA).to(gl.float32), 0.0)
            sm_bt.store(b_c * tail)
            sm_kt.store(k_c * tail)
            sm_v.store(raw16.index(st * 4 + 3).slice(0, BV, 1).load(MMA).to(gl.float32))
            gamma = gl.convert_layout(gl.exp(G_last), ROW)
            barrier()
            S = mma_v2(sm_bt.permute((1, 0)).load(A32), raw_u.index(st).load(B32), S * gamma[:, None],
                       input_precision="tf32")
            S = mma_v2(sm_kt.permute((1, 0)).load(A32), sm_v.load(B32), S, input_precision="tf32")
