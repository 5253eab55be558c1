"""MetaX MACA: probe, detection hooks, profiles (tables in tables/). MetaX's torch reports device type "cuda"."""

from __future__ import annotations

from ..device import DeviceInfo

VENDOR = "metax"
DEVICE_TYPE = "cuda"
TRITON_BACKEND = "maca"
DESCRIPTION = "MetaX GPUs through MACA builds of torch (device type cuda)"


def probe() -> bool:
    """A MACA build of torch: torch.version.maca is a version string."""
    import torch
    return isinstance(getattr(torch.version, "maca", None), str)


def arch_from_name(name: str) -> str:
    """"MetaX C500" -> "c500"; unknown names fall back to "maca"."""
    parts = name.lower().split()
    return parts[-1] if len(parts) >= 2 and parts[0] == "metax" else "maca"


PROFILES = {
    # SPEC §3: Triton target arch 80, warp 64. Multiprocessor count and shared memory are
    # assumptions (not published in a datasheet we could cite), used only to size tiles.
    "metax:c500": DeviceInfo(vendor=VENDOR, device_type=DEVICE_TYPE, name="MetaX C500", arch="c500", warp_size=64,
                             multiprocessors=104, shared_memory_per_block=65536, has_float64=True,
                             triton_backend=TRITON_BACKEND, triton_target_arch=80, simulated="metax:c500"),
}


def describe(index: int, triton_target) -> DeviceInfo:
    import torch
    props = torch.cuda.get_device_properties(index)
    return DeviceInfo(vendor=VENDOR, device_type=DEVICE_TYPE, name=props.name, arch=arch_from_name(props.name),
                      warp_size=64, multiprocessors=props.multi_processor_count, shared_memory_per_block=65536,
                      has_float64=True, triton_backend=TRITON_BACKEND, triton_target_arch=80, index=index)

