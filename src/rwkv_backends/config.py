"""The one config schema shared by the Triton kernels, the vendor tuning tables, the known-issue
constraints, the dispatcher and the tune tool.

A `KernelConfig` is what a kernel launch needs beyond the problem itself. Vendor tables hold them
per architecture (`rwkv_backends/<vendor>/tables/<arch>.json`, read by tuning.py); known issues narrow them
(`known_issues.py`); `explain()` and the doctor print them with `as_dict()`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

# Kernels the tables tune. "chained_dots" marks kernels whose results of one tl.dot feed another
# (triton#4492 concerns those); "uses" names the KernelConfig fields the kernel reads.
_CHUNK_FIELDS = ("chunk_size", "block_v", "num_warps", "num_stages", "dot_precision")
_GRADIENT_FIELDS = _CHUNK_FIELDS + ("keep_u",)
KERNELS = {
    "chunk_fwd": {"chained_dots": True, "uses": _CHUNK_FIELDS + ("gluon",),
                  "doc": "chunked forward (training and prefill); builds the chunk matrices in its loop"},
    "chunk_bwd": {"chained_dots": True, "uses": _GRADIENT_FIELDS + ("gluon",),
                  "doc": "chunked backward: gradients of r, w, k, v, a, b and the initial state"},
    "chunk_states": {"chained_dots": False, "uses": ("block_v", "num_warps", "num_stages", "dot_precision", "gluon"),
                     "doc": "the backward's chunk-state recompute from the U the training forward kept (when the "
                            "gradient kernel's keep_u or gluon asks for it), at the gradient kernel's chunk size"},
    "chunk_prep": {"chained_dots": True, "uses": ("chunk_size", "block_k", "num_warps", "num_stages", "dot_precision",
                                                  "gluon"),
                   "doc": "every chunk's matrices in one launch, all chunks in parallel (two-pass prefill)"},
    "chunk_fwd_loaded": {"chained_dots": True, "uses": _CHUNK_FIELDS + ("gluon",),
                         "doc": "chunked forward that loads chunk_prep's matrices (its chunk size must be chunk_prep's)"},
    "chunk_transition": {"chained_dots": True, "uses": ("chunk_size", "block_k", "num_warps", "num_stages", "dot_precision"),
                         "doc": "every chunk's transition (S' = M S + P V, O = R̃ S + Q V) in one launch, all chunks in "
                                "parallel (few-pair prefill and training, K, V <= 64)"},
    "chunk_fwd_transition": {"chained_dots": False, "uses": ("block_v", "num_warps", "num_stages", "dot_precision"),
                             "doc": "the walk over chunk_transition's transitions, at its chunk size; the state-gradient "
                                    "sweep of that training takes the same launch shape"},
    "chunk_bwd_split": {"chained_dots": True, "uses": _GRADIENT_FIELDS + ("gluon",),
                        "doc": "chunked backward, V split over programs, for few (sequence, head) pairs (two-pass "
                               "training; its chunk size rules the prep and forward there)"},
    "chunk_recompute": {"chained_dots": True, "uses": _CHUNK_FIELDS,
                        "doc": "the segmented backward's chunk-state recompute, every segment at once (two-pass "
                               "training): builds the chunk matrices at chunk_bwd_split's chunk size"},
    "recurrent_fwd": {"chained_dots": False, "uses": ("block_v", "num_warps", "num_stages"),
                      "doc": "step-by-step forward for decode and short sequences"},
}

# "bf16": operands rounded to bfloat16, float32 accumulation (kernels/common.py `_dot`).
DOT_PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16")


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of one kernel. Fields a kernel does not use are ignored by it."""

    chunk_size: int = 16          # time steps per chunk (chunked kernels); 16 is tl.dot's minimum
    block_v: int = 64             # columns of the state (V) one program owns
    block_k: int = 64             # columns of K one step of the chunk-matrix build takes (chunk_prep)
    num_warps: int = 4
    num_stages: int = 1
    # Precision of tl.dot on float32 operands inside the kernel. Float32 *inputs* always get "ieee"
    # unless the caller opts in (SPEC §2: no silent TF32); tables may pick "tf32" for 16-bit inputs.
    dot_precision: str = "ieee"
    # Gradient kernels: the training forward keeps U (U_t = a_tᵀ h_{t-1}, float32) for them, and
    # the backward rebuilds the chunk states from it (chunk_states) instead of from the chunk
    # matrices (kernels/common.py `empty_u`).
    keep_u: bool = False
    # chunk_fwd, chunk_bwd and chunk_states: run the kernel's Gluon implementation
    # (kernels/gluon/: NVIDIA sm80+, K = V = 64, 16-bit inputs; `unsupported()` there says
    # what else each takes). It launches with its own warps, V block and pipeline (kernels/roles.py GluonSpec),
    # so num_warps, num_stages, block_v and vendor_options apply only to the Triton kernel.
    gluon: bool = False
    # Vendor-specific launch keywords passed through to the Triton launcher, e.g. Intel's
    # grf_mode, AMD's waves_per_eu / matrix_instr_nonkdim. Kept as a sorted tuple of pairs so
    # the config stays hashable (it is part of the dispatch cache key).
    vendor_options: tuple = field(default_factory=tuple)

    def __post_init__(self):
        if self.chunk_size < 16 or self.chunk_size & (self.chunk_size - 1):
            raise ValueError(f"chunk_size: expected a power of two >= 16, got {self.chunk_size}")
        if self.block_v < 16 or self.block_v & (self.block_v - 1):
            raise ValueError(f"block_v: expected a power of two >= 16, got {self.block_v}")
        if self.block_k < 16 or self.block_k & (self.block_k - 1):
            raise ValueError(f"block_k: expected a power of two >= 16, got {self.block_k}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps: expected 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.dot_precision not in DOT_PRECISIONS:
            raise ValueError(f"dot_precision: expected one of {DOT_PRECISIONS}, got {self.dot_precision!r}")
        if not isinstance(self.keep_u, bool):
            raise ValueError(f"keep_u: expected True or False, got {self.keep_u!r}")
        if not isinstance(self.gluon, bool):
            raise ValueError(f"gluon: expected True or False, got {self.gluon!r}")

    @classmethod
    def make(cls, **kw) -> "KernelConfig":
        opts = kw.pop("vendor_options", {}) or {}
        return cls(**kw, vendor_options=tuple(sorted(dict(opts).items())))

    def with_(self, **kw) -> "KernelConfig":
        return replace(self, **kw)

    def launch_options(self) -> dict:
        """Keyword arguments for `kernel[grid](..., **options)`."""
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, **dict(self.vendor_options)}

    def as_dict(self) -> dict:
        d = asdict(self)
        d["vendor_options"] = dict(self.vendor_options)
        return d


def padded_head(n: int) -> int:
    """The power of two, at least 16, that the kernels pad a head dimension to: a block_v wider
    than padded_head(V) launches exactly as padded_head(V)."""
    return max(16, 1 << (n - 1).bit_length())


def head_bucket(K: int, V: int) -> str:
    """Tables are keyed by the padded head size: "64" covers K, V <= 64, "128" up to 128."""
    return "64" if max(K, V) <= 64 else "128"
