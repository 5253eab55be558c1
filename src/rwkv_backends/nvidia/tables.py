"""NVIDIA tuning tables: {arch: {kernel: {head_bucket: KernelConfig}}}.

"default" serves any architecture without an entry of its own. Entries are written by
`python -m rwkv_backends.tune` on the card; PROVENANCE says which were measured and where.
"""

from ..config import KernelConfig as C

_DEFAULT = {
    "chunk_fwd": {"64": C(chunk_size=16, block_v=64, num_warps=4), "128": C(chunk_size=16, block_v=64, num_warps=4)},
    "chunk_bwd": {"64": C(chunk_size=16, block_v=64, num_warps=4), "128": C(chunk_size=16, block_v=64, num_warps=4)},
    "recurrent_fwd": {"64": C(block_v=16, num_warps=2), "128": C(block_v=32, num_warps=4)},
}

TABLES = {
    "default": _DEFAULT,
}

PROVENANCE = {
    "default": "untuned starting point, not measured",
}
