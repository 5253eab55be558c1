"""The PyTorch backend against the float64 reference on the CPU (issue: >= 20x forward,
>= 10x forward+backward at B1 T4096 H8 K64 float32). Runs are interleaved and medians taken,
because a shared 2-core VM drifts by 2x between minutes."""

import argparse
import platform
import statistics
import time

import torch

import rwkv_backends as rb
from rwkv_backends.conformance import Case, make_inputs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--T", type=int, default=4096)
    args = p.parse_args()
    x = make_inputs(Case("forward", "float32", "realistic", 1, args.T, 8, 64, 64), 0, "cpu")
    names = ("r", "w", "k", "v", "a", "b")

    def fwd(fn):
        with torch.no_grad():
            fn(*(x[n] for n in names), x["state"])

    def fwd_bwd(fn, dtype):
        leaves = [x[n].to(dtype).requires_grad_(True) for n in names]
        st = x["state"].to(dtype).requires_grad_(True)
        o, s = fn(*leaves, st)
        (o.sum() + s.sum()).backward()

    def clock(f):
        t = time.perf_counter()
        f()
        return time.perf_counter() - t

    ours = lambda *a: rb.wkv7(*a, backend="pytorch")  # noqa: E731
    fwd(ours)
    ref_f, our_f = [], []
    for _ in range(args.reps):
        ref_f.append(clock(lambda: fwd(rb.wkv7_reference)))
        our_f.append(clock(lambda: fwd(ours)))
    ref_fb, our_fb = [], []
    for _ in range(max(1, args.reps // 2)):
        ref_fb.append(clock(lambda: fwd_bwd(rb.wkv7_reference, torch.float64)))
        our_fb.append(clock(lambda: fwd_bwd(ours, torch.float32)))
    mf, rf = statistics.median(our_f), statistics.median(ref_f)
    mfb, rfb = statistics.median(our_fb), statistics.median(ref_fb)
    print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"B1 T{args.T} H8 K64 fp32  forward: reference {rf*1e3:.0f} ms, pytorch.chunk {mf*1e3:.1f} ms -> {rf/mf:.1f}x")
    print(f"B1 T{args.T} H8 K64 fp32  fwd+bwd: reference {rfb*1e3:.0f} ms, pytorch.chunk {mfb*1e3:.1f} ms -> {rfb/mfb:.1f}x")
    print("samples (s): ref fwd", [round(t, 3) for t in ref_f], "ours fwd", [round(t, 4) for t in our_f])


if __name__ == "__main__":
    main()
