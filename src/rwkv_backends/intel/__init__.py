"""Intel XPU (Arc, Data Center GPU Max): probe, detection hooks, profiles, preferences (tables in tables/)."""

from __future__ import annotations

from ..device import DeviceInfo
from ..vendors import DEFAULT_PREFERENCES

VENDOR = "intel"
DEVICE_TYPE = "xpu"
TRITON_BACKEND = "xpu"
DESCRIPTION = "Intel Arc and Data Center GPU Max through torch's XPU device"


def probe() -> bool:
    """torch.xpu with a visible device (Kunlunxin's also answers: its probe is asked first)."""
    import torch
    xpu = getattr(torch, "xpu", None)
    return xpu is not None and xpu.is_available()

# Shared local memory per work-group: 64 KiB on Xe-HPG (Arc A-series, "Alchemist") and 128 KiB
# on Xe-HPC (Data Center GPU Max, "Ponte Vecchio"), per Intel's oneAPI GPU optimization guide.
_SLM_BY_ARCH = {"alchemist": 65536, "pvc": 131072, "battlemage": 131072}


def arch_from_name(name: str) -> str:
    n = name.lower()
    if "max" in n or "ponte" in n:
        return "pvc"
    if "arc" in n and " a" in n:          # "Intel(R) Arc(TM) A770 Graphics"
        return "alchemist"
    if "arc" in n and " b" in n:          # "Intel(R) Arc(TM) B580 Graphics"
        return "battlemage"
    return "xe"


def _profile(name, arch, xe_cores, fp64):
    return DeviceInfo(vendor=VENDOR, device_type=DEVICE_TYPE, name=name, arch=arch, warp_size=32,
                      multiprocessors=xe_cores, shared_memory_per_block=_SLM_BY_ARCH.get(arch, 65536),
                      has_float64=fp64, triton_backend=TRITON_BACKEND,
                      triton_target_arch={"name": arch}, simulated=f"intel:{arch}")


# Xe-core counts from Intel's product pages: Arc A770 32 Xe-cores (no native float64);
# Data Center GPU Max 1550 128 Xe-cores (float64 native).
PROFILES = {
    "intel:alchemist": _profile("Intel(R) Arc(TM) A770 Graphics", "alchemist", 32, False),
    "intel:pvc": _profile("Intel(R) Data Center GPU Max 1550", "pvc", 128, True),
}


def describe(index: int, triton_target) -> DeviceInfo:
    import torch
    props = torch.xpu.get_device_properties(index)
    arch = arch_from_name(props.name)
    backend, target_arch = (triton_target[0], triton_target[1]) if triton_target else (TRITON_BACKEND, None)
    return DeviceInfo(vendor=VENDOR, device_type=DEVICE_TYPE, name=props.name, arch=arch, warp_size=32,
                      multiprocessors=getattr(props, "gpu_subslice_count", 0) or getattr(props, "gpu_eu_count", 0),
                      shared_memory_per_block=_SLM_BY_ARCH.get(arch, 65536),
                      has_float64=bool(getattr(props, "has_fp64", True)), triton_backend=backend,
                      triton_target_arch=target_arch, index=index)


def preferences(info: DeviceInfo) -> dict:
    if info.arch == "alchemist":
        # intel-xpu-backend-for-triton#3449: Arc A-series lowers tl.dot to FMA loops and spills,
        # so the dot-free recurrent kernel is tried first for inference as well.
        return {
            "training": ["triton.chunk", "pytorch.chunk"],
            "prefill": ["triton.recurrent", "triton.chunk", "pytorch.chunk"],
            "decode": ["triton.recurrent", "pytorch.chunk"],
        }
    return DEFAULT_PREFERENCES
