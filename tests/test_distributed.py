"""Context parallelism (SPEC §7): rwkv_backends.distributed.wkv7 on 2 and 4 CPU processes (gloo,
loopback) against single-process wkv7 and the float64 reference, forward and backward.

One process group per world size runs every case (starting processes dominates the time); each
test reads its case's errors from that run."""

import json
import math
import os
import socket
import tempfile
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

# Float32 ceilings of SPEC §2 (o and state_out; gradients).
TOL_OUT, TOL_GRAD = 2e-5, 1e-4
WORLD_SIZES = (2, 4)
RUN_TIMEOUT_S = 240
NAMES = ("r", "w", "k", "v", "a", "b")

# Each case: shapes, the split of the time axis per world size, and the options of the call.
# seqlens packs sequences (B = 1); dfinal "same" gives every rank the same final-state gradient.
CASES = {
    "batch_equal_state": dict(B=2, H=2, K=8, V=6, split={2: [12, 12], 4: [6, 6, 6, 6]}, state=True),
    "batch_unequal_raw": dict(B=2, H=2, K=8, V=6, split={2: [5, 19], 4: [3, 11, 1, 9]}, w_form="raw"),
    "batch_empty_slices_clampw": dict(B=1, H=2, K=8, V=6, split={2: [0, 17], 4: [7, 0, 0, 10]},
                                      state=True, w_form="clampw"),
    "batch_last_empty": dict(B=2, H=2, K=4, V=8, split={2: [9, 0], 4: [0, 9, 4, 0]}, state=True),
    "batch_no_final_state": dict(B=2, H=2, K=8, V=6, split={2: [10, 7], 4: [4, 0, 8, 5]}, state=True,
                                 output_final_state=False),
    "batch_same_dfinal": dict(B=1, H=2, K=8, V=6, split={2: [6, 9], 4: [2, 5, 5, 3]}, state=True,
                              dfinal="same"),
    "packed_crossing": dict(H=2, K=8, V=6, seqlens=[5, 0, 9, 3, 7], split={2: [12, 12], 4: [6, 6, 6, 6]},
                            state=True),
    "packed_spanning_raw": dict(H=2, K=8, V=6, seqlens=[2, 19, 0, 3], split={2: [11, 13], 4: [6, 6, 6, 6]},
                                w_form="raw"),
    "packed_empty_at_boundaries_clampw": dict(H=2, K=8, V=6, seqlens=[6, 0, 6, 0, 12, 0],
                                              split={2: [12, 12], 4: [6, 6, 6, 6]}, state=True,
                                              w_form="clampw"),
    "packed_empty_ranks": dict(H=2, K=8, V=6, seqlens=[4, 10, 1, 5], split={2: [0, 20], 4: [0, 9, 0, 11]},
                               state=True),
    "packed_no_final_state": dict(H=2, K=8, V=6, seqlens=[3, 8, 0, 9], split={2: [7, 13], 4: [2, 9, 0, 9]},
                                  state=True, output_final_state=False),
    "packed_no_state_same_dfinal": dict(H=2, K=8, V=6, seqlens=[7, 7, 7], split={2: [10, 11], 4: [5, 5, 5, 6]},
                                        dfinal="same"),
    "packed_all_empty": dict(H=2, K=4, V=4, seqlens=[0, 0], split={2: [0, 0], 4: [0, 0, 0, 0]}, state=True),
    "wide_heads_two_summary_calls": dict(B=1, H=1, K=72, V=64, split={2: [4, 5], 4: [2, 3, 0, 4]}, state=True),
    "in_place_on_outputs": dict(B=2, H=2, K=8, V=6, split={2: [4, 16], 4: [0, 4, 0, 16]}, state=True,
                                in_place=True),
    "two_layers": dict(B=1, H=2, K=8, V=8, seqlens=[6, 10, 5], split={2: [8, 13], 4: [3, 8, 0, 10]},
                       state=True, layers=2),
}
# The detection check: the fold loses rank 0's summaries (M = I, P = 0), and the errors must show it.
FAULT_CASE = "fault_fold_drops_rank_0"
CASES[FAULT_CASE] = dict(CASES["packed_crossing"], fault="drop_rank_0")

# Several processes on one GPU (gloo moves the summaries through the host), the Triton backend: the
# CPU cases that cross ranks, plus head size 64 over hundreds of tokens, where the kernels chunk.
GPU_CASES = {
    "heads64_batch": dict(B=2, H=4, K=64, V=64, split={2: [300, 212], 4: [128, 0, 200, 184]}, state=True),
    "heads64_packed": dict(H=4, K=64, V=64, seqlens=[70, 333, 0, 100, 9], split={2: [256, 256],
                           4: [64, 200, 0, 248]}, state=True, w_form="raw"),
}
GPU_NAMES = ("batch_unequal_raw", "packed_crossing", "packed_empty_ranks", "two_layers", FAULT_CASE,
             *GPU_CASES)

