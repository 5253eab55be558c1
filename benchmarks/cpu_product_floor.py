"""The matrix-product floor of the PyTorch backend's chunked forward on this CPU.

Times every batched product the chunked forward needs at B1 T4096 H8 K=V=64 float32 (the issue's
CPU shape), preallocated (`out=`), with no elementwise work and no allocation, for chunk sizes
16, 32 and 64; the inverse by nilpotent doubling. The sum is what the products alone cost: no
implementation of this formulation can be faster. Compare it with the reference's time / 20.

    python benchmarks/cpu_product_floor.py [--reps 15]
"""

from __future__ import annotations

import argparse
import math
import time

import torch


def best_ms(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def floor(C, reps, T=4096, BH=8, K=64, V=64):
    n = T // C
    N = n * BH
    g = torch.Generator().manual_seed(0)

    def mk(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    rows_k, cols_k, cc, cv, kc, kv = mk(N, C, K), mk(N, C, K), mk(N, C, C), mk(N, C, V), mk(N, K, C), mk(N, K, V)
    o_cc, o_cv, o_kv = torch.empty(N, C, C), torch.empty(N, C, V), torch.empty(N, K, V)
    squarings = int(math.log2(C)) - 1
    parts = {
        "in-chunk matrices (4 C x K x C)": lambda: [torch.bmm(rows_k, cols_k.transpose(1, 2), out=o_cc)
                                                    for _ in range(4)],
        f"inverse ({squarings} squarings, 2 C^3 each)": lambda: [torch.bmm(cc, cc, out=o_cc)
                                                                 for _ in range(2 * squarings)],
        "W = Tinv Â": lambda: torch.bmm(cc, rows_k, out=o_cv),
        "U0 = Tinv A_ak V": lambda: [torch.bmm(cc, cv, out=o_cv) for _ in range(2)],
        "Ñ = K̃ᵀ V": lambda: torch.bmm(kc, cv, out=o_kv),
        "P, Q (3 C^2 V)": lambda: [torch.bmm(cc, cv, out=o_cv) for _ in range(3)],
        "outputs Q + P S": lambda: torch.baddbmm(cv, rows_k, kv, out=o_cv),
    }
    states = torch.empty(n + 1, BH, K, V)
    states[0] = mk(BH, K, V)
    W, U0, Bt, Nt, gamma = mk(n, BH, C, K), mk(n, BH, C, V), mk(n, BH, C, K), mk(n, BH, K, V), torch.rand(n, BH, K, 1)

    def scan():
        for c in range(n):
            U = torch.baddbmm(U0[c], W[c], states[c])
            torch.baddbmm(Nt[c], Bt[c].transpose(1, 2), U, out=states[c + 1]).addcmul_(gamma[c], states[c])

    parts[f"state scan ({n} steps)"] = scan
    return {name: best_ms(fn, reps) for name, fn in parts.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for C in (16, 32, 64):
        parts = floor(C, args.reps)
        print(f"chunk {C}: products alone {sum(parts.values()):.1f} ms  ("
              + ", ".join(f"{name} {ms:.1f}" for name, ms in parts.items()) + ")")


if __name__ == "__main__":
    main()
