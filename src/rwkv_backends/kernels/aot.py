"""Ahead-of-time compilation of the kernels for a target, without a GPU.

Triton compiles for an NVIDIA target on any machine (its wheel carries ptxas), so CI and the doctor
can check that every planned config of the NVIDIA tables compiles, and read its shared memory and
register use, before a card is involved. Other vendors need their toolchains present.
"""

from __future__ import annotations

from ..config import KernelConfig

_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _signature(kernel: str, dtype: str):
    t = "*" + _TYPES[dtype]
    if kernel == "chunk_prep":
        ptr = {n: t for n in ("r", "w", "k", "a", "b")} | {"mats": "*fp32", "chunk_offsets": "*i64",
                                                             "cu_seqlens": "*i32"}
        return ptr | {"T": "i32"}
    segs = {"seg_offsets": "*i64"}
    if kernel == "chunk_transition":
        return ({n: t for n in ("r", "w", "k", "a", "b")}
                | {n: "*fp32" for n in ("trans", "p_mat", "q_mat", "r_eff")}
                | {"chunk_offsets": "*i64", "cu_seqlens": "*i32", "T": "i32"})
    if kernel == "chunk_fwd_transition":
        return ({"v": t} | {n: "*fp32" for n in ("trans", "p_mat", "q_mat", "r_eff")} | {"o": t}
                | {"h0": "*fp32", "ht": "*fp32", "chunk_offsets": "*i64", "cu_seqlens": "*i32", "seg_states": "*fp32"}
                | segs | {"scale": "fp32", "T": "i32", "seg_chunks": "i32"})
    if kernel == "chunk_dstate_transition":
        return ({"trans": "*fp32", "r_eff": "*fp32", "do": t, "dht": "*fp32", "seg_ds": "*fp32", "dh0": "*fp32",
                 "chunk_offsets": "*i64"} | segs | {"cu_seqlens": "*i32", "scale": "fp32", "T": "i32",
                                                    "seg_chunks": "i32"})
    if kernel in ("chunk_fwd", "chunk_fwd_loaded", "chunk_recompute"):
        names = ["r", "w", "k", "v", "a", "b", "o", "h0", "ht", "states", "mats", "chunk_offsets", "cu_seqlens"]
        ptr = {n: t for n in names[:7]} | {"h0": "*fp32", "ht": "*fp32", "states": "*fp32", "mats": "*fp32",
                                             "chunk_offsets": "*i64", "cu_seqlens": "*i32", "seg_states": "*fp32"} | segs \
            | {"u": "*fp32"}
    elif kernel in ("chunk_bwd", "chunk_bwd_split"):
        names = ["r", "w", "k", "v", "a", "b", "do", "dht", "states", "mats", "chunk_offsets", "cu_seqlens"]
        ptr = ({n: t for n in names} | {"dht": "*fp32", "states": "*fp32", "mats": "*fp32", "chunk_offsets": "*i64",
                                        "cu_seqlens": "*i32", "seg_ds": "*fp32"} | segs | {"u": "*fp32"}
               | {n: t for n in ("dr", "dw", "dk", "dv", "da", "db")} | {"dh0": "*fp32"})
    elif kernel == "chunk_states":
        ptr = ({n: t for n in ("w", "k", "v", "b")} | {"u": "*fp32", "h0": "*fp32", "states": "*fp32",
               "chunk_offsets": "*i64", "cu_seqlens": "*i32", "seg_states": "*fp32"} | segs)
        return ptr | {"T": "i32", "seg_chunks": "i32"}
    elif kernel == "chunk_dstate":
        ptr = ({n: t for n in ("r", "w", "k", "a", "b", "do")} | {"dht": "*fp32", "mats": "*fp32", "seg_ds": "*fp32",
               "dh0": "*fp32", "dz": t, "dv": t, "chunk_offsets": "*i64"} | segs | {"cu_seqlens": "*i32"})
        return ptr | {"scale": "fp32", "T": "i32", "seg_chunks": "i32"}
    elif kernel == "recurrent_fwd":
        names = ["r", "w", "k", "v", "a", "b", "o", "h0", "ht", "cu_seqlens"]
        ptr = {n: t for n in names[:7]} | {"h0": "*fp32", "ht": "*fp32", "cu_seqlens": "*i32"}
    else:
        raise ValueError(f"kernel: unknown kernel {kernel!r}")
    extra = {"part_stride": "i64"} if kernel in ("chunk_bwd", "chunk_bwd_split") else {}
    extra |= {"seg_chunks": "i32"} if kernel != "recurrent_fwd" else {}
    return ptr | {"scale": "fp32", "T": "i32"} | extra


