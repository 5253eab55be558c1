"""The compat adapters against the float64 reference (always) and the peers themselves (on a GPU
when they import; skipped otherwise)."""

import importlib.util

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


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU or importlib.util.find_spec("fla") is None, reason="needs a GPU and fla-core")
def test_fla_adapter_matches_fla_on_gpu():
    import fla.ops.rwkv7 as peer
    x = _x(B=2, T=300, H=4, K=64, V=64, device="cuda", dtype="bfloat16")
    args = [x[n] for n in NAMES]
    o, s = fla.chunk_rwkv7(*args, initial_state=x["state"], output_final_state=True)
    o_p, s_p = peer.chunk_rwkv7(*args, initial_state=x["state"], output_final_state=True)
    assert relative_error(o, o_p.float()) < 1e-2 and relative_error(s, s_p.float()) < 1e-2