# Bad arguments on one rank: every rank raises, naming the argument.
ERROR_CASES = ("lengths_do_not_sum", "k_differs_on_last_rank", "bad_state_on_last_rank",
               "cu_seqlens_differ", "needs_grad_differs")


def _inputs(case, seed=0):
    """Full-sequence float32 inputs, RWKV-7-like: a = -kk, b = kk * lr, log-decay in (-0.6065, 0)."""
    g = torch.Generator().manual_seed(seed)
    B = case.get("B", 1)
    T = sum(case["seqlens"]) if "seqlens" in case else sum(case["split"][2])
    H, K, V = case["H"], case["K"], case["V"]
    rnd = lambda *s: torch.randn(*s, generator=g)                      # noqa: E731
    kk = torch.nn.functional.normalize(rnd(B, T, H, K), dim=-1)
    L = -0.6065 * torch.rand(B, T, H, K, generator=g)
    form = case.get("w_form", "log")
    if form == "log":
        w = L
    elif form == "raw":
        w = torch.log(-L.clamp(max=-1e-6))
    else:
        frac = (-L / math.exp(-0.5)).clamp(1e-6, 1 - 1e-6)
        w = torch.log(frac / (1 - frac))
    x = dict(r=rnd(B, T, H, K), w=w, k=rnd(B, T, H, K) * K ** -0.5, v=rnd(B, T, H, V), a=-kk,
             b=kk * torch.rand(B, T, H, K, generator=g))
    N = len(case["seqlens"]) if "seqlens" in case else B
    x["state"] = rnd(N, H, K, V) if case.get("state") else None
    x["cu"] = (torch.tensor([0] + list(torch.tensor(case["seqlens"]).cumsum(0)), dtype=torch.int32)
               if "seqlens" in case else None)
    layers = case.get("layers", 1)
    x["do"] = rnd(B, T, H, V)
    x["dfinal"] = [rnd(layers, N, H, K, V) for _ in range(4)]         # one per rank, up to 4 ranks
    return x


def _rel(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x).all():
        return math.inf
    den = ref.norm().item()
    return (x - ref).norm().item() / den if den > 0 else (x - ref).norm().item()


def _grad(t):
    """t's gradient, zeros where autograd left none (no tokens reach it)."""
    return t.grad if t.grad is not None else torch.zeros_like(t)


def _model(op, x, state, cu, case, leaves):
    """One or two stacked wkv7 calls; the second layer's values are the first layer's output."""
    finals = []
    v = leaves["v"]
    for _ in range(case.get("layers", 1)):
        o, s = op(leaves["r"], leaves["w"], leaves["k"], v, leaves["a"], leaves["b"], state,
                  w_form=case.get("w_form", "log"), cu_seqlens=cu,
                  output_final_state=case.get("output_final_state", True))
        if case.get("in_place"):           # as on the local op's o
            o.mul_(2.0)
        finals.append(s)
        v = o
    return v, finals


def _to(x, device):
    if isinstance(x, dict):
        return {n: _to(t, device) for n, t in x.items()}
    if isinstance(x, list):
        return [_to(t, device) for t in x]
    return x.to(device) if isinstance(x, torch.Tensor) else x


