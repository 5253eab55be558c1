"""Looking configs up in the vendor tuning tables (the tables themselves live in the vendor folders,
and `python -m rwkv_backends.tune` writes them). No sweep ever runs here."""

from __future__ import annotations

import torch

from .config import KERNELS, KernelConfig, head_bucket
from .device import DeviceInfo
from .vendors import vendor_module

FALLBACK = KernelConfig()

# Float32 inputs must stay within 2e-5 (SPEC §2). Chunks of 32 do not in the strong-decay regime:
# state error 3.7e-5 on an H100 (full conformance tier, 2026-11-27); chunks of 16 give 2e-6.
FLOAT32_MAX_CHUNK = 16
# Float32 inputs double the backward's load staging in shared memory: at V block 128 (K = 128) the
# segmented backward asked for 247,808 B against the H100's 232,448 (conformance, 2026-11-27).
FLOAT32_MAX_BACKWARD_BLOCK_V = 64


def _float32_limits(kernel, cfg, source, problem):
    """Float32 inputs: chunks no longer than FLOAT32_MAX_CHUNK (accuracy) and backward V blocks no
    wider than FLOAT32_MAX_BACKWARD_BLOCK_V (shared memory)."""
    if getattr(problem, "dtype", None) != torch.float32:
        return cfg, source
    if "chunk_size" in KERNELS.get(kernel, {}).get("uses", ()) and cfg.chunk_size > FLOAT32_MAX_CHUNK:
        cfg, source = cfg.with_(chunk_size=FLOAT32_MAX_CHUNK), f"{source}, chunk {FLOAT32_MAX_CHUNK} for float32 inputs"
    if kernel in ("chunk_bwd", "chunk_bwd_split") and cfg.block_v > FLOAT32_MAX_BACKWARD_BLOCK_V:
        cfg = cfg.with_(block_v=FLOAT32_MAX_BACKWARD_BLOCK_V)
        source = f"{source}, V block {FLOAT32_MAX_BACKWARD_BLOCK_V} for float32 inputs"
    return cfg, source


def lookup(device: DeviceInfo, kernel: str, problem) -> tuple:
    """(config, source) for `kernel` on `device` at the problem's head size (and, for float32
    inputs, within `_float32_limits`)."""
    module = vendor_module(device.vendor)
    bucket = head_bucket(problem.K, problem.V)
    if module is None:
        return FALLBACK, "built-in fallback (no vendor table)"
    tables = module.TABLES
    for arch in (device.arch, "default"):
        entry = tables.get(arch, {}).get(kernel, {}).get(bucket)
        if entry is not None:
            return _float32_limits(kernel, entry, f"{module.VENDOR}/{arch}/{kernel}/{bucket}", problem)
    return FALLBACK, f"built-in fallback ({module.VENDOR} has no {kernel} entry)"


def provenance(device: DeviceInfo) -> str:
    module = vendor_module(device.vendor)
    if module is None:
        return "no vendor table"
    from importlib import import_module
    tables = import_module(f"{module.__name__}.tables")
    prov = getattr(tables, "PROVENANCE", {})
    arch = device.arch if device.arch in module.TABLES else "default"
    return f"{module.VENDOR}/{arch}: {prov.get(arch, 'unknown')}"
