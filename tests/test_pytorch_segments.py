"""The PyTorch backend's segmented forward (pytorch_segments): against the float64 reference and
against the unsegmented chunk maps in every SPEC §2 regime, with tokens past the last whole chunk,
several segments, a segment that needs the exact form beside factored ones, start states for the
backward at a coarser chunk, 16-bit inputs, and the workspace reused across calls."""

import pytest
import torch

from rwkv_backends import pytorch_chunked as pc
from rwkv_backends import pytorch_segments as ps
from rwkv_backends.conformance import Case, make_inputs
from rwkv_backends.conformance.cases import TOLERANCES, relative_error
from rwkv_backends.reference import log_decay, wkv7_reference

NAMES = ("r", "w", "k", "v", "a", "b")
F32_FWD = TOLERANCES["float32"][0]


def _inputs(regime, B, T, H=2, K=16, V=8, seed=0, w_form="log"):
    x = make_inputs(Case("forward", "float32", regime, B, T, H, K, V, w_form=w_form), seed, "cpu")
    L = log_decay(x["w"].float(), w_form)
    return x, [x["r"], L, x["k"], x["v"], x["a"], x["b"]]


@pytest.mark.parametrize("regime", ["realistic", "strong", "strong_all", "unit", "zero"])
@pytest.mark.parametrize("B, T, rows", [(1, 100, 64), (2, 64, 2048), (3, 37, 96)], ids=str)
def test_segmented_forward_matches_the_reference(regime, B, T, rows):
    x, args = _inputs(regime, B, T)
    with torch.no_grad():
        o, s, starts = ps.segmented_forward(*args, x["state"], 0.7, 16, segment_rows=rows)
    ref_o, ref_s = wkv7_reference(*(x[n] for n in NAMES), x["state"], scale=0.7)
    assert starts is None
    assert relative_error(o, ref_o) <= F32_FWD and relative_error(s, ref_s) <= F32_FWD


def test_one_strong_segment_beside_factored_ones():
    """Decay past SAFE_RANGE in one segment only: that segment runs the exact form, the others the
    factored one, and the whole matches the reference."""
    x, args = _inputs("realistic", 1, 96, seed=3)
    L = args[1].clone()
    L[:, 40:44] = -30.0                     # chunk 2 (tokens 32-47): range 120 > SAFE_RANGE
    args[1] = L
    calls = []
    real = ps._segment_exact
    ps._segment_exact = lambda *a: calls.append(a[5]) or real(*a)
    try:
        with torch.no_grad():
            o, s, _ = ps.segmented_forward(*args, x["state"], 1.0, 16, segment_rows=2 * 16 * 2)
    finally:
        ps._segment_exact = real
    assert calls == [32]                    # the segment starting at token 32 alone
    ref_o, ref_s = wkv7_reference(x["r"], L, x["k"], x["v"], x["a"], x["b"], x["state"])
    assert relative_error(o, ref_o) <= F32_FWD and relative_error(s, ref_s) <= F32_FWD


