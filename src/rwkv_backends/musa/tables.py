"""MUSA tuning tables: {arch: {kernel: {head_bucket: KernelConfig}}}; "default" for any other arch.

Not measured on Moore Threads hardware (see PROVENANCE). Parts with 128-lane warps get fewer
warps per program for the same tile.
"""

from ..config import KernelConfig as C

_WIDE = {
    "chunk_fwd": {"64": C(chunk_size=16, block_v=64, num_warps=1), "128": C(chunk_size=16, block_v=64, num_warps=2)},
    "chunk_bwd": {"64": C(chunk_size=16, block_v=64, num_warps=1), "128": C(chunk_size=16, block_v=64, num_warps=2)},
    "recurrent_fwd": {"64": C(block_v=16, num_warps=1), "128": C(block_v=32, num_warps=1)},
}

TABLES = {
    "mp21": _WIDE,
    "mp22": _WIDE,
    "default": {
        "chunk_fwd": {"64": C(chunk_size=16, block_v=64, num_warps=4), "128": C(chunk_size=16, block_v=64, num_warps=4)},
        "chunk_bwd": {"64": C(chunk_size=16, block_v=64, num_warps=4), "128": C(chunk_size=16, block_v=64, num_warps=4)},
        "recurrent_fwd": {"64": C(block_v=16, num_warps=2), "128": C(block_v=32, num_warps=4)},
    },
}

PROVENANCE = {k: "untuned starting point, not measured on Moore Threads hardware" for k in TABLES}
