"""The SPEC §2 case matrix, input generation and the error measure.

Every case has a stable id; its inputs are drawn fresh from a seed that the report names. Inputs
look like a real RWKV-7 layer's (a = -kk, b = kk * lr with kk unit-norm per head) with the decay
regime of the case:
    realistic  L in (-0.6065, 0)        strong  L down to -30        unit  L = 0 on half the channels
    strong_all L in [-30, -10] on every channel (dL_t carries e^{L_t}: tiny gradients of w)
    zero       L = -inf (decay exactly 0) on a quarter of the channels and on one token in eight
               elsewhere, realistic otherwise; raw w is 500 there (exp overflows float32, not float64)
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# SPEC §2 ceilings: (outputs and state, gradients).
TOLERANCES = {"float32": (2e-5, 1e-4), "bfloat16": (1e-2, 2e-2), "float16": (5e-3, 1e-2)}

REGIMES = ("realistic", "strong", "unit")            # every dtype, forward and backward
EXTREME_REGIMES = ("strong_all", "zero")             # a few cases each
KINDS = ("forward", "backward", "chain", "decode_chain", "varlen", "determinism", "noncontiguous")


@dataclass(frozen=True)
class Case:
    kind: str
    dtype: str
    regime: str
    B: int
    T: int
    H: int
    K: int
    V: int
    w_form: str = "log"
    scale: float = 1.0
    has_state: bool = True
    seqlens: tuple = ()          # varlen: the sequence lengths (B = 1, T = sum)
    split: int = 0               # chain: where the sequence is cut
    tags: tuple = field(default_factory=tuple)

    @property
    def id(self) -> str:
        parts = [self.kind, self.dtype, self.regime, f"B{self.B}T{self.T}H{self.H}K{self.K}V{self.V}", self.w_form]
        if not self.has_state:
            parts.append("nostate")
        if self.seqlens:
            parts.append("lens" + "-".join(map(str, self.seqlens)))
        if self.split:
            parts.append(f"split{self.split}")
        if self.scale != 1.0:
            parts.append(f"scale{self.scale:g}")
        return ".".join(parts)

    def seed(self, base_seed: int) -> int:
        return (base_seed * 1_000_003 + zlib.crc32(self.id.encode())) % (2 ** 31)


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖₂ / ‖ref‖₂ over the whole tensor (inf when x has NaN/Inf; SPEC §2)."""
    x = x.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    if not torch.isfinite(x).all():
        return math.inf
    denom = ref.norm().item()
    num = (x - ref).norm().item()
    return num / denom if denom > 0 else num


