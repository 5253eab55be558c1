"""AMD tuning tables: {arch: {kernel: {head_bucket: KernelConfig}}}; "default" for any other arch.

waves_per_eu and matrix_instr_nonkdim are launch options of Triton's HIP backend. None of these
entries has been measured on AMD hardware yet (see PROVENANCE); they are starting points chosen
for wave64 CDNA (more warps per program than wave32 parts need for the same tile).
"""

from ..config import KernelConfig as C

_CDNA = {"waves_per_eu": 2, "matrix_instr_nonkdim": 16}

TABLES = {
    "gfx942": {
        "chunk_fwd": {"64": C.make(chunk_size=16, block_v=64, num_warps=4, vendor_options=_CDNA),
                      "128": C.make(chunk_size=16, block_v=64, num_warps=4, vendor_options=_CDNA)},
        "chunk_bwd": {"64": C.make(chunk_size=16, block_v=64, num_warps=4, vendor_options=_CDNA),
                      "128": C.make(chunk_size=16, block_v=64, num_warps=4, vendor_options=_CDNA)},
        "recurrent_fwd": {"64": C(block_v=32, num_warps=2), "128": C(block_v=32, num_warps=4)},
    },
    "default": {
        "chunk_fwd": {"64": C(chunk_size=16, block_v=64, num_warps=4), "128": C(chunk_size=16, block_v=64, num_warps=4)},
        "chunk_bwd": {"64": C(chunk_size=16, block_v=64, num_warps=4), "128": C(chunk_size=16, block_v=64, num_warps=4)},
        "recurrent_fwd": {"64": C(block_v=16, num_warps=2), "128": C(block_v=32, num_warps=4)},
    },
}

PROVENANCE = {
    "gfx942": "untuned starting point, not measured on AMD hardware",
    "default": "untuned starting point, not measured on AMD hardware",
}
