"""The compat adapters against the float64 reference (always) and the peers themselves (on a GPU
when they import; skipped otherwise)."""

import importlib
import importlib.util
import os

import pytest
import torch

from _support import HAS_GPU
from rwkv_backends.compat import fla, rwkv_fla, rwkvlm
from rwkv_backends.conformance import Case, make_inputs, relative_error
from rwkv_backends.reference import wkv7_reference

NAMES = ("r", "w", "k", "v", "a", "b")


def _x(w_form="log", B=2, T=19, H=2, K=16, V=16, seed=0, device="cpu", dtype="float32"):
    return make_inputs(Case("forward", dtype, "realistic", B, T, H, K, V, w_form=w_form), seed, device)


def _ref(x, w_form, scale=1.0, state=None):
    return wkv7_reference(*(x[n] for n in NAMES), state, w_form=w_form, scale=scale)


def test_fla_chunk_defaults_and_values():
    x = _x()
    o, s = fla.chunk_rwkv7(*(x[n] for n in NAMES), initial_state=x["state"])
    assert s is None                                            # fla's default output_final_state=False
    o_ref, s_ref = _ref(x, "log", state=x["state"])
    assert relative_error(o, o_ref) < 2e-5
    o, s = fla.chunk_rwkv7(*(x[n] for n in NAMES), scale=0.5, initial_state=x["state"].half(), output_final_state=True)
    o_ref, s_ref = _ref(x, "log", 0.5, x["state"].half().float())
    assert relative_error(o, o_ref) < 2e-5 and relative_error(s, s_ref) < 2e-5


def test_fla_fused_recurrent_default_scale_is_inverse_sqrt_k():
    x = _x(T=3)
    o, s = fla.fused_recurrent_rwkv7(*(x[n] for n in NAMES), initial_state=x["state"])
    o_ref, s_ref = _ref(x, "log", 16 ** -0.5, x["state"])
    assert relative_error(o, o_ref) < 2e-5 and relative_error(s, s_ref) < 2e-5


def test_rwkv_fla_keyword_forms():
    x = _x("raw")
    args = dict(r=x["r"], k=x["k"], v=x["v"], a=x["a"], b=x["b"], initial_state=x["state"])
    o, s = rwkv_fla.chunk_rwkv7(**args, w=x["w"])
    o_ref, s_ref = _ref(x, "raw", state=x["state"])
    assert relative_error(o, o_ref) < 2e-5 and relative_error(s, s_ref) < 2e-5
    o2, _ = rwkv_fla.chunk_rwkv7(**args, log_w=-torch.exp(x["w"]))
    assert relative_error(o2, o_ref) < 2e-5
    o3, _ = rwkv_fla.fused_recurrent_rwkv7(**args, w=x["w"])
    assert relative_error(o3, _ref(x, "raw", 16 ** -0.5, x["state"])[0]) < 2e-5
    with pytest.raises(ValueError, match="w, log_w"):
        rwkv_fla.chunk_rwkv7(**args)
    with pytest.raises(ValueError, match="w, log_w"):
        rwkv_fla.chunk_rwkv7(**args, w=x["w"], log_w=x["w"])


@pytest.mark.parametrize("form, fn", [("raw", rwkvlm.RUN_CUDA_RWKV7g), ("clampw", rwkvlm.RUN_CUDA_RWKV7_CLAMPW)])
def test_rwkvlm_bt_c_layout(form, fn):
    x = _x(form, K=64, V=64, H=2)
    B, T = 2, 19
    flat = [x[n].reshape(B, T, -1) for n in NAMES]
    o = fn(*flat, head_size=64)
    o_ref, _ = _ref(x, form)
    assert o.shape == (B, T, 128) and relative_error(o, o_ref.reshape(B, T, -1)) < 2e-5


def test_rwkvlm_state_is_transposed():
    x = _x("raw", K=32, V=32)
    flat = [x[n].reshape(2, 19, -1) for n in NAMES]
    state_vk = x["state"].transpose(-1, -2).contiguous()           # RWKV-LM's [B, H, V, K]
    o, s_vk = rwkvlm.RUN_RWKV7_STATE(*flat, state_vk, head_size=32)
    o_ref, s_ref = _ref(x, "raw", state=x["state"])
    assert relative_error(o, o_ref.reshape(2, 19, -1)) < 2e-5
    assert relative_error(s_vk.transpose(-1, -2), s_ref) < 2e-5
    with pytest.raises(ValueError, match="head_size"):
        rwkvlm.RUN_CUDA_RWKV7g(*(t[..., :60] for t in flat), head_size=64)


