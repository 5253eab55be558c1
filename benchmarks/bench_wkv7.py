"""rwkv_backends beside the peers that import, on the ANCHORS/issue shapes, in one process on one card.

    PYTHONPATH=src python benchmarks/bench_wkv7.py [--peers fla,rwkv-fla] [--only train,prefill,...]
        [--out results.json] [--cold] [--dispatch] [--plot speedup.png [--plot-T 1024,2048,4096,8192]]

--dispatch adds the host cost of one B=1 decode call: `wkv7` (validation, cached plan, launch), the
bare kernel launch under it (through our cached compiled kernel, and through Triton's JIT
dispatch), each peer, and one step of a captured CUDA graph; and the GPU time per decode step of
each implementation with the host out of the way (32 steps captured in one CUDA graph).

--plot adds a sweep over T (prefill and training, B8 H32 K64) and draws our speedup over each peer
against T into a PNG (needs matplotlib; the numbers also go to --out and the printed table).

Peers are looked up on sys.path (install each wheel into its own --target folder and pass
--peer-path for each: fla-core and rwkv-fla both ship a top-level `fla`). Times are
triton.testing.do_bench medians; inputs are fresh random RWKV-like tensors, never zeros.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

SHAPES = {
    # name: (mode, B, T, H, K)
    "train_H32": ("train", 8, 4096, 32, 64),
    "train_H64": ("train", 8, 4096, 64, 64),
    "prefill_H32": ("prefill", 8, 4096, 32, 64),
    "prefill_H64": ("prefill", 8, 4096, 64, 64),
    "long_T16384": ("train", 1, 16384, 32, 64),
    "long_prefill_T16384": ("prefill", 1, 16384, 32, 64),
    "head128": ("train", 4, 4096, 16, 128),
    "decode_B256": ("decode", 256, 1, 32, 64),
    "decode_B1": ("decode", 1, 1, 32, 64),
}


def sweep_shapes(Ts):
    """The --plot sweep: prefill and training at B8 H32 K64 for each T."""
    return {f"{mode}_T{T}": (mode, 8, T, 32, 64) for mode in ("prefill", "train") for T in Ts}


def plot_speedups(rows, peers, path, title=""):
    """Speedup of ours over each peer against T, one line per (mode, peer), log2 T axis."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"--plot: needs matplotlib ({exc}); the numbers are in the table and --out") from exc
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, style in (("prefill", "-o"), ("train", "--s")):
        for peer in peers:
            pts = sorted((r["T"], r[peer]["ms"] / r["ours"]["ms"]) for r in rows
                         if r["mode"] == mode and "ms" in r.get(peer, {}) and "ms" in r["ours"])
            if pts:
                ax.plot([t for t, _ in pts], [v for _, v in pts], style, label=f"{mode} vs {peer}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ticks = sorted({r["T"] for r in rows})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("T (tokens per sequence), B8 H32 K=V=64, bf16")
    ax.set_ylabel("speedup of rwkv-backends (×)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def make(mode, B, T, H, K, dtype=torch.bfloat16, device="cuda", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    x = {
        "r": torch.randn(B, T, H, K, generator=g), "k": torch.randn(B, T, H, K, generator=g) * K ** -0.5,
        "v": torch.randn(B, T, H, K, generator=g), "a": -kk, "b": kk * torch.rand(B, T, H, K, generator=g),
        "w_log": -0.6065 * torch.rand(B, T, H, K, generator=g).clamp_min(1e-3),
    }
    x = {n: t.to(device=device, dtype=dtype) for n, t in x.items()}
    x["w_raw"] = torch.log(-x["w_log"].float()).to(dtype)
    x["h0"] = torch.randn(B, H, K, K, generator=g).to(device)
    return x


def ours(x, mode):
    import rwkv_backends as rb
    return lambda: rb.wkv7(x["r"], x["w_log"], x["k"], x["v"], x["a"], x["b"], x["h0"])


def peer_fla(x, mode):
    from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7
    fn = fused_recurrent_rwkv7 if mode == "decode" else chunk_rwkv7
    return lambda: fn(x["r"], x["w_log"], x["k"], x["v"], x["a"], x["b"], scale=1.0,
                      initial_state=x["h0"], output_final_state=True)


# flash-linear-attention's RWKV7Attention calls chunk_rwkv7 so in training: inputs' log-decays respect
# the bound (make() draws them in (-0.6065, 0)).
FLA_LAYER = dict(safe_gate=True, lower_bound=-0.6065306597126334, chunk_size=64)


def peer_fla_layer(x, mode, **extra):
    from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7
    if mode == "decode":
        return peer_fla(x, mode)
    return lambda: chunk_rwkv7(x["r"], x["w_log"], x["k"], x["v"], x["a"], x["b"], scale=1.0,
                               initial_state=x["h0"], output_final_state=True, **FLA_LAYER, **extra)


def peer_fla_layer_norecompute(x, mode):
    return peer_fla_layer(x, mode, disable_recompute=True)


def peer_wind(x, mode):
    """wind_rwkv's chunked CUDA kernel (bf16 throughout, T % 16 == 0, RWKV-LM's [B, H, V, K] state
    in bf16, raw w). It builds for one head size per process: --wind-head picks it."""
    import wind_rwkv.rwkv7 as wind
    B, T, H, K = x["r"].shape
    if K != WIND_HEAD[0] or mode == "decode":
        raise RuntimeError(f"not run: this process builds wind_rwkv for head size {WIND_HEAD[0]}, T % 16 == 0")
    wind.load_chunked_cuda(K)
    s0 = x["h0"].detach().transpose(-1, -2).to(torch.bfloat16).contiguous().requires_grad_(x["h0"].requires_grad)
    return lambda: wind.attn_chunked_cuda(x["r"], x["w_raw"], x["k"], x["v"], x["a"], x["b"], s0)


WIND_HEAD = [64]


def peer_rwkv_fla(x, mode):
    from rwkvfla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7
    fn = fused_recurrent_rwkv7 if mode == "decode" else chunk_rwkv7
    return lambda: fn(r=x["r"], k=x["k"], v=x["v"], a=x["a"], b=x["b"], w=x["w_raw"], scale=1.0,
                      initial_state=x["h0"], output_final_state=True)


# "fla" is fla-core at its defaults (chunk 16, safe_gate off); "fla-layer" at its RWKV-7 layer's settings.
PEERS = {"fla": peer_fla, "fla-layer": peer_fla_layer, "fla-layer-norecompute": peer_fla_layer_norecompute,
         "rwkv-fla": peer_rwkv_fla, "wind": peer_wind}


def timed(make_fn, x, mode):
    """(median ms, peak MiB) of forward, or forward+backward for mode 'train'."""
    from triton.testing import do_bench
    if mode == "train":
        leaves = {n: x[n].detach().requires_grad_(True) for n in ("r", "w_log", "w_raw", "k", "v", "a", "b", "h0")}
        fwd = make_fn(leaves, mode)
        do = torch.randn_like(x["v"])

        def step():
            o, h = fwd()
            torch.autograd.backward((o, h), (do, torch.ones_like(h)))
            for t in leaves.values():
                t.grad = None
        run = step
    else:
        fwd = make_fn(x, mode)

        def run():
            with torch.no_grad():
                fwd()
    from rwkv_backends.tune import peak_mib
    run()                                                   # compile / autotune outside the timing
    peak = peak_mib(run)
    ms = do_bench(run, warmup=100, rep=400, return_mode="median")
    return ms, peak


def cold_start(timeout=600):
    """Seconds for the first forward+backward at B8 T4096 H32 with an empty Triton cache, in a
    fresh process (compile time is what a user waits for)."""
    import tempfile
    code = ("import time,torch,sys; sys.path.insert(0,'src'); t=time.time(); import rwkv_backends as rb;"
            "from benchmarks.bench_wkv7 import make; x=make('train',8,4096,32,64);"
            "l={n:x[n].requires_grad_(True) for n in ('r','w_log','k','v','a','b','h0')};"
            "t=time.time(); o,h=rb.wkv7(l['r'],l['w_log'],l['k'],l['v'],l['a'],l['b'],l['h0']);"
            "torch.cuda.synchronize(); f=time.time()-t; (o.float().sum()+h.sum()).backward();"
            "torch.cuda.synchronize(); print(f, time.time()-t)")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        return {"error": out.stderr[-2000:]}
    fwd, total = map(float, out.stdout.split()[-2:])
    return {"first_forward_s": round(fwd, 2), "first_forward_backward_s": round(total, 2)}


def host_us_per_call(fn, calls=2000):
    """Wall time per call of back-to-back calls, synchronised at the end: at B=1 decode the GPU
    work is a few microseconds, so this is what the host spends dispatching and launching."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def host_us_interleaved(fns: dict, rounds=7, calls=500) -> dict:
    """host_us_per_call for several functions, in rounds that take each in turn, and the median of
    the rounds per function: a shared host's speed drifts by 2x within a minute, and measuring one
    function after the other would put that drift into the ratios."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(host_us_per_call(fn, calls))
    return {name: round(statistics.median(ts), 1) for name, ts in times.items()}


def host_bound_row(x, peers) -> dict:
    """B1 decode: the GPU work is a few microseconds, so a call costs what its host path costs.
    do_bench cannot see that: it clears L2 with a kernel before every call, and a host path shorter
    than that kernel hides behind it (on an H100 do_bench gives ours 5.4 us, against 30 us of wall
    time per eager call). So this row is the wall time per back-to-back eager call, in
    interleaved rounds (host_us_interleaved), the way a decode loop runs."""
    fns, row = {}, {}
    for label, make_fn in [("ours", ours)] + [(n, PEERS[n]) for n in peers]:
        try:
            fns[label] = make_fn(x, "decode")
            fns[label]()
        except Exception as exc:
            row[label] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            fns.pop(label, None)
    for label, us in host_us_interleaved(fns).items():
        row[label] = {"ms": round(us / 1e3, 4), "timing": "wall time per back-to-back eager call, interleaved rounds"}
        print("decode B1", label, row[label], flush=True)
    return row


def dispatch_overhead(peers):
    """Host microseconds per B1 H32 decode call (see --dispatch)."""
    import rwkv_backends as rb
    from rwkv_backends.api import _plan
    from rwkv_backends.kernels import recurrent
    x = make("decode", 1, 1, 32, 64)
    args = [x[n] for n in ("r", "w_log", "k", "v", "a", "b")]
    _, plan = _plan(*args, x["h0"], "log", 1.0, None, True, None)
    cfg = plan.configs["recurrent_fwd"]
    fns = {
        "wkv7": lambda: rb.wkv7(*args, x["h0"]),
        "bare launch": lambda: recurrent.recurrent_forward(*args, x["h0"], scale=1.0, cu_seqlens=None, w_form="log",
                                                           cfg=cfg),
    }
    fns.update({n: PEERS[n](x, "decode") for n in peers})
    out = host_us_interleaved(fns)
    for n in peers:
        out[f"host time ratio, {n} / wkv7"] = round(out[n] / out["wkv7"], 2)
    cached = recurrent.FAST_LAUNCH_TRITON
    recurrent.FAST_LAUNCH_TRITON = ()                       # the same launch through Triton's JIT dispatch
    try:
        out["bare launch, Triton's JIT dispatch"] = round(host_us_per_call(fns["bare launch"]), 1)
        out["wkv7, Triton's JIT dispatch"] = round(host_us_per_call(fns["wkv7"]), 1)
    finally:
        recurrent.FAST_LAUNCH_TRITON = cached
    out["wkv7 again"] = round(host_us_per_call(fns["wkv7"]), 1)
    out["plan"] = plan.variant.name
    graph = torch.cuda.CUDAGraph()
    fns["wkv7"]()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        rb.wkv7(*args, x["h0"])
    out["wkv7 in a CUDA graph (per replay)"] = round(host_us_per_call(graph.replay), 1)
    for name in ["wkv7"] + list(peers):
        try:
            out[f"GPU us per step, 32 steps in one CUDA graph: {name}"] = round(graph_step_us(fns[name]), 2)
        except Exception as exc:  # a peer that cannot be captured is reported, not fatal
            out[f"GPU us per step, 32 steps in one CUDA graph: {name}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


def graph_step_us(fn, steps=32, replays=200):
    """GPU time per call with the host out of the way: `steps` calls captured in one CUDA graph,
    replayed back to back between two events. At B=1 this is the kernels' own time, which is what
    a server that replays graphs pays per token."""
    fn()                                            # compile / autotune before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps):
            fn()
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * steps)


def versions():
    import triton
    return {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": sys.version.split()[0]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--peers", default="", help="comma-separated: " + ",".join(PEERS))
    p.add_argument("--wind-head", type=int, default=64, help="the head size wind_rwkv is built for in this process")
    p.add_argument("--peer-path", action="append", default=[], help="folder to put on sys.path (repeatable)")
    p.add_argument("--only", default="", help="comma-separated shape names")
    p.add_argument("--out", default="")
    p.add_argument("--cold", action="store_true", help="also measure the first call with an empty Triton cache")
    p.add_argument("--dispatch", action="store_true", help="also measure host cost per B=1 decode call")
    p.add_argument("--plot", default="", metavar="PNG", help="also sweep T and plot the speedup against it")
    p.add_argument("--plot-T", default="1024,2048,4096,8192", help="T values of the --plot sweep")
    args = p.parse_args()
    for path in args.peer_path:
        sys.path.append(path)
    WIND_HEAD[0] = args.wind_head
    peers = [n for n in args.peers.split(",") if n]
    shapes = dict(SHAPES)
    names = [n for n in args.only.split(",") if n] or list(SHAPES)
    if args.plot:
        swept = sweep_shapes([int(t) for t in args.plot_T.split(",") if t])
        shapes.update(swept)
        names += [n for n in swept if n not in names]
    rows = []
    for name in names:
        mode, B, T, H, K = shapes[name]
        x = make(mode, B, T, H, K)
        row = {"shape": name, "mode": mode, "B": B, "T": T, "H": H, "K": K}
        if mode == "decode" and B == 1:
            row.update(host_bound_row(x, peers))
        for label, fn in [("ours", ours)] + [(n, PEERS[n]) for n in peers]:
            if label in row:
                continue
            try:
                t0 = time.time()
                ms, peak = timed(fn, x, mode)
                row[label] = {"ms": round(ms, 4), "peak_mib": round(peak, 1), "setup_s": round(time.time() - t0, 1)}
            except Exception as exc:  # a peer that fails is reported, not fatal
                row[label] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(name, label, row[label], flush=True)
        best = min((row[n]["ms"] for n in peers if "ms" in row.get(n, {})), default=None)
        if best and "ms" in row["ours"]:
            row["speedup_vs_best_peer"] = round(best / row["ours"]["ms"], 2)
        rows.append(row)
        if args.out:                                        # kept row by row: a run cut short keeps its rows
            with open(args.out, "w") as f:
                json.dump({"versions": versions(), "rows": rows, "partial": True}, f, indent=1)
        del x
        torch.cuda.empty_cache()
    result = {"versions": versions(), "rows": rows}
    if args.cold:
        result["cold_start"] = cold_start()
    if args.dispatch:
        result["dispatch_us"] = dispatch_overhead(peers)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"\n{'shape':<14}{'ours ms':>10}" + "".join(f"{n + ' ms':>14}" for n in peers) + f"{'speedup':>9}")
    for r in rows:
        cells = [f"{r['ours'].get('ms', float('nan')):>10.3f}"]
        cells += [f"{r[n].get('ms', float('nan')):>14.3f}" for n in peers]
        print(f"{r['shape']:<14}" + "".join(cells) + f"{r.get('speedup_vs_best_peer', float('nan')):>9}")
    if args.plot:
        v = result["versions"]
        plot_speedups(rows, peers, args.plot, f"{v['card']}, torch {v['torch']}, Triton {v['triton']}")


if __name__ == "__main__":
    main()
