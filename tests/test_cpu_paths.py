"""The PyTorch backend's short-sequence path (step by step) and its choice of path: against the
float64 reference forward and backward in every SPEC §2 regime and w form, packed sequences with
empty ones, and T = 1 decode chains against one long call."""

import warnings

import pytest
import torch

import rwkv_backends as rb
from rwkv_backends import pytorch_chunked as pc
from rwkv_backends.backends.pytorch import PyTorchChunk
from rwkv_backends.conformance import Case, make_inputs
from rwkv_backends.conformance.cases import TOLERANCES, relative_error
from rwkv_backends.reference import wkv7_reference

NAMES = ("r", "w", "k", "v", "a", "b")
F32_FWD, F32_BWD = TOLERANCES["float32"]
REGIMES = ("realistic", "strong", "strong_all", "unit", "zero")


def _grads(fn, x, state, do, dstate, dtype, **kw):
    leaves = [x[n].detach().to(dtype).requires_grad_(True) for n in NAMES]
    st = state.detach().to(dtype).requires_grad_(True) if state is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # log-form w that looks like raw w, by design here
        o, s = fn(*leaves, st, **kw)
    wrt = [*leaves] + ([st] if st is not None else [])
    return o, s, torch.autograd.grad((o, s), wrt, (do.to(o.dtype), dstate.to(s.dtype)))


def _compare(x, state, kw, fwd_tol=F32_FWD, bwd_tol=F32_BWD):
    got = _grads(lambda *a, **k: rb.wkv7(*a, backend="pytorch", **k), x, state, x["do"], x["dstate"],
                 torch.float32, **kw)
    ref = _grads(wkv7_reference, x, state, x["do"], x["dstate"], torch.float64, **kw)
    errors = {"o": relative_error(got[0], ref[0]), "state_out": relative_error(got[1], ref[1])}
    errors.update({f"d{i}": relative_error(g, r) for i, (g, r) in enumerate(zip(got[2], ref[2]))})
    bad = {n: e for n, e in errors.items() if not e <= (fwd_tol if n in ("o", "state_out") else bwd_tol)}
    assert not bad, f"over tolerance: {bad}"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o, s = rb.wkv7(*(x[n] for n in NAMES), state, backend="pytorch", **kw)
    assert relative_error(o, ref[0]) <= fwd_tol and relative_error(s, ref[1]) <= fwd_tol


@pytest.mark.parametrize("w_form", ["log", "raw", "clampw"])
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("B, T", [(1, 1), (3, 1), (2, 5), (1, pc.SHORT_MAX)], ids=lambda x: str(x))
def test_short_path_matches_the_reference(B, T, regime, w_form):
    case = Case("backward", "float32", regime, B, T, 2, 16, 8, w_form=w_form)
    x = make_inputs(case, 7, "cpu")
    _compare(x, x["state"], {"w_form": w_form, "scale": 0.7})


@pytest.mark.parametrize("B, T", [(3, 5), (2, 1)])
def test_short_path_with_one_head(B, T):
    """One head with B > 1: the step path's per-step views stay valid when H = 1 folds into B."""
    case = Case("backward", "float32", "realistic", B, T, 1, 16, 8)
    x = make_inputs(case, 5, "cpu")
    _compare(x, x["state"], {})


@pytest.mark.parametrize("T", [1, 4])
def test_short_path_without_state_and_without_final_state(T):
    x = make_inputs(Case("backward", "float32", "realistic", 2, T, 2, 16, 8), 3, "cpu")
    _compare(x, None, {})
    with torch.no_grad():
        o, s = rb.wkv7(*(x[n] for n in NAMES), x["state"], backend="pytorch", output_final_state=False)
    ref, _ = wkv7_reference(*(x[n] for n in NAMES), x["state"])
    assert s is None and relative_error(o, ref) <= F32_FWD


@pytest.mark.parametrize("regime", ["realistic", "strong_all", "zero"])
def test_packed_short_and_long_sequences_with_empty_ones(regime):
    """Length classes up to SHORT_MAX run step by step, longer ones by chunks, in one call."""
    lens = (1, 0, 3, pc.SHORT_MAX, 0, 40, 2)
    case = Case("varlen", "float32", regime, 1, sum(lens), 2, 16, 8, w_form="raw", seqlens=lens)
    x = make_inputs(case, 5, "cpu")
    _compare(x, x["state"], {"w_form": "raw", "cu_seqlens": x["cu_seqlens"]})


def test_packed_decode_of_many_sequences():
    lens = (1,) * 9
    x = make_inputs(Case("varlen", "float32", "realistic", 1, 9, 2, 16, 8, seqlens=lens), 2, "cpu")
    _compare(x, x["state"], {"cu_seqlens": x["cu_seqlens"]})


