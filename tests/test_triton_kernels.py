"""The Triton kernels: through the interpreter on CPU (CI), on the real device when there is one."""

import os

import pytest
import torch

from _support import HAS_GPU, requires_gpu
from rwkv_backends.conformance import Case, full_cases, quick_cases
from rwkv_backends.conformance.runner import run_case

interpreter = pytest.mark.skipif(HAS_GPU or os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="interpreter tests run on CPU-only machines")


@interpreter
@pytest.mark.parametrize("profile", ["nvidia:sm90", "amd:gfx942"])
@pytest.mark.parametrize("case", quick_cases(), ids=lambda c: c.id)
def test_interpreted_plan(simulate, profile, case):
    simulate(profile)
    res = run_case(case, backend="triton", device="cpu", base_seed=7)
    assert res["status"] == "passed", res.get("detail")
    assert res["variant"].startswith("triton.")


_VARIANT_CASES = ([c for c in quick_cases() if c.kind in ("forward", "varlen") and c.T > 16][:5]
                  + [c for c in quick_cases() if c.kind == "backward"][:4])


@interpreter
@pytest.mark.parametrize("variant", ["triton.chunk", "triton.chunk_twopass", "triton.chunk_transition"])
@pytest.mark.parametrize("case", _VARIANT_CASES, ids=lambda c: c.id)
def test_every_chunk_variant_matches_the_reference(simulate, variant, case):
    """Small problems plan the transition variant on sm90 (the two-pass one at K > 64); each chunk
    variant is forced here so that all stay covered, forward and backward."""
    simulate("nvidia:sm90")
    res = run_case(case, backend=variant, device="cpu", base_seed=3)
    assert res["status"] == "passed", res.get("detail")
    assert res["variant"] == variant


@interpreter
@pytest.mark.parametrize("regime, varlen, block_k, per_sequence", [
    ("realistic", False, 16, 3), ("strong", True, 16, 2), ("strong", False, 32, 1), ("unit", True, 32, 5)])
def test_chunk_prepare_matches_the_in_loop_build(regime, varlen, block_k, per_sequence):
    """Pass 1 of the two-pass forward (matrices built K-block by K-block, every per_sequence-th
    chunk per program) gives the outputs of the one-pass forward, strong decay and an empty
    sequence included."""
    from rwkv_backends.config import KernelConfig
    from rwkv_backends.conformance import Case, make_inputs, relative_error
    from rwkv_backends.kernels import chunk, twopass
    x = make_inputs(Case("forward", "float32", regime, 1 if varlen else 2, 50, 2, 24, 32), 4, "cpu")
    cu = torch.tensor([0, 17, 17, 50]) if varlen else None
    state = torch.randn(3, 2, 24, 32) if varlen else x["state"]
    args = [x[n] for n in ("r", "w", "k", "v", "a", "b")]
    cfg = KernelConfig(chunk_size=16, block_v=32, block_k=block_k)
    kw = dict(scale=0.7, cu_seqlens=cu, w_form="log", cfg=cfg)
    o_one, s_one, _ = chunk.chunk_forward(*args, state, **kw)
    mats = twopass.chunk_prepare(*(x[n] for n in ("r", "w", "k", "a", "b")), cu_seqlens=cu, w_form="log", cfg=cfg,
                                 programs_per_sequence=per_sequence)
    o_two, s_two, _ = chunk.chunk_forward(*args, state, mats=mats, mats_mode="load", **kw)
    assert relative_error(o_two, o_one) < 1e-6 and relative_error(s_two, s_one) < 1e-6


@interpreter
@pytest.mark.parametrize("regime, varlen, V", [("realistic", False, 40), ("strong", True, 32)])
def test_backward_split_by_v_blocks_matches_one_block(regime, varlen, V):
    """Each V block's program gives exact v and state gradients for its columns and a share of the
    r, w, k, a, b gradients; the shares add up to the one-block backward."""
    from rwkv_backends.config import KernelConfig
    from rwkv_backends.conformance import Case, make_inputs, relative_error
    from rwkv_backends.kernels import backward
    x = make_inputs(Case("backward", "float32", regime, 1 if varlen else 2, 37, 2, 24, V), 6, "cpu")
    cu = torch.tensor([0, 20, 20, 37]) if varlen else None
    N = 3 if varlen else 2
    state = torch.randn(N, 2, 24, V)
    dstate = torch.randn(N, 2, 24, V)
    args = [x[n] for n in ("r", "w", "k", "v", "a", "b")]
    fwd = KernelConfig(chunk_size=16, block_v=64)
    kw = dict(scale=0.9, cu_seqlens=cu, w_form="log", cfg_fwd=fwd)
    whole = backward.chunk_backward(*args, state, x["do"], dstate, cfg_bwd=KernelConfig(chunk_size=16, block_v=64), **kw)
    split = backward.chunk_backward(*args, state, x["do"], dstate, cfg_bwd=KernelConfig(chunk_size=16, block_v=16), **kw)
    for name, g1, g2 in zip(("r", "w", "k", "v", "a", "b", "state"), whole, split):
        assert g2.dtype == g1.dtype and g2.shape == g1.shape, name
        assert relative_error(g2, g1) < 1e-5, name          # the shares add in another order


def _reference_gradients(ins, state, do, dstate, **kw):
    """Gradients of r, w, k, v, a, b and the initial state (None without one) from the float64
    reference, for the outputs' gradients do and dstate."""
    from rwkv_backends.reference import wkv7_reference
    ref_ins = [t.double().requires_grad_(True) for t in ins]
    ref_state = state.double().requires_grad_(True) if state is not None else None
    o_ref, s_ref = wkv7_reference(*ref_ins, ref_state, **kw)
    torch.autograd.backward((o_ref, s_ref), (do.double(), dstate.double()))
    return [t.grad for t in ref_ins] + [ref_state.grad if state is not None else None]


