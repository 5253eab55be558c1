"""What every kernel module shares: the jit helpers for sequence bounds, segments, decays and
state tiles, the constants the kernels and their launchers agree on, and the host side of a
launch (grid slicing by sequence, the interpreter lock, the side stream, buffer shapes, stand-ins
for absent tensors).

Layout: every [B, T, H, D] input is read as a flat token axis (B*T tokens) so that packed sequences
(cu_seqlens) and batches share one code path: sequence n covers tokens [bos, eos). States are
[N, H, K, V] float32. All arithmetic is float32 (tl.exp only: no libdevice, so the interpreter
runs it); tl.dot takes DOT_PRECISION ("ieee" for float32 inputs: no silent TF32).
"""

from __future__ import annotations

import contextlib
import threading

import torch
import triton
import triton.language as tl

from ..config import KernelConfig
from ..device import interpreter_enabled
from . import gluon

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
    tf32 here kept it at 2.2e-3, for 0.24 ms more at B8 T4096 H32."""
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


# ---------------------------------------------------------------------------------------------
# Host side

W_FORM_CODES = {"log": 0, "raw": 1, "clampw": 2}


# Host-side integer helpers. Triton 3.6's triton.cdiv and triton.next_power_of_2 are
# ConstexprFunction objects that cost about 5 us a call on the host; a decode step makes several.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (n - 1).bit_length())


def _launch_options(cfg: KernelConfig) -> dict:
    # The interpreter takes no launch options; on hardware they go to the vendor's launcher.
    return {} if interpreter_enabled() else cfg.launch_options()


# Triton's interpreter patches module-wide state (triton.language's functions, the builder's grid
# index) for the length of a launch, so two threads' interpreted launches corrupt each other. They
# take turns; compiled launches take no lock.
_INTERPRETER_LOCK = threading.RLock()


def _interpreted():
    """The lock an interpreted launch holds; nothing for a compiled one."""
    return _INTERPRETER_LOCK if interpreter_enabled() else contextlib.nullcontext()


# CUDA caps a grid's y and z sizes at 65535 (x at 2^31 - 1). Every kernel takes its (sequence, head)
# pair from program_id(1), and a segment walk its segment from program_id(2). A launch with more
# pairs goes out as several, each over a slice of whole sequences with its tensors cut to that slice
# (_launch); segment_states keeps the segments per sequence within the cap.
GRID_YZ_MAX = 65535


class _Cut:
    """A kernel argument that a sliced launch cuts to sequences [n0, n1): along `dim`, `per` entries
    per sequence, and `extra` more (1 for the [N + 1] sequence bounds)."""

    __slots__ = ("x", "dim", "per", "extra")

    def __init__(self, x, dim=0, per=1, extra=0):
        self.x, self.dim, self.per, self.extra = x, dim, per, extra

    def cut(self, n0, n1):
        return self.x.narrow(self.dim, n0 * self.per, (n1 - n0) * self.per + self.extra)


def _or(x, stand_in):
    """x, or `stand_in` where x is None: what a kernel takes for a pointer it never reads (the flag
    that would read it is off). Launchers keep absent tensors None and pass them through this (or
    _Pairs, which does the same) at the launch only."""
    return stand_in if x is None else x


class _Pairs:
    """How one launch's tensors split by sequence. Each method takes the tensor, or None and the
    stand-in passed in its place (never read, never cut). Packed sequences (varlen) index the token
    axis and the chunk and segment buffers through cu_seqlens and the offsets, whose values stay
    global: only those bounds and the per-sequence states are cut. Equal lengths index everything
    from the sequence number: every per-sequence tensor is cut."""

    def __init__(self, N, H, varlen):
        self.N, self.H, self.varlen = N, H, varlen

    def tokens(self, x, dummy=None, dim=0):
        """[B, T, H, D] (or with a leading V-block axis, dim=1)."""
        return dummy if x is None else x if self.varlen else _Cut(x, dim)

    def rows(self, x, dummy=None):
        """[N, H, K, V] per-sequence states."""
        return dummy if x is None else _Cut(x)

    def bounds(self, x, dummy=None):
        """[N + 1] cu_seqlens and offsets (packed sequences only)."""
        return dummy if x is None else _Cut(x, extra=1)

    def chunks(self, x, per, dummy=None):
        """Buffers with `per` entries per sequence (chunks, segments) at equal lengths."""
        return dummy if x is None else x if self.varlen else _Cut(x, per=per)

    def slices(self):
        """Sequence ranges [n0, n1) of at most GRID_YZ_MAX pairs each: the whole call when it fits.
        A slice's sequence count is a multiple of 16 where it can be, so that cut tensors keep their
        16-byte alignment."""
        per = GRID_YZ_MAX // self.H
        if per < 1:
            raise ValueError(f"H: {self.H} heads exceed the {GRID_YZ_MAX} programs a launch grid's y size allows")
        if per >= self.N:
            return [(0, self.N)]
        if per >= 16:
            per -= per % 16
        return [(n0, min(self.N, n0 + per)) for n0 in range(0, self.N, per)]


def _launch(kernel, grid, pairs: _Pairs, args, **kw):
    """kernel[grid](*args, **kw), where grid[1] is the pair count: one launch per slice of sequences
    (_Pairs.slices), the _Cut arguments cut to it."""
    if grid[1] != pairs.N * pairs.H:
        raise ValueError(f"grid: its y size {grid[1]} is not the {pairs.N} x {pairs.H} (sequence, head) pairs")
    slices = pairs.slices()
    for n0, n1 in slices:
        if len(slices) == 1:
            sub = [x.x if isinstance(x, _Cut) else x for x in args]
        else:
            sub = [x.cut(n0, n1) if isinstance(x, _Cut) else x for x in args]
        with _interpreted():
            kernel[(grid[0], (n1 - n0) * pairs.H, *grid[2:])](*sub, **kw)


def _dot_precision(cfg: KernelConfig, dtype: torch.dtype) -> str:
    # Float32 inputs never go through TF32 silently (SPEC §2); tables choose for 16-bit inputs.
    if dtype == torch.float32:
        return "ieee"
    # known issue triton#11584: the interpreter cannot run bf16 dots (the dispatcher's plan says so
    # too; this also covers direct launches, such as the tune tool's).
    if cfg.dot_precision == "bf16" and interpreter_enabled():
        return "tf32"
    return cfg.dot_precision


_SIDE_STREAMS: dict = {}


def _side_stream(device):
    """One extra CUDA stream per device, for work that can run beside the current stream's."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(index)
    return _SIDE_STREAMS[index]