def make_inputs(case: Case, seed: int, device) -> dict:
    """Fresh random inputs for a case, rounded to its dtype (the reference upcasts these)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, T, H, K, V = case.B, case.T, case.H, case.K, case.V

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32)

    kk = torch.nn.functional.normalize(rnd(B, T, H, K), dim=-1)
    lr = torch.rand(B, T, H, K, generator=g)
    u = torch.rand(B, T, H, K, generator=g)
    if case.regime == "strong":
        L = -30.0 * u
    elif case.regime == "unit":
        L = -0.6065 * u
        L[..., : K // 2] = 0.0
    elif case.regime == "strong_all":
        L = -10.0 - 20.0 * u
    elif case.regime == "zero":
        L = -0.6065 * u
        L[..., : max(1, K // 4)] = -math.inf
        L[torch.rand(B, T, H, K, generator=g) < 0.125] = -math.inf
    else:
        L = -0.6065 * u
    w = _w_from_log_decay(L, case.w_form)
    dtype = DTYPES[case.dtype]
    out = {
        "r": rnd(B, T, H, K), "w": w, "k": rnd(B, T, H, K) * K ** -0.5 * 2, "v": rnd(B, T, H, V),
        "a": -kk, "b": kk * lr,
    }
    out = {n: x.to(dtype).to(device) for n, x in out.items()}
    N = len(case.seqlens) if case.seqlens else B
    out["state"] = rnd(N, H, K, V).to(device) if case.has_state else None
    out["do"] = rnd(B, T, H, V).to(dtype).to(device)
    out["dstate"] = rnd(N, H, K, V).to(device)
    if case.seqlens:
        offsets = [0]
        for n in case.seqlens:
            offsets.append(offsets[-1] + n)
        out["cu_seqlens"] = torch.tensor(offsets, dtype=torch.int32, device=device)
    else:
        out["cu_seqlens"] = None
    return out


def _w_from_log_decay(L: torch.Tensor, w_form: str) -> torch.Tensor:
    if w_form == "log":
        return L
    if w_form == "raw":                       # L = -exp(w); L = -inf as w = 500
        return torch.clamp(torch.log(torch.clamp(-L, min=1e-30)), max=500.0)
    if w_form == "clampw":                    # L = -e^-0.5 sigmoid(w): invert within its range
        frac = torch.clamp(-L / math.exp(-0.5), 1e-6, 1 - 1e-6)
        return torch.log(frac / (1 - frac))
    raise ValueError(w_form)


def _dtype_regime_matrix(forward_shape, backward_shape) -> list:
    """A forward and a backward case, each (B, T, H, K, V), for every dtype and decay regime."""
    return [Case(kind, dtype, regime, *shape)
            for dtype in ("float32", "bfloat16", "float16") for regime in REGIMES
            for kind, shape in (("forward", forward_shape), ("backward", backward_shape))]


def quick_cases() -> list:
    """Small shapes: minutes under the Triton interpreter on a 2-core CPU."""
    cases = _dtype_regime_matrix((2, 37, 2, 16, 24), (1, 21, 2, 16, 16))
    cases += [
        Case("forward", "float32", "realistic", 3, 1, 2, 32, 32),                       # T = 1
        Case("forward", "float32", "realistic", 1, 19, 1, 24, 40, has_state=False),     # K not a power of two, K != V
        Case("forward", "float32", "realistic", 1, 33, 2, 64, 32, w_form="raw", scale=0.5),
        Case("forward", "bfloat16", "realistic", 1, 30, 1, 32, 32, w_form="clampw"),
        Case("backward", "float32", "strong", 1, 18, 1, 32, 16, w_form="raw"),
        Case("backward", "float32", "realistic", 1, 17, 1, 16, 16, w_form="clampw", has_state=False),
        Case("forward", "float32", "strong_all", 2, 37, 2, 16, 24),
        Case("backward", "float32", "strong_all", 1, 21, 2, 16, 16),
        Case("backward", "bfloat16", "strong_all", 1, 21, 2, 16, 16, w_form="raw"),
        Case("forward", "bfloat16", "zero", 2, 37, 2, 16, 24),
        Case("backward", "float32", "zero", 1, 21, 2, 16, 16),
        Case("backward", "bfloat16", "zero", 1, 21, 2, 16, 16, w_form="raw"),
        Case("chain", "float32", "realistic", 1, 40, 2, 16, 16, split=23),
        Case("decode_chain", "float32", "realistic", 2, 6, 2, 16, 32),
        Case("varlen", "float32", "realistic", 1, 45, 2, 16, 16, seqlens=(17, 0, 28)),
        Case("varlen", "bfloat16", "strong", 1, 33, 1, 32, 32, seqlens=(0, 20, 13)),
        Case("determinism", "bfloat16", "realistic", 2, 40, 2, 32, 32),
        Case("noncontiguous", "float32", "realistic", 1, 25, 2, 16, 16),
    ]
    return cases


def full_cases() -> list:
    """Real sizes for hardware runs (about ten minutes on an H100 with the float64 reference)."""
    cases = _dtype_regime_matrix((2, 512, 4, 64, 64), (2, 300, 4, 64, 64))
    cases += [
        Case("forward", "bfloat16", "realistic", 2, 4096, 8, 64, 64),                   # long T
        Case("backward", "bfloat16", "realistic", 1, 4100, 4, 64, 64),                  # long T, ragged
        Case("forward", "bfloat16", "realistic", 1, 16384, 2, 64, 64),
        Case("forward", "float32", "realistic", 3, 1, 32, 64, 64),                      # decode
        Case("forward", "bfloat16", "realistic", 64, 1, 8, 64, 64),                     # B*H = 512 decode
        Case("forward", "bfloat16", "realistic", 2, 777, 4, 128, 128),
        Case("backward", "bfloat16", "realistic", 1, 513, 2, 128, 128),
        Case("backward", "float32", "strong", 1, 200, 2, 128, 96),
        Case("forward", "float32", "realistic", 1, 301, 3, 48, 80, has_state=False),
        Case("backward", "float32", "unit", 1, 129, 2, 32, 16, w_form="raw"),
        Case("backward", "float32", "strong_all", 2, 300, 4, 64, 64),
        Case("backward", "bfloat16", "strong_all", 1, 257, 2, 128, 128, w_form="raw"),
        Case("forward", "float32", "zero", 2, 512, 4, 64, 64, w_form="raw"),
        Case("backward", "bfloat16", "zero", 2, 300, 4, 64, 64),
        Case("backward", "float32", "zero", 1, 129, 2, 128, 128),
        Case("backward", "bfloat16", "realistic", 2, 260, 2, 64, 64, w_form="clampw", scale=0.125),
        Case("forward", "float16", "strong", 2, 333, 2, 64, 64, w_form="raw"),
        Case("chain", "bfloat16", "realistic", 2, 1000, 4, 64, 64, split=389),
        Case("decode_chain", "float32", "realistic", 4, 24, 4, 64, 64),
        Case("varlen", "bfloat16", "realistic", 1, 1500, 4, 64, 64, seqlens=(700, 0, 1, 799)),
        Case("varlen", "float32", "strong", 1, 300, 2, 64, 64, seqlens=(0, 150, 150)),
        Case("determinism", "bfloat16", "realistic", 4, 2048, 8, 64, 64),
        Case("noncontiguous", "bfloat16", "realistic", 2, 333, 4, 64, 64),
    ]
    return cases