def _run_case(name, case, rank, world, dist, distributed, wkv7, reference, device="cpu", backend="pytorch"):
    x = _to(_inputs(case), device)
    lengths = case["split"][world]
    start = sum(lengths[:rank])
    end = start + lengths[rank]
    dfinals = [x["dfinal"][j] for j in range(world)]
    if case.get("dfinal") == "same":
        dfinals = [x["dfinal"][0]] * world
    ofs = case.get("output_final_state", True)

    def loss(o, finals, do, dfinal):
        total = (o * do).sum()
        for i, s in enumerate(finals):
            if s is not None:
                total = total + (s * dfinal[i]).sum()
        return total

    # Single process: the whole sequence, final-state gradients summed over ranks.
    full = {n: x[n].clone().requires_grad_() for n in NAMES}
    st = x["state"].clone().requires_grad_() if x["state"] is not None else None
    o_ref, f_ref = _model(lambda *a, **kw: wkv7(*a, **kw, backend=backend), x, st, x["cu"], case, full)
    loss(o_ref, f_ref, x["do"], sum(dfinals)).backward()
    ref_grads = {n: _grad(full[n]) for n in NAMES}
    ref_dstate = _grad(st) if st is not None else None

    # Float64 reference (one layer): outputs and gradients.
    ref64 = None
    if case.get("layers", 1) == 1:
        full64 = {n: x[n].double().requires_grad_() for n in NAMES}
        st64 = x["state"].double().requires_grad_() if x["state"] is not None else None
        o64, f64 = _model(reference, x, st64, x["cu"], case, full64)
        loss(o64, [f64[0]], x["do"].double(), [d.double() for d in sum(dfinals)]).backward()
        ref64 = (o64, f64[0], {n: _grad(full64[n]) for n in NAMES}, _grad(st64) if st64 is not None else None)

    # Distributed: this rank's slice.
    local = {n: x[n][:, start:end].clone().requires_grad_() for n in NAMES}
    st_d = x["state"].clone().requires_grad_() if x["state"] is not None else None
    op = lambda *a, **kw: distributed.wkv7(*a, **kw, backend=backend)         # noqa: E731
    o_d, f_d = _model(op, x, st_d, x["cu"], case, local)
    loss(o_d, f_d, x["do"][:, start:end], dfinals[rank]).backward()
    grads = {n: _grad(local[n]) for n in NAMES}
    dstate = None
    if st_d is not None:                      # None on ranks whose outputs do not use the state
        dstate = _grad(st_d).cpu()
        dist.all_reduce(dstate)
        dstate = dstate.to(device)

    err = {}
    # o: the gathered slices against the whole; every rank contributes its slice's squared error.
    def slice_err(key, mine, ref_full, ref_is_full=True):
        ref_slice = ref_full[:, start:end] if ref_is_full else ref_full
        num = torch.tensor([(mine.detach().double() - ref_slice.detach().double()).norm().item() ** 2,
                            ref_slice.detach().double().norm().item() ** 2,
                            0.0 if torch.isfinite(mine).all() else 1.0], dtype=torch.float64)
        dist.all_reduce(num)
        err[key] = math.inf if num[2] > 0 else math.sqrt(num[0]) / max(math.sqrt(num[1]), 1e-300)

    slice_err("o", o_d, o_ref)
    for n in NAMES:
        slice_err("d" + n, grads[n], ref_grads[n])
    if ofs:
        for i, (s, s_ref) in enumerate(zip(f_d, f_ref)):
            err[f"state_out{i}"] = _rel(s, s_ref)
    else:
        err["state_out_is_none"] = 0.0 if all(s is None for s in f_d) else math.inf
    if dstate is not None:
        err["dstate"] = _rel(dstate, ref_dstate)
    if ref64 is not None:
        o64, f64, g64, ds64 = ref64
        slice_err("o_vs_float64", o_d, o64)
        for n in NAMES:
            slice_err(f"d{n}_vs_float64", grads[n], g64[n])
        if ofs:
            err["state_out_vs_float64"] = _rel(f_d[0], f64)
        if dstate is not None:
            err["dstate_vs_float64"] = _rel(dstate, ds64)
    # Every rank sees the same values; report the largest.
    vals = torch.tensor([err[k] for k in sorted(err)], dtype=torch.float64)
    dist.all_reduce(vals, op=dist.ReduceOp.MAX)
    return dict(zip(sorted(err), vals.tolist()))


