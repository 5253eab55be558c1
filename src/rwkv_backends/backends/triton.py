"""The Triton backend: the kernels of rwkv_backends/kernels, on every vendor through its tables."""

from __future__ import annotations

import functools

from ..config import padded_head
from ..device import triton_target
from ..registry import GLUON_ENV, Variant, planning_settings, register
from ..vendors import runs_gluon

MAX_HEAD = 128
# Gradient programs per multiprocessor that the segmented backward's segments aim for, in both
# two-pass variants (one program fits a multiprocessor: 255 registers, 8 warps). 8 against 4, three
# interleaved rounds each on the H100: B1 T16384 H32 training 5.638 -> 5.551 ms (+16 MiB); K = V = 128
# B4 T4096 H16 12.54 -> 12.27 ms (+56 MiB; 16 gives 12.38).
SEGMENT_FILL = 8
# The narrowest V block the decode variant splits to when few (sequence, head) pairs leave
# multiprocessors idle (fit_configs below).
MIN_DECODE_BLOCK_V = 16
# Chunk transitions serve heads up to this size: at K = V = 128 (B4 T4096 H16) they were slower than
# the loaded forward (1.95 against 1.75 ms) and its sweep (1.06 against 0.97 ms) on the H100.
TRANSITION_MAX_HEAD = 64
# Transition programs per multiprocessor: each builds a few chunks' transitions. B1 T16384 H32:
# 0.83-0.86 ms from 4 to 16 per multiprocessor, 1.16 at 1 (H100).
TRANSITION_PROGRAMS_PER_SM = 16


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def common_reasons(problem, device, runtime=True) -> list:
    """Why no Triton variant can take this problem here (empty: they can)."""
    err = _triton_import_error()
    if err and runtime:
        return [err]
    reasons = []
    interpreted = planning_settings().interpreted
    if not runtime:
        if device.triton_backend is None:
            reasons.append(f"{device.name}: Triton has no backend for this device")
    elif problem.device_type == "cpu":
        if not (device.simulated and interpreted):
            reasons.append("CPU tensors: Triton kernels need a GPU, or a simulated profile "
                           "(RWKV_BACKENDS_SIMULATE) with TRITON_INTERPRET=1")
    elif device.simulated:
        reasons.append(f"simulated profile {device.simulated} plans CPU tensors only, got {problem.device_type} tensors")
    elif device.triton_backend is None:
        reasons.append(f"{device.name}: Triton has no backend for this device")
    elif not interpreted and triton_target() is None:
        reasons.append("Triton has no active driver for this device")
    if problem.K > MAX_HEAD or problem.V > MAX_HEAD:
        reasons.append(f"head size K={problem.K}, V={problem.V}: the Triton kernels take K, V <= {MAX_HEAD}")
    return reasons


