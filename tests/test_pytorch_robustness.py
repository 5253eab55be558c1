"""The PyTorch backend at the edges of its inputs: non-finite values in packed sequences, autocast
regions, packed batches of very uneven lengths, decay exactly 0 and strong decay on every channel.
Every check is against the float64 reference on fresh random inputs (SPEC §2)."""

import math
import subprocess
import sys

import pytest
import torch

import rwkv_backends as rb
from rwkv_backends.conformance.cases import TOLERANCES, relative_error
from rwkv_backends.reference import wkv7_reference

NAMES = ("r", "w", "k", "v", "a", "b")
F32_FWD, F32_BWD = TOLERANCES["float32"]


def _inputs(T, H=2, K=16, V=8, *, N=1, L=None, seed=0, dtype=torch.float32):
    """r, w (log form), k, v, a, b [1, T, H, *] as in an RWKV-7 layer, a state [N, H, K, V] and
    cotangents do, dstate. L(u) maps uniform noise to the log-decay (realistic by default)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    kk = torch.nn.functional.normalize(rnd(1, T, H, K), dim=-1)
    u = torch.rand(1, T, H, K, generator=g)
    w = L(u) if L is not None else -0.6065 * u
    x = {"r": rnd(1, T, H, K), "w": w, "k": rnd(1, T, H, K) * K ** -0.5 * 2, "v": rnd(1, T, H, V),
         "a": -kk, "b": kk * torch.rand(1, T, H, K, generator=g)}
    x = {n: t.to(dtype) for n, t in x.items()}
    return x, rnd(N, H, K, V), rnd(1, T, H, V).to(dtype), rnd(N, H, K, V)


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def _run(x, state, do, dstate, **kw):
    """o, state_out and the gradients of every input and the state, for cotangents do, dstate."""
    leaves = [x[n].detach().clone().requires_grad_(True) for n in NAMES]
    st = state.detach().clone().requires_grad_(True)
    o, s = rb.wkv7(*leaves, st, backend="pytorch", **kw)
    grads = torch.autograd.grad((o, s), [*leaves, st], (do.to(o.dtype), dstate))
    return o, s, grads


def _reference(x, state, do, dstate, **kw):
    leaves = [x[n].detach().double().requires_grad_(True) for n in NAMES]
    st = state.detach().double().requires_grad_(True)
    o, s = wkv7_reference(*leaves, st, **kw)
    grads = torch.autograd.grad((o, s), [*leaves, st], (do.double(), dstate.double()))
    return o, s, grads


def _assert_matches_reference(got, ref, fwd_tol, bwd_tol):
    (o, s, grads), (o_ref, s_ref, grads_ref) = got, ref
    errors = {"o": relative_error(o, o_ref), "state_out": relative_error(s, s_ref)}
    errors.update({"d" + n: relative_error(g, gr) for n, g, gr in zip((*NAMES, "state"), grads, grads_ref)})
    bad = {n: e for n, e in errors.items() if not e <= (fwd_tol if n in ("o", "state_out") else bwd_tol)}
    assert not bad, f"over tolerance: {bad} (all: {errors})"


# --- non-finite values stay in their own sequence ------------------------------------------------


@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_packed_non_finite_values_stay_in_their_sequence(poison):
    """A NaN or Inf in the packed stream's first token (sequence 0) and in a later sequence's first
    token reaches no other sequence's output, final state or gradients: those equal a run without
    the poisoned sequences and the float64 reference."""
    lens = (9, 0, 40, 1, 3, 70, 2)
    poisoned = (0, 4)
    x, state, do, dstate = _inputs(sum(lens), N=len(lens), seed=3)
    offsets = _cu(lens).tolist()
    bad = float(poison)
    for n in poisoned:
        first = offsets[n]
        x["k"][0, first, 0, 0] = bad
        x["v"][0, first, 1, 0] = -bad
        x["r"][0, first, 0, 1] = bad
    o, s, grads = _run(x, state, do, dstate, cu_seqlens=_cu(lens))

    keep = [n for n in range(len(lens)) if n not in poisoned]
    tokens = torch.cat([torch.arange(offsets[n], offsets[n + 1]) for n in keep])
    x_keep = {n: t[:, tokens] for n, t in x.items()}
    clean = _run(x_keep, state[keep], do[:, tokens], dstate[keep], cu_seqlens=_cu([lens[n] for n in keep]))
    ref = _reference(x_keep, state[keep], do[:, tokens], dstate[keep], cu_seqlens=_cu([lens[n] for n in keep]))

    got = (o[:, tokens], s[keep], [g[:, tokens] for g in grads[:6]] + [grads[6][keep]])
    assert all(torch.isfinite(t).all() for t in (got[0], got[1], *got[2]))
    for mine, alone in zip((got[0], got[1], *got[2]), (clean[0], clean[1], *clean[2])):
        torch.testing.assert_close(mine, alone, rtol=1e-6, atol=1e-6)
    _assert_matches_reference(got, ref, F32_FWD, F32_BWD)
    # The poisoned sequences themselves are non-finite, as in the reference.
    assert not torch.isfinite(o[:, offsets[0]:offsets[1]]).all()


# --- autocast ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("packed", [False, True], ids=["batch", "packed"])
def test_autocast_region_computes_as_outside(dtype, packed):
    """Inside torch.autocast(cpu, bfloat16) the op computes as outside it: float32 arithmetic, o in
    v's dtype, the accuracy of the input dtype, forward and backward."""
    lens = (37, 0, 5, 20)
    x, state, do, dstate = _inputs(sum(lens), N=len(lens) if packed else 1, seed=5, dtype=dtype)
    kw = {"cu_seqlens": _cu(lens)} if packed else {}
    outside = _run(x, state, do, dstate, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = _run(x, state, do, dstate, **kw)
    assert inside[0].dtype == dtype and inside[1].dtype == torch.float32
    assert all(g.dtype == x[n].dtype for g, n in zip(inside[2], NAMES))
    for a, b in zip((inside[0], inside[1], *inside[2]), (outside[0], outside[1], *outside[2])):
        assert torch.equal(a, b)
    fwd_tol, bwd_tol = TOLERANCES["float32" if dtype == torch.float32 else "bfloat16"]
    _assert_matches_reference(inside, _reference(x, state, do, dstate, **kw), fwd_tol, bwd_tol)


# --- packed sequences of uneven lengths ----------------------------------------------------------

_MEASURE = r"""
import resource, sys, time, torch, rwkv_backends as rb
torch.set_num_threads(1)            # timings on a shared machine: no thread-pool contention
packed = sys.argv[1] == "packed"
long, short, H, K = 1024, 255, 2, 16
T = long + short
g = torch.Generator().manual_seed(0)
x = [torch.randn(1, T, H, K, generator=g) * 0.3 for _ in range(6)]
x[1] = -0.6 * torch.rand(1, T, H, K, generator=g)
x = [t.requires_grad_(True) for t in x]
cu = torch.tensor([0] + [long + i for i in range(short + 1)]) if packed else None

def rss_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))

def step():
    o, s = rb.wkv7(*x, cu_seqlens=cu, backend="pytorch")
    (o.sum() + s.sum()).backward()

o, s = rb.wkv7(*(t[:, :40] for t in x), backend="pytorch")      # imports and planning, off the clock
(o.sum() + s.sum()).backward()
try:                                 # reset the peak RSS to the current RSS (Linux)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = rss_kb("VmRSS:")
    peak = lambda: rss_kb("VmHWM:")
except OSError:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
step()
seconds = time.perf_counter() - t0
mb = (peak() - base) / 1024
for _ in range(2 if seconds < 5 else 0):
    t0 = time.perf_counter()
    step()
    seconds = min(seconds, time.perf_counter() - t0)
print(mb, seconds)
"""


def _peak_mb_and_seconds(mode):
    out = subprocess.run([sys.executable, "-c", _MEASURE, mode], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    mb, seconds = map(float, out.stdout.split())
    return mb, seconds


def test_packed_uneven_lengths_cost_about_what_the_tokens_cost_unpacked():
    """One 1024-token sequence and 255 one-token sequences, forward and backward: peak memory within
    2x of the same tokens as one unpacked sequence (padding every sequence to the longest took 160x
    here), and time within a small factor."""
    unpacked_mb, unpacked_s = _peak_mb_and_seconds("unpacked")
    packed_mb, packed_s = _peak_mb_and_seconds("packed")
    # The allowances cover allocator and timer noise at these sizes.
    assert packed_mb <= 2 * unpacked_mb + 16, (packed_mb, unpacked_mb)
    assert packed_s <= 2 * unpacked_s + 0.5, (packed_s, unpacked_s)


def test_packing_pads_each_length_class_to_under_twice_its_tokens():
    from rwkv_backends.pytorch_chunked import _Packing
    lens = [4096] + [1] * 255 + [0, 3, 17, 33, 64, 65, 100, 2000]
    pack = _Packing(_cu(lens), "cpu", 32)
    padded = sum(g.n * g.Tp for g in pack.classes)
    assert padded < 2 * sum(lens)
    assert sorted(torch.cat([g.ids for g in pack.classes]).tolist()) == [n for n, t in enumerate(lens) if t]
    assert sorted(torch.cat([g.tokens for g in pack.classes]).tolist()) == list(range(sum(lens)))


def test_packed_gradcheck():
    """Float64 gradcheck of the packed Function across length classes and an empty sequence."""
    from rwkv_backends.pytorch_chunked import PackedWKV7, _Packing
    lens = (3, 0, 1, 6, 2, 9)
    x, state, _, _ = _inputs(sum(lens), H=1, K=4, V=3, N=len(lens), seed=11, dtype=torch.float64)
    pack = _Packing(_cu(lens), "cpu", 4)
    args = [t.detach().requires_grad_(True) for t in (*x.values(), state.double())]
    assert torch.autograd.gradcheck(lambda *a: PackedWKV7.apply(*a, 0.8, pack), args, eps=1e-6, atol=1e-6)


# --- decay exactly 0 -----------------------------------------------------------------------------


def _zero_decay_log(u):
    L = -0.6065 * u
    L[u < 0.3] = -math.inf                         # decay exactly 0 on about a third of the entries
    L[:, 5] = -math.inf                            # and on every channel of one step
    return L


@pytest.mark.parametrize("w_form, big", [("log", None), ("raw", 100.0), ("raw", 50.0)],
                         ids=["log-inf", "raw100", "raw50"])
@pytest.mark.parametrize("packed", [False, True], ids=["batch", "packed"])
def test_decay_exactly_zero_is_finite_like_the_reference(w_form, big, packed):
    """w = -inf (log form) or a raw w whose decay exp(-exp(w)) is 0 (exp(100) overflows float32, so
    L = -inf there; exp(50) does not): finite and equal to the reference, gradients included."""
    lens = (40, 1, 0, 33)
    x, state, do, dstate = _inputs(sum(lens), N=len(lens) if packed else 1, L=_zero_decay_log, seed=7)
    if w_form == "raw":                            # L = -exp(w)
        x["w"] = torch.where(torch.isinf(x["w"]), torch.tensor(big), torch.log(-x["w"]))
    kw = {"w_form": w_form, **({"cu_seqlens": _cu(lens)} if packed else {})}
    got = _run(x, state, do, dstate, **kw)
    _assert_matches_reference(got, _reference(x, state, do, dstate, **kw), F32_FWD, F32_BWD)


# --- strong decay on every channel ---------------------------------------------------------------


@pytest.mark.parametrize("w_form", ["log", "raw"])
@pytest.mark.parametrize("regime", ["-10", "-30..-10", "-30"])
@pytest.mark.parametrize("lens", [(70,), (1,), (2,), (5, 1, 1, 40, 2)], ids=["T70", "T1", "T2", "packed"])
def test_strong_decay_on_every_channel_keeps_dw_accurate(w_form, regime, lens):
    """L <= -10 on every channel: the true dL carries a factor e^L <= 4.5e-5, so any term of dL
    that cancels against its opposite leaves noise larger than dL itself."""
    L = {"-10": lambda u: -10.0 + 0 * u, "-30..-10": lambda u: -10.0 - 20.0 * u,
         "-30": lambda u: -30.0 + 0 * u}[regime]
    x, state, do, dstate = _inputs(sum(lens), N=len(lens), L=L, seed=13)
    if w_form == "raw":
        x["w"] = torch.log(-x["w"])
    kw = {"w_form": w_form, **({"cu_seqlens": _cu(lens)} if len(lens) > 1 else {})}
    got = _run(x, state, do, dstate, **kw)
    # A tenth of the float32 ceiling: the margin left is what a real run needs across seeds.
    _assert_matches_reference(got, _reference(x, state, do, dstate, **kw), F32_FWD, F32_BWD / 10)
