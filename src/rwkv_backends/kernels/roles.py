"""One spec per kernel role: the table key, the kernel (and its Gluon implementation, if any), the
config fields it reads, how the tune tool sweeps and runs it, and how ahead-of-time compilation
launches it. The launchers, kernels/aot.py, compile_check.py and tune.py read these specs.

Roles are the tables' keys (config.KERNELS), plus the two state-gradient sweeps, which take
another role's table entry (`config_from`). A role's kernel is looked up by name when needed, so
reading a spec imports no kernel module (the Gluon ones import only where Gluon is available).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from ..config import KERNELS
from .common import _pow2
from .gluon import HEAD, KSPLIT_BLOCK_K, KSPLIT_HEAD

# The AOT signature's type of each runtime argument, by name: the inputs and the gradients of the
# inputs take the inputs' dtype, everything else a fixed type.
_INPUT_DTYPE_ARGS = frozenset(("r", "w", "k", "v", "a", "b", "o", "do", "dz", "dr", "dw", "dk", "dv", "da", "db"))
_ARG_TYPES = {"chunk_offsets": "*i64", "seg_offsets": "*i64", "cu_seqlens": "*i32", "scale": "fp32", "T": "i32",
              "seg_chunks": "i32", "c_lo": "i32", "c_hi": "i32", "part_stride": "i64"}
_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def signature(fn, dtype: str, constexprs: dict) -> dict:
    """The ahead-of-time signature of kernel `fn` for `dtype` inputs: its runtime arguments in
    order, typed by name (float32 pointers unless named otherwise), then its constexprs."""
    t = "*" + _TYPES[dtype]
    sig = {n: t if n in _INPUT_DTYPE_ARGS else _ARG_TYPES.get(n, "*fp32") for n in fn.arg_names if n not in constexprs}
    return sig | {n: "constexpr" for n in constexprs}


def _load(module: str, name: str):
    return getattr(importlib.import_module(module, __package__), name)


@dataclasses.dataclass(frozen=True)
class GluonSpec:
    """A role's Gluon implementation (kernels/gluon/<module>.py, NVIDIA sm80+): the launch it takes
    whatever its config says, and what it is laid out for (gluon.unsupported reads these)."""

    module: str
    kernel: str
    title: str                  # what messages call it
    precision: str              # the dot precision it computes at (the tables' for this role)
    num_warps: int
    block_v: int | None         # V columns of one program (None: no V blocks)
    heads: tuple = (HEAD,)      # K = V head sizes it is laid out for
    own_v_blocks: bool = False  # V blocks of its own whatever block_v says (else all V in one program)
    segmented_only: bool = False  # runs the segments of the two-pass backward only
    # Its constexprs as training launches it, for ahead-of-time compiles: (cfg, K, V) -> dict.
    aot_constexprs: Callable | None = None

    @property
    def launch(self) -> dict:
        """The KernelConfig fields its launch fixes (the tune tool folds its candidates to these)."""
        return dict(num_warps=self.num_warps) | ({} if self.block_v is None else dict(block_v=self.block_v))

    def load(self):
        return _load(f".gluon.{self.module}", self.kernel)


@dataclasses.dataclass(frozen=True)
class TuneSpec:
    """How the tune tool sweeps a role: the candidate values of the fields it sweeps, the problem
    (B, T, H) it times at head 64, whether its check is on gradients, and how it runs (tune.py's
    runner of that name)."""

    sweep: dict
    shape: tuple
    runner: str
    backward: bool = False


@dataclasses.dataclass(frozen=True)
class Role:
    name: str
    module: str                 # kernels/<module>.py
    kernel: str
    # Its constexprs for ahead-of-time compiles, as its largest variant launches: (cfg, K, V, dot
    # precision) -> dict.
    aot_constexprs: Callable
    gluon: GluonSpec | None = None
    tune: TuneSpec | None = None
    config_from: str | None = None   # a sweep's role, whose table entry it takes

    @property
    def fields(self) -> tuple:
        """The KernelConfig fields it reads (config.KERNELS "uses")."""
        return KERNELS[self.config_from or self.name]["uses"]

    def load(self):
        return _load(f".{self.module}", self.kernel)


def _base(cfg, K, V):
    return dict(H=1, K=K, V=V, BK=_pow2(K), BV=min(_pow2(V), cfg.block_v), W_FORM=0)


def _chunk_fwd(mats):
    # MATS=1 builds and stores the chunk matrices (the training forward, the largest variant).
    return lambda cfg, K, V, prec: _base(cfg, K, V) | dict(
        BT=cfg.chunk_size, HAS_STATE=True, STORE_FINAL=True, STORE_O=True, STORE_STATES=False, MATS=mats, SEGMENTS=0,
        STORE_U=mats != 0, IS_VARLEN=False, DOT_PRECISION=prec)


def _chunk_fwd_loaded(cfg, K, V, prec):
    # MATS=2 loads the matrices and SEGMENTS=1 stores the segments' start states (two-pass training).
    return _base(cfg, K, V) | dict(BT=cfg.chunk_size, HAS_STATE=True, STORE_FINAL=True, STORE_O=True,
                                   STORE_STATES=False, MATS=2, SEGMENTS=1, STORE_U=True, IS_VARLEN=False,
                                   DOT_PRECISION=prec)


def _chunk_recompute(cfg, K, V, prec):
    # every segment at once, building and storing the chunk matrices, storing the chunk states
    return _base(cfg, K, V) | dict(BT=cfg.chunk_size, HAS_STATE=True, STORE_FINAL=False, STORE_O=False,
                                   STORE_STATES=True, MATS=1, SEGMENTS=2, STORE_U=False, IS_VARLEN=False,
                                   DOT_PRECISION=prec)


def _chunk_bwd(segments):
    # chunk_bwd_split runs segments in parallel (SEGMENTS=2), as two-pass training does.
    def constexprs(cfg, K, V, prec):
        base = _base(cfg, K, V)
        return base | dict(BT=cfg.chunk_size, HAS_DHT=True, STORE_DH0=True, IS_VARLEN=False, SPLIT_V=base["BV"] < V,
                           SEGMENTS=segments, HAS_U=cfg.keep_u, DOT_PRECISION=prec)
    return constexprs


def _gluon_fwd(cfg, K, V):      # the training forward: it stores the chunk matrices and U
    return dict(H=1, K=K, BT=cfg.chunk_size, W_FORM=0, HAS_STATE=True, STORE_FINAL=True, STORE_O=True,
                STORE_MATS=True, STORE_U=True, IS_VARLEN=False, NW=ROLES["chunk_fwd"].gluon.num_warps)


def _gluon_bwd(cfg, K, V):
    return dict(H=1, K=K, BT=cfg.chunk_size, W_FORM=0, HAS_DHT=True, STORE_DH0=True, IS_VARLEN=False)


def _gluon_states(cfg, K, V):
    g = ROLES["chunk_states"].gluon
    return dict(H=1, K=K, V=V, BV=g.block_v, BT=cfg.chunk_size, W_FORM=0, HAS_STATE=True, SEGMENTED=K == KSPLIT_HEAD,
                IS_VARLEN=False, NW=g.num_warps)


def _gluon_prep(cfg, K, V):     # head 128's chunk matrices
    return dict(H=1, K=K, BT=cfg.chunk_size, W_FORM=0, IS_VARLEN=False, NW=ROLES["chunk_prep"].gluon.num_warps)


def _gluon_loaded(cfg, K, V):   # head 128's two-pass training forward: segments' states and U
    g = ROLES["chunk_fwd_loaded"].gluon
    return dict(H=1, K=K, V=V, BV=g.block_v, BT=cfg.chunk_size, W_FORM=0, HAS_STATE=True, STORE_FINAL=True,
                STORE_O=True, STORE_SEGMENTS=True, STORE_U=True, IS_VARLEN=False, NW=g.num_warps)


def _gluon_ksplit(cfg, K, V):   # the K-split gradient kernel of the segmented backward
    return dict(H=1, K=K, V=V, BK=KSPLIT_BLOCK_K, BT=cfg.chunk_size, W_FORM=0, IS_VARLEN=False)


def _gluon_dstate(cfg, K, V):   # head 128's state-gradient sweep, storing dZ and dv
    g = ROLES["chunk_dstate"].gluon
    return dict(H=1, K=K, V=V, BV=g.block_v, BT=cfg.chunk_size, W_FORM=0, HAS_DHT=True, STORE_DH0=True,
                IS_VARLEN=False, NW=g.num_warps, DS_BF16=True)


_HEAD128 = (KSPLIT_HEAD,)
_ROLES = (
    Role("chunk_fwd", "chunk", "chunk_fwd_kernel", _chunk_fwd(1),
         GluonSpec("forward", "chunk_fwd_gluon_kernel", "forward", "tf32", 4, 64, aot_constexprs=_gluon_fwd),
         # num_stages lets the next chunk's loads start while this chunk's dots run: 3 stages took 9% off
         # the one-pass forward on the H100, 2 almost nothing.
         # (ieee dots for 16-bit inputs are 4.2x slower at the same accuracy bar.)
         TuneSpec(dict(chunk_size=(16, 32), block_v=(32, 64), num_warps=(4, 8), num_stages=(1, 2, 3),
                       dot_precision=("tf32",)), (8, 4096, 32), "forward")),
    Role("chunk_bwd", "backward", "chunk_bwd_kernel", _chunk_bwd(0),
         GluonSpec("backward", "chunk_bwd_gluon_kernel", "gradient kernel", "bf16", 8, 64, aot_constexprs=_gluon_bwd),
         # "bf16": the gradient kernels' products on bfloat16 operands (its in-chunk pair products stay
         # tf32: kernels/common.py `_pair_dot`). Half the tensor-core steps and operand registers: training
         # B8 T4096 H32 8.85 -> 6.91 ms on the H100, gradient errors up to 3.7e-3.
         # keep_u: the training forward keeps U and the backward rebuilds the chunk states from it
         # (chunk_states): training B8 T4096 H32 6.82 -> 6.36 ms on the H100.
         TuneSpec(dict(chunk_size=(16, 32), num_warps=(4, 8), num_stages=(1, 2, 3), dot_precision=("tf32", "bf16"),
                       keep_u=(False, True)), (8, 4096, 32), "backward", backward=True)),
    Role("chunk_states", "chunk", "chunk_states_kernel",
         lambda cfg, K, V, prec: _base(cfg, K, V) | dict(BT=cfg.chunk_size, HAS_STATE=True, SEGMENTS=0,
                                                         IS_VARLEN=False, DOT_PRECISION=prec),
         GluonSpec("states", "chunk_states_gluon_kernel", "state rebuild", "tf32", 4, 64, heads=(HEAD, KSPLIT_HEAD),
                   own_v_blocks=True, aot_constexprs=_gluon_states),
         # Timed alone, on the U of the training forward that the table's chunk_bwd entry asks for.
         TuneSpec(dict(block_v=(32, 64), num_warps=(1, 2, 4), num_stages=(2, 3, 4), dot_precision=("tf32",)),
                  (8, 4096, 32), "backward", backward=True)),
    Role("chunk_prep", "twopass", "chunk_prep_kernel",
         lambda cfg, K, V, prec: dict(H=1, K=K, BT=cfg.chunk_size, BKK=min(_pow2(K), cfg.block_k), W_FORM=0,
                                      IS_VARLEN=False, DOT_PRECISION=prec),
         GluonSpec("prep", "chunk_prep_gluon_kernel", "chunk-matrix build", "tf32", 4, None, heads=_HEAD128,
                   own_v_blocks=True, aot_constexprs=_gluon_prep),
         # the two-pass prefill serves few (sequence, head) pairs: one long sequence
         TuneSpec(dict(chunk_size=(16, 32), block_k=(16, 32), num_warps=(2, 4), dot_precision=("tf32",)),
                  (1, 16384, 32), "prep")),
    Role("chunk_fwd_loaded", "chunk", "chunk_fwd_kernel", _chunk_fwd_loaded,
         GluonSpec("loaded_walks", "chunk_fwd_loaded_gluon_kernel", "loaded forward", "tf32", 4, 64, heads=_HEAD128,
                   own_v_blocks=True, aot_constexprs=_gluon_loaded),
         # Timed on the matrices of chunk_prep's table entry at the same chunk size.
         TuneSpec(dict(chunk_size=(16, 32), block_v=(16, 32, 64), num_warps=(4,), num_stages=(1, 3),
                       dot_precision=("tf32",)), (1, 16384, 32), "loaded")),
    # Chunk transitions (K, V <= 64). The walk's entry serves its state-gradient sweep too, so both
    # are timed together, on the transitions of chunk_transition's table entry.
    Role("chunk_transition", "transition", "chunk_transition_kernel",
         lambda cfg, K, V, prec: dict(H=1, K=K, BT=cfg.chunk_size, BK=_pow2(K), BKK=min(_pow2(K), cfg.block_k),
                                      W_FORM=0, IS_VARLEN=False, DOT_PRECISION=prec),
         tune=TuneSpec(dict(chunk_size=(16, 32, 64), block_k=(32,), num_warps=(2, 4), dot_precision=("tf32",)),
                       (1, 16384, 32), "transition")),
    # as two-pass training runs it: storing the segments' states
    Role("chunk_fwd_transition", "transition", "chunk_transition_fwd_kernel",
         lambda cfg, K, V, prec: dict(H=1, K=K, V=V, BT=cfg.chunk_size, BK=_pow2(K), BV=min(_pow2(V), cfg.block_v),
                                      HAS_STATE=True, STORE_FINAL=True, STORE_O=True, SEGMENTS=1, IS_VARLEN=False,
                                      DOT_PRECISION=prec),
         tune=TuneSpec(dict(block_v=(16, 32, 64), num_warps=(2, 4), num_stages=(1, 3, 4), dot_precision=("tf32",)),
                       (1, 16384, 32), "transition")),
    Role("chunk_bwd_split", "backward", "chunk_bwd_kernel", _chunk_bwd(2),
         GluonSpec("backward_ksplit", "chunk_bwd_ksplit_gluon_kernel", "K-split gradient kernel", "bf16", 8, 128,
                   heads=_HEAD128, segmented_only=True, aot_constexprs=_gluon_ksplit),
         # The segmented backward of two-pass training: segments give the programs, so wide V blocks.
         TuneSpec(dict(chunk_size=(16,), block_v=(32, 64, 128), num_warps=(4, 8), num_stages=(1, 2, 3),
                       dot_precision=("tf32", "bf16"), keep_u=(False, True)), (1, 16384, 32), "segmented_backward",
                  backward=True)),
    Role("chunk_recompute", "chunk", "chunk_fwd_kernel", _chunk_recompute,
         tune=TuneSpec(dict(chunk_size=(16,), block_v=(32, 64, 128), num_warps=(4, 8), num_stages=(1, 3),
                            dot_precision=("tf32",)), (1, 16384, 32), "segmented_backward", backward=True)),
    Role("recurrent_fwd", "recurrent", "recurrent_fwd_kernel",
         lambda cfg, K, V, prec: _base(cfg, K, V) | dict(HAS_STATE=True, STORE_FINAL=True, IS_VARLEN=False),
         tune=TuneSpec(dict(block_v=(16, 32, 64), num_warps=(1, 2, 4)), (256, 1, 32), "recurrent")),
    # The sweeps of the segmented backward, at their walks' configs. chunk_dstate as its larger
    # variant: also storing dZ and dv, as for head 128's K-split Gluon gradient kernel.
    Role("chunk_dstate", "twopass", "chunk_dstate_kernel",
         lambda cfg, K, V, prec: _base(cfg, K, V) | dict(BT=cfg.chunk_size, HAS_DHT=True, STORE_DH0=True,
                                                         IS_VARLEN=False, STORE_DZ_DV=True, DOT_PRECISION=prec),
         GluonSpec("loaded_walks", "chunk_dstate_gluon_kernel", "state-gradient sweep", "tf32", 4, 64, heads=_HEAD128,
                   own_v_blocks=True, segmented_only=True, aot_constexprs=_gluon_dstate),
         config_from="chunk_fwd_loaded"),
    Role("chunk_dstate_transition", "transition", "chunk_transition_dstate_kernel",
         lambda cfg, K, V, prec: dict(H=1, K=K, V=V, BT=cfg.chunk_size, BK=_pow2(K), BV=min(_pow2(V), cfg.block_v),
                                      HAS_DHT=True, STORE_DH0=True, IS_VARLEN=False, DOT_PRECISION=prec),
         config_from="chunk_fwd_transition"),
)
ROLES = {role.name: role for role in _ROLES}
