"""Intel tuning tables: {arch: {kernel: {head_bucket: KernelConfig}}}; "default" for any other arch.

grf_mode is a launch option of Intel's Triton backend ("large" = 256 registers per thread).
None of these entries has been measured on Intel hardware yet (see PROVENANCE).
"""

from ..config import KernelConfig as C

_LARGE_GRF = {"grf_mode": "large"}

TABLES = {
    # intel-xpu-backend-for-triton#3449: scratch space over the hardware limit on Alchemist;
    # large GRF mode and narrower V tiles keep the chunk kernels inside it.
    "alchemist": {
        "chunk_fwd": {"64": C.make(chunk_size=16, block_v=32, num_warps=4, vendor_options=_LARGE_GRF),
                      "128": C.make(chunk_size=16, block_v=32, num_warps=4, vendor_options=_LARGE_GRF)},
        "chunk_bwd": {"64": C.make(chunk_size=16, block_v=32, num_warps=4, vendor_options=_LARGE_GRF),
                      "128": C.make(chunk_size=16, block_v=32, num_warps=4, vendor_options=_LARGE_GRF)},
        "recurrent_fwd": {"64": C.make(block_v=16, num_warps=2, vendor_options=_LARGE_GRF),
                          "128": C.make(block_v=16, num_warps=4, vendor_options=_LARGE_GRF)},
    },
    "default": {
        "chunk_fwd": {"64": C.make(chunk_size=16, block_v=64, num_warps=4, vendor_options=_LARGE_GRF),
                      "128": C.make(chunk_size=16, block_v=64, num_warps=8, vendor_options=_LARGE_GRF)},
        "chunk_bwd": {"64": C.make(chunk_size=16, block_v=64, num_warps=4, vendor_options=_LARGE_GRF),
                      "128": C.make(chunk_size=16, block_v=64, num_warps=8, vendor_options=_LARGE_GRF)},
        "recurrent_fwd": {"64": C(block_v=16, num_warps=2), "128": C(block_v=32, num_warps=4)},
    },
}

PROVENANCE = {
    "alchemist": "untuned starting point, not measured on Intel hardware",
    "default": "untuned starting point, not measured on Intel hardware",
}
