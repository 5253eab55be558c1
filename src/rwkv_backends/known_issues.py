"""Known compiler and platform bugs, as data (SPEC §4).

Each entry: an id, a link, a predicate over (device, Triton version, Python version), the
constraint it puts on kernel configs, and a one-line explanation. The dispatcher applies the
constraints of every active issue to the configs it takes from the tuning tables; the doctor lists
every issue with its state. A Triton assertion aborts the process and cannot be caught, so the
triggers are avoided up front; combinations nobody has seen are probed by the doctor in a subprocess.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import Callable

from .config import KERNELS, KernelConfig
from .device import DeviceInfo, interpreter_enabled, parse_version


@dataclass(frozen=True)
class KnownIssue:
    id: str
    link: str
    summary: str
    scope: str                                   # who is affected, in words (bounds with sources)
    applies: Callable[[DeviceInfo, tuple, tuple], bool]
    # Narrows a config for one kernel; returns it unchanged where the issue does not bite.
    constrain: Callable[[str, KernelConfig], KernelConfig] = lambda kernel, cfg: cfg
    refuses: bool = False                        # True: the Triton backend cannot be used at all
    # Why one kernel's config (after the constraints) cannot run, or None: a variant whose plan holds
    # such a config is refused with that reason (registry.plan), as for a config no constraint can fix.
    refuses_config: Callable[[str, KernelConfig], str | None] = lambda kernel, cfg: None


def _numpy_version() -> tuple:
    import numpy
    return parse_version(numpy.__version__)


def _hopper(d: DeviceInfo) -> bool:
    return d.vendor == "nvidia" and d.arch in ("sm90", "sm90a")


def _cap_warps_chained(kernel: str, cfg: KernelConfig, limit: int = 4) -> KernelConfig:
    if KERNELS.get(kernel, {}).get("chained_dots") and cfg.num_warps > limit:
        return cfg.with_(num_warps=limit)
    return cfg


def _avoid_eight_warps(kernel: str, cfg: KernelConfig) -> KernelConfig:
    return cfg.with_(num_warps=4) if cfg.num_warps >= 8 else cfg


# The gradient kernel (kernels/backward.py chunk_bwd_kernel) under both roles that launch it.
_GRADIENT_KERNELS = ("chunk_bwd", "chunk_bwd_split")


def _gradient_kernel_at_chunk64(kernel: str, cfg: KernelConfig) -> str | None:
    if kernel in _GRADIENT_KERNELS and cfg.chunk_size >= 64:
        return (f"{kernel}: chunk_size {cfg.chunk_size}: at 64 rows every product of the Triton gradient kernel "
                "becomes a Hopper wgmma (44 at 4 warps against 4 at chunk 32, compiled for sm90), the lowering "
                "that faulted with an illegal memory access on the H200 (Triton 3.6, tests/test_chunk64_gpu.py) "
                "and, in a transposed form whose products also ran as wgmma, on the H100; the tables plan chunks of 16 and 32")
    return None


def _no_bf16_dots(kernel: str, cfg: KernelConfig) -> KernelConfig:
    return cfg.with_(dot_precision="tf32") if cfg.dot_precision == "bf16" else cfg


# The Triton releases the package supports: those torch 2.11 to 2.15 pin (3.6.0, 3.7.0, 3.7.1, 3.8.0,
# 3.9.0) and their patch releases. pyproject.toml declares the same range.
SUPPORTED_TRITON = ((3, 6), (3, 9))
# The Triton releases the Gluon kernels (kernels/gluon/) passed the card's checks on
# (conformance and the Gluon GPU tests): triton.experimental.gluon is experimental, and its API
# moves between releases (kernels/gluon/api.py resolves the renamed calls).
GLUON_CHECKED_TRITON = ((3, 6), (3, 8), (3, 9))


def supported_triton(tv: tuple) -> bool:
    """Whether Triton release `tv` (a parse_version tuple) is in SUPPORTED_TRITON's range."""
    return bool(tv) and SUPPORTED_TRITON[0] <= tv[:2] <= SUPPORTED_TRITON[1]


def _release_words(tv: tuple) -> str:
    return ".".join(map(str, tv)) if tv else "none"


