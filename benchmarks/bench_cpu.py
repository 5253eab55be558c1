"""The PyTorch backend on the CPU against plain PyTorch steps: decode (T = 1, B1 H16), prefill
(B1 T512 H16) and a long forward (B1 T4096 H8), K = V = 64, float32, no gradients.

Columns: `wkv7` (the public op, backend="pytorch", validation and dispatch included), `plain`
(the five-op step below, once per token), `loop` (a careful float32 step loop: preallocated
output, the state updated in place), and `rwkv` (the rwkv pip package's RWKV-7 step, where
installed). Each is timed in CPU time (time.process_time) and wall time, at one thread and at
all threads, in interleaved rounds (the machine is shared: minima and medians of the rounds).

    python benchmarks/bench_cpu.py [--reps 7] [--threads 1,0] [--out results.json]
"""

import argparse
import json
import platform
import statistics
import time

import torch

import rwkv_backends as rb

K = V = 64
CASES = {"decode_B1_H16": (1, 16), "prefill_T512_H16": (512, 16), "forward_T4096_H8": (4096, 8)}


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def inputs(T, H, seed=0):
    g = torch.Generator().manual_seed(seed)
    kk = torch.nn.functional.normalize(torch.randn(1, T, H, K, generator=g), dim=-1)
    return {"r": torch.randn(1, T, H, K, generator=g), "w": -0.6065 * torch.rand(1, T, H, K, generator=g),
            "k": torch.randn(1, T, H, K, generator=g) * K ** -0.5 * 2, "v": torch.randn(1, T, H, V, generator=g),
            "a": -kk, "b": kk * torch.rand(1, T, H, K, generator=g), "state": torch.randn(1, H, K, V, generator=g)}


def plain_step(r, w, k, v, a, b, h):
    """One token, [H, *] vectors and an [H, K, V] state: five products and updates past the decay."""
    H = k.shape[0]
    sa = torch.bmm(a.view(H, 1, K), h)
    h = h * w.exp().view(H, K, 1)
    h.baddbmm_(b.view(H, K, 1), sa)
    h.baddbmm_(k.view(H, K, 1), v.view(H, 1, V))
    return torch.bmm(r.view(H, 1, K), h), h


def plain(x):
    T, H = x["k"].shape[1], x["k"].shape[2]
    h, outs = x["state"][0], []
    for t in range(T):
        o, h = plain_step(*(x[n][0, t] for n in ("r", "w", "k", "v", "a", "b")), h)
        outs.append(o)
    return outs, h


def careful_loop(x):
    """Float32 step loop: per-step views made once, the decay exponentiated once, the output
    preallocated, the state updated in place (four ATen calls per step)."""
    T, H = x["k"].shape[1], x["k"].shape[2]
    d = x["w"][0].exp().unsqueeze(-1).unbind(0)
    ks, bs = (x[n][0].unsqueeze(-1).unbind(0) for n in ("k", "b"))
    vs, as_, rs = (x[n][0].unsqueeze(2).unbind(0) for n in ("v", "a", "r"))
    o = torch.empty(T, H, 1, V)
    outs = o.unbind(0)
    h = x["state"][0].clone()
    for t in range(T):
        sa = torch.bmm(as_[t], h)
        h.mul_(d[t]).baddbmm_(bs[t], sa).baddbmm_(ks[t], vs[t])
        torch.bmm(rs[t], h, out=outs[t])
    return o, h


def ours(x):
    return rb.wkv7(*(x[n] for n in ("r", "w", "k", "v", "a", "b")), x["state"], backend="pytorch")


def rwkv_pip():
    """The rwkv package's RWKV-7 time-mix step, where installed (optional; never a dependency). Its
    signature differs between releases, so it is reported as present and not timed."""
    try:
        import rwkv  # noqa: F401
        from rwkv.model import RWKV_x070_TMix_one  # noqa: F401  (module-level in some releases)
    except Exception:
        return None
    return RWKV_x070_TMix_one


def clock(f, reps, calls):
    """[(cpu s, wall s)] per call, one entry per round."""
    c, w = time.process_time(), time.perf_counter()
    for _ in range(calls):
        f()
    return (time.process_time() - c) / calls, (time.perf_counter() - w) / calls


def run_case(name, reps, rwkv_step):
    T, H = CASES[name]
    x = inputs(T, H)
    fns = {"wkv7": lambda: ours(x), "plain": lambda: plain(x), "loop": lambda: careful_loop(x)}
    calls = 200 if T == 1 else (3 if T <= 512 else 1)
    samples = {n: [] for n in fns}
    with torch.no_grad():
        o_ref, s_ref = ours(x)
        o_loop, s_loop = careful_loop(x)
        err = float((s_ref[0] - s_loop).abs().max())
        for f in fns.values():
            f()
        for _ in range(reps):
            for n, f in fns.items():
                samples[n].append(clock(f, reps, calls))
    out = {"T": T, "H": H, "state_max_abs_diff_vs_loop": err}
    for n, s in samples.items():
        cpu, wall = [c for c, _ in s], [w for _, w in s]
        out[n] = {"cpu_min_us": min(cpu) * 1e6, "cpu_median_us": statistics.median(cpu) * 1e6,
                  "wall_min_us": min(wall) * 1e6, "wall_median_us": statistics.median(wall) * 1e6}
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", default="1,0", help="thread counts, 0 for all (torch's default)")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    default_threads = torch.get_num_threads()
    rwkv_step = rwkv_pip()
    report = {"cpu": cpu_model(), "torch": torch.__version__, "python": platform.python_version(),
              "rwkv_package": rwkv_step is not None, "runs": []}
    print(f"CPU: {report['cpu']}  torch {report['torch']}  rwkv package: "
          f"{'present (not timed)' if rwkv_step is not None else 'not installed'}")
    print(f"{'case':18s} {'threads':>7s} {'column':>6s} {'cpu min':>10s} {'cpu med':>10s} {'wall min':>10s}"
          f" {'wall med':>10s} {'loop/x':>7s} {'plain/x':>8s} {'loop/x med':>10s} {'x/plain med':>11s}")
    try:
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads or default_threads)
            for name in args.cases.split(","):
                res = run_case(name, args.reps, rwkv_step)
                res.update(case=name, threads=torch.get_num_threads())
                report["runs"].append(res)
                for col in ("wkv7", "plain", "loop"):
                    m = res[col]
                    print(f"{name:18s} {res['threads']:7d} {col:>6s} {m['cpu_min_us']:10.1f} {m['cpu_median_us']:10.1f}"
                          f" {m['wall_min_us']:10.1f} {m['wall_median_us']:10.1f}"
                          f" {res['loop']['cpu_min_us'] / m['cpu_min_us']:7.2f}"
                          f" {res['plain']['cpu_min_us'] / m['cpu_min_us']:8.2f}"
                          f" {res['loop']['cpu_median_us'] / m['cpu_median_us']:10.2f}"
                          f" {m['cpu_median_us'] / res['plain']['cpu_median_us']:11.2f}")
    finally:
        torch.set_num_threads(default_threads)
    print("times in µs per call; loop/x and plain/x: CPU-time minima, the column against that baseline;"
          " loop/x med: the loop's median CPU time over the column's (the speed-up);"
          " x/plain med: the column's median over the plain step's (the decode target's ratio)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