@pytest.mark.parametrize("T", [64, 70, 100])
def test_start_states_at_the_backward_chunk(T):
    """keep_every = 2 at chunk 16 gives the start states of chunks of 32, as the unsegmented maps do."""
    x, args = _inputs("realistic", 2, T, seed=1)
    with torch.no_grad():
        o, s, starts = ps.segmented_forward(*args, x["state"], 1.0, 16, keep_every=2, segment_rows=64)
        o_ref, s_ref, starts_ref = pc._chunked_forward_maps(*args, x["state"], 1.0, 32)
    assert starts.shape == starts_ref.shape
    torch.testing.assert_close(starts, starts_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_and_a_reused_workspace():
    """16-bit inputs compute in float32; a second call on other shapes reuses the thread's workspace
    without carrying anything over (the same call twice gives the same bits)."""
    x, args = _inputs("realistic", 1, 80, H=4, K=32, V=32, seed=2)
    args16 = [t.bfloat16() for t in args]
    with torch.no_grad():
        o1, s1, _ = ps.segmented_forward(*args16, x["state"], 1.0)
        ps.segmented_forward(*[t[:, :48] for t in args16], x["state"], 1.0)
        o2, s2, _ = ps.segmented_forward(*args16, x["state"], 1.0)
    assert o1.dtype == torch.float32 and torch.equal(o1, o2) and torch.equal(s1, s2)
    ref_o, ref_s = wkv7_reference(*(t.float() for t in args16), x["state"])
    assert relative_error(o1, ref_o) <= 1e-5 and relative_error(s1, ref_s) <= 1e-5


def test_huge_vectors_fall_back_to_masked_fill():
    """Vectors large enough that an entry above the in-chunk diagonal overflows: the 0/1 product
    would give NaN there; the finiteness check forms the product again with masked_fill_."""
    x, args = _inputs("realistic", 1, 32, seed=4)
    args[1] = torch.full_like(args[1], -3.5)              # range 56 per chunk: factored, e^56 ~ 2e24
    args[0] = args[0] * 1e8                                # r_t k_s e^{G_t - G_s} past 3e38 above the diagonal
    args[2] = args[2] * 1e8
    with torch.no_grad():
        o, s, _ = ps.segmented_forward(*args, x["state"], 1.0, 16)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    ref_o, ref_s = wkv7_reference(*args, x["state"])
    assert relative_error(o, ref_o) <= F32_FWD and relative_error(s, ref_s) <= F32_FWD


def test_forward_chunk_by_length():
    """8 below 64 tokens, 16 from 64 (where it divides the backward's chunk), else the chunk itself."""
    assert ps.forward_chunk(40, 16) == 8
    assert ps.forward_chunk(63, 16) == 8
    assert ps.forward_chunk(64, 32) == 16
    assert ps.forward_chunk(4096, 32) == 16
    assert ps.forward_chunk(100, 4) == 4
    assert ps.forward_chunk(100, 24) == 24


@pytest.mark.parametrize("T", [40, 200])
def test_chunked_forward_runs_at_the_chosen_chunk(T, monkeypatch):
    """chunked_forward (what wkv7's chunk path calls) runs segmented_forward at forward_chunk's size,
    with the start states for the backward's chunk; gradients through it match the reference."""
    seen = []
    real = ps.segmented_forward
    monkeypatch.setattr(pc, "segmented_forward", lambda *a, **k: seen.append((a[8], k)) or real(*a, **k))
    x, args = _inputs("realistic", 1, T, seed=5)
    chunk = pc.chunk_for(T)
    leaves = [t.detach().clone().requires_grad_(True) for t in args]
    o, s = pc.ChunkedWKV7.apply(*leaves, x["state"], 1.0, chunk)
    fc = 8 if T < 64 else 16
    assert seen == [(fc, {"keep_every": chunk // fc})]
    grads = torch.autograd.grad((o.sum() + s.sum()), leaves)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in args]
    ro, rs = wkv7_reference(*ref_leaves, x["state"].double())
    ref_grads = torch.autograd.grad((ro.sum() + rs.sum()), ref_leaves)
    assert relative_error(o, ro) <= F32_FWD
    assert all(relative_error(g, r) <= TOLERANCES["float32"][1] for g, r in zip(grads, ref_grads))


def test_inference_mode_then_training_reuse_no_inference_buffer():
    """A call under torch.inference_mode, then the same shapes without it and with gradients: the
    kept workspace and masks made in inference mode (inference tensors, which out= may not write
    outside it) are not reused outside it."""
    import rwkv_backends as rb
    x, _ = _inputs("realistic", 1, 100, seed=6)
    args = [x[n] for n in NAMES]
    with torch.inference_mode():
        o1, _ = rb.wkv7(*args, x["state"], backend="pytorch")
    with torch.no_grad():
        o2, _ = rb.wkv7(*args, x["state"], backend="pytorch")
    leaves = [t.detach().clone().requires_grad_(True) for t in args]
    o3, s3 = rb.wkv7(*leaves, x["state"], backend="pytorch")
    (o3.sum() + s3.sum()).backward()
    with torch.inference_mode():
        o4, _ = rb.wkv7(*args, x["state"], backend="pytorch")
    assert torch.equal(o1, o2) and torch.equal(o1, o4) and torch.allclose(o1, o3.detach(), atol=1e-6)
    assert all(t.grad is not None for t in leaves)
