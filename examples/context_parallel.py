"""Context parallelism: packed sequences split over the time axis of several processes.

    torchrun --nproc_per_node=2 examples/context_parallel.py      # one process per GPU (NCCL), or CPU (gloo)
    python examples/context_parallel.py                            # starts 2 CPU processes itself

Every rank builds the same global inputs (one seed), keeps its own slice of the time axis, runs
rwkv_backends.distributed.wkv7 forward and backward, and compares its o, the final states and its
gradients with single-process wkv7 on the whole sequence. Exits non-zero when an error is over the
SPEC §2 ceiling of the dtype.
"""

import os
import socket
import sys

import torch
import torch.distributed as dist

import rwkv_backends
import rwkv_backends.distributed as cp

# Ceilings of SPEC §2 (o and state; gradients), per dtype.
TOLERANCE = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (1e-2, 2e-2)}


def relative_error(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def inputs(T, H, K, V, N, device, dtype):
    """One set of global inputs, the same on every rank: RWKV-7-like a, b and decays."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)                          # noqa: E731
    kk = torch.nn.functional.normalize(rnd(1, T, H, K), dim=-1)
    x = dict(r=rnd(1, T, H, K), w=-0.6065 * torch.rand(1, T, H, K, generator=g), k=rnd(1, T, H, K) * K ** -0.5,
             v=rnd(1, T, H, V), a=-kk, b=kk * torch.rand(1, T, H, K, generator=g))
    x = {n: t.to(device, dtype) for n, t in x.items()}
    state = rnd(N, H, K, V).to(device)
    do = rnd(1, T, H, V).to(device, dtype)
    dfinal = rnd(N, H, K, V).to(device)
    return x, state, do, dfinal


def main():
    rank, world = dist.get_rank(), dist.get_world_size()
    on_gpu = torch.cuda.is_available() and dist.get_backend() == "nccl"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    H, K, V = (8, 64, 64) if on_gpu else (2, 32, 32)
    seqlens = [300, 1700, 40, 0, 2056] if on_gpu else [30, 170, 4, 0, 51]
    T, N = sum(seqlens), len(seqlens)
    cu_seqlens = torch.tensor([sum(seqlens[:i]) for i in range(N + 1)], dtype=torch.int32, device=device)

    # Unequal slices: rank j holds about (j + 1) shares of the time axis.
    shares = [j + 1 for j in range(world)]
    bounds = [T * sum(shares[:j]) // sum(shares) for j in range(world + 1)]
    start, end = bounds[rank], bounds[rank + 1]

    x, state, do, dfinal = inputs(T, H, K, V, N, device, dtype)
    names = ("r", "w", "k", "v", "a", "b")

    # This rank's slice. Every rank passes the global cu_seqlens and the whole initial state.
    mine = {n: x[n][:, start:end].clone().requires_grad_() for n in names}
    state_mine = state.clone().requires_grad_()
    o, final = cp.wkv7(*(mine[n] for n in names), state_mine, cu_seqlens=cu_seqlens)
    # Each rank's loss: its o and (here) a share of the final-state gradient; the shares sum to dfinal.
    ((o.float() * do[:, start:end].float()).sum() + (final * dfinal / world).sum()).backward()
    dstate = state_mine.grad.clone()
    dist.all_reduce(dstate)                        # the state's gradient is split over the ranks

    # The same problem in one process.
    whole = {n: x[n].clone().requires_grad_() for n in names}
    state_whole = state.clone().requires_grad_()
    o_ref, final_ref = rwkv_backends.wkv7(*(whole[n] for n in names), state_whole, cu_seqlens=cu_seqlens)
    ((o_ref.float() * do.float()).sum() + (final_ref * dfinal).sum()).backward()

    errors = {"o": relative_error(o, o_ref[:, start:end]) if end > start else 0.0,
              "state_out": relative_error(final, final_ref), "dstate": relative_error(dstate, state_whole.grad)}
    for n in names:
        if end > start:
            errors["d" + n] = relative_error(mine[n].grad, whole[n].grad[:, start:end])
    out_tol, grad_tol = TOLERANCE[dtype]
    ok = all(e <= (out_tol if n in ("o", "state_out") else grad_tol) for n, e in errors.items())
    shown = ", ".join(f"{n} {e:.1e}" for n, e in errors.items())
    print(f"rank {rank}/{world} tokens [{start}, {end}) of {T}, {str(dtype)[6:]} on {device}: {shown} "
          f"{'ok' if ok else 'FAILED'}", flush=True)
    return ok


def _spawned(rank, world, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ok = main()
    finally:
        dist.destroy_process_group()
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    if "RANK" in os.environ:                       # under torchrun
        use_nccl = torch.cuda.is_available()
        if use_nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if use_nccl else "gloo")
        try:
            ok = main()
        finally:
            dist.destroy_process_group()
        sys.exit(0 if ok else 1)
    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_spawned, args=(2, port), nprocs=2)
