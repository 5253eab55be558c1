"""NVIDIA tuning tables: {arch: {kernel: {head_bucket: KernelConfig}}}.

"default" serves any architecture without an entry of its own. Entries are written by
`python -m rwkv_backends.tune` on the card; PROVENANCE says which were measured and where.
"""

from ..config import KernelConfig as C

_DEFAULT = {
    "chunk_fwd": {"64": C(chunk_size=16, block_v=64, num_warps=4), "128": C(chunk_size=16, block_v=64, num_warps=4)},
    "chunk_bwd": {"64": C(chunk_size=16, block_v=64, num_warps=4), "128": C(chunk_size=16, block_v=64, num_warps=4)},
    "chunk_prep": {"64": C(chunk_size=16, block_k=32, num_warps=2), "128": C(chunk_size=16, block_k=32, num_warps=2)},
    "chunk_fwd_loaded": {"64": C(block_v=16, num_warps=4), "128": C(block_v=32, num_warps=4)},
    "chunk_bwd_split": {"64": C(chunk_size=16, block_v=32, num_warps=4), "128": C(chunk_size=16, block_v=64, num_warps=4)},
    "recurrent_fwd": {"64": C(block_v=16, num_warps=2), "128": C(block_v=32, num_warps=4)},
}

# sm90, measured on an H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0, 2026-11-27. tf32 applies to
# 16-bit inputs only; float32 inputs always get "ieee".
# - K/V <= 64, one-pass kernels: `python -m rwkv_backends.tune` (benchmarks/tune-sm90-2026-11-27.json;
#   chunk_bwd from tune-sm90-2026-11-27c.json: num_stages 2, 9.79 -> 8.86 ms for recompute + backward).
# - Two-pass kernels (few sequence x head pairs) and the K/V <= 128 bucket: hand-run side-by-side
#   sweeps at B1 T16384 H32 K64 and B4 T4096 H16 K128, recorded in benchmarks/NOTES.md (changes
#   11-15), made before the tune tool learnt these kernels. Regenerate them with
#   `python -m rwkv_backends.tune --kernels chunk_prep,chunk_fwd_loaded,chunk_bwd_split` (and --K 128).
#   recurrent_fwd's 128 entry is untuned.
_SM90 = {
    "chunk_fwd": {"64": C(chunk_size=16, block_v=64, num_warps=4, dot_precision="tf32"),
                  "128": C(chunk_size=16, block_v=64, num_warps=4, dot_precision="tf32")},
    "chunk_bwd": {"64": C(chunk_size=16, block_v=64, num_warps=8, num_stages=2, dot_precision="tf32"),
                  "128": C(chunk_size=16, block_v=64, num_warps=8, num_stages=2, dot_precision="tf32")},
    "recurrent_fwd": {"64": C(block_v=32, num_warps=4), "128": _DEFAULT["recurrent_fwd"]["128"]},
    # Prefill at B1 T16384 H32: chunk 32, prep 0.59 ms + loaded forward 2.00 ms, against 5.17 ms
    # for the one-pass forward.
    "chunk_prep": {"64": C(chunk_size=32, block_k=32, num_warps=4, dot_precision="tf32"),
                   "128": C(chunk_size=16, block_k=32, num_warps=2, dot_precision="tf32")},
    "chunk_fwd_loaded": {"64": C(chunk_size=32, block_v=16, num_warps=4, dot_precision="tf32"),
                         "128": C(chunk_size=16, block_v=64, num_warps=4, dot_precision="tf32")},
    # Training: recompute + backward 16.6 ms at BV 64 (one program per pair), 14.8 ms at BV 32.
    "chunk_bwd_split": {"64": C(chunk_size=16, block_v=32, num_warps=8, num_stages=2, dot_precision="tf32"),
                        "128": C(chunk_size=16, block_v=64, num_warps=8, num_stages=2, dot_precision="tf32")},
}

TABLES = {
    "sm90": _SM90,
    "default": _DEFAULT,
}

PROVENANCE = {
    "sm90": "measured on an H100 80GB HBM3 (torch 2.11.0+cu130, Triton 3.6.0, 2026-11-27); "
            "recurrent_fwd at K,V <= 128 untuned",
    "default": "untuned starting point, not measured",
}
