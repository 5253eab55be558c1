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


def _accuracy_limit(kernel, cfg, source, problem):
    if (getattr(problem, "dtype", None) == torch.float32 and "chunk_size" in KERNELS.get(kernel, {}).get("uses", ())
            and cfg.chunk_size > FLOAT32_MAX_CHUNK):
        return cfg.with_(chunk_size=FLOAT32_MAX_CHUNK), f"{source}, chunk {FLOAT32_MAX_CHUNK} for float32 inputs"
    return cfg, source


def lookup(device: DeviceInfo, kernel: str, problem) -> tuple:
    """(config, source) for `kernel` on `device` at the problem's head size (and, for float32
    inputs, chunks no longer than FLOAT32_MAX_CHUNK)."""
    module = vendor_module(device.vendor)
    bucket = head_bucket(problem.K, problem.V)
    if module is None:
        return FALLBACK, "built-in fallback (no vendor table)"
    tables = module.TABLES
    for arch in (device.arch, "default"):
        entry = tables.get(arch, {}).get(kernel, {}).get(bucket)
        if entry is not None:
            return _accuracy_limit(kernel, entry, f"{module.VENDOR}/{arch}/{kernel}/{bucket}", problem)
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
