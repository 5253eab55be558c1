"""Ahead-of-time compilation of the kernels for a target, without a GPU.

Triton compiles for an NVIDIA target on any machine (its wheel carries ptxas), so CI and the doctor
can check that every planned config of the NVIDIA tables compiles, and read its shared memory and
register use, before a card is involved. Other vendors need their toolchains present.
"""

from __future__ import annotations

from ..config import KernelConfig

def compile_for(kernel: str, cfg: KernelConfig, *, backend: str, arch, warp_size: int, K: int = 64, V: int = 64,
                dtype: str = "bfloat16") -> dict:
    """Compile one kernel role (kernels/roles.py) for (backend, arch); returns what the compiler reports."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .roles import ROLES, signature
    if cfg.gluon:
        return _compile_gluon(kernel, cfg, backend=backend, arch=arch, warp_size=warp_size, K=K, V=V, dtype=dtype)
    if kernel not in ROLES:
        raise ValueError(f"kernel: unknown kernel {kernel!r}")
    role = ROLES[kernel]
    fn = role.load()
    const = role.aot_constexprs(cfg, K, V, "ieee" if dtype == "float32" else cfg.dot_precision)
    src = ASTSource(fn=fn, signature=signature(fn, dtype, const), constexprs=const)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, **dict(cfg.vendor_options)}
    compiled = triton.compile(src, target=GPUTarget(backend, arch, warp_size), options=options)
    meta = compiled.metadata
    return {"kernel": kernel, "shared_bytes": getattr(meta, "shared", None), "num_warps": cfg.num_warps,
            "registers": getattr(compiled, "n_regs", None), "spills": getattr(compiled, "n_spills", None)} \
        | _resource_usage(compiled)


def _resource_usage(compiled) -> dict:
    """Registers and stack bytes (spills) from the cubin, read by the cuobjdump in Triton's wheel
    (no GPU needed: n_regs and n_spills only exist once a kernel is loaded on a device), or an AMD
    kernel's registers and spills from its amdgcn assembly. {} when neither can be read."""
    import os
    import re
    import subprocess
    import tempfile

    import triton
    amdgcn = compiled.asm.get("amdgcn") if hasattr(compiled, "asm") else None
    if amdgcn:
        return _amdgcn_usage(amdgcn)
    cubin = compiled.asm.get("cubin") if hasattr(compiled, "asm") else None
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not cubin or not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return {"registers": int(regs.group(1)), "stack_bytes": int(stack.group(1))} if regs and stack else {}


def _amdgcn_usage(asm: str) -> dict:
    """VGPRs, AGPRs, SGPRs and spilled registers from the kernel descriptor's metadata in the
    amdgcn assembly (LDS is the compiler's `shared`, allocated at launch)."""
    import re
    out = {}
    for key, name in (("vgpr_count", "vgprs"), ("agpr_count", "agprs"), ("sgpr_count", "sgprs"),
                      ("vgpr_spill_count", "vgpr_spills"), ("sgpr_spill_count", "sgpr_spills")):
        m = re.search(rf"\.{key}:\s+(\d+)", asm)
        if m:
            out[name] = int(m.group(1))
    return out


def _compile_gluon(kernel: str, cfg: KernelConfig, *, backend: str, arch, warp_size: int, K: int, V: int,
                   dtype: str) -> dict:
    """A role's Gluon kernel (kernels/gluon/) as training launches it."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from . import gluon
    from .common import keeps_u
    from .roles import ROLES, signature
    prec = "ieee" if dtype == "float32" else cfg.dot_precision
    spec = ROLES[kernel].gluon if kernel in ROLES else None
    why = gluon.unsupported(kernel, K=K, V=V, chunk_size=cfg.chunk_size, block_v=cfg.block_v,
                            dtype=getattr(torch, dtype), dot_precision=prec, has_u=keeps_u(cfg),
                            segmented=spec is not None and spec.segmented_only)
    if why:
        raise ValueError(f"cfg: gluon is set, but {why}")
    fn = spec.load()
    const = spec.aot_constexprs(cfg, K, V)
    sig = signature(fn, dtype, const)
    # Torch's allocations are 16-byte aligned, and the JIT specializes on that: cp.async needs it.
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, ty in sig.items() if ty.startswith("*")}
    compiled = triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                              target=GPUTarget(backend, arch, warp_size), options={"num_warps": spec.num_warps})
    return {"kernel": kernel, "shared_bytes": getattr(compiled.metadata, "shared", None), "num_warps": spec.num_warps,
            "registers": getattr(compiled, "n_regs", None), "spills": getattr(compiled, "n_spills", None)} \
        | _resource_usage(compiled)


def compile_in_subprocess(jobs, *, arch, warp_size: int = 32, timeout: float = 900, backend: str = "cuda"):
    """Compile [(kernel, KernelConfig)] or [(kernel, KernelConfig, head size)] (K = V; default 64)
    for (backend, arch) in a fresh process, without the interpreter. Returns (returncode, results or
    None, stderr): a compiler assertion aborts that process (negative return code), never the caller."""
    import json
    import os
    import subprocess
    import sys

    payload = json.dumps({"jobs": [(job[0], job[1].as_dict(), job[2] if len(job) > 2 else 64) for job in jobs],
                          "arch": arch, "warp": warp_size, "backend": backend})
    code = ("import json,sys\n"
            "from rwkv_backends.config import KernelConfig\n"
            "from rwkv_backends.kernels.aot import compile_for\n"
            "p=json.loads(sys.argv[1]); out=[]\n"
            "for k,c,d in p['jobs']:\n"
            "    out.append(compile_for(k, KernelConfig.make(**c), backend=p['backend'], arch=p['arch'], warp_size=p['warp'],"
            " K=d, V=d))\n"
            "print(json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    res = subprocess.run([sys.executable, "-c", code, payload], capture_output=True, text=True, timeout=timeout, env=env)
    results = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else None
    return res.returncode, results, res.stderr
