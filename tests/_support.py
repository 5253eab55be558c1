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