# The setting of the Gluon kernels: "0" keeps them off (backends/triton.py); "check" runs them on a
# supported Triton release outside GLUON_CHECKED_TRITON, how a card checks a new release before the
# release joins the list.
GLUON_ENV, GLUON_CHECK_VALUE = "RWKV_BACKENDS_GLUON", "check"


def _gluon_unchecked(d: DeviceInfo, tv: tuple) -> bool:
    """NVIDIA devices where the Gluon kernels have not been checked: before sm80 (they issue
    mma.sync and cp.async), other Triton releases (unless RWKV_BACKENDS_GLUON=check), and the
    interpreter (which cannot run Gluon). Other vendors have no Gluon kernel at all
    (TritonChunk.fit_configs keeps it off there)."""
    if d.vendor != "nvidia":
        return False
    sm = re.match(r"sm(\d+)", d.arch or "")
    checking = os.environ.get(GLUON_ENV) == GLUON_CHECK_VALUE and supported_triton(tv)
    return (interpreter_enabled() or sm is None or int(sm.group(1)) < 80 or not tv
            or (tv[:2] not in GLUON_CHECKED_TRITON and not checking))


def _no_gluon(kernel: str, cfg: KernelConfig) -> KernelConfig:
    return cfg.with_(gluon=False) if cfg.gluon else cfg


def _alchemist_tiles(kernel: str, cfg: KernelConfig) -> KernelConfig:
    opts = dict(cfg.vendor_options)
    opts["grf_mode"] = "large"
    return cfg.with_(block_v=min(cfg.block_v, 32), vendor_options=tuple(sorted(opts.items())))