def _fake_layer_module(monkeypatch):
    """A stand-in for rwkvfla.layers.rwkv7: the two op names the layer imported, with rwkv-fla's
    signatures, and a minimal block that calls them the way RWKV7Attention does."""
    import sys
    import types
    mod = types.ModuleType("rwkvfla_fake_layer")

    def chunk_rwkv7(r, k, v, a, b, w=None, log_w=None, scale=1.0, initial_state=None, output_final_state=True,
                    cu_seqlens=None, head_first=False):
        raise AssertionError("the peer's kernel ran: not patched")

    def fused_mul_recurrent_rwkv7(r, w, k, v, kk, a, scale=1.0, initial_state=None, output_final_state=False,
                                  reverse=False, cu_seqlens=None, head_first=False):
        raise AssertionError("the peer's kernel ran: not patched")

    def block(r, w_log, k, v, kk, a, state, decode):
        if decode:
            return mod.fused_mul_recurrent_rwkv7(r=r, w=w_log, k=k, v=v, kk=kk, a=a, initial_state=state,
                                                 output_final_state=True)
        return mod.chunk_rwkv7(r=r, log_w=w_log, k=k, v=v, a=-kk, b=kk * a, initial_state=state,
                               output_final_state=True)
    mod.chunk_rwkv7, mod.fused_mul_recurrent_rwkv7, mod.block = chunk_rwkv7, fused_mul_recurrent_rwkv7, block
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return mod


@pytest.mark.parametrize("decode", [False, True])
def test_patch_fla_routes_a_layer_module_through_wkv7(monkeypatch, decode):
    from rwkv_backends.compat import patch_fla
    mod = _fake_layer_module(monkeypatch)
    originals = (mod.chunk_rwkv7, mod.fused_mul_recurrent_rwkv7)
    x = _x(T=1 if decode else 19)
    kk = torch.nn.functional.normalize(x["k"], dim=-1)
    a = torch.rand_like(kk)
    with patch_fla([mod.__name__]) as patch:
        assert sorted(patch.targets) == [f"{mod.__name__}.chunk_rwkv7", f"{mod.__name__}.fused_mul_recurrent_rwkv7"]
        o, s = mod.block(x["r"], x["w"], x["k"], x["v"], kk, a, x["state"], decode)
    o_ref, s_ref = wkv7_reference(x["r"], x["w"], x["k"], x["v"], -kk, kk * a, x["state"], w_form="log")
    assert relative_error(o, o_ref) < 2e-5 and relative_error(s, s_ref) < 2e-5
    assert (mod.chunk_rwkv7, mod.fused_mul_recurrent_rwkv7) == originals          # restored


def test_patch_fla_without_peers_patches_nothing_or_raises_when_strict():
    from rwkv_backends.compat import patch_fla
    assert patch_fla(["no_such_peer.layers.rwkv7"]).targets == []
    with pytest.raises(ImportError, match="modules"):
        patch_fla(["no_such_peer.layers.rwkv7"], strict=True)


_HAS_RWKV_FLA = importlib.util.find_spec("rwkvfla") is not None


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU or not _HAS_RWKV_FLA, reason="needs a GPU and rwkv-fla")
@pytest.mark.parametrize("training", [True, False])
def test_patch_fla_on_rwkv_fla_attention_matches_the_peer(training):
    """rwkv-fla's own RWKV7Attention, tiny and randomly initialised: its kernels, then ours."""
    from rwkvfla.layers.rwkv7 import RWKV7Attention
    from rwkv_backends.compat import patch_fla
    torch.manual_seed(0)
    # num_hidden_layers: the layer's RWKV-7 initialisation scales by layer_idx / (layers - 1).
    layer = RWKV7Attention(hidden_size=256, head_dim=64, layer_idx=0, num_hidden_layers=2).cuda().bfloat16()
    layer.train(training)
    x = torch.randn(2, 100 if training else 16, 256, device="cuda", dtype=torch.bfloat16)

    def run():
        h = x.clone().requires_grad_(True)
        out = layer(h)[0]
        if not training:
            return out, None
        out.square().mean().backward()
        grads = torch.cat([p.grad.flatten() for p in layer.parameters() if p.grad is not None] + [h.grad.flatten()])
        layer.zero_grad(set_to_none=True)
        return out, grads

    o_peer, g_peer = run()
    with patch_fla(["rwkvfla.layers.rwkv7"], strict=True) as patch:
        assert patch.targets
        o_ours, g_ours = run()
    # Two bfloat16 pipelines (the layer's own projections and norms in bfloat16 around the op).
    assert relative_error(o_ours.float(), o_peer.float()) < 2e-2
    if training:
        assert relative_error(g_ours.float(), g_peer.float()) < 5e-2


