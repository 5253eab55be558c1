"""Kunlunxin XPU: probe and detection hooks. No tuning tables: the Triton variants are refused
here (the plan says so) and the PyTorch backend serves, until a card's tune run writes
tables/default.json."""

from __future__ import annotations

from ..device import DeviceInfo

VENDOR = "kunlunxin"
DEVICE_TYPE = "xpu"           # Kunlunxin's torch registers the "xpu" device type, as Intel's does
TRITON_BACKEND = "xpu"        # and its Triton calls its backend "xpu" too
DESCRIPTION = "Kunlunxin XPUs (torch device type xpu, Triton backend xpu with a non-Intel arch)"
PROFILES: dict = {}


def probe() -> bool:
    """torch.xpu with a visible device, and a Triton target "xpu" whose arch is not Intel's dict."""
    import torch

    from .. import device
    xpu = getattr(torch, "xpu", None)
    if xpu is None or not xpu.is_available():
        return False
    target = device.triton_target()
    return target is not None and target[0] == "xpu" and not isinstance(target[1], dict)


def describe(index: int, triton_target) -> DeviceInfo:
    # Multiprocessors, shared memory and float64 are not known here for Kunlunxin parts: what
    # torch reports, else 0 and False (the two-pass fill rule then stays off).
    import torch
    props = torch.xpu.get_device_properties(index)
    backend, arch = (triton_target[0], triton_target[1]) if triton_target else (TRITON_BACKEND, None)
    warp = (triton_target[2] if triton_target and len(triton_target) > 2 else None) or 32
    return DeviceInfo(vendor=VENDOR, device_type=DEVICE_TYPE, name=getattr(props, "name", "Kunlunxin XPU"),
                      arch=str(arch) if arch is not None else "xpu", warp_size=int(warp),
                      multiprocessors=int(getattr(props, "multi_processor_count", 0) or 0),
                      shared_memory_per_block=int(getattr(props, "shared_memory_per_block", 0) or 0),
                      has_float64=bool(getattr(props, "has_fp64", False)), triton_backend=backend,
                      triton_target_arch=arch, index=index)