def _constexprs(kernel: str, cfg: KernelConfig, K: int, V: int, dtype: str, mats: int = 1) -> dict:
    from .common import _pow2
    BK = _pow2(K)
    BV = min(_pow2(V), cfg.block_v)
    base = dict(H=1, K=K, V=V, BK=BK, BV=BV, W_FORM=0)
    prec = "ieee" if dtype == "float32" else cfg.dot_precision
    if kernel == "chunk_prep":
        return dict(H=1, K=K, BT=cfg.chunk_size, BKK=min(BK, cfg.block_k), W_FORM=0, IS_VARLEN=False,
                    DOT_PRECISION=prec)
    if kernel == "chunk_transition":
        return dict(H=1, K=K, BT=cfg.chunk_size, BK=BK, BKK=min(BK, cfg.block_k), W_FORM=0, IS_VARLEN=False,
                    DOT_PRECISION=prec)
    if kernel == "chunk_fwd_transition":      # as two-pass training runs it: storing the segments' states
        return dict(H=1, K=K, V=V, BT=cfg.chunk_size, BK=BK, BV=BV, HAS_STATE=True, STORE_FINAL=True, STORE_O=True,
                    SEGMENTS=1, IS_VARLEN=False, DOT_PRECISION=prec)
    if kernel == "chunk_dstate_transition":
        return dict(H=1, K=K, V=V, BT=cfg.chunk_size, BK=BK, BV=BV, HAS_DHT=True, STORE_DH0=True, IS_VARLEN=False,
                    DOT_PRECISION=prec)
    if kernel in ("chunk_fwd", "chunk_fwd_loaded"):
        # chunk_fwd: MATS=1 builds and stores the chunk matrices (the training forward, the largest
        # variant); chunk_fwd_loaded: MATS=2 loads them and stores the segments' start states
        # (SEGMENTS=1, the two-pass training forward).
        loaded = kernel == "chunk_fwd_loaded"
        return base | dict(BT=cfg.chunk_size, HAS_STATE=True, STORE_FINAL=True, STORE_O=True, STORE_STATES=False,
                           MATS=2 if loaded else mats, SEGMENTS=1 if loaded else 0, STORE_U=mats != 0,
                           IS_VARLEN=False, DOT_PRECISION=prec)
    if kernel == "chunk_recompute":
        # every segment at once, building and storing the chunk matrices, storing the chunk states
        return base | dict(BT=cfg.chunk_size, HAS_STATE=True, STORE_FINAL=False, STORE_O=False, STORE_STATES=True,
                           MATS=1, SEGMENTS=2, STORE_U=False, IS_VARLEN=False, DOT_PRECISION=prec)
    if kernel == "chunk_states":
        return base | dict(BT=cfg.chunk_size, HAS_STATE=True, SEGMENTS=0, IS_VARLEN=False, DOT_PRECISION=prec)
    if kernel in ("chunk_bwd", "chunk_bwd_split"):
        # chunk_bwd_split runs segments in parallel (SEGMENTS=2), as two-pass training does.
        return base | dict(BT=cfg.chunk_size, HAS_DHT=True, STORE_DH0=True, IS_VARLEN=False, SPLIT_V=BV < V,
                           SEGMENTS=2 if kernel == "chunk_bwd_split" else 0, HAS_U=cfg.keep_u,
                           DOT_PRECISION=prec)
    if kernel == "chunk_dstate":
        # the larger variant: also storing dZ and dv, as for head 128's K-split Gluon gradient kernel
        return base | dict(BT=cfg.chunk_size, HAS_DHT=True, STORE_DH0=True, IS_VARLEN=False, STORE_DZ_DV=True,
                           DOT_PRECISION=prec)
    return base | dict(HAS_STATE=True, STORE_FINAL=True, IS_VARLEN=False)


