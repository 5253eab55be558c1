"""rwkv_backends: RWKV-7's WKV7 operator on every accelerator (the contract: docs/contract.md).

    o, state = rwkv_backends.wkv7(r, w, k, v, a, b, state)
    rwkv_backends.explain(r, w, k, v, a, b, state)   # which kernel, which config, and why
"""

import sys

if sys.version_info < (3, 10):  # pragma: no cover
    raise ImportError("rwkv_backends needs Python >= 3.10 (Triton fails on older Pythons: triton#5224)")

__version__ = "0.1.0"

from . import ops  # noqa: E402,F401  (registers torch.ops.rwkv_backends.wkv7 / wkv7_backward)
from .api import explain, wkv7  # noqa: E402
from .reference import wkv7_reference  # noqa: E402
from .registry import NoBackendError  # noqa: E402

__all__ = ["wkv7", "explain", "wkv7_reference", "NoBackendError", "compat", "distributed", "__version__"]


def __getattr__(name):
    # The drop-ins and context parallelism load on first use: `rwkv_backends.compat.patch_fla()` and
    # `rwkv_backends.distributed.wkv7(...)` work without importing them first.
    if name in ("compat", "distributed"):
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