@interpreter
@pytest.mark.parametrize("regime, varlen, seg_len, V, with_state, fwd_chunk, transitions", [
    ("realistic", False, 32, 32, True, 16, False), ("strong", True, 16, 32, True, 16, False),
    ("realistic", True, 64, 16, False, 32, False), ("unit", False, 96, 32, True, 32, False),
    ("realistic", False, 32, 32, True, 32, True), ("strong", True, 16, 32, True, 16, True),
    ("unit", True, 96, 16, False, 32, True)])
def test_segmented_backward_matches_one_walk_and_the_reference(regime, varlen, seg_len, V, with_state, fwd_chunk,
                                                               transitions):
    """Two-pass training stores each segment's start state in the forward; the backward recomputes
    the chunk states and the gradients of all segments at once, from the state gradients a sweep
    stored at the segments' ends (at the forward's chunk size, which may differ from the backward's;
    over the loaded chunk matrices, or over chunk transitions). It must give the one-walk backward's
    gradients (an empty sequence, a segment longer than its sequence, a partial last segment and
    strong decay included) and the float64 reference's; the forward's outputs must not change, and
    the transition walk's must be the loaded forward's."""
    from rwkv_backends.config import KernelConfig
    from rwkv_backends.conformance import Case, make_inputs, relative_error
    from rwkv_backends.kernels import backward, common, transition, twopass
    x = make_inputs(Case("backward", "float32", regime, 1 if varlen else 2, 70, 2, 16, V), 8, "cpu")
    cu = torch.tensor([0, 0, 21, 70]) if varlen else None
    N = 3 if varlen else 2
    state = torch.randn(N, 2, 16, V) if with_state else None
    dstate = torch.randn(N, 2, 16, V)
    ins = [x[n] for n in ("r", "w", "k", "v", "a", "b")]
    fwd = KernelConfig(chunk_size=fwd_chunk, block_v=16)
    bwd = KernelConfig(chunk_size=16, block_v=16)
    kw = dict(scale=0.8, cu_seqlens=cu, w_form="log")
    seg = common.empty_states(x["k"], x["v"], cu, seg_len)
    o, s, mats = twopass.twopass_forward(*ins, state, **kw, cfg_prep=fwd, cfg_fwd=fwd, programs_per_sequence=2,
                                         seg_states=seg, seg_len=seg_len)
    o_plain, s_plain, _ = twopass.twopass_forward(*ins, state, **kw, cfg_prep=fwd, cfg_fwd=fwd,
                                                  programs_per_sequence=2)
    assert torch.equal(o, o_plain) and torch.equal(s, s_plain)
    if transitions:
        seg_t = common.empty_states(x["k"], x["v"], cu, seg_len)
        o_t, s_t, kept = transition.transition_twopass(*ins, state, **kw, cfg_trans=fwd, cfg_walk=fwd,
                                                       programs_per_sequence=3, seg_states=seg_t, seg_len=seg_len)
        assert relative_error(o_t, o) < 1e-5 and relative_error(s_t, s) < 1e-5
        lens = (cu[1:] - cu[:-1]).tolist() if varlen else [70, 70]
        used = sum(-(-n // seg_len) for n in lens)          # packed buffers have spare slots at the end
        assert relative_error(seg_t[:used], seg[:used]) < 1e-5
        g_seg = backward.chunk_backward(*ins, state, x["do"], dstate, **kw, cfg_fwd=fwd, cfg_bwd=bwd, seg_states=seg_t,
                                        seg_len=seg_len, transitions=kept)
        if fwd_chunk == 32:          # walked at another chunk size than they were built at: refused
            with pytest.raises(ValueError, match="transitions"):
                backward.chunk_backward(*ins, state, x["do"], dstate, **kw, cfg_fwd=fwd.with_(chunk_size=16), cfg_bwd=bwd,
                                        seg_states=seg_t, seg_len=seg_len, transitions=kept)
    else:
        g_seg = backward.chunk_backward(*ins, state, x["do"], dstate, **kw, cfg_fwd=fwd, cfg_bwd=bwd, mats=mats,
                                        seg_states=seg, seg_len=seg_len)
    g_one = backward.chunk_backward(*ins, state, x["do"], dstate, **kw, cfg_fwd=fwd, cfg_bwd=bwd, mats=mats)
    want = _reference_gradients(ins, state, x["do"], dstate, scale=0.8, cu_seqlens=cu)
    for name, got, same, ref in zip(("r", "w", "k", "v", "a", "b", "state"), g_seg, g_one, want):
        if ref is None:
            assert got is None and same is None
            continue
        # The transition sweep sums in another order: the same gradients to float32 rounding.
        assert relative_error(got, same) < (1e-5 if transitions else 1e-6), name
        assert relative_error(got, ref) < 1e-4, name
    with pytest.raises(ValueError, match="seg_len"):
        backward.chunk_backward(*ins, state, x["do"], dstate, **kw, cfg_fwd=fwd, cfg_bwd=bwd, mats=mats,
                                seg_states=seg, seg_len=seg_len + 8)


@interpreter
@pytest.mark.parametrize("varlen", [False, True])
def test_state_gradient_sweep_also_stores_dz_and_dv(varlen):
    """Given dz and dv, the sweep also stores every chunk's dZ and the gradient of v (what head 128's
    K-split Gluon gradient kernel takes): dv must be the one-walk backward's, every dZ row written,
    and the state gradients it stores unchanged to the bit."""
    from rwkv_backends.config import KernelConfig
    from rwkv_backends.conformance import Case, make_inputs, relative_error
    from rwkv_backends.kernels import backward, chunk, common, twopass
    x = make_inputs(Case("backward", "float32", "realistic", 1 if varlen else 2, 70, 2, 16, 32), 9, "cpu")
    cu = torch.tensor([0, 0, 21, 70]) if varlen else None
    N = 3 if varlen else 2
    state, dstate = torch.randn(N, 2, 16, 32), torch.randn(N, 2, 16, 32)
    r, w, k, v, a, b = (x[n] for n in ("r", "w", "k", "v", "a", "b"))
    cfg = KernelConfig(chunk_size=16, block_v=16)
    kw = dict(scale=0.8, cu_seqlens=cu, w_form="log")
    seg = common.empty_states(k, v, cu, 32)
    twopass.twopass_forward(r, w, k, v, a, b, state, **kw, cfg_prep=cfg, cfg_fwd=cfg, programs_per_sequence=2,
                            seg_states=seg, seg_len=32)
    mats = common.empty_mats(k, cu, 16)
    chunk.chunk_forward(r, w, k, v, a, b, state, **kw, cfg=cfg, mats=mats, mats_mode="store")
    g_one = backward.chunk_backward(r, w, k, v, a, b, state, x["do"], dstate, **kw, cfg_fwd=cfg, cfg_bwd=cfg, mats=mats)
    sweeps = []
    for with_dz in (False, True):
        seg_ds, dh0 = torch.zeros_like(seg), torch.zeros(N, 2, 16, 32)
        dz, dv = (torch.full_like(v, float("nan")), torch.full_like(v, float("nan"))) if with_dz else (None, None)
        twopass.dstate_sweep(r, w, k, a, b, x["do"], dstate, mats, seg_ds, dh0, **kw, cfg=cfg, seg_len=32, dz=dz, dv=dv)
        sweeps.append((seg_ds, dh0, dz, dv))
    (seg_a, dh0_a, _, _), (seg_b, dh0_b, dz, dv) = sweeps
    assert torch.equal(seg_a, seg_b) and torch.equal(dh0_a, dh0_b)
    assert torch.equal(dh0_a, g_one[6])
    assert relative_error(dv, g_one[3]) < 1e-6
    assert torch.isfinite(dz).all() and dz.abs().max() > 0
    with pytest.raises(ValueError, match="dz, dv"):
        twopass.dstate_sweep(r, w, k, a, b, x["do"], dstate, mats, seg_ds, dh0, **kw, cfg=cfg, seg_len=32, dz=dz)


@interpreter
def test_chunk_forward_fills_a_given_states_buffer():
    """The backward allocates the recompute's states on its own stream and hands the buffer in
    (the recompute may run on a side stream): chunk_forward must fill that buffer, with the same
    states it would have allocated itself."""
    from rwkv_backends.config import KernelConfig
    from rwkv_backends.conformance import Case, make_inputs
    from rwkv_backends.kernels import chunk, common
    x = make_inputs(Case("forward", "float32", "realistic", 2, 40, 2, 16, 16), 4, "cpu")
    ins = [x[n] for n in ("r", "w", "k", "v", "a", "b")]
    kw = dict(scale=1.0, cu_seqlens=None, w_form="log", cfg=KernelConfig(chunk_size=16, block_v=16),
              store_o=False, store_final=False, store_states=True)
    buf = common.empty_states(x["k"], x["v"], None, 16).fill_(float("nan"))
    _, _, given = chunk.chunk_forward(*ins, x["state"], **kw, states=buf)
    _, _, own = chunk.chunk_forward(*ins, x["state"], **kw)
    assert given is buf and torch.equal(given, own)


@interpreter
@pytest.mark.parametrize("regime, varlen, segmented, with_state", [
    ("realistic", False, False, True), ("strong", True, False, True), ("unit", True, True, False),
    ("realistic", False, True, True)])
def test_backward_from_the_forwards_u_matches_the_rebuilt_one(regime, varlen, segmented, with_state):
    """Training may keep U (keep_u): the chunk states are then rebuilt from it (chunk_states, one
    multiply-add per chunk on the chain) and the gradient kernel loads it. Storing U must not change
    the forward's outputs, and the gradients must be those of the backward that rebuilds U from the
    chunk matrices, and the float64 reference's: one walk and segments, two V blocks in the forward
    (each stores its U columns), an empty sequence and strong decay included."""
    from rwkv_backends.config import KernelConfig
    from rwkv_backends.conformance import Case, make_inputs, relative_error
    from rwkv_backends.kernels import backward, chunk, common, twopass
    x = make_inputs(Case("backward", "float32", regime, 1 if varlen else 2, 70, 2, 24, 32), 9, "cpu")
    cu = torch.tensor([0, 0, 21, 70]) if varlen else None
    N = 3 if varlen else 2
    state = torch.randn(N, 2, 24, 32) if with_state else None
    dstate = torch.randn(N, 2, 24, 32)
    ins = [x[n] for n in ("r", "w", "k", "v", "a", "b")]
    fwd = KernelConfig(chunk_size=16, block_v=16)
    bwd = KernelConfig(chunk_size=16, block_v=32, keep_u=True)
    kw = dict(scale=0.8, cu_seqlens=cu, w_form="log")
    u = common.empty_u(x["v"], bwd.keep_u)
    if segmented:
        seg = common.empty_states(x["k"], x["v"], cu, 32)
        o, s, mats = twopass.twopass_forward(*ins, state, **kw, cfg_prep=fwd, cfg_fwd=fwd, programs_per_sequence=2,
                                             seg_states=seg, seg_len=32, u=u)
        o_plain, s_plain, _ = twopass.twopass_forward(*ins, state, **kw, cfg_prep=fwd, cfg_fwd=fwd,
                                                      programs_per_sequence=2)
        segments = dict(seg_states=seg, seg_len=32)
    else:
        mats = common.empty_mats(x["k"], cu, 16)
        o, s, _ = chunk.chunk_forward(*ins, state, **kw, cfg=fwd, mats=mats, mats_mode="store", u=u)
        o_plain, s_plain, _ = chunk.chunk_forward(*ins, state, **kw, cfg=fwd)
        segments = {}
    assert torch.equal(o, o_plain) and torch.equal(s, s_plain)
    g_u = backward.chunk_backward(*ins, state, x["do"], dstate, **kw, cfg_fwd=fwd, cfg_bwd=bwd, mats=mats, u=u,
                                  cfg_states=KernelConfig(block_v=16, num_warps=2), **segments)
    g_plain = backward.chunk_backward(*ins, state, x["do"], dstate, **kw, cfg_fwd=fwd, cfg_bwd=bwd, mats=mats,
                                      **segments)
    want = _reference_gradients(ins, state, x["do"], dstate, scale=0.8, cu_seqlens=cu)
    for name, got, same, ref in zip(("r", "w", "k", "v", "a", "b", "state"), g_u, g_plain, want):
        if ref is None:
            assert got is None and same is None
            continue
        assert relative_error(got, same) < 1e-6, name
        assert relative_error(got, ref) < 1e-4, name


@interpreter
def test_chunk_states_rebuilds_the_forwards_chunk_states():
    """chunk_states walks S' = γ S + B̃ᵀ U + K̃ᵀ V on the forward's U: the chunk start states the
    forward itself walked through, into the buffer it is given."""
    from rwkv_backends.config import KernelConfig
    from rwkv_backends.conformance import Case, make_inputs, relative_error
    from rwkv_backends.kernels import chunk, common
    x = make_inputs(Case("forward", "float32", "strong", 2, 45, 2, 24, 32), 3, "cpu")
    ins = [x[n] for n in ("r", "w", "k", "v", "a", "b")]
    u = common.empty_u(x["v"], "float32")
    cfg = KernelConfig(chunk_size=16, block_v=16)
    _, _, walked = chunk.chunk_forward(*ins, x["state"], scale=1.0, cu_seqlens=None, w_form="log", cfg=cfg,
                                       store_states=True, u=u)
    buf = common.empty_states(x["k"], x["v"], None, 16).fill_(float("nan"))
    got = chunk.chunk_states(x["w"], x["k"], x["v"], x["b"], u, x["state"], cu_seqlens=None, w_form="log",
                             cfg=cfg.with_(block_v=32), states=buf)
    assert got is buf and relative_error(got, walked) < 1e-6


@interpreter
def test_strong_decay_raw_w_gradient_keeps_its_margin(simulate):
    """As the PyTorch backend's test of the same name: the backward's s = t pairs stay out of dL.
    Before, dw's error was 5.0e-5 over these 8 seeds (and 1e-4 is the ceiling); now 1.3e-5."""
    simulate("nvidia:sm90")
    case = Case("backward", "float32", "strong", 1, 18, 1, 32, 16, w_form="raw")
    worst = max(run_case(case, backend="triton", device="cpu", base_seed=s)["errors"]["dw"] for s in range(8))
    assert worst < 3e-5


@interpreter
def test_an_injected_wrong_kernel_fails_the_suite(simulate, monkeypatch):
    """The suite must be able to fail: perturb the chunked kernel's output and expect failures."""
    from rwkv_backends.kernels import chunk
    real = chunk.chunk_forward

    def wrong(*args, **kw):
        o, ht, st = real(*args, **kw)
        if o is not None:
            o = o * 1.001
        return o, ht, st
    monkeypatch.setattr(chunk, "chunk_forward", wrong)
    simulate("nvidia:sm90")
    case = next(c for c in quick_cases() if c.kind == "forward" and c.dtype == "float32" and c.T > 16)
    assert run_case(case, backend="triton.chunk", device="cpu", base_seed=1)["status"] == "failed"


def test_kernels_compile_for_hopper_without_a_gpu():
    """Triton compiles NVIDIA targets anywhere: catches what the interpreter cannot (e.g. globals)."""
    pytest.importorskip("triton")
    from rwkv_backends.config import KernelConfig
    from rwkv_backends.kernels.aot import compile_in_subprocess
    jobs = [("chunk_fwd", KernelConfig()), ("chunk_bwd", KernelConfig()),
            ("chunk_prep", KernelConfig(chunk_size=32, block_k=32)), ("chunk_fwd_loaded", KernelConfig(block_v=16)),
            ("chunk_bwd_split", KernelConfig(block_v=32, num_warps=8)), ("chunk_dstate", KernelConfig(block_v=16)),
            ("chunk_recompute", KernelConfig()), ("chunk_states", KernelConfig(num_warps=2, num_stages=3)),
            ("chunk_transition", KernelConfig(chunk_size=32, block_k=32, num_warps=2)),
            ("chunk_fwd_transition", KernelConfig(chunk_size=32, block_v=16, num_warps=2, num_stages=4)),
            ("chunk_dstate_transition", KernelConfig(chunk_size=32, block_v=16, num_warps=2, num_stages=4)),
            ("recurrent_fwd", KernelConfig(block_v=16, num_warps=2)),
            # bf16 operands: the interpreter cannot run them (triton#11584), so CI compiles them here
            ("chunk_bwd", KernelConfig(num_warps=8, num_stages=3, dot_precision="bf16", keep_u=True)),
            ("chunk_bwd_split", KernelConfig(block_v=32, num_warps=8, dot_precision="bf16")),
            # the Gluon kernels: only a card runs them, CI compiles them
            ("chunk_fwd", KernelConfig(dot_precision="tf32", gluon=True)),
            ("chunk_states", KernelConfig(dot_precision="tf32", gluon=True)),
            ("chunk_bwd", KernelConfig(num_warps=8, dot_precision="bf16", keep_u=True, gluon=True)),
            ("chunk_bwd_split", KernelConfig(block_v=128, num_warps=8, dot_precision="bf16", keep_u=True, gluon=True),
             128),
            ("chunk_dstate", KernelConfig(dot_precision="tf32", gluon=True), 128),
            ("chunk_fwd_loaded", KernelConfig(dot_precision="tf32", gluon=True), 128)]
    rc, results, stderr = compile_in_subprocess(jobs, arch=90)
    assert rc == 0, stderr[-2000:]
    assert [r["kernel"] for r in results] == [job[0] for job in jobs]
    assert all(0 < r["shared_bytes"] <= 232448 for r in results)
    # The Gluon kernels' speed rests on their registers not spilling (compile_check.GLUON_MAX_STACK; a
    # 128-register cap spilled 496 B): a change that spills more should be timed on a card first.
    from rwkv_backends.compile_check import GLUON_MAX_STACK
    for gluon in results[-6:]:
        assert gluon["registers"] <= 255 and gluon["stack_bytes"] <= GLUON_MAX_STACK, gluon


def _skip_unless_gluon_is_checked():
    """The Gluon GPU tests run where known issue gluon-experimental does not apply."""
    import triton
    from rwkv_backends import known_issues
    from rwkv_backends.device import detect
    if any(i.id == "gluon-experimental" for i in known_issues.active(detect(torch.device("cuda")), triton.__version__)):
        pytest.skip("the Gluon kernels are not checked on this card or Triton release (known issue gluon-experimental)")


def _misaligned(t):
    """t copied to storage that starts 2 bytes past 16-byte alignment (cp.async needs 16: the
    launcher must realign it)."""
    odd = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].copy_(t.flatten()).view_as(t)
    assert odd.data_ptr() % 16 != 0
    return odd


def _float64_reference(args, x, common):
    """Float64 leaves of args (r, w, k, v, a, b) and x's state, their gradients through the reference
    for x's do and dstate, and the reference's output and final state."""
    from rwkv_backends.reference import wkv7_reference
    leaves = [t.double().requires_grad_(True) for t in args + [x["state"]]]
    o, s = wkv7_reference(*leaves, **common)
    torch.autograd.backward((o, s), (x["do"].double(), x["dstate"].double()))
    return leaves, o, s


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("regime, w_form, seqlens, dtype", [
    ("realistic", "log", (), "bfloat16"), ("strong", "raw", (), "bfloat16"), ("unit", "clampw", (), "float16"),
    ("realistic", "log", (300, 0, 411), "bfloat16"),
])
def test_gpu_gluon_gradient_kernel_matches_the_triton_one(regime, w_form, seqlens, dtype):
    """The Gluon gradient kernel is the Triton one's math with other layouts (and the decays' scans
    as products): on the same forward's matrices, U and chunk states, every gradient is as close to
    the float64 reference as the Triton kernel's, in every regime and w form, varlen included."""
    from rwkv_backends.config import KernelConfig
    from rwkv_backends.conformance.cases import make_inputs, relative_error
    from rwkv_backends.kernels import backward, chunk
    from rwkv_backends.kernels.common import empty_mats, empty_u
    _skip_unless_gluon_is_checked()
    T = sum(seqlens) or 700
    x = make_inputs(Case("backward", dtype, regime, 1 if seqlens else 2, T, 4, 64, 64, w_form=w_form, scale=0.125,
                         seqlens=seqlens), 7, "cuda")
    names = ("r", "w", "k", "v", "a", "b")
    args = [x[n] for n in names]
    if seqlens:
        x["do"] = _misaligned(x["do"])
    common = dict(scale=0.125, cu_seqlens=x["cu_seqlens"], w_form=w_form)
    leaves, _, _ = _float64_reference(args, x, common)
    fwd = KernelConfig(num_warps=4, dot_precision="tf32")
    mats = empty_mats(x["k"], x["cu_seqlens"], 16)
    u = empty_u(x["v"], True)
    chunk.chunk_forward(*args, x["state"], **common, cfg=fwd, mats=mats, mats_mode="store", u=u)
    errors = {}
    for gluon in (False, True):
        bwd = KernelConfig(num_warps=8, num_stages=3, dot_precision="bf16", keep_u=True, gluon=gluon)
        grads = backward.chunk_backward(*args, x["state"], x["do"], x["dstate"], **common, cfg_fwd=fwd, cfg_bwd=bwd,
                                        mats=mats, u=u, cfg_states=KernelConfig(block_v=32))
        assert all(torch.isfinite(g).all() for g in grads)
        errors[gluon] = [relative_error(g, t.grad) for g, t in zip(grads, leaves)]
    for name, ours, theirs in zip(names + ("state",), errors[True], errors[False]):
        assert ours <= 1.1 * theirs + 1e-4, (name, ours, theirs)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("regime, w_form, seqlens, dtype", [
    ("realistic", "log", (), "bfloat16"), ("strong", "raw", (), "bfloat16"), ("unit", "clampw", (), "float16"),
    ("realistic", "log", (300, 0, 1, 411), "bfloat16"),
])
def test_gpu_gluon_ksplit_gradient_kernel_matches_the_triton_one(regime, w_form, seqlens, dtype):
    """Head 128's two-pass training in Gluon (the chunk-matrix build, split beside the loaded forward
    for whole sequences; the sweep with dZ and dv; the state rebuild over segments; the K-split
    gradient kernel, U kept) against the same path in Triton (no U): the outputs and every gradient
    as close to the float64 reference, in every regime and w form, varlen with an empty and a
    one-step sequence included, and a misaligned do."""
    from rwkv_backends.config import KernelConfig
    from rwkv_backends.conformance.cases import make_inputs, relative_error
    from rwkv_backends.kernels import backward, twopass
    from rwkv_backends.kernels.common import empty_u, keeps_u, segment_states
    _skip_unless_gluon_is_checked()
    T = sum(seqlens) or 500
    x = make_inputs(Case("backward", dtype, regime, 1 if seqlens else 2, T, 3, 128, 128, w_form=w_form, scale=0.125,
                         seqlens=seqlens), 5, "cuda")
    names = ("r", "w", "k", "v", "a", "b")
    args = [x[n] for n in names]
    if seqlens:
        x["do"] = _misaligned(x["do"])
    common = dict(scale=0.125, cu_seqlens=x["cu_seqlens"], w_form=w_form)
    leaves, o_ref, s_ref = _float64_reference(args, x, common)
    errors = {}
    for gluon in (False, True):
        cfg = KernelConfig(chunk_size=16, block_v=64, num_warps=4, dot_precision="tf32", gluon=gluon)
        bwd = KernelConfig(chunk_size=16, block_v=128, num_warps=8, dot_precision="bf16", gluon=gluon)
        seg, seg_len = segment_states(x["k"], x["v"], x["cu_seqlens"], 5, (16,))
        u = empty_u(x["v"], keeps_u(bwd))
        o, ht, mats = twopass.twopass_forward(*args, x["state"], **common, cfg_prep=cfg, cfg_fwd=cfg,
                                              programs_per_sequence=3, seg_states=seg, seg_len=seg_len, u=u)
        grads = backward.chunk_backward(*args, x["state"], x["do"], x["dstate"], **common, cfg_fwd=cfg, cfg_bwd=bwd,
                                        mats=mats, seg_states=seg, seg_len=seg_len, u=u, cfg_states=cfg)
        assert all(torch.isfinite(g).all() for g in grads)
        errors[gluon] = [relative_error(o, o_ref), relative_error(ht, s_ref)] + [
            relative_error(g, t.grad) for g, t in zip(grads, leaves)]
    for name, ours, theirs in zip(("o", "state_out") + names + ("state",), errors[True], errors[False]):
        assert ours <= 1.1 * theirs + 1e-4, (name, ours, theirs)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("regime, w_form, seqlens, dtype", [
    ("realistic", "log", (), "bfloat16"), ("strong", "raw", (), "bfloat16"), ("unit", "clampw", (), "float16"),
    ("realistic", "log", (300, 0, 411), "bfloat16"),
])
def test_gpu_gluon_forward_and_state_rebuild_match_the_triton_ones(regime, w_form, seqlens, dtype):
    """The Gluon forward's output and final state are as close to the float64 reference as the Triton
    forward's; the chunk matrices and U it keeps for the backward, and the chunk states the Gluon
    rebuild walks from them, agree with the Triton kernels' (varlen with an empty sequence, and a
    misaligned r, included)."""
    from rwkv_backends.config import KernelConfig
    from rwkv_backends.conformance.cases import make_inputs, relative_error
    from rwkv_backends.kernels import chunk
    from rwkv_backends.kernels.common import empty_mats, empty_states, empty_u
    _skip_unless_gluon_is_checked()
    T = sum(seqlens) or 700
    x = make_inputs(Case("forward", dtype, regime, 1 if seqlens else 2, T, 4, 64, 64, w_form=w_form, scale=0.125,
                         seqlens=seqlens), 9, "cuda")
    if seqlens:
        x["r"] = _misaligned(x["r"])
    args = [x[n] for n in ("r", "w", "k", "v", "a", "b")]
    common = dict(scale=0.125, cu_seqlens=x["cu_seqlens"], w_form=w_form)
    from rwkv_backends.reference import wkv7_reference
    o_ref, s_ref = wkv7_reference(*[t.double() for t in args], x["state"].double(), **common)
    got = {}
    for gluon in (False, True):
        cfg = KernelConfig(num_warps=4, num_stages=3, dot_precision="tf32", gluon=gluon)
        mats = empty_mats(x["k"], x["cu_seqlens"], 16).zero_()     # (varlen leaves spare slots)
        u = empty_u(x["v"], True)
        o, ht, _ = chunk.chunk_forward(*args, x["state"], **common, cfg=cfg, mats=mats, mats_mode="store", u=u)
        states = empty_states(x["k"], x["v"], x["cu_seqlens"], 16).zero_()
        chunk.chunk_states(x["w"], x["k"], x["v"], x["b"], u, x["state"], cu_seqlens=x["cu_seqlens"], w_form=w_form,
                           cfg=KernelConfig(block_v=32, num_warps=1, num_stages=3, dot_precision="tf32", gluon=gluon),
                           states=states)
        got[gluon] = dict(o=o, ht=ht, mats=mats, u=u, states=states)
    for name, ref in (("o", o_ref), ("ht", s_ref)):
        ours, theirs = relative_error(got[True][name], ref), relative_error(got[False][name], ref)
        assert ours <= 1.1 * theirs + 1e-5, (name, ours, theirs)
    for name in ("mats", "u", "states"):
        assert relative_error(got[True][name], got[False][name]) < 1e-3, name


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 2, 17])
def test_gpu_training_at_a_few_steps(T):
    """Training through the planned kernels at T = 1 (Triton compiles it as a constant; the Gluon
    kernels do not lower then, so the plan keeps them off) and just past it."""
    import rwkv_backends as rb
    from rwkv_backends.conformance.cases import make_inputs, relative_error
    from rwkv_backends.reference import wkv7_reference
    x = make_inputs(Case("backward", "bfloat16", "realistic", 2, T, 4, 64, 64), 3, "cuda")
    names = ("r", "w", "k", "v", "a", "b")
    leaves = [x[n].clone().requires_grad_(True) for n in names] + [x["state"].clone().requires_grad_(True)]
    o, s = rb.wkv7(*leaves, backend="triton.chunk")
    torch.autograd.backward((o, s), (x["do"], x["dstate"]))
    ref = [x[n].double().requires_grad_(True) for n in names] + [x["state"].double().requires_grad_(True)]
    o_ref, s_ref = wkv7_reference(*ref)
    torch.autograd.backward((o_ref, s_ref), (x["do"].double(), x["dstate"].double()))
    assert relative_error(o, o_ref) < 1e-2
    for got, want in zip(leaves, ref):
        assert relative_error(got.grad, want.grad) < 2e-2


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", full_cases(), ids=lambda c: c.id)
def test_gpu_full_matrix(case):
    res = run_case(case, backend="triton", device="cuda", base_seed=11)
    assert res["status"] == "passed", res.get("detail")


