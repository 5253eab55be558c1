"""The index of vendor folders. Each `rwkv_backends/<vendor>/` package provides:

- `VENDOR`, `DEVICE_TYPE`, `TRITON_BACKEND`: names;
- `describe(index, triton_target) -> DeviceInfo`: detection hooks for a real device;
- `PROFILES`: simulated devices (`"vendor:profile" -> DeviceInfo`), facts cited in comments;
- `TABLES` (in `tables.py`): `{arch: {kernel: {head_bucket: KernelConfig}}}`, with a "default" arch;
- optionally `preferences(info) -> {problem_class: [variant, ...]}` where the order in which
  variants are tried differs from DEFAULT_PREFERENCES.

Nothing else differs by vendor.
"""

from __future__ import annotations

import functools
import importlib

VENDOR_PACKAGES = {
    "nvidia": "nvidia",
    "amd": "amd",
    "hygon": "amd",        # Hygon DCUs run ROCm's HIP stack: AMD's hooks and tables serve them
    "intel": "intel",
    "kunlunxin": "intel",  # placeholder: Kunlunxin shares the "xpu" name; no tables of its own yet
    "musa": "musa",
    "metax": "metax",
}


def vendor_module(vendor: str):
    pkg = VENDOR_PACKAGES.get(vendor)
    if pkg is None:
        return None
    return importlib.import_module(f"rwkv_backends.{pkg}")


@functools.lru_cache(maxsize=None)
def all_profiles() -> dict:
    out = {}
    for pkg in sorted(set(VENDOR_PACKAGES.values())):
        out.update(importlib.import_module(f"rwkv_backends.{pkg}").PROFILES)
    return out


# Which variants to try first, per problem class; vendors override through `preferences(info)`.
DEFAULT_PREFERENCES = {
    "training": ["triton.chunk_transition", "triton.chunk_twopass", "triton.chunk", "pytorch.chunk"],
    "prefill": ["triton.chunk_transition", "triton.chunk_twopass", "triton.chunk", "triton.recurrent", "pytorch.chunk"],
    "decode": ["triton.recurrent", "triton.chunk", "pytorch.chunk"],
}


def preferences(info) -> dict:
    module = vendor_module(info.vendor)
    hook = getattr(module, "preferences", None) if module is not None else None
    return hook(info) if hook is not None else DEFAULT_PREFERENCES
