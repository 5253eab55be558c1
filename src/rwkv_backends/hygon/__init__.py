"""Hygon DCU: probe and detection hooks. Hygon's torch runs ROCm's HIP stack, so AMD's detection
hooks describe the device and AMD's tables serve it (TABLES_FROM)."""

from __future__ import annotations

from ..device import DeviceInfo

VENDOR = "hygon"
DEVICE_TYPE = "cuda"          # as ROCm builds of torch
TRITON_BACKEND = "hip"
DESCRIPTION = "Hygon DCUs through Hygon's ROCm build of torch (AMD's hooks and tables)"
TABLES_FROM = "amd"
PROFILES: dict = {}


def probe() -> bool:
    """A ROCm build of torch that also carries torch.__hcu_version__."""
    import torch
    return torch.cuda.is_available() and bool(getattr(torch.version, "hip", None)) and hasattr(torch, "__hcu_version__")


def describe(index: int, triton_target) -> DeviceInfo:
    from ..amd import describe as amd_describe
    return amd_describe(index, triton_target, vendor=VENDOR)
