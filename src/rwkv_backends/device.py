"""Run-time device detection: the one place that asks torch and Triton what hardware this is.

`detect(device)` returns a `DeviceInfo`, cached per device. Vendor-specific facts (how a torch
build is recognised, architecture names, shared memory, simulated profiles) live in the vendor
folders; this module asks their probes in vendors.PROBE_ORDER, the order SPEC §3 requires (MetaX
and Hygon before the vendors whose probes they also satisfy), and hands the device to the
vendor's `describe`.

`RWKV_BACKENDS_SIMULATE=vendor:profile` replaces detection with a profile (SPEC §5).
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from dataclasses import asdict, dataclass, field

import torch

SIMULATE_ENV = "RWKV_BACKENDS_SIMULATE"


@dataclass(frozen=True)
class DeviceInfo:
    vendor: str                 # nvidia | amd | hygon | intel | kunlunxin | musa | metax | cpu
    device_type: str            # torch device type: cuda | xpu | musa | cpu
    name: str
    arch: str                   # table key: "sm90", "gfx942", "alchemist", "mp31", "c500", "cpu"
    warp_size: int
    multiprocessors: int
    shared_memory_per_block: int
    has_float64: bool
    triton_backend: str | None  # "cuda", "hip", "xpu", "musa", "maca"; None when Triton can't target it
    # As Triton reports it (int, str or dict); not part of equality, so DeviceInfo stays hashable.
    triton_target_arch: object = field(default=None, compare=False)
    simulated: str | None = None         # the profile name when simulated
    index: int = 0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["triton_target_arch"] = _jsonable(self.triton_target_arch)
        return d


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    return str(x)


CPU = DeviceInfo(vendor="cpu", device_type="cpu", name=platform.processor() or platform.machine(),
                 arch="cpu", warp_size=1, multiprocessors=os.cpu_count() or 1,
                 shared_memory_per_block=0, has_float64=True, triton_backend=None)


# ---------------------------------------------------------------------------------------------
# Versions

def versions() -> dict:
    """torch, triton and rwkv_backends versions, and Python's."""
    from . import __version__
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "rwkv_backends": __version__,
    }


@functools.lru_cache(maxsize=None)
def triton_version() -> str | None:
    try:
        import triton
    except Exception:
        return None
    return getattr(triton, "__version__", None)


def parse_version(text: str | None) -> tuple:
    """"3.2.0+git1234" -> (3, 2, 0); None -> ()."""
    if not text:
        return ()
    out = []
    for part in text.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def interpreter_enabled() -> bool:
    """Triton's interpreter runs kernels on CPU tensors with numpy (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def triton_target():
    """(backend, arch, warp_size) from Triton's active driver, or None when there is none."""
    try:
        from triton.runtime import driver
        target = driver.active.get_current_target()
    except Exception:
        return None
    return target.backend, target.arch, getattr(target, "warp_size", None)


# ---------------------------------------------------------------------------------------------
# Detection

def simulated_profile_name() -> str | None:
    name = os.environ.get(SIMULATE_ENV, "").strip()
    return name or None


def detect(device=None) -> DeviceInfo:
    """What `device` (a torch.device, a string, or None for the default accelerator) is."""
    sim = simulated_profile_name()
    if sim:
        return profile(sim)
    if device is None:
        device = default_device()
    device = torch.device(device)
    return _detect_cached(device.type, device.index or 0)


def default_device() -> torch.device:
    from .vendors import vendor_module
    module = vendor_module(_vendor_of_torch())
    return torch.device(module.DEVICE_TYPE if module is not None else "cpu")


@functools.lru_cache(maxsize=None)
def _vendor_of_torch() -> str:
    """Which accelerator torch drives: the first vendor folder whose probe holds (vendors.PROBE_ORDER)."""
    from .vendors import probe_torch
    return probe_torch()


@functools.lru_cache(maxsize=None)
def _detect_cached(device_type: str, index: int) -> DeviceInfo:
    if device_type == "cpu":
        return CPU
    from .vendors import vendor_module
    vendor = _vendor_of_torch()
    module = vendor_module(vendor)
    if module is None:
        raise RuntimeError(f"device: no detection hooks for vendor {vendor!r} (device type {device_type})")
    return module.describe(index, triton_target())


def profile(name: str) -> DeviceInfo:
    """A simulated device from a vendor profile, e.g. "nvidia:sm90" (see `list_profiles()`)."""
    from .vendors import all_profiles
    profiles = all_profiles()
    if name not in profiles:
        raise ValueError(f"{SIMULATE_ENV} / --simulate: unknown profile {name!r}; known: {', '.join(sorted(profiles))}")
    return profiles[name]


def list_profiles() -> dict:
    from .vendors import all_profiles
    return all_profiles()


def python_ok() -> bool:
    return sys.version_info >= (3, 10)
