"""The cost of context parallelism on one GPU: rwkv_backends.distributed.wkv7 over R processes that
share one device (gloo; the summaries cross through the host) against one plain wkv7 call over the
whole sequence.

    python benchmarks/bench_context_parallel.py [--T 16384 --H 32 --K 64 --ranks 2,4] [--out FILE]

With R processes on one GPU the device does the same tokens as one plain call plus the summary calls
(value width K + V over every carried slice) and the fold, so the step time over the plain time is
the overhead of the summary pass. Also timed, in one process: the plain call over one slice and the
summary-width call over one slice, which the overhead decomposes into. Times are medians of
synchronized steps (every rank's step ends at a barrier), milliseconds.
"""

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import rwkv_backends  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def make_inputs(T, H, K, dtype, seed=0):
    """Global RWKV-7-like inputs on the GPU, identical in every process (one seed)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda")           # noqa: E731
    kk = torch.nn.functional.normalize(rnd(1, T, H, K), dim=-1)
    x = dict(r=rnd(1, T, H, K), w=-0.6065 * torch.rand(1, T, H, K, generator=g, device="cuda"),
             k=rnd(1, T, H, K) * K ** -0.5, v=rnd(1, T, H, K), a=-kk,
             b=kk * torch.rand(1, T, H, K, generator=g, device="cuda"))
    x = {n: t.to(dtype) for n, t in x.items()}
    state = rnd(1, H, K, K)
    do = rnd(1, T, H, K).to(dtype)
    dfinal = rnd(1, H, K, K)
    return x, state, do, dfinal


def timed(fn, barrier, iters, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        barrier()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        barrier()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def step_fns(op, x, state, do, dfinal, world):
    names = ("r", "w", "k", "v", "a", "b")
    leaves = {n: x[n].detach().clone().requires_grad_() for n in names}

    def forward():
        with torch.no_grad():
            op(*[x[n] for n in names], state)

    def training():
        o, final = op(*[leaves[n] for n in names], state)
        ((o.float() * do.float()).sum() + (final * dfinal).sum() / world).backward()
    return forward, training


def worker(rank, world, port, out_dir, args):
    import torch.distributed as dist

    import rwkv_backends.distributed as cp
    torch.cuda.set_device(0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x, state, do, dfinal = make_inputs(args.T, args.H, args.K, DTYPES[args.dtype])
    bounds = [args.T * j // world for j in range(world + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    x = {n: t[:, lo:hi].contiguous() for n, t in x.items()}
    do = do[:, lo:hi].contiguous()
    op = lambda *a: cp.wkv7(*a, backend="triton")                       # noqa: E731
    forward, training = step_fns(op, x, state, do, dfinal, world)
    res = dict(forward_ms=timed(forward, dist.barrier, args.iters), training_ms=timed(training, dist.barrier, args.iters))
    if rank == 0:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(res, f)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world, args):
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(worker, args=(world, free_port(), out_dir, args), nprocs=world, start_method="spawn")
        with open(os.path.join(out_dir, "result.json")) as f:
            return json.load(f)


def single_process(args):
    """The plain call over the whole sequence and, per R, over one slice and at summary width."""
    dtype = DTYPES[args.dtype]
    x, state, do, dfinal = make_inputs(args.T, args.H, args.K, dtype)
    op = lambda *a: rwkv_backends.wkv7(*a, backend="triton")              # noqa: E731
    forward, training = step_fns(op, x, state, do, dfinal, 1)
    out = dict(plain=dict(forward_ms=timed(forward, lambda: None, args.iters),
                          training_ms=timed(training, lambda: None, args.iters)))
    for world in args.ranks:
        n = args.T // world
        part = {k: t[:, :n].contiguous() for k, t in x.items()}
        f1, t1 = step_fns(op, part, state, do[:, :n].contiguous(), dfinal, 1)
        # the summary call: value width K + V, values [0, v], initial state [I, 0]
        wide = dict(part, v=torch.cat([torch.zeros_like(part["v"]), part["v"]], dim=-1))
        eye = torch.eye(args.K, device="cuda").expand(1, args.H, args.K, args.K)
        wide_state = torch.cat([eye, torch.zeros_like(state)], dim=-1).contiguous()
        wide_do = torch.cat([do[:, :n], do[:, :n]], dim=-1).contiguous()
        wide_dfinal = torch.cat([dfinal, dfinal], dim=-1)
        f2, t2 = step_fns(op, wide, wide_state, wide_do, wide_dfinal, 1)
        out[f"slice_of_{world}"] = dict(forward_ms=timed(f1, lambda: None, args.iters),
                                        training_ms=timed(t1, lambda: None, args.iters))
        out[f"summary_slice_of_{world}"] = dict(forward_ms=timed(f2, lambda: None, args.iters),
                                                training_ms=timed(t2, lambda: None, args.iters))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=16384)
    p.add_argument("--H", type=int, default=32)
    p.add_argument("--K", type=int, default=64)
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--ranks", default="2,4")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out")
    args = p.parse_args()
    args.ranks = [int(r) for r in args.ranks.split(",")]
    if not torch.cuda.is_available():
        sys.exit("bench_context_parallel needs a CUDA/ROCm GPU")
    res = dict(shape=dict(B=1, T=args.T, H=args.H, K=args.K, V=args.K, dtype=args.dtype),
               device=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=__import__("triton").__version__, single=single_process(args), ranks={})
    for world in args.ranks:
        res["ranks"][world] = run_ranks(world, args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    plain = res["single"]["plain"]
    print(f"{res['device']}, torch {res['torch']}, Triton {res['triton']}, B1 T{args.T} H{args.H} K=V={args.K} {args.dtype}")
    print(f"{'run':34s} {'forward ms':>11s} {'training ms':>12s}")
    print(f"{'plain call, one process':34s} {plain['forward_ms']:11.3f} {plain['training_ms']:12.3f}")
    for world in args.ranks:
        for key, label in ((f"slice_of_{world}", f"plain call over 1/{world}"),
                           (f"summary_slice_of_{world}", f"summary call over 1/{world}")):
            r = res["single"][key]
            print(f"{label:34s} {r['forward_ms']:11.3f} {r['training_ms']:12.3f}")
        r = res["ranks"][world]
        print(f"{f'{world} processes, one GPU':34s} {r['forward_ms']:11.3f} {r['training_ms']:12.3f}"
              f"   ({r['forward_ms'] / plain['forward_ms']:.2f}x, {r['training_ms'] / plain['training_ms']:.2f}x plain)")


if __name__ == "__main__":
    main()
