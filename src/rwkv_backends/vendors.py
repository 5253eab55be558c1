"""The index of vendor folders. Each `rwkv_backends/<vendor>/` package declares:

- `VENDOR`, `DEVICE_TYPE`, `TRITON_BACKEND`: names; `DESCRIPTION`: one line on what it covers;
- `probe() -> bool`: whether the installed torch drives this vendor's accelerator (device.py asks
  the folders in PROBE_ORDER and takes the first that holds);
- `describe(index, triton_target) -> DeviceInfo`: detection hooks for a real device;
- `PROFILES`: simulated devices (`"vendor:profile" -> DeviceInfo`), facts cited in comments;
- its tuning tables, `tables/<arch>.json` and `tables/default.json` (read by tuning.py), or
  `TABLES_FROM`, the folder whose tables serve it; a folder with neither plans no Triton variant;
- optionally `preferences(info) -> {problem_class: [variant, ...]}` where the order in which
  variants are tried differs from DEFAULT_PREFERENCES; `GLUON = True` where the Gluon kernels
  (kernels/gluon/) run; `TUNE_CANDIDATES`, launch options only this vendor's Triton takes,
  which the tune tool sweeps as well.

Nothing else differs by vendor.
"""

from __future__ import annotations

import functools
import importlib

# The vendor folders, in the order their probes are asked: a probe that another vendor's torch
# also satisfies comes after that vendor's (MetaX's torch reports CUDA; Hygon's sets
# torch.version.hip as AMD's does; Kunlunxin's Triton also calls its backend "xpu").
PROBE_ORDER = ("metax", "musa", "hygon", "amd", "nvidia", "kunlunxin", "intel")


def vendor_module(vendor: str):
    """The vendor folder's package, or None for a vendor without one (the CPU)."""
    if vendor not in PROBE_ORDER:
        return None
    return importlib.import_module(f"rwkv_backends.{vendor}")


def probe_torch() -> str:
    """The vendor whose probe holds first in PROBE_ORDER, or "cpu"."""
    for vendor in PROBE_ORDER:
        try:
            if vendor_module(vendor).probe():
                return vendor
        except Exception:        # a vendor's torch extension that is absent or broken: not this vendor
            continue
    return "cpu"


@functools.lru_cache(maxsize=None)
def all_profiles() -> dict:
    out = {}
    for vendor in sorted(PROBE_ORDER):
        out.update(vendor_module(vendor).PROFILES)
    return out


def runs_gluon(info) -> bool:
    """Whether the Gluon kernels (kernels/gluon/) can run on this device's vendor."""
    module = vendor_module(info.vendor)
    return bool(getattr(module, "GLUON", False)) if module is not None else False


def tune_candidates(vendor: str) -> dict:
    """{kernel: {field: values}}: launch options the tune tool sweeps on this vendor only."""
    module = vendor_module(vendor)
    return dict(getattr(module, "TUNE_CANDIDATES", {})) if module is not None else {}


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