def _contiguous(*tensors):
    """The kernels index flat, contiguous memory. Anything else (views of a fused projection, a
    transposed state, the stride-0 gradient that `state.sum()` sends back) is copied first."""
    return [x if x is None or x.is_contiguous() else x.contiguous() for x in tensors]


def _aligned16(*tensors):
    """The Gluon kernels copy their inputs with cp.async, which moves at least 4 bytes and is compiled
    for 16-byte-aligned pointers: a tensor whose storage starts elsewhere (a view at an odd offset)
    is copied to a fresh, aligned allocation first."""
    return [x if x is None or x.data_ptr() % 16 == 0 else x.clone() for x in tensors]


def _num_sequences(B, cu_seqlens):
    """Sequences in the call: the batch, or the packed sequences of cu_seqlens."""
    return B if cu_seqlens is None else cu_seqlens.numel() - 1


def _chunk_count(cu_seqlens, N, T, BT) -> int:
    """Slots in a buffer with one entry per BT steps of each sequence: exact for equal lengths, an
    upper bound for packed sequences (no host sync to read their lengths)."""
    return N * _cdiv(T, BT) if cu_seqlens is None else _cdiv(T, BT) + N


def _chunk_offsets(cu_seqlens, N, BT, device):
    """Per-sequence offset into such a buffer: None for equal lengths (the kernels compute it)."""
    if cu_seqlens is None:
        return None
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    counts = (lens + BT - 1) // BT
    offsets = torch.zeros(N + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets


def empty_mats(k, cu_seqlens, chunk_size: int):
    """A buffer for the chunk matrices of a forward with this chunk size."""
    B, T, H, _ = k.shape
    N = _num_sequences(B, cu_seqlens)
    return torch.empty(_chunk_count(cu_seqlens, N, T, chunk_size), H, N_MATS.value, chunk_size, chunk_size, dtype=torch.float32, device=k.device)


MATS_MODES = {"build": 0, "store": 1, "load": 2}     # MATS_BUILD / MATS_STORE / MATS_LOAD
SEG_MODES = {"none": 0, "store": 1, "walk": 2}       # SEG_NONE / SEG_STORE / SEG_WALK


def segment_states(k, v, cu_seqlens, segments_per_sequence: int, chunk_sizes) -> tuple:
    """(an empty buffer for each segment's start state, the segment length in steps) for a forward
    that keeps them. A sequence splits into about `segments_per_sequence` segments, each a multiple
    of every chunk size that walks them; packed sequences (cu_seqlens) are split by their mean
    length: longer ones get more segments, shorter fewer."""
    B, T_all = k.shape[:2]
    T = T_all if cu_seqlens is None else max(1, T_all // _num_sequences(B, cu_seqlens))
    multiple = max(chunk_sizes)
    seg_len = multiple * _cdiv(_cdiv(T, multiple), max(1, segments_per_sequence))
    # The segment walks' grids take one z index per segment of the longest possible sequence (a
    # packed one may span the whole token axis): longer segments keep that count within GRID_YZ_MAX.
    seg_len = max(seg_len, multiple * _cdiv(_cdiv(T_all, multiple), GRID_YZ_MAX))
    return empty_states(k, v, cu_seqlens, seg_len), seg_len


def _chunks_per_segment(seg_len: int, BT: int) -> int:
    if seg_len % BT:
        raise ValueError(f"seg_len: {seg_len} steps per segment is not a multiple of the chunk size {BT}")
    return seg_len // BT


def _segment_launch(cu_seqlens, N, T, seg_len, BT, device) -> tuple:
    """What a kernel walking segments of `seg_len` steps at chunk size BT takes: (chunks per segment,
    packed sequences' offsets into the segment buffers or None, the most segments one sequence can
    have: the grid's third size when every segment runs at once)."""
    if _cdiv(T, seg_len) > GRID_YZ_MAX:
        raise ValueError(f"seg_len: {seg_len} steps make {_cdiv(T, seg_len)} segments of {T} steps, over the "
                         f"{GRID_YZ_MAX} a launch grid's z size allows (segment_states picks a longer one)")
    return _chunks_per_segment(seg_len, BT), _chunk_offsets(cu_seqlens, N, seg_len, device), _cdiv(T, seg_len)


def empty_states(k, v, cu_seqlens, steps: int):
    """A buffer for one float32 [K, V] state per head and per `steps` steps of each sequence: every
    chunk's start state (steps = the chunk size), or every segment's (steps = its length)."""
    B, T, H, K = k.shape
    N = _num_sequences(B, cu_seqlens)
    return torch.empty(_chunk_count(cu_seqlens, N, T, steps), H, K, v.shape[-1], dtype=torch.float32,
                       device=k.device)


def keeps_u(cfg_bwd: KernelConfig) -> bool:
    """Whether training keeps U for this gradient kernel config: its `keep_u` asks for it, and the
    Gluon gradient kernels load it. A config that falls back from Gluon to Triton (the plan turns
    `gluon` off) keeps U only if `keep_u` says so: at head 128 the Triton kernel is faster without it."""
    return cfg_bwd.keep_u or cfg_bwd.gluon


def empty_u(v, keep_u: bool):
    """A float32 buffer for the forward's U (U_t = a_tᵀ h_{t-1}, per token, head and V column), or
    None: what a gradient kernel's `keep_u` asks training to keep. With it, the backward's state
    recompute needs no chunk matrices and has one multiply-add per chunk on its chain
    (chunk_states), and the gradient kernel loads U instead of rebuilding it from S.
    Float32, because the recompute feeds U's rounding into every later state: a bfloat16 U
    doubled r's gradient error at T = 4096 with no decay on some channels (2.5e-3 -> 4.8e-3, bf16
    inputs on the H100), for no time saved."""
    return torch.empty(v.shape, dtype=torch.float32, device=v.device) if keep_u else None


def _check_gluon(arg: str, kernel: str, **launch):
    """Raises a ValueError naming `arg` when `kernel`'s Gluon implementation cannot take this launch."""
    why = gluon.unsupported(kernel, **launch)
    if why is None and interpreter_enabled():
        why = "TRITON_INTERPRET=1: the interpreter cannot run Gluon kernels"
    if why:
        raise ValueError(f"{arg}: gluon is set, but {why}")
