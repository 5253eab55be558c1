"""Moore Threads MUSA: probe, detection hooks, profiles (tables in tables/)."""

from __future__ import annotations

from ..device import DeviceInfo

VENDOR = "musa"
DEVICE_TYPE = "musa"
TRITON_BACKEND = "musa"
DESCRIPTION = "Moore Threads GPUs through torch_musa"


def probe() -> bool:
    """torch_musa importable (it registers torch.musa) with a visible device."""
    import torch
    import torch_musa  # noqa: F401
    return bool(torch.musa.is_available())


def warp_size_for(major: int) -> int:
    """SPEC §3: 128 lanes below compute capability 3.0, 32 from 3.0 on."""
    return 128 if major < 3 else 32


def _profile(name, major, minor, mps):
    return DeviceInfo(vendor=VENDOR, device_type=DEVICE_TYPE, name=name, arch=f"mp{major}{minor}",
                      warp_size=warp_size_for(major), multiprocessors=mps,
                      # Shared memory per block: not published for MUSA parts; 64 KiB is an
                      # assumption used only to size tiles, to be replaced by a measured value.
                      shared_memory_per_block=65536,
                      has_float64=False,                  # SPEC §3: no float64 on MUSA devices
                      triton_backend=TRITON_BACKEND, triton_target_arch=major * 10 + minor,
                      simulated=f"musa:mp{major}{minor}")


# Names by MUSA architecture (mp_22 = MTT S4000, mp_31 = the capability-3.1 generation) follow
# torch_musa's arch list; the multiprocessor counts are assumptions, not datasheet numbers.
PROFILES = {
    "musa:mp31": _profile("MTT S5000 (capability 3.1)", 3, 1, 64),
    "musa:mp22": _profile("MTT S4000 (capability 2.2)", 2, 2, 48),
}


def describe(index: int, triton_target) -> DeviceInfo:
    import torch
    props = torch.musa.get_device_properties(index)
    major, minor = int(props.major), int(props.minor)
    return DeviceInfo(vendor=VENDOR, device_type=DEVICE_TYPE, name=props.name, arch=f"mp{major}{minor}",
                      warp_size=warp_size_for(major), multiprocessors=getattr(props, "multi_processor_count", 0),
                      shared_memory_per_block=65536, has_float64=False, triton_backend=TRITON_BACKEND,
                      triton_target_arch=major * 10 + minor, index=index)

