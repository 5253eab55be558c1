"""The training plan: the chunked forward that keeps what the chunked backward needs, and that
backward. The torch.library op (ops.py) runs training_forward in its forward and training_backward,
from what the forward kept, in its backward.

What forward saves for backward: the inputs, the initial state and the chunk matrices it built
(4 x C x C float32 per chunk and head, 16 C bytes per token and head), and U where the gradient
kernel's config asks for it (`keeps_u`: float32, 4 bytes per token, head and V column). Backward recomputes
the chunk start states into a temporary buffer: from U with one multiply-add per chunk on the
chain (chunk_states), or else with a lighter forward pass that loads those matrices (`MATS_LOAD`:
no outputs, no in-chunk products, no inverse).

The one-pass path's forward, state rebuild and gradient kernels are kernels/chunk.py's and
kernels/backward.py's, or where their configs ask for it (`gluon`) the same math in Gluon
(kernels/gluon/, NVIDIA sm80+, K = V = 64).

The two-pass variant's training forward also saves the start state of each segment of the
sequence (a few per sequence). Its backward then sweeps the state gradient back to every
segment's end, and recomputes the chunk states and the gradients of all segments at once.
The transition variant does the same, except that its forward walks chunk transitions (M, P, Q,
R̃, built for all chunks at once) and keeps M and R̃, which its sweep walks back.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import KernelConfig
from .backward import chunk_backward
from .chunk import chunk_forward
from .common import _chunk_count, _num_sequences, empty_mats, empty_u, keeps_u, segment_states
from .transition import transition_twopass
from .twopass import twopass_forward


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
