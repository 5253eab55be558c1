"""Constants shared by the tests (imported as `_support`; tests/ is on sys.path under pytest)."""

import os
import pathlib

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN_DIR = pathlib.Path(os.environ.get("RWKV_GOLDEN_DIR", REPO.parent / "shared" / "golden"))

requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA/ROCm GPU")


def patch_nvidia_tables_at_chunk(monkeypatch, chunk_size: int, num_warps: int = 4) -> None:
    """Plan from the NVIDIA tables with every chunked role (all but recurrent_fwd) at `chunk_size`,
    Triton kernels only, one stage and V blocks of 32: at chunk 64 the gradient kernels need 115 KB
    of shared memory so (the tables' 3 stages and V block 64 ask 336-369 KB)."""
    import copy

    from rwkv_backends import registry, tuning
    original = tuning.tables
    patched = copy.deepcopy(original("nvidia"))
    for arch in patched.values():
        for role, buckets in arch.items():
            if role != "recurrent_fwd":
                for bucket, entry in buckets.items():
                    cfg = entry.config.with_(chunk_size=chunk_size, num_warps=num_warps, gluon=False, block_k=32,
                                             block_v=32, num_stages=1)
                    buckets[bucket] = tuning.Entry(cfg, entry.provenance)
    monkeypatch.setattr(tuning, "tables", lambda package: patched if package == "nvidia" else original(package))
    registry._plan_cached.cache_clear()