CATALOG = (
    KnownIssue(
        id="triton#4492",
        link="https://github.com/triton-lang/triton/pull/4492",
        summary="'mma -> mma layout conversion is only supported on Ampere' assertion in kernels "
                "whose tl.dot results feed another tl.dot, with 8 warps",
        scope="NVIDIA Hopper with Triton < 3.3. SPEC §4 names < 3.2; "
              "fla-org/flash-linear-attention#240 reports the assertion on Triton 3.1.0 and 3.2.0, "
              "so 3.2.x is treated as affected too. Hopper mma->mma conversion landed with "
              "triton#4492 (triton#4999 thread).",
        applies=lambda d, tv, pv: _hopper(d) and bool(tv) and tv < (3, 3),
        constrain=_cap_warps_chained,
    ),
    KnownIssue(
        id="triton#5609",
        link="https://github.com/triton-lang/triton/issues/5609",
        summary="LinearLayoutConversions / LinearLayout::reshapeOuts assertion with num_warps=8",
        scope="NVIDIA Hopper, Triton 3.2.x and 3.3.x: reported 2025-01-14 against main between the "
              "3.2 and 3.3 branch points (both assertion forms, before and after commit e57b468); "
              "the same trigger was filed as triton#5265 on 2024-11-27. The issue was still open in "
              "2025. Releases after 3.3 are not known to be affected: the project treats them as "
              "unaffected, and every 8-warp config it plans there is one the tune tool compiled and "
              "ran on the card, and one the doctor's subprocess compile probe checks.",
        applies=lambda d, tv, pv: _hopper(d) and bool(tv) and (3, 2) <= tv < (3, 4),
        constrain=_avoid_eight_warps,
    ),
    KnownIssue(
        id="triton#5224",
        link="https://github.com/triton-lang/triton/issues/5224",
        summary="'NoneType' object has no attribute 'start' when Triton parses kernels on Python < 3.10",
        scope="any device, Python < 3.10; rwkv-backends itself requires Python >= 3.10",
        applies=lambda d, tv, pv: pv < (3, 10),
        refuses=True,
    ),
    KnownIssue(
        id="intel-xpu-backend-for-triton#3449",
        link="https://github.com/intel/intel-xpu-backend-for-triton/issues/3449",
        summary="scratch space exceeds the hardware limit: tl.dot lowered to FMA loops spills registers",
        scope="Intel Arc A-series (Alchemist), any Triton release so far",
        applies=lambda d, tv, pv: d.vendor == "intel" and d.arch == "alchemist",
        constrain=_alchemist_tiles,
    ),
    KnownIssue(
        id="triton#9171",
        link="https://github.com/triton-lang/triton/issues/9171",
        summary="NumPy >= 2.4 breaks Triton's interpreter: 'only 0-dimensional arrays can be "
                "converted to Python scalars' in loops with run-time bounds",
        scope="TRITON_INTERPRET=1 with NumPy >= 2.4 and Triton <= 3.6 (reported 2026-01-08, fixed "
              "upstream after 3.6). Response: the Triton variants refuse; install numpy<2.4 to interpret",
        applies=lambda d, tv, pv: interpreter_enabled() and bool(tv) and tv < (3, 7) and _numpy_version() >= (2, 4),
        refuses=True,
    ),
    KnownIssue(
        id="triton#11584",
        link="https://github.com/triton-lang/triton/issues/11584",
        summary="under TRITON_INTERPRET=1, tl.dot on bfloat16 operands multiplies their raw bit patterns "
                "(results near 1e10), and casts to bfloat16 truncate instead of rounding to nearest",
        scope="TRITON_INTERPRET=1, Triton 3.6 (seen here; the fix, triton#11585, was declined: the "
              "interpreter does not support it). Response: tables' \"bf16\" dot precision runs as "
              "\"tf32\" under the interpreter, so CI checks those kernels' logic, not their bf16 "
              "rounding; the card's conformance runs check that",
        applies=lambda d, tv, pv: interpreter_enabled(),
        constrain=_no_bf16_dots,
    ),
    KnownIssue(
        id="gluon-experimental",
        link="https://github.com/triton-lang/triton/tree/main/python/tutorials/gluon",
        summary="triton.experimental.gluon is experimental (its API changes between releases) and the "
                "interpreter cannot run it: the Gluon kernels are off here, their Triton kernels run",
        scope="NVIDIA devices before sm80, Triton releases other than "
              f"{', '.join(_release_words(tv) for tv in GLUON_CHECKED_TRITON)} (GLUON_CHECKED_TRITON: where the "
              "Gluon kernels passed the card's conformance and GPU tests), and TRITON_INTERPRET=1",
        applies=lambda d, tv, pv: _gluon_unchecked(d, tv),
        constrain=_no_gluon,
    ),
    KnownIssue(
        id="triton-release-unsupported",
        link="https://pypi.org/project/triton/#history",
        summary="the installed Triton release is outside the supported range (3.6 to 3.9): the Triton "
                "kernels run but are unverified there, and the Gluon kernels are off",
        scope="any device with a Triton release before 3.6 or after 3.9; torch 2.11 to 2.15 pin "
              "releases inside the range. Response: the plans keep the Triton kernels (the doctor and "
              "explain() name this entry); install a torch that pins a supported Triton",
        applies=lambda d, tv, pv: bool(tv) and d.triton_backend is not None and not supported_triton(tv),
        constrain=_no_gluon,
    ),
    KnownIssue(
        id="gluon-api-renames",
        link="https://github.com/triton-lang/triton/tree/main/python/triton/experimental/gluon",
        summary="Gluon renames calls between releases: thread_barrier became barrier (3.7), and "
                "async_copy_global_to_shared became async_load (3.8; a stub that raises in 3.9)",
        scope="NVIDIA, Triton 3.7 and later. Response: kernels/gluon/api.py resolves each call once "
              "for the installed release; the kernels use its names. Layouts, mma_v2, commit_group and "
              "wait_group are unchanged from 3.6 to 3.9 (compile_check compiles every Gluon kernel)",
        applies=lambda d, tv, pv: d.vendor == "nvidia" and bool(tv) and tv >= (3, 7),
    ),
    KnownIssue(
        id="triton-3.9-interpreter-scalar-mask",
        link="https://github.com/triton-lang/triton/blob/main/python/triton/runtime/interpreter.py",
        summary="under TRITON_INTERPRET=1, a block mask and'ed with a scalar comparison "
                "(mask=m & (i < n)) gives an int32 mask that tl.load rejects: 'mask has unsupported dtype'",
        scope="TRITON_INTERPRET=1, Triton 3.9.0 (seen here; 3.6 to 3.8 accept it; compiled kernels are "
              "unaffected). Response: the kernels fold scalar tests into tensor comparisons "
              "(kernels/common.py _walk_start); CI interprets every vendor's plan on 3.9",
        applies=lambda d, tv, pv: interpreter_enabled() and bool(tv) and tv >= (3, 9),
    ),
    KnownIssue(
        id="fla-hopper-chunk64-gradients",
        link="https://github.com/fla-org/flash-linear-attention/issues/984",
        summary="Hopper miscompiles seen by flash-linear-attention at chunk 64: wrong dk/dbeta from a "
                "4-warp 64-row program, and a tl.trans of an accumulated tl.dot fed to another dot "
                "(fla-org/flash-linear-attention#640, #983, #984)",
        scope="NVIDIA Hopper, Triton 3.4 up to 3.7.1 as fla reports it. The tables here run chunks of "
              "16 and 32, where fla sees no fault; tests/test_chunk64_gpu.py holds every chunked variant's "
              "training at chunk 64, 4 and 8 warps, to the float64 reference on a card (it passes under the "
              "interpreter; docs/verification.md says where it ran on hardware). On Hopper its first case faulted "
              "(Triton 3.6, H200): the gradient kernel at chunk 64 is refused there (hopper-wgmma-gradient-chunk64)",
        applies=lambda d, tv, pv: _hopper(d) and bool(tv) and (3, 4) <= tv < (3, 7, 1),
    ),
    KnownIssue(
        id="hopper-wgmma-gradient-chunk64",
        link="benchmarks/NOTES.md (change 39: a Triton 3.6 wgmma miscompile, unreduced)",
        summary="the Triton gradient kernel at chunk 64 on Hopper: its 64-row products all lower to wgmma, "
                "which faulted (an illegal memory access) on the card; such configs are refused",
        scope="NVIDIA Hopper (sm90), every Triton release until a card passes tests/test_chunk64_gpu.py on it. "
              "Seen on an H200 with Triton 3.6 (chunk_bwd at chunk 64, 4 warps, bf16 products: an illegal memory "
              "access in the backward, with CUDA_LAUNCH_BLOCKING=1 too) and in benchmarks/NOTES.md change 39 "
              "(the same kernel moved onto wgmma: wrong bf16 gradients, a float32 fault; right with "
              "DISABLE_MMA_V3=1). Compiled for sm90 (Triton 3.9, no GPU), the kernel at chunk 64 and 4 warps has "
              "44 wgmma products and no mma.sync, at chunk 32 4 wgmma and 24 mma.sync. The kernel's indexing is "
              "in bounds at chunk 64: the interpreter, with every load and store checked against the launch's "
              "tensors, finds no out-of-bounds lane in that test's cases (tests/test_chunk64_refusal.py). "
              "Response: a "
              "chunk_bwd or chunk_bwd_split config at chunk 64 refuses its variant, naming this entry",
        applies=lambda d, tv, pv: _hopper(d),
        refuses_config=_gradient_kernel_at_chunk64,
    ),
    KnownIssue(
        id="interpreter",
        link="https://triton-lang.org/main/programming-guide/chapter-3/debugging.html",
        summary="under TRITON_INTERPRET=1, tl.extra.*.libdevice and inline asm fail and bf16 "
                "arithmetic needs casts; the kernels use tl.exp / tl.math and compute in float32",
        scope="any device, when TRITON_INTERPRET=1",
        applies=lambda d, tv, pv: interpreter_enabled(),
    ),
)


def active(device: DeviceInfo, triton_version: str | None, python_version: tuple | None = None) -> list:
    tv = parse_version(triton_version)
    pv = tuple(python_version or sys.version_info[:2])
    return [issue for issue in CATALOG if issue.applies(device, tv, pv)]


def constrain(kernel: str, cfg: KernelConfig, issues) -> tuple:
    """The config after every active issue's constraint, and the ids that changed it."""
    changed_by = []
    for issue in issues:
        new = issue.constrain(kernel, cfg)
        if new != cfg:
            changed_by.append(issue.id)
            cfg = new
    return cfg, changed_by


def report(device: DeviceInfo, triton_version: str | None, python_version: tuple | None = None) -> list:
    on = {i.id for i in active(device, triton_version, python_version)}
    return [{"id": i.id, "active": i.id in on, "link": i.link, "summary": i.summary, "scope": i.scope}
            for i in CATALOG]
