"""The PyTorch backend at the edges of its inputs: decay exactly 0 and strong decay on every channel.
Every check is against the float64 reference on fresh random inputs (SPEC §2)."""

import math

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


# --- decay exactly 0 -----------------------------------------------------------------------------


def _zero_decay_log(u):
    L = -0.6065 * u
    L[u < 0.3] = -math.inf                         # decay exactly 0 on about a third of the entries
    L[:, 5] = -math.inf                            # and on every channel of one step
    return L


@pytest.mark.parametrize("w_form, big", [("log", None), ("raw", 100.0), ("raw", 50.0)],
                         ids=["log-inf", "raw100", "raw50"])
@pytest.mark.parametrize("packed", [False], ids=["batch"])
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
