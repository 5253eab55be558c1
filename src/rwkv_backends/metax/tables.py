"""MetaX tuning tables: {arch: {kernel: {head_bucket: KernelConfig}}}; "default" for any other arch.

Not measured on MetaX hardware (see PROVENANCE). Warp 64: half the warps of NVIDIA's entries.
"""

from ..config import KernelConfig as C

TABLES = {
    "default": {
        "chunk_fwd": {"64": C(chunk_size=16, block_v=64, num_warps=2), "128": C(chunk_size=16, block_v=64, num_warps=4)},
        "chunk_bwd": {"64": C(chunk_size=16, block_v=64, num_warps=2), "128": C(chunk_size=16, block_v=64, num_warps=4)},
        "recurrent_fwd": {"64": C(block_v=16, num_warps=1), "128": C(block_v=32, num_warps=2)},
    },
}

PROVENANCE = {"default": "untuned starting point, not measured on MetaX hardware"}
