"""Looking configs up in the vendor tuning tables (the tables themselves live in the vendor folders,
and `python -m rwkv_backends.tune` writes them). No sweep ever runs here."""

from __future__ import annotations

from .config import KernelConfig, head_bucket
from .device import DeviceInfo
from .vendors import vendor_module

FALLBACK = KernelConfig()


def lookup(device: DeviceInfo, kernel: str, problem) -> tuple:
    """(config, source) for `kernel` on `device` at the problem's head size."""
    module = vendor_module(device.vendor)
    bucket = head_bucket(problem.K, problem.V)
    if module is None:
        return FALLBACK, "built-in fallback (no vendor table)"
    tables = module.TABLES
    for arch in (device.arch, "default"):
        entry = tables.get(arch, {}).get(kernel, {}).get(bucket)
        if entry is not None:
            return entry, f"{module.VENDOR}/{arch}/{kernel}/{bucket}"
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