def _peer_inputs(dtype="bfloat16", T=300):
    return _x(B=2, T=T, H=4, K=64, V=64, device="cuda", dtype=dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU or importlib.util.find_spec("fla") is None, reason="needs a GPU and fla-core")
def test_fla_adapters_match_fla_forward_and_backward_on_gpu():
    import fla.ops.rwkv7 as peer
    x = _peer_inputs()
    outs = []
    for fn in (fla.chunk_rwkv7, peer.chunk_rwkv7):
        leaves = [x[n].detach().clone().requires_grad_(True) for n in NAMES]
        o, s = fn(*leaves, initial_state=x["state"], output_final_state=True)
        (o.float().square().sum() + s.sum()).backward()
        outs.append((o.float(), s.float(), [t.grad.float() for t in leaves]))
    (o, s, g), (o_p, s_p, g_p) = outs
    assert relative_error(o, o_p) < 1e-2 and relative_error(s, s_p) < 1e-2
    for name, a, b in zip(NAMES, g, g_p):
        assert relative_error(a, b) < 3e-2, name
    xd = _peer_inputs(T=1)
    o, s = fla.fused_recurrent_rwkv7(*(xd[n] for n in NAMES), initial_state=xd["state"])
    o_p, s_p = peer.fused_recurrent_rwkv7(*(xd[n] for n in NAMES), initial_state=xd["state"])
    assert relative_error(o, o_p.float()) < 1e-2 and relative_error(s, s_p.float()) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU or not _HAS_RWKV_FLA, reason="needs a GPU and rwkv-fla")
def test_rwkv_fla_adapters_match_rwkv_fla_on_gpu():
    import rwkvfla.ops.rwkv7 as peer
    x = _peer_inputs()
    raw = torch.log(-x["w"].float()).to(x["w"].dtype)                   # rwkv-fla's w: log-decay = -exp(w)
    kw = dict(r=x["r"], k=x["k"], v=x["v"], a=x["a"], b=x["b"], initial_state=x["state"], output_final_state=True)
    for ours, theirs, decay in ((rwkv_fla.chunk_rwkv7, peer.chunk_rwkv7, dict(w=raw)),
                                (rwkv_fla.chunk_rwkv7, peer.chunk_rwkv7, dict(log_w=x["w"]))):
        o, s = ours(**kw, **decay)
        o_p, s_p = theirs(**kw, **decay)
        assert relative_error(o, o_p.float()) < 1e-2 and relative_error(s, s_p.float()) < 1e-2
    xd = _peer_inputs(T=1)
    kwd = dict(r=xd["r"], k=xd["k"], v=xd["v"], a=xd["a"], b=xd["b"], initial_state=xd["state"],
               output_final_state=True, w=torch.log(-xd["w"].float()).to(xd["w"].dtype))
    o, s = rwkv_fla.fused_recurrent_rwkv7(**kwd, scale=1.0)
    o_p, s_p = peer.fused_recurrent_rwkv7(**kwd, scale=1.0)
    assert relative_error(o, o_p.float()) < 1e-2 and relative_error(s, s_p.float()) < 1e-2



def _rwkvlm_peer():
    """RWKV-LM ships no package: its CUDA kernel is built from the repository's sources by its own
    training script. Point RWKV_LM_OP at the built op as "module:function" (for example a module
    that loads wkv7_cuda.cu with HEAD_SIZE=64 and defines RUN_CUDA_RWKV7g) to run this check."""
    spec = os.environ.get("RWKV_LM_OP", "")
    if not spec:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name or "RUN_CUDA_RWKV7g")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU or not os.environ.get("RWKV_LM_OP"),
                    reason="needs a GPU and RWKV-LM's built op in RWKV_LM_OP=module:function")
def test_rwkvlm_adapter_matches_rwkv_lm_on_gpu():
    theirs = _rwkvlm_peer()
    x = _x("raw", B=2, T=128, H=4, K=64, V=64, device="cuda", dtype="bfloat16")
    flat = [x[n].reshape(2, 128, -1).contiguous() for n in NAMES]
    o = rwkvlm.RUN_CUDA_RWKV7g(*flat, head_size=64)
    o_peer = theirs(*flat)
    assert relative_error(o.float(), o_peer.float()) < 1e-2