def segments_per_sequence(pairs: int, V: int, block_v: int, multiprocessors: int) -> int:
    """Training splits each sequence into segments that the backward runs in parallel: enough for
    SEGMENT_FILL gradient programs per multiprocessor."""
    return -(-SEGMENT_FILL * multiprocessors // (pairs * -(-V // block_v)))


def training_segments(problem, plan) -> int:
    """segments_per_sequence for a planned problem: the rule both two-pass variants train with."""
    return segments_per_sequence(problem.N * problem.H, problem.V, plan.configs["chunk_bwd_split"].block_v,
                                 plan.device.multiprocessors)


def transition_programs(pairs: int, multiprocessors: int) -> int:
    """Programs per sequence for chunk_transition: TRANSITION_PROGRAMS_PER_SM per multiprocessor in all."""
    return -(-TRANSITION_PROGRAMS_PER_SM * multiprocessors // pairs)


def gluon_fallbacks(problem, device, configs, kernels, segmented=False, sweep_chunk_size=None) -> dict:
    """The tables may ask for a kernel's Gluon implementation, which takes only some problems (K = V =
    64, 16-bit inputs, ...): for the others the Triton kernel runs with the entry's other fields, and
    the plan's config_source says why. {kernel: (config, why)} as Variant.fit_configs returns.
    `sweep_chunk_size`: the segmented backward's sweep chunk size (gluon.unsupported)."""
    from ..kernels import gluon
    from ..kernels.common import _dot_precision, keeps_u
    changed = {}
    gluon_off = planning_settings().gluon == "0"
    for kernel in kernels:
        cfg = configs[kernel]
        if not cfg.gluon:
            continue
        if gluon_off:
            why = f"{GLUON_ENV}=0"
        elif not runs_gluon(device):
            why = f"the Gluon kernels are written for NVIDIA (mma.sync, cp.async), not {device.vendor}"
        else:
            why = gluon.unsupported(kernel, K=problem.K, V=problem.V, chunk_size=cfg.chunk_size,
                                    block_v=cfg.block_v, dtype=problem.dtype,
                                    dot_precision=_dot_precision(cfg, problem.dtype), T=problem.T,
                                    has_u=keeps_u(cfg), segmented=segmented, sweep_chunk_size=sweep_chunk_size)
        if why:
            changed[kernel] = (cfg.with_(gluon=False), f"gluon off: {why}")
    return changed


class _TrainedVariant(Variant):
    """A chunked Triton variant: training goes through kernels/training.py's TrainingPlan, which
    `training(problem, plan)` builds. The torch.library op (ops.py) runs its forward
    (train_forward) and, from what that keeps, its backward (train_backward), eager and compiled."""

    backend = "triton"
    keeps_for_backward = True

    def training(self, problem, plan):
        raise NotImplementedError

    def train(self, r, w, k, v, a, b, state, *, problem, plan, cu_seqlens):
        """(o, final state) with gradients: the torch.library op, forced to this variant."""
        import torch
        o, ht, _ = torch.ops.rwkv_backends.wkv7(r, w, k, v, a, b, state, cu_seqlens, problem.w_form, problem.scale,
                                                self.name, True)
        return o, ht

    def train_forward(self, r, w, k, v, a, b, state, *, problem, plan, cu_seqlens):
        from ..kernels import training
        o, ht, kept, _ = training.training_forward(r, w, k, v, a, b, state, scale=problem.scale,
                                                   cu_seqlens=cu_seqlens, w_form=problem.w_form,
                                                   how=self.training(problem, plan))
        return o, ht, kept

    def train_backward(self, r, w, k, v, a, b, state, do, dstate, kept, *, problem, plan, cu_seqlens):
        from ..kernels import training
        how = self.training(problem, plan)
        shapes, seg_len = training.kept_layout(r, k, v, cu_seqlens, how)
        kept = tuple(None if shape is None else x.view(shape) for x, shape in zip(kept, shapes))
        return training.training_backward(r, w, k, v, a, b, state, do, dstate, kept, seg_len, scale=problem.scale,
                                          cu_seqlens=cu_seqlens, w_form=problem.w_form, how=how)


class TritonChunk(_TrainedVariant):
    """One program per (sequence, head, V block) walks the chunks with the state on chip (chunk_fwd);
    training keeps the chunk matrices (and U where chunk_bwd's config asks: common.keeps_u), and the backward
    rebuilds the chunk states (chunk_states from U, or a forward that loads the matrices) before
    the gradient kernel walks the chunks back (chunk_bwd)."""

    name = "triton.chunk"
    kernels = ("chunk_fwd", "chunk_bwd", "chunk_states")

    def reasons(self, problem, device, runtime=True):
        return common_reasons(problem, device, runtime)

    def fit_configs(self, problem, device, configs):
        return gluon_fallbacks(problem, device, configs, ("chunk_fwd", "chunk_bwd", "chunk_states"))

    def training(self, problem, plan):
        from ..kernels.training import TrainingPlan
        return TrainingPlan(plan.configs["chunk_fwd"], plan.configs["chunk_bwd"], cfg_states=plan.configs["chunk_states"])

    def run(self, r, w, k, v, a, b, state, *, problem, plan, cu_seqlens):
        from ..kernels.chunk import chunk_forward
        if problem.needs_grad:
            return self.train(r, w, k, v, a, b, state, problem=problem, plan=plan, cu_seqlens=cu_seqlens)
        o, ht, _ = chunk_forward(r, w, k, v, a, b, state, scale=problem.scale, cu_seqlens=cu_seqlens,
                                 w_form=problem.w_form, cfg=plan.configs["chunk_fwd"],
                                 store_final=problem.output_final_state)
        return o, ht


def few_pairs_reasons(problem, device) -> list:
    """The two-pass variants exist for fewer (sequence, head) pairs than multiprocessors."""
    pairs = problem.N * problem.H
    if not device.multiprocessors:
        return ["the device's multiprocessor count is unknown, so the fill rule cannot apply"]
    if pairs >= device.multiprocessors:
        return [f"{pairs} (sequence, head) pairs fill the {device.multiprocessors} multiprocessors: "
                "the one-pass kernels of triton.chunk are faster there"]
    return []


class TritonChunkTwoPass(_TrainedVariant):
    """Few (sequence, head) pairs: one program per pair would leave most of the device idle while it
    walks its chunks. Pass 1 builds every chunk's matrices with all chunks in parallel (chunk_prep);
    pass 2 walks the chunks, loading them, with V split over more programs (chunk_fwd_loaded), at
    chunk_prep's chunk size. Training also keeps the start state of each segment of the sequence;
    the backward sweeps the state gradient back to every segment's end, then recomputes the chunk
    states (chunk_recompute; chunk_states where chunk_bwd_split's config has the forward keep U) and
    the gradients (chunk_bwd_split) of all segments at once.
    benchmarks/NOTES.md, changes 11 and 24."""

    name = "triton.chunk_twopass"
    kernels = ("chunk_prep", "chunk_fwd_loaded", "chunk_bwd_split", "chunk_recompute", "chunk_states")

    def reasons(self, problem, device, runtime=True):
        return common_reasons(problem, device, runtime) + few_pairs_reasons(problem, device)

    def fit_configs(self, problem, device, configs):
        # Its backward runs segment by segment: the state rebuild, and head 128's K-split Gluon
        # gradient kernel, whose dZ comes from the sweep at the forward's chunk size (prep's).
        changed = gluon_fallbacks(problem, device, configs, ("chunk_states", "chunk_bwd_split"), segmented=True,
                                  sweep_chunk_size=configs["chunk_prep"].chunk_size)
        # Its forward builds the chunk matrices, then walks whole sequences (storing the segments' start
        # states) on them.
        return changed | gluon_fallbacks(problem, device, configs, ("chunk_prep", "chunk_fwd_loaded"))

    @staticmethod
    def _prep_programs(problem, plan):
        # A few programs per multiprocessor in pass 1: each walks every P-th chunk of its sequence.
        return -(-4 * plan.device.multiprocessors // (problem.N * problem.H))

    def training(self, problem, plan):
        from ..kernels.training import TrainingPlan
        return TrainingPlan(plan.configs["chunk_fwd_loaded"], plan.configs["chunk_bwd_split"],
                            cfg_prep=plan.configs["chunk_prep"], prep_programs=self._prep_programs(problem, plan),
                            segments=training_segments(problem, plan), cfg_recompute=plan.configs["chunk_recompute"],
                            cfg_states=plan.configs["chunk_states"])

    def run(self, r, w, k, v, a, b, state, *, problem, plan, cu_seqlens):
        from ..kernels.twopass import twopass_forward
        if problem.needs_grad:
            return self.train(r, w, k, v, a, b, state, problem=problem, plan=plan, cu_seqlens=cu_seqlens)
        o, ht, _ = twopass_forward(r, w, k, v, a, b, state, scale=problem.scale, cu_seqlens=cu_seqlens,
                                   w_form=problem.w_form, cfg_prep=plan.configs["chunk_prep"],
                                   cfg_fwd=plan.configs["chunk_fwd_loaded"],
                                   programs_per_sequence=self._prep_programs(problem, plan),
                                   store_final=problem.output_final_state)
        return o, ht


class TritonChunkTransition(_TrainedVariant):
    """Few (sequence, head) pairs at K, V <= 64: the two-pass variant with a shorter dependent chain.
    Pass 1 builds every chunk's transition (S' = M S + P V, O = R̃ S + Q V: kernels/transition.py) with
    all chunks in parallel; pass 2 walks them, one K x K product per chunk on the chain where the
    loaded forward has three. Training keeps M and R̃ and the segments' start states; its backward
    sweeps dS ← Mᵀ dS + R̃ᵀ dO back to every segment's end, then runs the segmented backward of
    triton.chunk_twopass. benchmarks/NOTES.md, change 36."""

    name = "triton.chunk_transition"
    kernels = ("chunk_transition", "chunk_fwd_transition", "chunk_bwd_split", "chunk_recompute")

    def reasons(self, problem, device, runtime=True):
        reasons = common_reasons(problem, device, runtime) + few_pairs_reasons(problem, device)
        if max(problem.K, problem.V) > TRANSITION_MAX_HEAD:
            reasons.append(f"head size K={problem.K}, V={problem.V}: above {TRANSITION_MAX_HEAD} the K x K "
                           "transitions cost more than they save; triton.chunk_twopass serves it")
        return reasons

    @staticmethod
    def _programs(problem, plan):
        return transition_programs(problem.N * problem.H, plan.device.multiprocessors)

    @staticmethod
    def _configs(plan):
        """(transition config, walk config at the transition's chunk size)."""
        cfg_trans = plan.configs["chunk_transition"]
        return cfg_trans, plan.configs["chunk_fwd_transition"].with_(chunk_size=cfg_trans.chunk_size)

    def training(self, problem, plan):
        from ..kernels.training import TrainingPlan
        cfg_trans, cfg_walk = self._configs(plan)
        return TrainingPlan(cfg_walk, plan.configs["chunk_bwd_split"], cfg_prep=cfg_trans,
                            prep_programs=self._programs(problem, plan), segments=training_segments(problem, plan),
                            cfg_recompute=plan.configs["chunk_recompute"], transitions=True)

    def run(self, r, w, k, v, a, b, state, *, problem, plan, cu_seqlens):
        from ..kernels.transition import transition_twopass
        if problem.needs_grad:
            return self.train(r, w, k, v, a, b, state, problem=problem, plan=plan, cu_seqlens=cu_seqlens)
        cfg_trans, cfg_walk = self._configs(plan)
        o, ht, _ = transition_twopass(r, w, k, v, a, b, state, scale=problem.scale, cu_seqlens=cu_seqlens,
                                      w_form=problem.w_form, cfg_trans=cfg_trans, cfg_walk=cfg_walk,
                                      programs_per_sequence=self._programs(problem, plan),
                                      store_final=problem.output_final_state)
        return o, ht


class TritonRecurrent(Variant):
    name = "triton.recurrent"
    backend = "triton"
    kernels = ("recurrent_fwd",)
    state_dtypes = ("float32", "bfloat16", "float16")   # loads and stores it as given, computes in float32

    def reasons(self, problem, device, runtime=True):
        reasons = common_reasons(problem, device, runtime)
        if problem.needs_grad:
            reasons.append("forward only: gradients come from triton.chunk")
        return reasons

    def fit_configs(self, problem, device, configs):
        # One program per (sequence, head, V block). With few pairs (B=1 decode) most multiprocessors
        # idle and a step takes one program's latency: halve the V block until the programs fill the
        # device or it reaches MIN_DECODE_BLOCK_V. B1 H32 K64 on the H100: 2.40 us per step at
        # block_v 64, 1.89 at 16; B256 is within 2% at any of them.
        cfg = configs["recurrent_fwd"]
        pairs, sms = problem.N * problem.H, device.multiprocessors
        block_v = bv = min(cfg.block_v, padded_head(problem.V))
        while sms and bv > MIN_DECODE_BLOCK_V and pairs * -(-problem.V // bv) < sms:
            bv //= 2
        if bv == block_v:
            return {}
        programs = pairs * -(-problem.V // block_v)
        return {"recurrent_fwd": (cfg.with_(block_v=bv), f"block_v {block_v} -> {bv}: at {block_v}, {pairs} "
                                  f"(sequence, head) pairs make {programs} programs for {sms} multiprocessors")}

    def run(self, r, w, k, v, a, b, state, *, problem, plan, cu_seqlens):
        from ..kernels.recurrent import recurrent_forward
        return recurrent_forward(r, w, k, v, a, b, state, scale=problem.scale, cu_seqlens=cu_seqlens,
                                 w_form=problem.w_form, cfg=plan.configs["recurrent_fwd"],
                                 store_final=problem.output_final_state)


register(TritonChunk())
register(TritonChunkTwoPass())
register(TritonChunkTransition())
register(TritonRecurrent())
