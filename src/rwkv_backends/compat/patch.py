"""`patch_fla()`: route the RWKV-7 layers of an installed fla or rwkv-fla through `wkv7`.

Their `RWKV7Attention` calls the op functions it imported into its own module (`chunk_rwkv7` for
training and prefill, `fused_mul_recurrent_rwkv7` for short decode steps). Patching swaps those
module attributes for our adapters, choosing the adapter by the original function's signature:
rwkv-fla's `chunk_rwkv7` takes `log_w=` (and `w=` as the raw decay), fla's takes `w` as the
log-decay. Everything else in the layer (projections, LoRAs, norms, token shift) stays the peer's.
"""

from __future__ import annotations

import importlib
import inspect

from . import fla as fla_ops
from . import rwkv_fla as rwkv_fla_ops

LAYER_MODULES = ("fla.layers.rwkv7", "rwkvfla.layers.rwkv7")


def _replacement(name, original):
    params = inspect.signature(original).parameters
    if name == "chunk_rwkv7":
        return rwkv_fla_ops.chunk_rwkv7 if "log_w" in params else fla_ops.chunk_rwkv7
    if name == "fused_recurrent_rwkv7":
        return rwkv_fla_ops.fused_recurrent_rwkv7 if "log_w" in params else fla_ops.fused_recurrent_rwkv7
    if name == "fused_mul_recurrent_rwkv7":
        return rwkv_fla_ops.fused_mul_recurrent_rwkv7
    return None


class Patch:
    """What `patch_fla` replaced; `restore()` (or leaving a `with` block) puts the originals back."""

    def __init__(self):
        self.replaced = []               # (module, attribute name, original)

    @property
    def targets(self):
        return [f"{m.__name__}.{n}" for m, n, _ in self.replaced]

    def restore(self):
        for module, name, original in reversed(self.replaced):
            setattr(module, name, original)
        self.replaced.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()


def patch_fla(modules=LAYER_MODULES, *, strict=False) -> Patch:
    """Patch every importable module of `modules`; returns the `Patch`. With `strict=True`, raise
    ImportError when none of them imports (by default an absent peer is skipped)."""
    patch = Patch()
    missing = []
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            missing.append(f"{module_name} ({exc})")
            continue
        for name in ("chunk_rwkv7", "fused_recurrent_rwkv7", "fused_mul_recurrent_rwkv7"):
            original = getattr(module, name, None)
            if original is None or getattr(original, "__module__", "").startswith("rwkv_backends."):
                continue
            replacement = _replacement(name, original)
            if replacement is not None:
                setattr(module, name, replacement)
                patch.replaced.append((module, name, original))
    if strict and not patch.replaced:
        raise ImportError("modules: none of " + ", ".join(modules) + " could be patched: " + "; ".join(missing))
    return patch
