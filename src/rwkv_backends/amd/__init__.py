"""AMD ROCm: probe, detection hooks, profiles (tables in tables/; Hygon DCUs use them too, see hygon/)."""

from __future__ import annotations

from ..device import DeviceInfo

VENDOR = "amd"
DEVICE_TYPE = "cuda"          # ROCm builds of torch use the "cuda" device type
TRITON_BACKEND = "hip"
DESCRIPTION = "AMD Instinct and Radeon GPUs through ROCm builds of torch"


def probe() -> bool:
    """A ROCm build of torch (torch.version.hip) with a visible device."""
    import torch
    return torch.cuda.is_available() and bool(getattr(torch.version, "hip", None))

# LDS per workgroup: 64 KiB on CDNA3 (MI300X) and RDNA3, per AMD's CDNA3 ISA guide and RDNA3
# ISA guide; 160 KiB on CDNA4 (gfx950, MI355X) per AMD's CDNA4 white paper.
_LDS_BY_ARCH = {"gfx950": 163840}
_DEFAULT_LDS = 65536


def warp_size_for(arch: str) -> int:
    """Wave64 on GCN/CDNA (gfx9*), wave32 on RDNA (gfx10+), as Triton's HIP backend uses them."""
    return 64 if arch.startswith("gfx9") else 32


def _profile(name, arch, cus):
    return DeviceInfo(vendor=VENDOR, device_type=DEVICE_TYPE, name=name, arch=arch, warp_size=warp_size_for(arch),
                      multiprocessors=cus, shared_memory_per_block=_LDS_BY_ARCH.get(arch, _DEFAULT_LDS),
                      has_float64=True, triton_backend=TRITON_BACKEND, triton_target_arch=arch,
                      simulated=f"amd:{arch}")


# Compute units from AMD's datasheets: MI300X 304 CUs; MI250X 220 CUs over two GCDs, each a device
# of its own; Radeon RX 7900 XTX 96 CUs.
PROFILES = {
    "amd:gfx942": _profile("AMD Instinct MI300X", "gfx942", 304),
    "amd:gfx90a": _profile("AMD Instinct MI250X (one GCD)", "gfx90a", 110),
    "amd:gfx1100": _profile("AMD Radeon RX 7900 XTX", "gfx1100", 96),
}


def describe(index: int, triton_target, vendor: str = VENDOR) -> DeviceInfo:
    """The device at `index`; `vendor` names who made it (hygon/ describes its DCUs through here)."""
    import torch
    props = torch.cuda.get_device_properties(index)
    arch = str(getattr(props, "gcnArchName", "") or (triton_target[1] if triton_target else "gfx")).split(":")[0]
    warp = getattr(props, "warp_size", 0) or warp_size_for(arch)
    return DeviceInfo(vendor=vendor, device_type=DEVICE_TYPE, name=props.name, arch=arch, warp_size=warp,
                      multiprocessors=props.multi_processor_count,
                      shared_memory_per_block=_LDS_BY_ARCH.get(arch, _DEFAULT_LDS), has_float64=True,
                      triton_backend=TRITON_BACKEND, triton_target_arch=arch, index=index)

