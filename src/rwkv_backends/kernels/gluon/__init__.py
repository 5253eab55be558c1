"""The chunked paths' kernels written in Gluon, Triton's layout-explicit dialect, for NVIDIA sm80 and
later (mma.sync and cp.async). What `KernelConfig.gluon` selects for each kernel; the kernels of
kernels/*.py are the same math and the reference for them.

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
sm90 (ptxas) and only a card runs them. Each kernel's launch shape, precision and scope are its
role's GluonSpec (kernels/roles.py).
"""

from __future__ import annotations

import torch

# Whether Gluon is usable here, decided once: the kernel modules of this package import it freely
# and are imported only when it is.
IMPORT_ERROR: str | None = None
try:
    from . import api as _api
except ImportError as exc:   # pragma: no cover - Triton before Gluon
    IMPORT_ERROR = f"triton.experimental.gluon is not importable ({exc})"
else:
    IMPORT_ERROR = _api.MISSING


def available() -> bool:
    """Whether this Triton release's Gluon can build the kernels (IMPORT_ERROR says why not)."""
    return IMPORT_ERROR is None


# The head size of the one-pass kernels, and the chunk size every kernel takes.
HEAD = 64
CHUNK = 16
# Head size 128's two-pass training: the loaded forward (chunk_fwd_loaded_gluon_kernel), the
# state-gradient sweep (chunk_dstate_gluon_kernel), and the gradient kernel split over two programs
# of KSPLIT_BLOCK_K columns of K (chunk_bwd_ksplit_gluon_kernel).
KSPLIT_HEAD = 128
KSPLIT_BLOCK_K = 64


def unsupported(kernel: str, *, K: int, V: int, chunk_size: int, block_v: int, dtype: torch.dtype,
                dot_precision: str, T: int = 2, has_u: bool = True, segmented: bool = False,
                mats_mode: str = "build", store_states: bool = False, sweep_chunk_size: int | None = None) -> str | None:
    """Why `kernel`'s Gluon implementation cannot take a launch (None: it can). Device and
    Triton-release checks are known_issues' "gluon-experimental". `segmented`: the launch walks
    segments (the recompute, the segmented backward); `sweep_chunk_size`: for chunk_bwd_split, the
    chunk size of the state-gradient sweep that gives it dZ (the two-pass forward's)."""
    from ..roles import ROLES
    spec = ROLES[kernel].gluon if kernel in ROLES else None
    if spec is None:
        return f"{kernel} has no Gluon implementation"
    name = f"the Gluon {spec.title}"
    if IMPORT_ERROR:
        return IMPORT_ERROR
    if T == 1:
        # Triton compiles an integer argument equal to 1 as a constant; with T = 1 the kernels' masked
        # cp.async fails to lower (Triton 3.6, seen on an H100).
        return f"T = 1: {name} is not compiled for one-step sequences"
    if K != V or K not in spec.heads:
        return f"K = {K}, V = {V}: {name} is laid out for K = V = {' or '.join(map(str, spec.heads))}"
    head = K
    if chunk_size != CHUNK:
        return f"chunk_size {chunk_size}: {name} takes chunks of {CHUNK}"
    if not spec.own_v_blocks and block_v < head:
        return f"block_v {block_v}: {name} takes all {head} V columns in one program"
    if dtype not in (torch.bfloat16, torch.float16) or dot_precision != spec.precision:
        return (f"{str(dtype).replace('torch.', '')} inputs with dot precision {dot_precision!r}: {name} takes "
                f"16-bit inputs at dot precision {spec.precision!r}")
    if kernel in ("chunk_bwd", "chunk_bwd_split") and not has_u:
        return f"keep_u is off: {name} loads the U the forward kept"
    if kernel == "chunk_fwd_loaded":
        if segmented or store_states:
            return f"{name} stores segment start states but walks no segments and stores no chunk states"
        return None
    if spec.segmented_only:
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
