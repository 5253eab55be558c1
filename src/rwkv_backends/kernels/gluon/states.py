"""The Gluon state rebuild from the forward's U (chunk_states), and its launcher."""

from __future__ import annotations

from ..common import W_FORM_CODES, _aligned16, _cdiv, _launch
from ..roles import ROLES
from .api import async_load, barrier, cp, gl, gluon, mma_v2
from .common import SHARED16, SHARED32, _chunk_rows, _log_decay, _segment_base, _sequence, _triangle_scan


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
    """kernels/chunk.py chunk_states_kernel: S' = γ S + B̃ᵀ U + K̃ᵀ V, storing every chunk's start
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
    if SEGMENTED:            # kernels/common.py _segment_range: the segment's chunks, none past the end
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


def chunk_states_gluon(grid, P, w, k, v, b, u, h0, states, offsets, cu_seqlens, seg_states, seg_offsets, *, T, BT,
                       seg_len, seg_chunks, w_form):
    """kernels/chunk.py chunk_states in Gluon, over `grid` (its own V blocks: the role spec's block_v)."""
    H, K = k.shape[-2:]
    V = v.shape[-1]
    spec = ROLES["chunk_states"].gluon
    w, k, v, b = _aligned16(w, k, v, b)
    _launch(
        chunk_states_gluon_kernel, grid, P,
        (*(P.tokens(x) for x in (w, k, v, b, u)), P.rows(h0, v), P.chunks(states, _cdiv(T, BT)),
         P.bounds(offsets, v), P.bounds(cu_seqlens, v), P.chunks(seg_states, _cdiv(T, seg_len or 1), v),
         P.bounds(seg_offsets, v), T, seg_chunks),
        H=H, K=K, V=V, BV=spec.block_v, BT=BT, W_FORM=W_FORM_CODES[w_form], HAS_STATE=h0 is not None,
        IS_VARLEN=cu_seqlens is not None, SEGMENTED=seg_states is not None, NW=spec.num_warps,
        num_warps=spec.num_warps,
    )
