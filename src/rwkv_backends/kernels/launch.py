"""Launching the Triton kernels with a `KernelConfig`, and the autograd Function that ties the
chunked forward to the chunked backward. The torch.library op wraps `TritonWKV7`.

What forward saves for backward: the inputs, the initial state and the chunk matrices it built
(4 x C x C float32 per chunk and head, 16 C bytes per token and head), and U where the gradient
kernel's config asks for it (`keeps_u`: float32, 4 bytes per token, head and V column). Backward recomputes
the chunk start states into a temporary buffer: from U with one multiply-add per chunk on the
chain (chunk_states), or else with a lighter forward pass that loads those matrices (`MATS_LOAD`:
no outputs, no in-chunk products, no inverse).

The one-pass path's forward, state rebuild and gradient kernels are kernels/wkv7.py's, or where their
configs ask for it (`gluon`) the same math in Gluon (kernels/gluon_nvidia.py, NVIDIA sm80+, K = V = 64).

The two-pass variant's training forward also saves the start state of each segment of the
sequence (a few per sequence). Its backward then sweeps the state gradient back to every
segment's end, and recomputes the chunk states and the gradients of all segments at once.
The transition variant does the same, except that its forward walks chunk transitions (M, P, Q,
R̃, built for all chunks at once) and keeps M and R̃, which its sweep walks back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading

import torch
import triton

from ..config import KernelConfig
from ..device import interpreter_enabled
from . import gluon_nvidia
from . import wkv7 as kern

try:                         # Triton 3.4 and later; CachedLaunch uses them on FAST_LAUNCH_TRITON only
    from triton import knobs as _knobs
    from triton.runtime import driver as _driver
except ImportError:          # pragma: no cover - older Triton
    _knobs = _driver = None

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


def _check_gluon(arg: str, kernel: str, **launch):
    """Raises a ValueError naming `arg` when `kernel`'s Gluon implementation cannot take this launch."""
    why = gluon_nvidia.unsupported(kernel, **launch)
    if why is None and interpreter_enabled():
        why = "TRITON_INTERPRET=1: the interpreter cannot run Gluon kernels"
    if why:
        raise ValueError(f"{arg}: gluon is set, but {why}")


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
    return torch.empty(_chunk_count(cu_seqlens, N, T, chunk_size), H, kern.N_MATS.value, chunk_size, chunk_size, dtype=torch.float32, device=k.device)


