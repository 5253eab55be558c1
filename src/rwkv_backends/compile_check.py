"""Ahead-of-time compiles of every config the tables plan for a target, without its hardware.

    python -m rwkv_backends.compile_check --target nvidia:sm90 --target amd:gfx942 --report r.json

For each target profile, each kernel role and head size 64 and 128, the config the vendor table
gives (after the active known issues' constraints for the installed Triton release) is compiled
for that target: NVIDIA through the ptxas in Triton's wheel, AMD through the HIP backend's LLVM,
neither needing a device. Gluon configs compile as well (NVIDIA sm80 and later), also on releases
where known issue gluon-experimental keeps them off at run time, so a new release's Gluon can be
checked before a card runs it. The report gives shared memory (LDS), registers and spills per
config; the exit status is 1 when a config fails to compile or exceeds its target's limits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

HEADS = (64, 128)
# Gluon kernels' speed rests on not spilling much: the most any of them spills on a release checked
# on a card is 72 bytes (head 128's loaded forward on Triton 3.9, whose training ran at 0.87× of
# 3.6's time on an H200); more than this needs a card's timing before it ships.
GLUON_MAX_STACK = 128
NVIDIA_MAX_REGISTERS = 255
# CDNA 2 and 3 share one file of 512 registers a lane between VGPRs and AGPRs; the kernel
# descriptor's vgpr_count is that unified total there. RDNA has 256.
AMD_MAX_VGPRS = {"gfx942": 512, "gfx90a": 512}


def planned_jobs(info, dtype: str = "bfloat16") -> list:
    """[(kernel, KernelConfig, head size)] the tables plan on `info` for `dtype` inputs, the walks
    at their builds' chunk sizes (as the variants launch them), as compiled (run with TRITON_INTERPRET
    unset: the interpreter's known issues would narrow them). Known issues other than
    gluon-experimental narrow the configs; Gluon stays where its kernel takes the launch."""
    import torch

    from . import known_issues
    from .config import KERNELS
    from .device import triton_version
    from .kernels import gluon
    from .kernels.common import keeps_u
    from .kernels.roles import ROLES
    from .tuning import lookup
    issues = [i for i in known_issues.active(info, triton_version()) if i.id != "gluon-experimental"]
    jobs = []
    for head in HEADS:
        problem = SimpleNamespace(K=head, V=head, dtype=getattr(torch, dtype))
        configs = {kernel: lookup(info, kernel, problem)[0] for kernel in KERNELS}
        if head <= 64:
            configs["chunk_fwd_transition"] = configs["chunk_fwd_transition"].with_(
                chunk_size=configs["chunk_transition"].chunk_size)
        else:    # the transition kernels serve K, V <= 64 only
            del configs["chunk_transition"], configs["chunk_fwd_transition"]
        configs["chunk_fwd_loaded"] = configs["chunk_fwd_loaded"].with_(chunk_size=configs["chunk_prep"].chunk_size)
        configs["chunk_states"] = configs["chunk_states"].with_(chunk_size=configs["chunk_bwd"].chunk_size)
        # the sweeps, at their walks' configs
        configs |= {name: configs[role.config_from] for name, role in ROLES.items() if role.config_from in configs}
        for kernel, cfg in configs.items():
            cfg, _ = known_issues.constrain(kernel, cfg, issues)
            if cfg.gluon and (info.triton_backend != "cuda" or gluon.unsupported(
                    kernel, K=head, V=head, chunk_size=cfg.chunk_size, block_v=cfg.block_v, dtype=problem.dtype,
                    dot_precision=cfg.dot_precision, has_u=keeps_u(cfg),
                    segmented=ROLES[kernel].gluon is not None and ROLES[kernel].gluon.segmented_only)):
                cfg = cfg.with_(gluon=False)
            if (kernel, cfg, head) not in jobs:
                jobs.append((kernel, cfg, head))
    return jobs


def _limits_broken(info, result: dict) -> list:
    """What a compiled config exceeds on its target."""
    broken = []
    shared = result.get("shared_bytes") or 0
    if shared > info.shared_memory_per_block:
        broken.append(f"shared memory {shared} B > {info.shared_memory_per_block} B")
    if info.triton_backend == "cuda":
        if (result.get("registers") or 0) > NVIDIA_MAX_REGISTERS:
            broken.append(f"{result['registers']} registers > {NVIDIA_MAX_REGISTERS}")
        if result.get("gluon") and (result.get("stack_bytes") or 0) > GLUON_MAX_STACK:
            broken.append(f"Gluon kernel spills {result['stack_bytes']} B of stack > {GLUON_MAX_STACK} B")
    elif info.triton_backend == "hip":
        cap = AMD_MAX_VGPRS.get(info.arch, 256)
        if (result.get("vgprs") or 0) > cap:
            broken.append(f"{result['vgprs']} VGPRs > {cap}")
    return broken


def check_target(name: str, dtype: str = "bfloat16") -> dict:
    """Compile every planned config for profile `name`; the report of that target."""
    import triton

    from .device import profile
    from .kernels.aot import compile_in_subprocess
    info = profile(name)
    if info.triton_backend not in ("cuda", "hip"):
        raise ValueError(f"--target: {name} compiles only with its vendor's toolchain (NVIDIA and AMD compile here)")
    jobs = planned_jobs(info, dtype)
    arch = info.triton_target_arch if info.triton_backend == "hip" else int(info.arch[2:])
    t0 = time.perf_counter()
    rc, results, stderr = compile_in_subprocess(jobs, arch=arch, warp_size=info.warp_size, backend=info.triton_backend)
    report = {"target": name, "triton": triton.__version__, "dtype": dtype, "seconds": round(time.perf_counter() - t0, 1)}
    if rc != 0:
        return report | {"status": "failed", "error": f"compiler exit {rc}: {stderr.strip()[-1500:]}", "configs": []}
    configs = []
    for (kernel, cfg, head), res in zip(jobs, results):
        entry = {"kernel": kernel, "head": head, "gluon": cfg.gluon, "config": cfg.as_dict()} | res
        entry["broken"] = _limits_broken(info, entry)
        configs.append(entry)
    status = "failed" if any(c["broken"] for c in configs) else "passed"
    return report | {"status": status, "configs": configs}


def _row(c: dict) -> str:
    regs = c.get("registers") if "registers" in c else f"{c.get('vgprs')}v+{c.get('agprs', 0)}a"
    spill = c.get("stack_bytes") if "stack_bytes" in c else c.get("vgpr_spills")
    flag = " Gluon" if c["gluon"] else ""
    return (f"  {c['kernel'] + flag:28s} K={c['head']:<4d} shared {c.get('shared_bytes')!s:>7} B  regs {regs!s:>8}  "
            f"spill {spill!s:>6}  {'; '.join(c['broken']) or 'ok'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rwkv_backends.compile_check", description=__doc__.split("\n")[0])
    ap.add_argument("--target", action="append", required=True, help="a profile, e.g. nvidia:sm90 or amd:gfx942")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--report", help="write the JSON report here")
    ap.add_argument("--quiet", action="store_true", help="one line per target")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    reports = []
    for name in args.target:
        try:
            rep = check_target(name, args.dtype)
        except ValueError as exc:
            ap.error(str(exc))
        reports.append(rep)
        n = len(rep["configs"])
        bad = sum(bool(c["broken"]) for c in rep["configs"])
        print(f"{name} (Triton {rep['triton']}, {rep['dtype']}): {rep['status']}, {n} configs compiled, "
              f"{bad} over limits, {rep['seconds']} s" + (f": {rep['error']}" if "error" in rep else ""))
        if not args.quiet or rep["status"] != "passed":
            for c in rep["configs"]:
                print(_row(c))
    if args.report:
        with open(args.report, "w") as f:
            json.dump(reports, f, indent=1)
    return 0 if all(r["status"] == "passed" for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
