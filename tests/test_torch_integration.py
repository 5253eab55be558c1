"""wkv7 as a torch.library op: opcheck, and torch.compile(fullgraph=True) forward and backward."""

import os

import pytest
import torch

import rwkv_backends as rb
from _support import HAS_GPU
from rwkv_backends.conformance import Case, make_inputs, relative_error
from rwkv_backends.reference import wkv7_reference

NAMES = ("r", "w", "k", "v", "a", "b")


def _x(seed=0, **kw):
    shape = dict(B=2, T=20, H=2, K=16, V=16) | kw
    return make_inputs(Case("backward", "float32", "realistic", **shape), seed, "cpu")


@pytest.mark.parametrize("training", [True, False])
def test_opcheck_with_state(training):
    x = _x()
    args = (*(x[n].requires_grad_(True) for n in NAMES), x["state"].requires_grad_(True), None, "log", 1.0, None,
            training)
    torch.library.opcheck(torch.ops.rwkv_backends.wkv7.default, args)


def test_opcheck_without_state_with_cu_seqlens_and_raw_decay():
    x = _x(B=1, T=24)
    args = (*(x[n].requires_grad_(True) for n in NAMES), None, torch.tensor([0, 10, 10, 24]), "raw", 0.5, None, True)
    torch.library.opcheck(torch.ops.rwkv_backends.wkv7.default, args)


def _compiled_matches_reference(x, use_state, backend="aot_eager", tol=1e-4, value_tol=1e-5, **kw):
    def loss(r, w, k, v, a, b, s):
        o, st = rb.wkv7(r, w, k, v, a, b, s, **kw)
        return (o.float() * x["do"]).sum() + (st * x["dstate"]).sum()

    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    leaves = [x[n].clone().requires_grad_(True) for n in NAMES]
    st = x["state"].clone().requires_grad_(True) if use_state else None
    wrt = leaves + ([st] if use_state else [])
    value = compiled(*leaves, st)
    grads = torch.autograd.grad(value, wrt)
    ref_leaves = [x[n].double().requires_grad_(True) for n in NAMES]
    ref_st = x["state"].double().requires_grad_(True) if use_state else None
    o_ref, s_ref = wkv7_reference(*ref_leaves, ref_st, **kw)
    ref_value = (o_ref * x["do"].double()).sum() + (s_ref * x["dstate"].double()).sum()
    ref_grads = torch.autograd.grad(ref_value, ref_leaves + ([ref_st] if use_state else []))
    assert abs(value.item() - ref_value.item()) <= value_tol * abs(ref_value.item())
    for g, gr in zip(grads, ref_grads):
        assert relative_error(g, gr) < tol


@pytest.mark.parametrize("use_state", [True, False])
def test_compile_fullgraph_forward_and_backward_match_the_reference(use_state):
    torch._dynamo.reset()
    _compiled_matches_reference(_x(seed=3), use_state)


def test_compile_strong_decay_and_clampw():
    torch._dynamo.reset()
    x = make_inputs(Case("backward", "float32", "strong", 1, 40, 2, 16, 16, w_form="raw"), 8, "cpu")
    _compiled_matches_reference(x, True, w_form="raw", scale=0.5)


@pytest.mark.skipif(HAS_GPU or os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter run")
@pytest.mark.parametrize("variant", [None, "triton.chunk", "triton.chunk_twopass"])
def test_compile_through_the_triton_plan(simulate, monkeypatch, variant):
    """The op's forward runs the variant's training forward and returns what it keeps, which the
    backward op takes: the planned variant (chunk transitions here), the one-pass one (which keeps U
    on sm90) and the two-pass one."""
    simulate("nvidia:sm90")
    if variant:
        monkeypatch.setenv("RWKV_BACKENDS_BACKEND", variant)
    torch._dynamo.reset()
    _compiled_matches_reference(_x(seed=5, T=37), True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA/ROCm GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compile_inductor_on_the_gpu_matches_the_reference(dtype):
    """The default (inductor) backend around the Triton plan, forward and backward, on the card."""
    torch._dynamo.reset()
    x = make_inputs(Case("backward", dtype, "realistic", 2, 200, 4, 64, 64), 9, "cuda")
    _compiled_matches_reference(x, True, backend="inductor",
                                tol=1e-4 if dtype == "float32" else 1e-2, value_tol=1e-5 if dtype == "float32" else 1e-2)


def test_compiled_graph_has_no_break():
    torch._dynamo.reset()
    x = _x()
    explanation = torch._dynamo.explain(lambda *t: rb.wkv7(*t)[0].sum())(*(x[n] for n in NAMES), x["state"])
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def _varlen_x(seed):
    """Packed sequences (an empty one among them) with an initial state per sequence."""
    return make_inputs(Case("backward", "float32", "realistic", 1, 37, 2, 16, 16, seqlens=(12, 0, 25)), seed, "cpu")


def _zero_state_gradient(grads):
    return [*grads[:6], torch.zeros_like(grads[6]), *grads[7:]]


@pytest.mark.parametrize("fault", [False, True])
def test_compile_varlen_with_state_gives_the_state_gradient(monkeypatch, fault):
    """torch.compile's path (the torch.library op and its backward op) for packed sequences with an
    initial state: the state's gradient is the reference's; a backward op that zeroes it fails."""
    from rwkv_backends import ops
    if fault:
        real = ops.wkv7_backward_op
        monkeypatch.setattr(ops, "wkv7_backward_op", lambda *args: _zero_state_gradient(real(*args)))
    torch._dynamo.reset()
    x = _varlen_x(6)
    if fault:
        with pytest.raises(AssertionError):
            _compiled_matches_reference(x, True, cu_seqlens=x["cu_seqlens"])
    else:
        _compiled_matches_reference(x, True, cu_seqlens=x["cu_seqlens"])


@pytest.mark.skipif(HAS_GPU or os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter run")
@pytest.mark.parametrize("variant, fault", [(None, False), ("triton.chunk", False), ("triton.chunk", True)])
def test_compile_varlen_with_state_through_the_triton_plan(simulate, monkeypatch, variant, fault):
    """The Triton variants' backward as the op runs it (from what the op's forward kept) for packed
    sequences with an initial state; a variant backward whose state gradient is zeroed fails."""
    from rwkv_backends.backends import triton as triton_backend
    simulate("nvidia:sm90")
    if variant:
        monkeypatch.setenv("RWKV_BACKENDS_BACKEND", variant)
    if fault:
        real = triton_backend._TrainedVariant.train_backward
        monkeypatch.setattr(triton_backend._TrainedVariant, "train_backward",
                            lambda self, *a, **kw: _zero_state_gradient(real(self, *a, **kw)))
    torch._dynamo.reset()
    x = _varlen_x(7)
    if fault:
        with pytest.raises(AssertionError):
            _compiled_matches_reference(x, True, cu_seqlens=x["cu_seqlens"])
    else:
        _compiled_matches_reference(x, True, cu_seqlens=x["cu_seqlens"])