def compile_for(kernel: str, cfg: KernelConfig, *, backend: str, arch, warp_size: int, K: int = 64, V: int = 64,
                dtype: str = "bfloat16") -> dict:
    """Compile one kernel for (backend, arch); returns what the compiler reports."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .backward import chunk_bwd_kernel
    from .chunk import chunk_fwd_kernel, chunk_states_kernel
    from .recurrent import recurrent_fwd_kernel
    from .transition import chunk_transition_dstate_kernel, chunk_transition_fwd_kernel, chunk_transition_kernel
    from .twopass import chunk_dstate_kernel, chunk_prep_kernel
    if cfg.gluon:
        return _compile_gluon(kernel, cfg, backend=backend, arch=arch, warp_size=warp_size, K=K, V=V, dtype=dtype)
    fn = {"chunk_fwd": chunk_fwd_kernel, "chunk_fwd_loaded": chunk_fwd_kernel,
          "chunk_recompute": chunk_fwd_kernel, "chunk_states": chunk_states_kernel,
          "chunk_bwd": chunk_bwd_kernel, "chunk_bwd_split": chunk_bwd_kernel,
          "chunk_prep": chunk_prep_kernel, "chunk_dstate": chunk_dstate_kernel,
          "chunk_transition": chunk_transition_kernel, "chunk_fwd_transition": chunk_transition_fwd_kernel,
          "chunk_dstate_transition": chunk_transition_dstate_kernel,
          "recurrent_fwd": recurrent_fwd_kernel}[kernel]
    const = _constexprs(kernel, cfg, K, V, dtype)
    sig = _signature(kernel, dtype) | {n: "constexpr" for n in const}
    src = ASTSource(fn=fn, signature=sig, constexprs=const)
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
    """A Gluon kernel (kernels/gluon/) as training launches it."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from . import gluon as gluon_nvidia
    from .common import keeps_u
    from .gluon import backward, backward_ksplit, forward, loaded_walks, prep, states
    prec = "ieee" if dtype == "float32" else cfg.dot_precision
    why = gluon_nvidia.unsupported(kernel, K=K, V=V, chunk_size=cfg.chunk_size, block_v=cfg.block_v,
                                   dtype=getattr(torch, dtype), dot_precision=prec, has_u=keeps_u(cfg),
                                   segmented=kernel in ("chunk_bwd_split", "chunk_dstate"))
    if why:
        raise ValueError(f"cfg: gluon is set, but {why}")
    t = "*" + _TYPES[dtype]
    f32 = "*fp32"
    warps = gluon_nvidia.LAUNCH[kernel]["num_warps"]
    if kernel == "chunk_bwd":
        fn = backward.chunk_bwd_gluon_kernel
        ptr = ({n: t for n in ("r", "w", "k", "v", "a", "b", "do")} | {"dht": f32, "states": f32, "mats": f32,
               "chunk_offsets": "*i64", "cu_seqlens": "*i32", "u": f32}
               | {n: t for n in ("dr", "dw", "dk", "dv", "da", "db")} | {"dh0": f32})
        scalars = {"scale": "fp32", "T": "i32"}
        const = dict(H=1, K=K, BT=cfg.chunk_size, W_FORM=0, HAS_DHT=True, STORE_DH0=True, IS_VARLEN=False)
    elif kernel == "chunk_bwd_split":    # the K-split gradient kernel of the segmented backward
        fn = backward_ksplit.chunk_bwd_ksplit_gluon_kernel
        ptr = ({n: t for n in ("r", "w", "k", "v", "a", "b", "do", "dz")} | {"states": f32, "seg_ds": f32,
               "chunk_offsets": "*i64", "seg_offsets": "*i64", "cu_seqlens": "*i32", "u": f32}
               | {n: t for n in ("dr", "dw", "dk", "da", "db")})
        scalars = {"scale": "fp32", "T": "i32", "seg_chunks": "i32"}
        const = dict(H=1, K=K, V=V, BK=gluon_nvidia.KSPLIT_BLOCK_K, BT=cfg.chunk_size, W_FORM=0, IS_VARLEN=False)
    elif kernel == "chunk_dstate":       # head 128's state-gradient sweep, storing dZ and dv
        fn = loaded_walks.chunk_dstate_gluon_kernel
        ptr = ({n: t for n in ("r", "w", "k", "a", "b", "do")} | {"dht": f32, "mats": f32, "seg_ds": f32, "dh0": f32}
               | {"dz": t, "dv": t, "chunk_offsets": "*i64", "seg_offsets": "*i64", "cu_seqlens": "*i32"})
        scalars = {"scale": "fp32", "T": "i32", "seg_chunks": "i32"}
        const = dict(H=1, K=K, V=V, BV=gluon_nvidia.LAUNCH[kernel]["block_v"], BT=cfg.chunk_size, W_FORM=0,
                     HAS_DHT=True, STORE_DH0=True, IS_VARLEN=False, NW=warps, DS_BF16=True)
    elif kernel == "chunk_prep":         # head 128's chunk matrices
        fn = prep.chunk_prep_gluon_kernel
        ptr = {n: t for n in ("r", "w", "k", "a", "b")} | {"mats": f32, "chunk_offsets": "*i64", "cu_seqlens": "*i32"}
        scalars = {"T": "i32", "c_lo": "i32", "c_hi": "i32"}
        const = dict(H=1, K=K, BT=cfg.chunk_size, W_FORM=0, IS_VARLEN=False, NW=warps)
    elif kernel == "chunk_fwd_loaded":   # head 128's two-pass training forward: segments' states and U
        fn = loaded_walks.chunk_fwd_loaded_gluon_kernel
        ptr = ({n: t for n in ("r", "w", "k", "v", "a", "b", "o")} | {"h0": f32, "ht": f32, "mats": f32,
               "chunk_offsets": "*i64", "cu_seqlens": "*i32", "seg_states": f32, "seg_offsets": "*i64", "u": f32})
        scalars = {"scale": "fp32", "T": "i32", "seg_chunks": "i32", "c_lo": "i32", "c_hi": "i32"}
        const = dict(H=1, K=K, V=V, BV=gluon_nvidia.LAUNCH[kernel]["block_v"], BT=cfg.chunk_size, W_FORM=0,
                     HAS_STATE=True, STORE_FINAL=True, STORE_O=True, STORE_SEGMENTS=True, STORE_U=True,
                     IS_VARLEN=False, NW=warps)
    elif kernel == "chunk_fwd":          # the training forward: it stores the chunk matrices and U
        fn = forward.chunk_fwd_gluon_kernel
        ptr = ({n: t for n in ("r", "w", "k", "v", "a", "b", "o")} | {"h0": f32, "ht": f32, "mats": f32,
               "chunk_offsets": "*i64", "cu_seqlens": "*i32", "u": f32})
        scalars = {"scale": "fp32", "T": "i32"}
        const = dict(H=1, K=K, BT=cfg.chunk_size, W_FORM=0, HAS_STATE=True, STORE_FINAL=True, STORE_O=True,
                     STORE_MATS=True, STORE_U=True, IS_VARLEN=False, NW=warps)
    else:
        fn = states.chunk_states_gluon_kernel
        ptr = ({n: t for n in ("w", "k", "v", "b")} | {"u": f32, "h0": f32, "states": f32, "chunk_offsets": "*i64",
               "cu_seqlens": "*i32", "seg_states": f32, "seg_offsets": "*i64"})
        scalars = {"T": "i32", "seg_chunks": "i32"}
        const = dict(H=1, K=K, V=V, BV=gluon_nvidia.LAUNCH[kernel]["block_v"], BT=cfg.chunk_size, W_FORM=0,
                     HAS_STATE=True, SEGMENTED=K == gluon_nvidia.KSPLIT_HEAD, IS_VARLEN=False, NW=warps)
    sig = ptr | scalars | {n: "constexpr" for n in const}
    # Torch's allocations are 16-byte aligned, and the JIT specializes on that: cp.async needs it.
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in ptr}
    compiled = triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                              target=GPUTarget(backend, arch, warp_size), options={"num_warps": warps})
    return {"kernel": kernel, "shared_bytes": getattr(compiled.metadata, "shared", None), "num_warps": warps,
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