@pytest.mark.parametrize("w_form", ["log", "clampw"])
def test_decode_chain_equals_one_long_call(w_form):
    """T = 1 calls that carry the state reproduce one call over the whole sequence (chunked: T = 48)."""
    x = make_inputs(Case("forward", "float32", "realistic", 2, 48, 2, 16, 8, w_form=w_form), 4, "cpu")
    with torch.no_grad():
        o_all, s_all = rb.wkv7(*(x[n] for n in NAMES), x["state"], w_form=w_form, backend="pytorch")
        s, outs = x["state"], []
        for t in range(48):
            o, s = rb.wkv7(*(x[n][:, t:t + 1] for n in NAMES), s, w_form=w_form, backend="pytorch")
            outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), o_all, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_all, rtol=1e-5, atol=1e-5)
    ref_o, ref_s = wkv7_reference(*(x[n] for n in NAMES), x["state"], w_form=w_form)
    assert relative_error(torch.cat(outs, 1), ref_o) <= F32_FWD and relative_error(s, ref_s) <= F32_FWD


def test_short_path_gradcheck():
    """Float64 gradcheck of the step-by-step Function, scale and state included."""
    g = torch.Generator().manual_seed(0)
    B, T, H, K, V = 2, 5, 2, 4, 3
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g, dtype=torch.float64), dim=-1)
    args = [torch.randn(B, T, H, K, generator=g, dtype=torch.float64),
            -0.6 * torch.rand(B, T, H, K, generator=g, dtype=torch.float64),
            torch.randn(B, T, H, K, generator=g, dtype=torch.float64),
            torch.randn(B, T, H, V, generator=g, dtype=torch.float64), -kk,
            kk * torch.rand(B, T, H, K, generator=g, dtype=torch.float64),
            torch.randn(B, H, K, V, generator=g, dtype=torch.float64)]
    args = [x.requires_grad_(True) for x in args]
    assert torch.autograd.gradcheck(lambda *a: pc.StepWKV7.apply(*a, 0.8), args, eps=1e-6, atol=1e-6)


def test_decode_never_writes_its_inputs():
    x = make_inputs(Case("forward", "float32", "realistic", 1, 1, 4, 16, 16), 1, "cpu")
    before = {n: x[n].clone() for n in (*NAMES, "state")}
    with torch.no_grad():
        rb.wkv7(*(x[n] for n in NAMES), x["state"], backend="pytorch")
    assert all(torch.equal(x[n], before[n]) for n in before)


def _problem(T, needs_grad=False, varlen=False):
    from rwkv_backends.problem import Problem
    return Problem(B=1, T=T, H=16, K=64, V=64, N=1, dtype=torch.float32, w_dtype=torch.float32,
                   device_type="cpu", w_form="log", scale=1.0, varlen=varlen, has_state=True,
                   output_final_state=True, state_dtype=torch.float32, needs_grad=needs_grad)


def test_path_choice_by_length():
    assert PyTorchChunk.path(_problem(1)) == "decode"
    assert PyTorchChunk.path(_problem(1, needs_grad=True)) == "step"
    assert PyTorchChunk.path(_problem(pc.SHORT_MAX)) == "step"
    assert PyTorchChunk.path(_problem(pc.SHORT_MAX + 1)) == "chunk"
    assert PyTorchChunk.path(_problem(1, varlen=True)) == "chunk"     # chooses per length class


def test_dispatcher_takes_the_short_path_at_t1(monkeypatch):
    """wkv7 at T = 1 on the CPU plans pytorch.chunk and runs its decode step, never a chunk."""
    calls = []
    real = pc.step_decode
    monkeypatch.setattr("rwkv_backends.backends.pytorch.step_decode",
                        lambda *a: calls.append("decode") or real(*a))
    monkeypatch.setattr(pc, "chunked_forward", lambda *a, **k: pytest.fail("chunked at T = 1"))
    x = make_inputs(Case("forward", "float32", "realistic", 1, 1, 16, 64, 64), 0, "cpu")
    args = [x[n] for n in NAMES]
    assert rb.explain(*args, x["state"])["variant"] == "pytorch.chunk"
    with torch.no_grad():
        o, s = rb.wkv7(*args, x["state"])
    assert calls == ["decode"]
    ref_o, ref_s = wkv7_reference(*args, x["state"])
    assert relative_error(o, ref_o) <= F32_FWD and relative_error(s, ref_s) <= F32_FWD
    # With gradients, the step-by-step Function (no chunk either).
    leaves = [t.clone().requires_grad_(True) for t in args]
    o, s = rb.wkv7(*leaves, x["state"])
    (o.sum() + s.sum()).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
