"""NVIDIA: probe, detection hooks, simulated profiles, Gluon and tune options (tables in tables/)."""

from __future__ import annotations

from ..device import DeviceInfo

VENDOR = "nvidia"
DEVICE_TYPE = "cuda"
TRITON_BACKEND = "cuda"
DESCRIPTION = "NVIDIA GPUs through CUDA builds of torch"
# The Gluon kernels (kernels/gluon/) are written for NVIDIA: mma.sync and cp.async, sm80+.
GLUON = True

# Launch options the tune tool sweeps on NVIDIA only. maxnreg: at 255 registers and 8 warps one
# backward program fills an SM, so a B8 x H32 grid (256 programs, 132 SMs) runs in two waves; capped
# at 128 it spills more but fits two per SM. gluon: the kernels' Gluon implementations; they launch
# with their own warps, V block and pipeline, so their configs differ only where they read them
# (tune.candidates folds the rest).
TUNE_CANDIDATES = {
    "chunk_bwd": {"vendor_options": ({}, {"maxnreg": 128}), "gluon": (False, True)},
    "chunk_fwd": {"gluon": (False, True)}, "chunk_states": {"gluon": (False, True)},
    "chunk_bwd_split": {"gluon": (False, True)}, "chunk_prep": {"gluon": (False, True)},
    "chunk_fwd_loaded": {"gluon": (False, True)},
}


def probe() -> bool:
    """A CUDA build of torch with a visible device (ROCm builds set torch.version.hip: AMD's)."""
    import torch
    return torch.cuda.is_available() and not getattr(torch.version, "hip", None)

# Opt-in shared memory per block by compute capability (SPEC §3; CUDA C Programming Guide,
# "Technical Specifications per Compute Capability": 227 KB on 9.0, 163 KB on 8.0, 99 KB on
# 8.6/8.9/12.0). Used only when torch does not report it.
_SMEM_BY_ARCH = {"sm90": 232448, "sm80": 166912, "sm86": 101376, "sm89": 101376, "sm120": 101376}
_DEFAULT_SMEM = 102400


def _profile(name, arch_cc, sms, smem, fp64=True):
    major, minor = divmod(arch_cc, 10)
    return DeviceInfo(vendor=VENDOR, device_type=DEVICE_TYPE, name=name, arch=f"sm{arch_cc}", warp_size=32,
                      multiprocessors=sms, shared_memory_per_block=smem, has_float64=fp64,
                      triton_backend=TRITON_BACKEND, triton_target_arch=arch_cc,
                      simulated=f"nvidia:sm{arch_cc}")


# Multiprocessor counts from NVIDIA's product datasheets: A100 108 SMs, RTX 4090 128 SMs,
# H100 SXM5 132 SMs (also what torch reports on the H100 we measure on), RTX 5090 170 SMs.
PROFILES = {
    "nvidia:sm80": _profile("NVIDIA A100-SXM4-80GB", 80, 108, 166912),
    "nvidia:sm89": _profile("NVIDIA GeForce RTX 4090", 89, 128, 101376),
    "nvidia:sm90": _profile("NVIDIA H100 80GB HBM3", 90, 132, 232448),
    "nvidia:sm120": _profile("NVIDIA GeForce RTX 5090", 120, 170, 101376),
}


def describe(index: int, triton_target) -> DeviceInfo:
    import torch
    props = torch.cuda.get_device_properties(index)
    arch = f"sm{props.major}{props.minor}"
    smem = getattr(props, "shared_memory_per_block_optin", 0) or _SMEM_BY_ARCH.get(arch, _DEFAULT_SMEM)
    backend, target_arch = (triton_target[0], triton_target[1]) if triton_target else (None, None)
    return DeviceInfo(vendor=VENDOR, device_type=DEVICE_TYPE, name=props.name, arch=arch, warp_size=32,
                      multiprocessors=props.multi_processor_count, shared_memory_per_block=smem,
                      has_float64=True, triton_backend=backend or TRITON_BACKEND,
                      triton_target_arch=target_arch if target_arch is not None else props.major * 10 + props.minor,
                      index=index)