@requires_gpu
@pytest.mark.gpu
def test_gpu_saves_only_the_chunk_transitions():
    """Beyond the inputs, forward saves only the chunk transitions M (K x K float32 per chunk and
    head) and R̃ (float32, r's shape), and the segments' start states (backward recomputes the
    chunk states)."""
    import rwkv_backends as rb
    from rwkv_backends.conformance import Case, make_inputs
    x = make_inputs(Case("backward", "bfloat16", "realistic", 2, 2048, 8, 64, 64), 0, "cuda")
    leaves = [x[n].requires_grad_(True) for n in ("r", "w", "k", "v", "a", "b")]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    o, s = rb.wkv7(*leaves, x["state"])
    saved = torch.cuda.memory_allocated() - before - o.numel() * o.element_size() - s.numel() * 4
    # 16 (sequence, head) pairs plan the transition variant, which also keeps each segment's start
    # state: at most one per chunk group of SEGMENT_FILL programs per multiprocessor.
    from rwkv_backends.backends.triton import SEGMENT_FILL
    plan = rb.explain(*leaves, x["state"])
    assert plan["variant"] == "triton.chunk_transition"
    n_v = -(-64 // plan["config"]["chunk_bwd_split"]["block_v"])
    segments = -(-SEGMENT_FILL * plan["device"]["multiprocessors"] // (2 * 8 * n_v))
    chunks = 2 * 8 * -(-2048 // plan["config"]["chunk_transition"]["chunk_size"])
    assert saved <= chunks * 64 * 64 * 4 + 2 * 2048 * 8 * 64 * 4 + 2 * 8 * segments * 64 * 64 * 4


@interpreter
def test_expanded_gradients_and_transposed_state(simulate):
    """state.sum() sends a stride-0 gradient back, and a state may be a transposed view: both once
    reached the kernels uncopied (an illegal memory access on the H100)."""
    import rwkv_backends as rb
    from rwkv_backends.conformance import Case, make_inputs, relative_error
    from rwkv_backends.reference import wkv7_reference
    simulate("nvidia:sm90")
    x = make_inputs(Case("backward", "float32", "realistic", 1, 20, 2, 16, 16), 5, "cpu")
    state = x["state"].transpose(-1, -2).contiguous().transpose(-1, -2)        # same values, strided
    assert not state.is_contiguous()
    leaves = [x[n].clone().requires_grad_(True) for n in ("r", "w", "k", "v", "a", "b")]
    o, s = rb.wkv7(*leaves, state)
    (o.sum() + s.sum()).backward()
    ref_leaves = [x[n].double().requires_grad_(True) for n in ("r", "w", "k", "v", "a", "b")]
    o_ref, s_ref = wkv7_reference(*ref_leaves, x["state"].double())
    (o_ref.sum() + s_ref.sum()).backward()
    assert relative_error(o, o_ref) < 2e-5 and relative_error(s, s_ref) < 2e-5
    for got, want in zip(leaves, ref_leaves):
        assert relative_error(got.grad, want.grad) < 1e-4


def test_cached_launch_keys_and_argument_layout(monkeypatch):
    """CachedLaunch (CPU, with a stand-in for the JIT kernel and the CUDA driver): a call with a new
    specialization (dtype, 16-byte alignment, scalar class, current device) compiles through the
    JIT; a repeat launches the kept kernel directly with the runner's argument layout (hooks and
    their metadata None); an installed launch hook sends it through Triton's runner instead."""
    from types import SimpleNamespace

    from rwkv_backends.kernels import recurrent

    jit_calls, direct, runner = [], [], []

    class Compiled:
        function, packed_metadata = "fn", "meta"

        def run(self, *a):
            direct.append(a)

        def __getitem__(self, grid):
            return lambda *a: runner.append((grid, a))

    class Kernel:
        arg_names = ["x", "y", "n", "BLOCK", "FLAG"]

        def __getitem__(self, grid):
            def jit(*a, **kw):
                jit_calls.append((grid, a, kw))
                return Compiled()
            return jit

    device = [0]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: device[0])
    hooks = SimpleNamespace(launch_enter_hook=SimpleNamespace(calls=[]), launch_exit_hook=SimpleNamespace(calls=[]))
    monkeypatch.setattr(recurrent, "_knobs", SimpleNamespace(runtime=hooks))
    monkeypatch.setattr(recurrent, "_driver", SimpleNamespace(active=SimpleNamespace(get_current_stream=lambda d: 100 + d)))
    monkeypatch.setattr(recurrent.triton, "__version__", "3.6.0")
    run = recurrent.CachedLaunch(Kernel(), (4, 2), dict(BLOCK=16, FLAG=True), dict(num_warps=4), on_cuda=True)
    x, y = torch.ones(64), torch.ones(64)
    run((x, y), (5,))
    run((x, y), (5,))
    assert len(jit_calls) == 1 and jit_calls[0][0] == (4, 2, 1) and jit_calls[0][2] == dict(BLOCK=16, FLAG=True,
                                                                                           num_warps=4)
    assert direct == [(4, 2, 1, 100, "fn", "meta", None, None, None, x, y, 5, 16, True)]
    run((x[1:17], y), (5,))                        # off 16-byte alignment: its own kernel
    run((x, y.to(torch.float64)), (5,))            # another dtype
    run((x, y), (1,))                              # an integer of 1 is compiled in
    run((x, y), (32,))                             # a multiple of 16 likewise
    device[0] = 1
    run((x, y), (5,))                              # another current device
    assert len(jit_calls) == 6 and len(direct) == 1
    device[0] = 0
    hooks.launch_enter_hook.calls.append(print)    # a profiler listens
    run((x, y), (5,))
    assert len(direct) == 1 and runner == [((4, 2, 1), (x, y, 5, 16, True))]
    monkeypatch.setattr(recurrent, "FAST_LAUNCH_TRITON", ())   # an unchecked Triton version: always the JIT
    run((x, y), (5,))
    assert len(jit_calls) == 7
    off = recurrent.CachedLaunch(Kernel(), (1,), dict(BLOCK=16, FLAG=True), {}, on_cuda=False)
    off((x, y), (5,))
    off((x, y), (5,))
    assert len(jit_calls) == 9                      # not CUDA: never cached


@requires_gpu
@pytest.mark.gpu
def test_cached_decode_launch_matches_the_jit_launch(monkeypatch):
    """CachedLaunch reuses the compiled decode kernel. Inputs that differ in what Triton
    specializes on (views off 16-byte alignment, another dtype, T = 1, 5 or 16) must get a kernel of
    their own: every call matches Triton's own launch bit for bit."""
    from rwkv_backends.config import KernelConfig
    from rwkv_backends.conformance import Case, make_inputs
    from rwkv_backends.kernels import recurrent

    def misaligned(t):                   # same values, contiguous, data pointer 1 element past 16 bytes
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        return view

    def calls():
        out = []
        for dtype, T in (("bfloat16", 1), ("float32", 1), ("bfloat16", 5), ("bfloat16", 16)):
            x = make_inputs(Case("forward", dtype, "realistic", 2, T, 4, 64, 64), T, "cuda")
            ins = [x[n] for n in ("r", "w", "k", "v", "a", "b")]
            for shift in (False, True, False):
                args = [misaligned(t) for t in ins] if shift else ins
                state = misaligned(x["state"]) if shift else x["state"]
                assert shift == (args[0].data_ptr() % 16 != 0)
                out.append(recurrent.recurrent_forward(*args, state, scale=0.5, cu_seqlens=None, w_form="log",
                                                       cfg=KernelConfig(block_v=32)))
        return out

    cached = calls() + calls()           # the second round takes the cached kernels only
    monkeypatch.setattr(recurrent, "FAST_LAUNCH_TRITON", ())
    jit = calls() + calls()
    assert len(cached) == len(jit) == 24
    for (o1, s1), (o2, s2) in zip(cached, jit):
        assert torch.equal(o1, o2) and torch.equal(s1, s2)


@requires_gpu
@pytest.mark.gpu
def test_cuda_graph_decode_replays_like_eager():
    """100 decode steps, the state carried from step to step, captured as one CUDA graph: replayed
    from two different start states, it matches eager bit for bit (no host sync, no allocation)."""
    import rwkv_backends as rb
    from rwkv_backends.conformance import Case, make_inputs
    names = ("r", "w", "k", "v", "a", "b")
    steps = 100
    x = make_inputs(Case("forward", "bfloat16", "realistic", 4, steps, 8, 64, 64), 0, "cuda")

    def decode(inputs, state):
        outs = []
        for t in range(steps):
            o, state = rb.wkv7(*(inputs[n][:, t:t + 1] for n in names), state)
            outs.append(o)
        return torch.cat(outs, 1), state

    static = {n: x[n].clone() for n in names}
    static_state = x["state"].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                       # warm-up outside the capture (compiles)
        decode(static, static_state)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_graph, s_graph = decode(static, static_state)
    for start in (x["state"], torch.randn_like(x["state"])):
        static_state.copy_(start)
        graph.replay()
        o_eager, s_eager = decode(x, start.clone())
        assert torch.equal(o_graph, o_eager) and torch.equal(s_graph, s_eager)


@interpreter
@pytest.mark.parametrize("regime", ["realistic", "strong"])
def test_stored_chunk_matrices_give_the_same_gradients_as_rebuilt_ones(regime):
    """The training forward stores the chunk matrices (MATS_STORE) and the backward loads them;
    without them the backward's state recompute builds and stores its own. Both must agree, with
    the strong-decay (pairwise) path too, and a mode without its buffer is refused."""
    from rwkv_backends.config import KernelConfig
    from rwkv_backends.conformance import Case, make_inputs
    from rwkv_backends.kernels import backward, chunk, common
    x = make_inputs(Case("backward", "float32", regime, 1, 40, 2, 16, 16), 3, "cpu")
    ins = [x[n] for n in ("r", "w", "k", "v", "a", "b")]
    cfg = KernelConfig()
    kw = dict(scale=1.0, cu_seqlens=None, w_form="log")
    mats = common.empty_mats(x["k"], None, cfg.chunk_size)
    o_store, _, _ = chunk.chunk_forward(*ins, x["state"], **kw, cfg=cfg, mats=mats, mats_mode="store")
    o_build, _, _ = chunk.chunk_forward(*ins, x["state"], **kw, cfg=cfg)
    assert torch.equal(o_store, o_build)
    do, dht = torch.randn_like(x["v"]), torch.randn_like(x["state"])
    g_loaded = backward.chunk_backward(*ins, x["state"], do, dht, **kw, cfg_fwd=cfg, cfg_bwd=cfg, mats=mats)
    g_rebuilt = backward.chunk_backward(*ins, x["state"], do, dht, **kw, cfg_fwd=cfg, cfg_bwd=cfg)
    assert all(torch.equal(p, q) for p, q in zip(g_loaded, g_rebuilt))
    with pytest.raises(ValueError, match="mats"):
        chunk.chunk_forward(*ins, x["state"], **kw, cfg=cfg, mats_mode="load")


@interpreter
@pytest.mark.parametrize("kernel", ["chunk_fwd", "chunk_bwd", "chunk_prep", "chunk_fwd_loaded", "chunk_transition",
                                    "chunk_fwd_transition", "chunk_bwd_split", "chunk_recompute", "recurrent_fwd"])
def test_tune_checks_each_kernels_candidates_against_the_reference(simulate, monkeypatch, kernel):
    """The tune tool's accuracy gate, run on the CPU through the interpreter: every kernel it sweeps
    has a runner, and its first candidate stays within SPEC's bf16 ceilings on a small problem (the
    tool's own, tighter gate is set for K = 64 on the card)."""
    from rwkv_backends import tune
    simulate("nvidia:sm90")
    monkeypatch.setattr(tune, "DEVICE", "cpu")
    torch.manual_seed(0)
    cfg = tune.candidates(kernel, "nvidia")[0]
    assert tune._error(kernel, cfg, 16) <= (2e-2 if kernel in tune.BACKWARD_KERNELS else 1e-2)


def test_gluon_inputs_are_realigned_only_when_misaligned():
    """cp.async in the Gluon kernel needs 16-byte-aligned inputs: a view at an odd offset is copied,
    an aligned tensor is passed through untouched."""
    from rwkv_backends.kernels.common import _aligned16
    base = torch.randn(4 * 64 + 1)
    aligned, odd = base[: 4 * 64], base[1:]
    got_aligned, got_odd, none = _aligned16(aligned, odd, None)
    assert got_aligned is aligned and none is None
    assert got_odd.data_ptr() % 16 == 0 and torch.equal(got_odd, odd)