MATS_MODES = {"build": 0, "store": 1, "load": 2}     # kern.MATS_BUILD / MATS_STORE / MATS_LOAD
SEG_MODES = {"none": 0, "store": 1, "walk": 2}       # kern.SEG_NONE / SEG_STORE / SEG_WALK


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
    (chunk_states), and the gradient kernel loads U instead of rebuilding it from S (NOTES change
    45). Float32, because the recompute feeds U's rounding into every later state: a bfloat16 U
    doubled r's gradient error at T = 4096 with no decay on some channels (2.5e-3 -> 4.8e-3, bf16
    inputs on the H100), for no time saved."""
    return torch.empty(v.shape, dtype=torch.float32, device=v.device) if keep_u else None


def chunk_states(w, k, v, b, u, h0, *, cu_seqlens, cfg: KernelConfig, w_form, states, seg_states=None, seg_len=0):
    """Fills `states` (from `empty_states` at cfg's chunk size) with every chunk's start state, from
    the forward's U: one program per (V block, sequence, head) walking from h0, or with
    `seg_states` one per segment as well, walking from the segment's start state."""
    w, k, v, b, u, h0, cu_seqlens = _contiguous(w, k, v, b, u, h0, cu_seqlens)
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = _num_sequences(B, cu_seqlens)
    BT, BV = cfg.chunk_size, min(_pow2(V), cfg.block_v)
    offsets = _chunk_offsets(cu_seqlens, N, BT, k.device)
    if cfg.gluon:
        _check_gluon("cfg", "chunk_states", K=K, V=V, chunk_size=BT, block_v=BV, dtype=k.dtype,
                     dot_precision=_dot_precision(cfg, k.dtype), T=T, segmented=seg_states is not None)
        w, k, v, b = _aligned16(w, k, v, b)
        BV = gluon_nvidia.LAUNCH["chunk_states"]["block_v"]     # the Gluon kernel's own V blocks
    grid, seg_offsets, seg_chunks = (_cdiv(V, BV), N * H), None, 1
    if seg_states is not None:
        seg_chunks, seg_offsets, n_segments = _segment_launch(cu_seqlens, N, T, seg_len, BT, k.device)
        grid = grid + (n_segments,)
    P = _Pairs(N, H, cu_seqlens is not None)
    args = (*(P.tokens(x) for x in (w, k, v, b, u)), P.rows(h0, v), P.chunks(states, _cdiv(T, BT)),
            P.bounds(offsets, v), P.bounds(cu_seqlens, v), P.chunks(seg_states, _cdiv(T, seg_len or 1), v),
            P.bounds(seg_offsets, v), T, seg_chunks)
    common = dict(H=H, K=K, V=V, BV=BV, BT=BT, W_FORM=W_FORM_CODES[w_form], HAS_STATE=h0 is not None,
                  IS_VARLEN=cu_seqlens is not None)
    if cfg.gluon:
        warps = gluon_nvidia.LAUNCH["chunk_states"]["num_warps"]
        _launch(gluon_nvidia.chunk_states_gluon_kernel, grid, P, args, **common, SEGMENTED=seg_states is not None,
                NW=warps, num_warps=warps)
    else:
        _launch(kern.chunk_states_kernel, grid, P, args, **common, BK=_pow2(K),
                SEGMENTS=SEG_MODES["none" if seg_states is None else "walk"],
                DOT_PRECISION=_dot_precision(cfg, k.dtype), **_launch_options(cfg))
    return states


def chunk_forward(r, w, k, v, a, b, h0, *, scale, cu_seqlens, w_form, cfg: KernelConfig,
                  store_o=True, store_final=True, store_states=False, mats=None, mats_mode="build",
                  seg_states=None, seg_len=0, seg_mode="none", states=None, u=None, chunks=(0, None), o=None):
    """(o, final state, chunk start states or None). `states`: with store_states, the buffer to
    fill (from `empty_states`) instead of a new one. `u`: a float32 buffer shaped like v (from
    `empty_u`) to store U in, for the backward (chunk_states, chunk_backward's `u`). `mats_mode`:
    "build" the chunk matrices in the loop, or also "store" them into `mats` (from `empty_mats`), or
    "load" them from `mats`.
    `seg_mode`: "store" the start state of each segment of `seg_len` steps into `seg_states` (from
    `empty_states`), or "walk" every segment at once from those states (the backward's
    recompute; no o, no final state)."""
    r, w, k, v, a, b, h0, cu_seqlens = _contiguous(r, w, k, v, a, b, h0, cu_seqlens)
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = _num_sequences(B, cu_seqlens)
    BT, BK = cfg.chunk_size, _pow2(K)
    BV = min(_pow2(V), cfg.block_v)
    o = (torch.empty_like(v) if o is None else o) if store_o else v
    ht = torch.empty(N, H, K, V, dtype=torch.float32, device=k.device) if store_final else v
    c_lo, c_hi = chunks[0], _cdiv(T, BT) if chunks[1] is None else chunks[1]
    if (c_lo, c_hi) != (0, _cdiv(T, BT)) and not (cfg.gluon and mats_mode == "load"):
        raise ValueError("chunks: only the Gluon loaded forward takes a chunk range")
    offsets = _chunk_offsets(cu_seqlens, N, BT, k.device)
    if store_states and states is None:
        states = empty_states(k, v, cu_seqlens, BT)
    if (mats is None) != (mats_mode == "build"):
        raise ValueError(f"mats: mode {mats_mode!r} {'needs' if mats is None else 'takes no'} a buffer")
    if (seg_states is None) != (seg_mode == "none"):
        raise ValueError(f"seg_states: mode {seg_mode!r} {'needs' if seg_states is None else 'takes no'} a buffer")
    if seg_mode == "walk" and (store_o or store_final):
        raise ValueError("seg_mode: 'walk' recomputes chunk states only (store_o and store_final must be False)")
    P = _Pairs(N, H, cu_seqlens is not None)
    n_chunks = _cdiv(T, BT)
    if cfg.gluon and mats_mode == "load":      # head 128's loaded forward
        _check_gluon("cfg", "chunk_fwd_loaded", K=K, V=V, chunk_size=BT, block_v=BV, dtype=k.dtype,
                     dot_precision=_dot_precision(cfg, k.dtype), T=T, segmented=seg_mode == "walk",
                     store_states=store_states)
        shape = gluon_nvidia.LAUNCH["chunk_fwd_loaded"]
        seg_chunks, seg_offsets = 1, None
        if seg_mode == "store":
            seg_chunks, seg_offsets, _ = _segment_launch(cu_seqlens, N, T, seg_len, BT, k.device)
        r, w, k, v, a, b = _aligned16(r, w, k, v, a, b)
        _launch(
            gluon_nvidia.chunk_fwd_loaded_gluon_kernel, (_cdiv(V, shape["block_v"]), N * H), P,
            (*(P.tokens(x) for x in (r, w, k, v, a, b)), P.tokens(o if store_o else None, v), P.rows(h0, v),
             P.rows(ht if store_final else None, v), P.chunks(mats, n_chunks),
             P.bounds(offsets, v), P.bounds(cu_seqlens, v), P.chunks(seg_states, _cdiv(T, seg_len or 1), v),
             P.bounds(seg_offsets, v), P.tokens(u, v), float(scale), T, seg_chunks, c_lo, c_hi),
            H=H, K=K, V=V, BV=shape["block_v"], BT=BT, W_FORM=W_FORM_CODES[w_form], HAS_STATE=h0 is not None,
            STORE_FINAL=store_final, STORE_O=store_o, STORE_SEGMENTS=seg_mode == "store", STORE_U=u is not None,
            IS_VARLEN=cu_seqlens is not None, NW=shape["num_warps"], num_warps=shape["num_warps"],
        )
        return (o if store_o else None), (ht if store_final else None), None
    if cfg.gluon:
        _check_gluon("cfg", "chunk_fwd", K=K, V=V, chunk_size=BT, block_v=BV, dtype=k.dtype,
                     dot_precision=_dot_precision(cfg, k.dtype), T=T, segmented=seg_mode != "none", mats_mode=mats_mode,
                     store_states=store_states)
        r, w, k, v, a, b = _aligned16(r, w, k, v, a, b)
        _launch(
            gluon_nvidia.chunk_fwd_gluon_kernel, (1, N * H), P,
            (*(P.tokens(x) for x in (r, w, k, v, a, b)), P.tokens(o if store_o else None, v), P.rows(h0, v),
             P.rows(ht if store_final else None, v), P.chunks(mats, n_chunks, v),
             P.bounds(offsets, v), P.bounds(cu_seqlens, v), P.tokens(u, v), float(scale), T),
            H=H, K=K, BT=BT, W_FORM=W_FORM_CODES[w_form], HAS_STATE=h0 is not None, STORE_FINAL=store_final,
            STORE_O=store_o, STORE_MATS=mats_mode == "store", STORE_U=u is not None, IS_VARLEN=cu_seqlens is not None,
            NW=gluon_nvidia.LAUNCH["chunk_fwd"]["num_warps"], num_warps=gluon_nvidia.LAUNCH["chunk_fwd"]["num_warps"],
        )
        return (o if store_o else None), (ht if store_final else None), None
    grid = (_cdiv(V, BV), N * H)
    seg_offsets, seg_chunks = None, 1
    if seg_mode != "none":
        seg_chunks, seg_offsets, n_segments = _segment_launch(cu_seqlens, N, T, seg_len, BT, k.device)
        if seg_mode == "walk":
            grid = grid + (n_segments,)
    _launch(
        kern.chunk_fwd_kernel, grid, P,
        (*(P.tokens(x) for x in (r, w, k, v, a, b)), P.tokens(o if store_o else None, v), P.rows(h0, v),
             P.rows(ht if store_final else None, v),
         P.chunks(states if store_states else None, n_chunks, v), P.chunks(mats, n_chunks, v),
         P.bounds(offsets, v), P.bounds(cu_seqlens, v), P.chunks(seg_states, _cdiv(T, seg_len or 1), v),
         P.bounds(seg_offsets, v), P.tokens(u, v), float(scale), T, seg_chunks),
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, W_FORM=W_FORM_CODES[w_form], HAS_STATE=h0 is not None,
        STORE_FINAL=store_final, STORE_O=store_o, STORE_STATES=store_states, MATS=MATS_MODES[mats_mode],
        SEGMENTS=SEG_MODES[seg_mode], STORE_U=u is not None, IS_VARLEN=cu_seqlens is not None,
        DOT_PRECISION=_dot_precision(cfg, k.dtype), **_launch_options(cfg),
    )
    return (o if store_o else None), (ht if store_final else None), (states if store_states else None)


def chunk_prepare(r, w, k, a, b, *, cu_seqlens, w_form, cfg: KernelConfig, programs_per_sequence: int = 1,
                  mats=None, chunks=(0, None)):
    """The chunk matrices of every chunk, in one launch over (chunk group, sequence x head): for a
    forward that then loads them (mats_mode="load"). Each program walks every
    `programs_per_sequence`-th chunk of its sequence. The Gluon build can take only the chunks
    [chunks[0], chunks[1]) of each sequence (None: to its end), into `mats`."""
    r, w, k, a, b, cu_seqlens = _contiguous(r, w, k, a, b, cu_seqlens)
    B, T, H, K = k.shape
    N = _num_sequences(B, cu_seqlens)
    BT = cfg.chunk_size
    mats = empty_mats(k, cu_seqlens, BT) if mats is None else mats
    offsets = _chunk_offsets(cu_seqlens, N, BT, k.device)
    c_lo, c_hi = chunks[0], _cdiv(T, BT) if chunks[1] is None else chunks[1]
    if (c_lo, c_hi) != (0, _cdiv(T, BT)) and not cfg.gluon:
        raise ValueError("chunks: only the Gluon build takes a chunk range")
    P = max(1, min(programs_per_sequence, _cdiv(T, BT)))
    pairs = _Pairs(N, H, cu_seqlens is not None)
    if cfg.gluon:
        _check_gluon("cfg", "chunk_prep", K=K, V=K, chunk_size=BT, block_v=K, dtype=k.dtype,
                     dot_precision=_dot_precision(cfg, k.dtype), T=T)
        r, w, k, a, b = _aligned16(r, w, k, a, b)
        warps = gluon_nvidia.LAUNCH["chunk_prep"]["num_warps"]
        _launch(
            gluon_nvidia.chunk_prep_gluon_kernel, (P, N * H), pairs,
            (*(pairs.tokens(x) for x in (r, w, k, a, b)), pairs.chunks(mats, _cdiv(T, BT)),
             pairs.bounds(offsets, k), pairs.bounds(cu_seqlens, k), T, c_lo, c_hi),
            H=H, K=K, BT=BT, W_FORM=W_FORM_CODES[w_form], IS_VARLEN=cu_seqlens is not None, NW=warps, num_warps=warps,
        )
        return mats
    _launch(
        kern.chunk_prep_kernel, (P, N * H), pairs,
        (*(pairs.tokens(x) for x in (r, w, k, a, b)), pairs.chunks(mats, _cdiv(T, BT)), pairs.bounds(offsets, k),
         pairs.bounds(cu_seqlens, k), T),
        H=H, K=K, BT=BT, BKK=min(_pow2(K), cfg.block_k), W_FORM=W_FORM_CODES[w_form], IS_VARLEN=cu_seqlens is not None,
        DOT_PRECISION=_dot_precision(cfg, k.dtype), **_launch_options(cfg),
    )
    return mats


def twopass_forward(r, w, k, v, a, b, h0, *, scale, cu_seqlens, w_form, cfg_prep: KernelConfig,
                    cfg_fwd: KernelConfig, programs_per_sequence: int, store_o=True, store_final=True,
                    seg_states=None, seg_len=0, u=None):
    """Pass 1 builds every chunk's matrices (chunk_prepare), pass 2 walks the chunks loading them,
    both at cfg_prep's chunk size; with `seg_states`, pass 2 also stores the start state of each
    segment of `seg_len` steps there. Returns (o or None, final state or None, the chunk matrices)."""
    cfg_fwd = cfg_fwd.with_(chunk_size=cfg_prep.chunk_size)
    walk = dict(scale=scale, cu_seqlens=cu_seqlens, w_form=w_form, cfg=cfg_fwd, store_o=store_o, mats_mode="load",
                seg_states=seg_states, seg_len=seg_len, seg_mode="none" if seg_states is None else "store", u=u)
    prep = dict(cu_seqlens=cu_seqlens, w_form=w_form, cfg=cfg_prep, programs_per_sequence=programs_per_sequence)
    split = _prep_split(k, cu_seqlens, cfg_prep, cfg_fwd)
    if not split:
        mats = chunk_prepare(r, w, k, a, b, **prep)
        o, ht, _ = chunk_forward(r, w, k, v, a, b, h0, **walk, store_final=store_final, mats=mats)
        return o, ht, mats
    # The first chunks' matrices, then the walk over them while the rest are built beside it (on a
    # side stream: the walk is a dependent chain over few programs and leaves the device room); the
    # walk goes on from the state where it stopped (NOTES change 64).
    r, w, k, v, a, b = _contiguous(r, w, k, v, a, b)
    mats = empty_mats(k, cu_seqlens, cfg_prep.chunk_size)
    chunk_prepare(r, w, k, a, b, **prep, mats=mats, chunks=(0, split))
    side = _side_stream(k.device)
    side.wait_stream(torch.cuda.current_stream(k.device))
    with torch.cuda.stream(side):
        chunk_prepare(r, w, k, a, b, **prep, mats=mats, chunks=(split, None))
    o, mid, _ = chunk_forward(r, w, k, v, a, b, h0, **walk, store_final=True, mats=mats, chunks=(0, split))
    torch.cuda.current_stream(k.device).wait_stream(side)
    o, ht, _ = chunk_forward(r, w, k, v, a, b, mid, **walk, store_final=store_final, mats=mats, chunks=(split, None),
                             o=o)
    return o, ht, mats


# The split two-pass forward builds 1 / PREP_SPLIT of each sequence's chunk matrices before its walk
# starts (2, 4 and 8 measured within 0.6% of each other in training, 4 best in prefill).
PREP_SPLIT = 4


def _prep_split(k, cu_seqlens, cfg_prep, cfg_fwd) -> int:
    """Where twopass_forward splits the chunk-matrix build (0: it does not): the Gluon build and loaded
    forward on CUDA, whole sequences (packed ones have no common chunk count without a host sync), a
    few chunks at least, and no CUDA graph being captured (graph trees cannot replay side streams)."""
    n_chunks = _cdiv(k.shape[1], cfg_prep.chunk_size)
    if not (cfg_prep.gluon and cfg_fwd.gluon and k.is_cuda and cu_seqlens is None and n_chunks >= 2 * PREP_SPLIT) \
            or torch.cuda.is_current_stream_capturing():
        return 0
    return _cdiv(n_chunks, PREP_SPLIT)


def chunk_transitions(r, w, k, a, b, *, cu_seqlens, w_form, cfg: KernelConfig, programs_per_sequence: int = 1):
    """Every chunk's transition at cfg's chunk size C (kernels/wkv7.py, "Chunk transitions"), all
    chunks in parallel: (M [chunks, H, K, K], P [chunks, H, K, C], Q [chunks, H, C, C], R̃ float32
    in r's layout)."""
    r, w, k, a, b, cu_seqlens = _contiguous(r, w, k, a, b, cu_seqlens)
    B, T, H, K = k.shape
    N = _num_sequences(B, cu_seqlens)
    BT = cfg.chunk_size
    n = _chunk_count(cu_seqlens, N, T, BT)
    trans = torch.empty(n, H, K, K, dtype=torch.float32, device=k.device)
    p_mat = torch.empty(n, H, K, BT, dtype=torch.float32, device=k.device)
    q_mat = torch.empty(n, H, BT, BT, dtype=torch.float32, device=k.device)
    r_eff = torch.empty(r.shape, dtype=torch.float32, device=r.device)
    offsets = _chunk_offsets(cu_seqlens, N, BT, k.device)
    P = max(1, min(programs_per_sequence, _cdiv(T, BT)))
    pairs = _Pairs(N, H, cu_seqlens is not None)
    _launch(
        kern.chunk_transition_kernel, (P, N * H), pairs,
        (*(pairs.tokens(x) for x in (r, w, k, a, b)), *(pairs.chunks(x, _cdiv(T, BT)) for x in (trans, p_mat, q_mat)),
         pairs.tokens(r_eff), pairs.bounds(offsets, k), pairs.bounds(cu_seqlens, k), T),
        H=H, K=K, BT=BT, BK=_pow2(K), BKK=min(_pow2(K), cfg.block_k), W_FORM=W_FORM_CODES[w_form],
        IS_VARLEN=cu_seqlens is not None, DOT_PRECISION=_dot_precision(cfg, k.dtype), **_launch_options(cfg),
    )
    return trans, p_mat, q_mat, r_eff


def transition_forward(v, h0, trans, p_mat, q_mat, r_eff, *, scale, cu_seqlens, cfg: KernelConfig, store_o=True,
                       store_final=True, seg_states=None, seg_len=0):
    """(o or None, final state or None): the walk over chunk transitions, one program per (V block,
    sequence, head); with `seg_states`, each segment's start state is stored there as well."""
    v, h0, cu_seqlens = _contiguous(v, h0, cu_seqlens)
    B, T, H, V = v.shape
    K, BT = p_mat.shape[-2:]
    N = _num_sequences(B, cu_seqlens)
    BV = min(_pow2(V), cfg.block_v)
    o = torch.empty_like(v) if store_o else v
    ht = torch.empty(N, H, K, V, dtype=torch.float32, device=v.device) if store_final else v
    offsets = _chunk_offsets(cu_seqlens, N, BT, v.device)
    seg_offsets, seg_chunks = None, 1
    if seg_states is not None:
        seg_chunks, seg_offsets, _ = _segment_launch(cu_seqlens, N, T, seg_len, BT, v.device)
    P = _Pairs(N, H, cu_seqlens is not None)
    _launch(
        kern.chunk_transition_fwd_kernel, (_cdiv(V, BV), N * H), P,
        (P.tokens(v), *(P.chunks(x, _cdiv(T, BT)) for x in (trans, p_mat, q_mat)), P.tokens(r_eff),
         P.tokens(o if store_o else None, v), P.rows(h0, v), P.rows(ht if store_final else None, v), P.bounds(offsets, v), P.bounds(cu_seqlens, v),
         P.chunks(seg_states, _cdiv(T, seg_len or 1), v), P.bounds(seg_offsets, v), float(scale), T, seg_chunks),
        H=H, K=K, V=V, BT=BT, BK=_pow2(K), BV=BV, HAS_STATE=h0 is not None, STORE_FINAL=store_final,
        STORE_O=store_o, SEGMENTS=SEG_MODES["none" if seg_states is None else "store"],
        IS_VARLEN=cu_seqlens is not None, DOT_PRECISION=_dot_precision(cfg, v.dtype), **_launch_options(cfg),
    )
    return (o if store_o else None), (ht if store_final else None)


def transition_twopass(r, w, k, v, a, b, h0, *, scale, cu_seqlens, w_form, cfg_trans: KernelConfig,
                       cfg_walk: KernelConfig, programs_per_sequence: int, store_o=True, store_final=True,
                       seg_states=None, seg_len=0):
    """Chunk transitions for every chunk (chunk_transitions), then the walk over them
    (transition_forward). Returns (o or None, final state or None, (M, R̃)): what the
    state-gradient sweep of training needs (transition_dstate)."""
    trans, p_mat, q_mat, r_eff = chunk_transitions(r, w, k, a, b, cu_seqlens=cu_seqlens, w_form=w_form,
                                                   cfg=cfg_trans, programs_per_sequence=programs_per_sequence)
    o, ht = transition_forward(v, h0, trans, p_mat, q_mat, r_eff, scale=scale, cu_seqlens=cu_seqlens, cfg=cfg_walk,
                               store_o=store_o, store_final=store_final, seg_states=seg_states, seg_len=seg_len)
    return o, ht, (trans, r_eff)


def transition_dstate(do, dht, trans, r_eff, seg_ds, dh0, *, scale, cu_seqlens, cfg: KernelConfig, chunk_size: int,
                      seg_len: int, seg_offsets=None):
    """The state-gradient sweep over chunk transitions: fills `seg_ds` (the state gradient at each
    segment's end) and, if given, `dh0`. `seg_offsets`: packed sequences' offsets into the segment
    buffers, when the caller has them already (`_chunk_offsets` at seg_len)."""
    B, T, H, V = do.shape
    K = trans.shape[-1]
    N = _num_sequences(B, cu_seqlens)
    BT, BV = chunk_size, min(_pow2(V), cfg.block_v)
    offsets = _chunk_offsets(cu_seqlens, N, BT, do.device)
    if seg_offsets is None:
        seg_offsets = _chunk_offsets(cu_seqlens, N, seg_len, do.device)
    P = _Pairs(N, H, cu_seqlens is not None)
    _launch(
        kern.chunk_transition_dstate_kernel, (_cdiv(V, BV), N * H), P,
        (P.chunks(trans, _cdiv(T, BT)), P.tokens(r_eff), P.tokens(do), P.rows(dht, do),
         P.chunks(seg_ds, _cdiv(T, seg_len)), P.rows(dh0, do), P.bounds(offsets, do), P.bounds(seg_offsets, do),
         P.bounds(cu_seqlens, do), float(scale), T, _chunks_per_segment(seg_len, BT)),
        H=H, K=K, V=V, BT=BT, BK=_pow2(K), BV=BV, HAS_DHT=dht is not None, STORE_DH0=dh0 is not None,
        IS_VARLEN=cu_seqlens is not None, DOT_PRECISION=_dot_precision(cfg, do.dtype), **_launch_options(cfg),
    )


def dstate_sweep(r, w, k, a, b, do, dht, mats, seg_ds, dh0, *, scale, cu_seqlens, w_form, cfg: KernelConfig,
                 seg_len: int, dz=None, dv=None, gluon=False, ds_bf16=False):
    """The segmented backward's state-gradient sweep over the chunk matrices `mats`, at their chunk size
    and cfg's launch shape: stores the state gradient at every segment's end into `seg_ds` (from
    segment_states), and into `dh0` unless it is None. With `dz` and `dv` (v's shape), also every
    chunk's dZ and the gradient of v (what the K-split Gluon gradient kernel needs). `gluon`: the
    Gluon sweep (kernels/gluon_nvidia.py; it stores dZ and dv, and takes its own launch shape), whose
    products with dS take bf16 operands if `ds_bf16` (the gradient kernel's precision), else tf32's."""
    B, T, H, K = k.shape
    V = do.shape[-1]
    N = _num_sequences(B, cu_seqlens)
    BT = mats.shape[-1]
    cfg = cfg.with_(chunk_size=BT)
    BV = min(_pow2(V), cfg.block_v)
    offsets = _chunk_offsets(cu_seqlens, N, BT, k.device)
    _, seg_offsets, _ = _segment_launch(cu_seqlens, N, T, seg_len, BT, k.device)
    if (dz is None) != (dv is None):
        raise ValueError("dz, dv: the sweep stores both or neither")
    P = _Pairs(N, H, cu_seqlens is not None)
    if gluon:
        launch_shape = gluon_nvidia.LAUNCH["chunk_dstate"]
        _check_gluon("gluon", "chunk_dstate", K=K, V=V, chunk_size=BT, block_v=launch_shape["block_v"], dtype=k.dtype,
                     dot_precision=_dot_precision(cfg, k.dtype), T=T, segmented=True)
        if dz is None:
            raise ValueError("dz, dv: the Gluon sweep stores both; pass them")
        r, w, k, a, b, do = _aligned16(r, w, k, a, b, do)
        _launch(
            gluon_nvidia.chunk_dstate_gluon_kernel, (_cdiv(V, launch_shape["block_v"]), N * H), P,
            (*(P.tokens(x) for x in (r, w, k, a, b, do)), P.rows(dht, do), P.chunks(mats, _cdiv(T, BT)),
             P.chunks(seg_ds, _cdiv(T, seg_len)), P.rows(dh0, seg_ds), P.tokens(dz), P.tokens(dv),
             P.bounds(offsets, do), P.bounds(seg_offsets, do), P.bounds(cu_seqlens, do), float(scale), T,
             _chunks_per_segment(seg_len, BT)),
            H=H, K=K, V=V, BV=launch_shape["block_v"], BT=BT, W_FORM=W_FORM_CODES[w_form], HAS_DHT=dht is not None,
            STORE_DH0=dh0 is not None, IS_VARLEN=cu_seqlens is not None, NW=launch_shape["num_warps"],
            DS_BF16=ds_bf16, num_warps=launch_shape["num_warps"],
        )
        return
    _launch(
        kern.chunk_dstate_kernel, (_cdiv(V, BV), N * H), P,
        (*(P.tokens(x) for x in (r, w, k, a, b, do)), P.rows(dht, do), P.chunks(mats, _cdiv(T, BT)),
         P.chunks(seg_ds, _cdiv(T, seg_len)), P.rows(dh0, seg_ds), P.tokens(dz, do), P.tokens(dv, do),
         P.bounds(offsets, do), P.bounds(seg_offsets, do), P.bounds(cu_seqlens, do), float(scale), T,
         _chunks_per_segment(seg_len, BT)),
        H=H, K=K, V=V, BT=BT, BK=_pow2(K), BV=BV, W_FORM=W_FORM_CODES[w_form], HAS_DHT=dht is not None,
        STORE_DH0=dh0 is not None, IS_VARLEN=cu_seqlens is not None, STORE_DZ_DV=dz is not None,
        DOT_PRECISION=_dot_precision(cfg, k.dtype), **_launch_options(cfg),
    )


def chunk_backward(r, w, k, v, a, b, h0, do, dht, *, scale, cu_seqlens, w_form,
                   cfg_fwd: KernelConfig, cfg_bwd: KernelConfig, mats=None, seg_states=None, seg_len=0,
                   cfg_recompute: KernelConfig | None = None, transitions=None, u=None,
                   cfg_states: KernelConfig | None = None):
    """Gradients (dr, dw, dk, dv, da, db, dh0). `mats`: the chunk matrices a forward stored, or None
    to build them here; they are rebuilt (in the state recompute) unless they have the backward's
    chunk size.

    `seg_states`: the start state of every segment of `seg_len` steps, stored by the forward along
    with `mats`. Then a sweep stores the state gradient at every segment's end (chunk_dstate_kernel,
    at `mats`' chunk size and cfg_fwd's launch shape), and the state recompute and the gradient
    kernel run all segments at once. `cfg_recompute`: the segmented recompute's launch shape
    (default cfg_fwd's), always at the backward's chunk size.

    `transitions`: (M, R̃) from transition_twopass, in place of `mats`: the sweep walks them
    (transition_dstate, at cfg_fwd's chunk size and launch shape).

    `u`: the U the forward stored (chunk_forward's `u`). The gradient kernel loads it; and where
    `mats` has the backward's chunk size, the state recompute is chunk_states (no matrices), with
    `cfg_states`' launch shape (default: the recompute's)."""
    r, w, k, v, a, b, h0, do, dht, cu_seqlens = _contiguous(r, w, k, v, a, b, h0, do, dht, cu_seqlens)
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = _num_sequences(B, cu_seqlens)
    segmented = seg_states is not None and (mats is not None or transitions is not None)
    fwd_mats = mats
    # The backward walks the chunks with its own chunk size.
    # (The Gluon forward neither loads matrices nor stores chunk states: the recompute runs in Triton.)
    cfg_rebuild = (cfg_recompute if segmented and cfg_recompute else cfg_fwd).with_(chunk_size=cfg_bwd.chunk_size,
                                                                                     gluon=False)
    have = mats is not None and mats.shape[-1] == cfg_bwd.chunk_size
    if not have:
        mats = empty_mats(k, cu_seqlens, cfg_bwd.chunk_size)
    # With segments, the recompute (all segments at once) and the sweep (one program per pair and V
    # block, a latency-bound walk that leaves most of the device idle) need nothing from each other:
    # on CUDA the recompute runs on a side stream beside the sweep (NOTES change 35). What it writes
    # is allocated here, on this stream, which waits for it before the gradients read it. Not while
    # a CUDA graph is captured: graph trees cannot replay side-stream allocations.
    side = (_side_stream(k.device) if segmented and k.is_cuda and not torch.cuda.is_current_stream_capturing()
            else None)
    states = empty_states(k, v, cu_seqlens, cfg_bwd.chunk_size)
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(k.device))
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        if u is not None and have:
            chunk_states(w, k, v, b, u, h0, cu_seqlens=cu_seqlens, w_form=w_form, states=states,
                         cfg=(cfg_states or cfg_rebuild).with_(chunk_size=cfg_bwd.chunk_size),
                         seg_states=seg_states if segmented else None, seg_len=seg_len)
        else:
            chunk_forward(r, w, k, v, a, b, h0, scale=scale, cu_seqlens=cu_seqlens, w_form=w_form, cfg=cfg_rebuild,
                          store_o=False, store_final=False, store_states=True, states=states, mats=mats,
                          mats_mode="load" if have else "store", seg_states=seg_states if segmented else None,
                          seg_len=seg_len, seg_mode="walk" if segmented else "none")
    BT, BK = cfg_bwd.chunk_size, _pow2(K)
    BV = min(_pow2(V), cfg_bwd.block_v)
    NV = _cdiv(V, BV)
    offsets = _chunk_offsets(cu_seqlens, N, BT, k.device)
    if NV == 1:
        dr, dw, dk, da, db = (torch.empty_like(x) for x in (r, w, k, a, b))
    else:   # each V block's share of the r, w, k, a, b gradients, added below in a fixed order
        dr, dw, dk, da, db = (torch.empty(NV, *x.shape, dtype=torch.float32, device=x.device) for x in (r, w, k, a, b))
    dv = torch.empty_like(v)
    dh0 = torch.empty(N, H, K, V, dtype=torch.float32, device=k.device) if h0 is not None else v
    grid, seg_ds, seg_offsets, seg_chunks = (NV, N * H), None, None, 1
    P = _Pairs(N, H, cu_seqlens is not None)
    n_chunks = _cdiv(T, BT)
    # Head size 128's Gluon gradient kernel splits K over two programs; the sweep gives it dZ and
    # writes dv (kernels/wkv7.py chunk_dstate_kernel's STORE_DZ_DV).
    ksplit = cfg_bwd.gluon and segmented
    dz = None
    if ksplit:
        if transitions is not None:
            raise ValueError("cfg_bwd: gluon is set, but the Gluon K-split gradient kernel takes dZ from the "
                             "chunk-matrix sweep, and this backward walks chunk transitions")
        _check_gluon("cfg_bwd", "chunk_bwd_split", K=K, V=V, chunk_size=BT, block_v=BV, dtype=k.dtype,
                     dot_precision=_dot_precision(cfg_bwd, k.dtype), T=T, has_u=u is not None, segmented=True,
                     sweep_chunk_size=fwd_mats.shape[-1])
        dz = torch.empty_like(v)         # rounded to bfloat16 by the gradient kernel's products anyway
    if segmented:
        seg_chunks, seg_offsets, n_segments = _segment_launch(cu_seqlens, N, T, seg_len, BT, k.device)
        seg_ds = torch.empty_like(seg_states)
        grid = grid + (n_segments,)
        if transitions is not None:
            if transitions[0].shape[0] != _chunk_count(cu_seqlens, N, T, cfg_fwd.chunk_size):
                raise ValueError(f"transitions: {transitions[0].shape[0]} chunk transitions per head, but cfg_fwd's "
                                 f"chunk size {cfg_fwd.chunk_size} makes {_chunk_count(cu_seqlens, N, T, cfg_fwd.chunk_size)}"
                                 " (they must be walked at the chunk size they were built at)")
            transition_dstate(do, dht, *transitions, seg_ds, dh0 if h0 is not None else None, scale=scale,
                              cu_seqlens=cu_seqlens, cfg=cfg_fwd, chunk_size=cfg_fwd.chunk_size, seg_len=seg_len,
                              seg_offsets=seg_offsets)
        else:
            dstate_sweep(r, w, k, a, b, do, dht, fwd_mats, seg_ds, dh0 if h0 is not None else None, scale=scale,
                         cu_seqlens=cu_seqlens, w_form=w_form, cfg=cfg_fwd, seg_len=seg_len,
                         dz=dz, dv=dv if ksplit else None, gluon=ksplit,
                         ds_bf16=_dot_precision(cfg_bwd, k.dtype) == "bf16")
    if side is not None:                 # the gradients need the recomputed states (and rebuilt matrices)
        torch.cuda.current_stream(k.device).wait_stream(side)
    if ksplit:
        r, w, k, v, a, b, do, dz = _aligned16(r, w, k, v, a, b, do, dz)
        _launch(
            gluon_nvidia.chunk_bwd_ksplit_gluon_kernel, (K // gluon_nvidia.KSPLIT_BLOCK_K, N * H, grid[2]), P,
            (*(P.tokens(x) for x in (r, w, k, v, a, b, do, dz)), P.chunks(states, n_chunks),
             P.chunks(seg_ds, _cdiv(T, seg_len)), P.bounds(offsets, v), P.bounds(seg_offsets, v),
             P.bounds(cu_seqlens, v), P.tokens(u), *(P.tokens(g) for g in (dr, dw, dk, da, db)),
             float(scale), T, seg_chunks),
            H=H, K=K, V=V, BK=gluon_nvidia.KSPLIT_BLOCK_K, BT=BT, W_FORM=W_FORM_CODES[w_form],
            IS_VARLEN=cu_seqlens is not None, num_warps=gluon_nvidia.LAUNCH["chunk_bwd_split"]["num_warps"],
        )
        return dr, dw, dk, dv, da, db, (dh0 if h0 is not None else None)
    if cfg_bwd.gluon:
        _check_gluon("cfg_bwd", "chunk_bwd", K=K, V=V, chunk_size=BT, block_v=BV, dtype=k.dtype,
                     dot_precision=_dot_precision(cfg_bwd, k.dtype), T=T, has_u=u is not None, segmented=segmented)
        r, w, k, v, a, b, do = _aligned16(r, w, k, v, a, b, do)
        _launch(
            gluon_nvidia.chunk_bwd_gluon_kernel, (1, N * H), P,
            (*(P.tokens(x) for x in (r, w, k, v, a, b, do)), P.rows(dht, v), P.chunks(states, n_chunks),
             P.chunks(mats, n_chunks), P.bounds(offsets, v), P.bounds(cu_seqlens, v), P.tokens(u),
             *(P.tokens(g) for g in (dr, dw, dk, dv, da, db)), P.rows(dh0 if h0 is not None else None, v),
             float(scale), T),
            H=H, K=K, BT=BT, W_FORM=W_FORM_CODES[w_form], HAS_DHT=dht is not None, STORE_DH0=h0 is not None,
            IS_VARLEN=cu_seqlens is not None, num_warps=gluon_nvidia.NUM_WARPS,
        )
        return dr, dw, dk, dv, da, db, (dh0 if h0 is not None else None)
    # With several V blocks the r, w, k, a, b gradients are [NV, B, T, H, K]: the shares lie r.numel() apart
    # (the whole call's, whichever slice of sequences a launch takes).
    _launch(
        kern.chunk_bwd_kernel, grid, P,
        (*(P.tokens(x) for x in (r, w, k, v, a, b, do)), P.rows(dht, v), P.chunks(states, n_chunks),
         P.chunks(mats, n_chunks), P.bounds(offsets, v), P.bounds(cu_seqlens, v),
         P.chunks(seg_ds, _cdiv(T, seg_len or 1), v), P.bounds(seg_offsets, v), P.tokens(u, v),
         *(P.tokens(g, dim=1 if NV > 1 and g is not dv else 0) for g in (dr, dw, dk, dv, da, db)),
         P.rows(dh0 if h0 is not None else None, v), float(scale), T, 0 if NV == 1 else r.numel(), seg_chunks),
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, W_FORM=W_FORM_CODES[w_form], HAS_DHT=dht is not None,
        STORE_DH0=h0 is not None, IS_VARLEN=cu_seqlens is not None, SPLIT_V=NV > 1,
        SEGMENTS=SEG_MODES["walk" if segmented else "none"], HAS_U=u is not None,
        DOT_PRECISION=_dot_precision(cfg_bwd, k.dtype), **_launch_options(cfg_bwd),
    )
    if NV > 1:
        dr, dw, dk, da, db = (g.sum(0).to(x.dtype) for g, x in zip((dr, dw, dk, da, db), (r, w, k, a, b)))
    return dr, dw, dk, dv, da, db, (dh0 if h0 is not None else None)


# Triton's JIT launch re-derives the kernel's specialization from every argument on every call.
# On the H100's host that is 31 us per decode launch, against 14 us for the compiled kernel's own
# runner, and decode at small batch is host-bound. So the decode kernel launches through a
# CachedLaunch: one per launch shape (grid, constexprs, options), holding the kernels Triton
# compiled for it, keyed by what Triton specializes on that the launch shape leaves open: each
# tensor's dtype and 16-byte alignment, each scalar's class (for integers: width, whether it is 1,
# whether 16 divides it), and the current device. Only where this was checked (bitwise equal to the
# JIT launch, tests/test_triton_kernels.py): NVIDIA devices and these Triton versions. Other vendors,
# other versions and the interpreter take the JIT launch.
FAST_LAUNCH_TRITON = ("3.6.",)
_COMPILED_MAX = 64           # compiled kernels per launch shape (alignment and dtype patterns)


def _scalar_class(x):
    if isinstance(x, int) and not isinstance(x, bool):
        return int, -2 ** 31 <= x < 2 ** 31, x == 1, x % 16 == 0
    return type(x)


class CachedLaunch:
    """kernel[grid](*tensors, *scalars, **constexprs, **options) for one launch shape. The first call
    with a new specialization goes through Triton's JIT and keeps its compiled kernel; later calls
    launch that kernel directly, skipping the JIT's argument binding and, while no launch hook is
    installed (a profiler's), the runner's hook metadata."""

    def __init__(self, kernel, grid, constexprs: dict, options: dict, on_cuda: bool):
        self.kernel = kernel
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.constexprs, self.options = constexprs, options
        self.cacheable = on_cuda and torch.version.hip is None and not interpreter_enabled()
        self.compiled: dict = {}
        self.trailing = None         # the constexprs in the kernel's argument order, after the runtime ones
        self.current_stream = None   # Triton's own stream query, looked up once

    def __call__(self, tensors: tuple, scalars: tuple):
        args = tensors + scalars
        if not (self.cacheable and triton.__version__.startswith(FAST_LAUNCH_TRITON)):
            with _interpreted():
                self.kernel[self.grid](*args, **self.constexprs, **self.options)
            return
        device = torch.cuda.current_device()      # Triton launches on the current device
        key = (device, tuple([t.dtype for t in tensors]), tuple([t.data_ptr() % 16 == 0 for t in tensors]),
               tuple(map(_scalar_class, scalars)))
        compiled = self.compiled.get(key)
        if compiled is None:
            compiled = self.kernel[self.grid](*args, **self.constexprs, **self.options)
            if len(self.compiled) >= _COMPILED_MAX:
                self.compiled.clear()
            self.compiled[key] = compiled
            self.trailing = tuple(self.constexprs[name] for name in self.kernel.arg_names[len(args):])
            self.current_stream = _driver.active.get_current_stream
            return
        # Triton's runner builds launch metadata for the launch hooks on every call. With no hook
        # installed (empty hook chains), launch as it would, with the hooks and their metadata None.
        enter, leave = _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
        if getattr(enter, "calls", True) or getattr(leave, "calls", True):
            compiled[self.grid](*args, *self.trailing)
            return
        compiled.run(*self.grid, self.current_stream(device), compiled.function, compiled.packed_metadata,
                     None, None, None, *args, *self.trailing)


@functools.lru_cache(maxsize=256)
def _recurrent_launch(on_cuda, N, H, K, V, w_form, has_state, store_final, varlen, cfg) -> CachedLaunch:
    BV = min(_pow2(V), cfg.block_v)
    return CachedLaunch(
        kern.recurrent_fwd_kernel, (_cdiv(V, BV), N * H),
        dict(H=H, K=K, V=V, BK=_pow2(K), BV=BV, W_FORM=W_FORM_CODES[w_form], HAS_STATE=has_state,
             STORE_FINAL=store_final, IS_VARLEN=varlen),
        _launch_options(cfg), on_cuda)


def recurrent_forward(r, w, k, v, a, b, h0, *, scale, cu_seqlens, w_form, cfg: KernelConfig, store_final=True):
    r, w, k, v, a, b, h0, cu_seqlens = _contiguous(r, w, k, v, a, b, h0, cu_seqlens)
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = _num_sequences(B, cu_seqlens)
    o = torch.empty_like(v)
    state_dtype = h0.dtype if h0 is not None else torch.float32          # a 16-bit state stays 16-bit
    ht = torch.empty(N, H, K, V, dtype=state_dtype, device=k.device) if store_final else v
    shape = (H, K, V, w_form, h0 is not None, store_final, cu_seqlens is not None, cfg)
    if N * H <= GRID_YZ_MAX:                # decode's common case: no slicing on the host's path
        _recurrent_launch(k.is_cuda, N, *shape)(
            (r, w, k, v, a, b, o, h0 if h0 is not None else v, ht, cu_seqlens if cu_seqlens is not None else v),
            (float(scale), T))
        return o, (ht if store_final else None)
    P = _Pairs(N, H, cu_seqlens is not None)
    args = (*(P.tokens(x) for x in (r, w, k, v, a, b, o)), P.rows(h0, v), P.rows(ht if store_final else None, v),
            P.bounds(cu_seqlens, v))
    for n0, n1 in P.slices():
        _recurrent_launch(k.is_cuda, n1 - n0, *shape)(
            tuple(x.cut(n0, n1) if isinstance(x, _Cut) else x for x in args), (float(scale), T))
    return o, (ht if store_final else None)


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    """How one training call runs: the launch configs and what the forward keeps for the backward.
    The Triton variants build it from their plan (backends/triton.py); the torch.library op runs
    it, training_forward in its forward and training_backward in its backward (ops.py).

    With `cfg_prep`, the two-pass forward: chunk_prepare builds every chunk's matrices
    (`prep_programs` programs per sequence), and the forward loads them. With `segments` > 1 the
    forward runs at cfg_prep's chunk size and stores the start state of about that many segments per
    sequence; the backward runs the segments in parallel. Without, everything runs at the backward's
    chunk size, so that it can load the forward's matrices.

    Unless `transitions`, the forward also keeps U when cfg_bwd asks for it (`keeps_u`); the backward
    then rebuilds the chunk states from it with `cfg_states`' launch shape.

    With `transitions`, cfg_prep is chunk_transition's config and cfg_fwd the walk's (at that chunk
    size): the forward keeps the transitions the state-gradient sweep walks, and the segments' start
    states."""

    cfg_fwd: KernelConfig
    cfg_bwd: KernelConfig
    cfg_prep: KernelConfig | None = None
    prep_programs: int = 1
    segments: int = 0
    cfg_recompute: KernelConfig | None = None
    transitions: bool = False
    cfg_states: KernelConfig | None = None


# What training_forward keeps, in this order (None where the plan keeps no such thing).
KEPT = ("mats", "seg_states", "u", "trans", "r_eff")


def training_forward(r, w, k, v, a, b, h0, *, scale, cu_seqlens, w_form, how: TrainingPlan, store_o=True,
                     store_final=True):
    """(o or None, final state or None, the KEPT tensors, the segment length): the forward of a
    training call, keeping what `training_backward` needs beyond the inputs."""
    mats = seg_states = u = None
    kept = (None, None)
    seg_len = 0
    out = dict(scale=scale, cu_seqlens=cu_seqlens, w_form=w_form, store_o=store_o, store_final=store_final)
    if how.transitions:
        seg_states, seg_len = segment_states(k, v, cu_seqlens, max(how.segments, 1),
                                             (how.cfg_prep.chunk_size, how.cfg_bwd.chunk_size))
        o, ht, kept = transition_twopass(r, w, k, v, a, b, h0, **out, cfg_trans=how.cfg_prep, cfg_walk=how.cfg_fwd,
                                         programs_per_sequence=how.prep_programs, seg_states=seg_states,
                                         seg_len=seg_len)
    elif how.cfg_prep is not None:
        if how.segments > 1:
            seg_states, seg_len = segment_states(k, v, cu_seqlens, how.segments,
                                                 (how.cfg_prep.chunk_size, how.cfg_bwd.chunk_size))
        u = empty_u(v, keeps_u(how.cfg_bwd))
        o, ht, mats = twopass_forward(r, w, k, v, a, b, h0, **out,
                                      cfg_prep=how.cfg_prep if seg_states is not None
                                      else how.cfg_prep.with_(chunk_size=how.cfg_bwd.chunk_size),
                                      cfg_fwd=how.cfg_fwd, programs_per_sequence=how.prep_programs,
                                      seg_states=seg_states, seg_len=seg_len, u=u)
    else:
        if how.cfg_bwd.chunk_size == how.cfg_fwd.chunk_size:
            mats = empty_mats(k, cu_seqlens, how.cfg_fwd.chunk_size)
        u = empty_u(v, keeps_u(how.cfg_bwd))
        o, ht, _ = chunk_forward(r, w, k, v, a, b, h0, **out, cfg=how.cfg_fwd, mats=mats,
                                 mats_mode="build" if mats is None else "store", u=u)
    return o, ht, (mats, seg_states, u, *kept), seg_len


def kept_layout(r, k, v, cu_seqlens, how: TrainingPlan) -> tuple:
    """(the shape of each KEPT tensor that training_forward keeps for these inputs, None where it
    keeps none; the segment length): what a backward that gets the kept tensors flattened needs.
    The buffers come from training_forward's own allocators, on meta tensors."""
    r, k, v, cu_seqlens = (None if x is None else torch.empty(x.shape, dtype=x.dtype, device="meta")
                           for x in (r, k, v, cu_seqlens))
    B, T, H, K = k.shape
    chunk_sizes = (how.cfg_prep.chunk_size, how.cfg_bwd.chunk_size) if how.cfg_prep is not None else ()
    mats = seg_states = u = trans = r_eff = None
    seg_len = 0
    if how.transitions or (how.cfg_prep is not None and how.segments > 1):
        seg_states, seg_len = segment_states(k, v, cu_seqlens, max(how.segments, 1), chunk_sizes)
    if how.transitions:        # chunk_transitions' M and R̃
        trans = torch.empty(_chunk_count(cu_seqlens, _num_sequences(B, cu_seqlens), T, how.cfg_prep.chunk_size),
                            H, K, K, device="meta")
        r_eff = r
    else:
        u = empty_u(v, keeps_u(how.cfg_bwd))
        if how.cfg_prep is not None:
            mats = empty_mats(k, cu_seqlens, how.cfg_prep.chunk_size if seg_states is not None
                              else how.cfg_bwd.chunk_size)
        elif how.cfg_bwd.chunk_size == how.cfg_fwd.chunk_size:
            mats = empty_mats(k, cu_seqlens, how.cfg_fwd.chunk_size)
    return tuple(None if x is None else tuple(x.shape) for x in (mats, seg_states, u, trans, r_eff)), seg_len


def training_backward(r, w, k, v, a, b, h0, do, dht, kept, seg_len, *, scale, cu_seqlens, w_form,
                      how: TrainingPlan):
    """Gradients (dr, dw, dk, dv, da, db, dh0) from what training_forward kept."""
    mats, seg_states, u, trans, r_eff = kept
    if do is None:
        do = torch.zeros_like(v)
    return chunk_backward(r, w, k, v, a, b, h0, do, dht, scale=scale, cu_seqlens=cu_seqlens, w_form=w_form,
                          cfg_fwd=how.cfg_fwd, cfg_bwd=how.cfg_bwd, mats=mats, seg_states=seg_states,
                          seg_len=seg_len, cfg_recompute=how.cfg_recompute,
                          transitions=None if trans is None else (trans, r_eff), u=u, cfg_states=how.cfg_states)