def _run_error_case(name, rank, world, distributed):
    """Returns the message this rank raised (or a note that it raised nothing)."""
    x = _inputs(CASES["packed_crossing"])
    lengths = CASES["packed_crossing"]["split"][world]
    start = sum(lengths[:rank])
    end = start + lengths[rank]
    args = [x[n][:, start:end] for n in NAMES]
    state, cu = x["state"], x["cu"]
    last = rank == world - 1
    if name == "lengths_do_not_sum" and last:
        args = [t[:, :-1] for t in args]
    if name == "k_differs_on_last_rank":
        state = None
        if last:
            args = [t[..., :4] if i in (0, 1, 2, 4, 5) else t for i, t in enumerate(args)]
    if name == "bad_state_on_last_rank" and last:
        state = state[:, :, :, :2]
    if name == "cu_seqlens_differ" and last:
        cu = cu.clone()
        cu[1] += 1
    if name == "needs_grad_differs" and last:
        args[0] = args[0].clone().requires_grad_()
    try:
        distributed.wkv7(*args, state, cu_seqlens=cu, backend="pytorch")
    except (ValueError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return "raised nothing"


def _worker(rank, world, port, out_dir, names=None, device="cpu", backend="pytorch"):
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(0)
    import torch.distributed as dist

    import rwkv_backends
    import rwkv_backends.distributed as distributed
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    try:
        for name, case in {**CASES, **GPU_CASES}.items():
            if names is not None and name not in names:
                continue
            restore = None
            if case.get("fault") == "drop_rank_0":
                restore = distributed._Fold._p, distributed._Fold._m

                def p_without_rank_0(self, j, piece, _p=restore[0]):
                    return _p(self, j, piece) * (j != 0)

                def m_without_rank_0(self, j, _m=restore[1]):
                    m = _m(self, j)
                    return torch.eye(m.shape[-1]).expand_as(m) if j == 0 else m
                distributed._Fold._p, distributed._Fold._m = p_without_rank_0, m_without_rank_0
            try:
                results[name] = _run_case(name, case, rank, world, dist, distributed, rwkv_backends.wkv7,
                                          rwkv_backends.wkv7_reference, device, backend)
            except Exception:
                results[name] = {"exception": traceback.format_exc()}
                raise
            finally:
                if restore is not None:
                    distributed._Fold._p, distributed._Fold._m = restore
        for name in ERROR_CASES if names is None else [n for n in ERROR_CASES if n in names]:
            results["error:" + name] = _run_error_case(name, rank, world, distributed)
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: under CPU load gloo's threads could still be live at
    # exit once in about ten runs, and libstdc++ aborts the process ("terminate called without an
    # active exception") after every result is written.
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RUNS = {}


def _results(world, names=None):
    """Every case (or those named) on `world` processes, run once per world size, as
    {rank: {case: result}}."""
    if names is not None:
        return _run(world, names)
    if world not in _RUNS:
        try:
            _RUNS[world] = _run(world, None)
        except Exception as error:                 # fail every test of this world size, once run
            _RUNS[world] = error
    if isinstance(_RUNS[world], Exception):
        pytest.fail(f"the {world}-process run failed: {_RUNS[world]}")
    return _RUNS[world]


def _run(world, names, device="cpu", backend="pytorch"):
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(world, _free_port(), out_dir, names, device, backend), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + RUN_TIMEOUT_S
        try:
            while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world} processes ran past {RUN_TIMEOUT_S} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = {}
        for rank in range(world):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                results[rank] = json.load(f)
    return results


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("name", [n for n in CASES if n != FAULT_CASE])
def test_matches_single_process_and_float64(world, name):
    res = _results(world)[0][name]
    assert "exception" not in res, res.get("exception")
    for key, value in res.items():
        tol = TOL_OUT if key.startswith(("o", "state_out")) else TOL_GRAD
        assert value <= tol, f"{name} on {world} ranks: {key} error {value:.2e} > {tol:.0e} ({res})"


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_a_fold_that_drops_a_rank_fails(world):
    res = _results(world)[0][FAULT_CASE]
    assert "exception" not in res, res.get("exception")
    assert res["o"] > 1e-2 and res["state_out0"] > 1e-2, res


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("name", ERROR_CASES)
def test_bad_arguments_raise_on_every_rank(world, name):
    expected = {"lengths_do_not_sum": "cu_seqlens:", "k_differs_on_last_rank": "k:",
                "bad_state_on_last_rank": "state:", "cu_seqlens_differ": "cu_seqlens:",
                "needs_grad_differs": "r:"}[name]
    for rank, results in _results(world).items():
        message = results["error:" + name]
        assert message.startswith("ValueError: " + expected), (rank, message)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU")
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_several_processes_on_one_gpu(world):
    """The Triton backend's distributed call on CUDA tensors, every rank on the same GPU, against the
    same backend in one process and against float64; the dropped-rank fold must fail."""
    results = _run(world, GPU_NAMES, device="cuda", backend="triton")[0]
    for name in GPU_NAMES:
        res = results[name]
        assert "exception" not in res, res.get("exception")
        if name == FAULT_CASE:
            assert res["o"] > 1e-2 and res["state_out0"] > 1e-2, res
            continue
        for key, value in res.items():
            tol = TOL_OUT if key.startswith(("o", "state_out")) else TOL_GRAD
            assert value <= tol, f"{name} on {world} ranks: {key} error {value:.2e} > {tol:.0e} ({res})"


def test_needs_an_initialized_process_group():
    import rwkv_backends.distributed as distributed
    x = torch.zeros(1, 2, 1, 4)
    with pytest.raises(ValueError, match="group: torch.distributed is not initialized"):
        distributed.wkv7(x, x, x, x, x, x)
