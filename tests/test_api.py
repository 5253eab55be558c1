"""wkv7 / explain: argument errors, identities of the op, dispatch choices."""

import pytest
import torch

import rwkv_backends as rb
from rwkv_backends.conformance import Case, make_inputs, relative_error
from rwkv_backends.reference import wkv7_reference

NAMES = ("r", "w", "k", "v", "a", "b")


def _x(B=2, T=20, H=2, K=16, V=16, dtype="float32", seed=3):
    return make_inputs(Case("forward", dtype, "realistic", B, T, H, K, V), seed, "cpu")


def _call(x, **kw):
    return rb.wkv7(*(x[n] for n in NAMES), kw.pop("state", x["state"]), **kw)


# One test per class of bad input: the exception type, and the argument named in the message.
@pytest.mark.parametrize("mutate, exc, name", [
    (lambda x: x.update(r=x["r"][0]), ValueError, "r:"),                                  # wrong rank
    (lambda x: x.update(a=x["a"][:, :-1]), ValueError, "a:"),                             # T mismatch
    (lambda x: x.update(v=x["v"][:1]), ValueError, "v:"),                                 # B mismatch
    (lambda x: x.update(b=x["b"].double()), TypeError, "b:"),                             # mixed dtype
    (lambda x: x.update(k=x["k"].to(torch.int32)), TypeError, "k:"),                      # unsupported dtype
    (lambda x: x.update(w=x["w"].half()), TypeError, "w:"),                               # w dtype
    (lambda x: x.update(state=x["state"][:, :1]), ValueError, "state:"),                  # state shape
    (lambda x: x.update(state=x["state"].double()), TypeError, "state:"),                 # state dtype
    (lambda x: x.update(r=x["r"].tolist()), TypeError, "r:"),                             # not a tensor
    (lambda x: x.update(v=torch.empty(2, 20, 2, 16, device="meta")), ValueError, "v:"),   # mixed devices
])
def test_bad_input_names_the_argument(mutate, exc, name):
    x = _x()
    mutate(x)
    with pytest.raises(exc, match=name):
        _call(x)


@pytest.mark.parametrize("kw, exc, name", [
    (dict(w_form="exp"), ValueError, "w_form"),
    (dict(scale="1"), TypeError, "scale"),
    (dict(backend="cuda-magic"), ValueError, "backend"),
    (dict(output_final_state=1), TypeError, "output_final_state"),
])
def test_bad_options_name_the_argument(kw, exc, name):
    with pytest.raises(exc, match=name):
        _call(_x(), **kw)


def test_cached_validation_still_rejects_after_a_good_call():
    """wkv7 keeps the problem and plan of metadata it has accepted. Look-alike arguments that hash the
    same (scale=True after scale=1.0, output_final_state=1 after True) are still rejected, and a
    change of requires_grad or of grad mode is a new problem."""
    x = _x()
    _call(x, scale=1.0)
    with pytest.raises(TypeError, match="scale"):
        _call(x, scale=True)
    with pytest.raises(TypeError, match="output_final_state"):
        _call(x, output_final_state=1)
    for n in ("r", "w", "k", "v", "a", "b"):
        x[n].requires_grad_(True)
    problem = rb.explain(*(x[n] for n in NAMES), x["state"])["problem"]
    assert "training" in problem
    with torch.no_grad():
        assert "training" not in rb.explain(*(x[n] for n in NAMES), x["state"])["problem"]


@pytest.mark.parametrize("cu, msg", [
    ([0, 5, 3, 20], "non-decreasing"), ([1, 20], "start at 0"), ([0, 19], "end at T"),
])
def test_bad_cu_seqlens(cu, msg):
    x = _x(B=1)
    with pytest.raises(ValueError, match="cu_seqlens: .*" + msg):
        _call(x, state=None, cu_seqlens=torch.tensor(cu))
    with pytest.raises(TypeError, match="cu_seqlens"):
        _call(x, state=None, cu_seqlens=torch.tensor([0.0, 20.0]))
    with pytest.raises(ValueError, match="B == 1"):
        _call(_x(B=2), state=None, cu_seqlens=torch.tensor([0, 20]))


def test_output_dtype_state_and_no_final_state():
    x = _x(dtype="bfloat16")
    o, s = _call(x)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32 and s.shape == (2, 2, 16, 16)
    o2, s2 = _call(x, output_final_state=False)
    assert s2 is None and torch.equal(o, o2)


def test_two_calls_chained_equal_one_call():
    x = _x(T=50)
    o, s = _call(x)
    first = {n: x[n][:, :17] for n in NAMES}
    o1, s1 = rb.wkv7(*(first[n] for n in NAMES), x["state"])
    o2, s2 = rb.wkv7(*(x[n][:, 17:] for n in NAMES), s1)
    assert relative_error(torch.cat([o1, o2], 1), o) < 2e-6
    assert relative_error(s2, s) < 2e-6


def test_t_calls_of_one_step_equal_one_call():
    x = _x(T=9)
    o, s = _call(x)
    state, outs = x["state"], []
    for t in range(9):
        o_t, state = rb.wkv7(*(x[n][:, t:t + 1] for n in NAMES), state)
        outs.append(o_t)
    assert relative_error(torch.cat(outs, 1), o) < 2e-6 and relative_error(state, s) < 2e-6


def test_varlen_equals_separate_calls_and_empty_sequence_keeps_state():
    x = _x(B=1, T=30)
    init = torch.randn(3, 2, 16, 16)
    cu = torch.tensor([0, 12, 12, 30])
    o, s = _call(x, state=init, cu_seqlens=cu)
    for n, (lo, hi) in enumerate([(0, 12), (12, 12), (12, 30)]):
        if hi == lo:
            assert torch.equal(s[n], init[n])
            continue
        o_n, s_n = rb.wkv7(*(x[m][:, lo:hi] for m in NAMES), init[n:n + 1])
        assert relative_error(o[:, lo:hi], o_n) < 2e-6 and relative_error(s[n:n + 1], s_n) < 2e-6


def test_gradients_reach_every_input_and_the_state_through_state_out():
    x = _x()
    leaves = {n: x[n].clone().requires_grad_(True) for n in NAMES}
    st = x["state"].clone().requires_grad_(True)
    _, s = rb.wkv7(*(leaves[n] for n in NAMES), st)
    s.sum().backward()                                   # only through state_out
    for name in ("w", "k", "v", "a", "b"):
        assert leaves[name].grad.abs().sum() > 0, name
    assert st.grad.abs().sum() > 0
    assert not leaves["r"].grad.any()                    # r reads the state, it never writes it


def test_bitwise_deterministic():
    x = _x(dtype="bfloat16")
    assert all(torch.equal(p, q) for p, q in zip(_call(x), _call(x)))


def test_explain_names_backend_variant_config_and_rejections():
    x = _x()
    e = rb.explain(*(x[n] for n in NAMES), x["state"])
    assert {"backend", "variant", "config", "rejected"} <= set(e)
    assert e["variant"] == "pytorch.chunk"
    assert any("GPU" in r or "interpreter" in r or "INTERPRET" in r for rs in e["rejected"].values() for r in rs)


def test_forced_backend_that_cannot_take_the_input_lists_reasons(monkeypatch):
    monkeypatch.delenv("RWKV_BACKENDS_SIMULATE", raising=False)
    x = _x()
    with pytest.raises(rb.NoBackendError) as err:
        _call(x, backend="triton")
    assert "triton.chunk" in str(err.value) and "triton.recurrent" in str(err.value)


def test_backend_forced_through_environment(monkeypatch):
    monkeypatch.setenv("RWKV_BACKENDS_BACKEND", "nope")
    with pytest.raises(ValueError, match="RWKV_BACKENDS_BACKEND"):
        _call(_x())


def test_cached_plan_follows_the_environment_and_the_registry(monkeypatch):
    """A call's plan is cached, but the cache is keyed on what steers planning: the same call after
    RWKV_BACKENDS_BACKEND changes, or after a variant registers, is planned again."""
    from rwkv_backends import dispatch, registry
    x = _x()
    args = [x[n] for n in NAMES]
    assert rb.explain(*args, x["state"])["variant"] == "pytorch.chunk"
    _call(x)                                                   # cached now
    monkeypatch.setenv("RWKV_BACKENDS_BACKEND", "nope")
    with pytest.raises(ValueError, match="RWKV_BACKENDS_BACKEND"):
        _call(x)
    monkeypatch.delenv("RWKV_BACKENDS_BACKEND")
    before = len(dispatch._PLANNED)
    _call(x)
    assert len(dispatch._PLANNED) == before                         # the earlier entry serves again

    class Preferred(registry.Variant):
        name, backend = "test.preferred", "test"

        def reasons(self, problem, device, runtime=True):
            return []

        def run(self, r, w, k, v, a, b, state, *, problem, plan, cu_seqlens):
            return torch.full_like(v, 7.0), state

    monkeypatch.setattr(registry, "_VARIANTS", dict(registry._VARIANTS))
    registry.register(Preferred())
    o, _ = _call(x, backend="test")
    assert torch.all(o == 7.0)
    monkeypatch.setattr(registry, "_VARIANTS", dict(registry._VARIANTS))
    registry._VARIANTS.pop("test.preferred")
    registry.register(registry._VARIANTS.pop("pytorch.chunk"))   # re-registering bumps the generation
    with pytest.raises(ValueError, match="test"):
        _call(x, backend="test")                               # the variant is gone: planned again


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("profile", [None, "nvidia:sm90"])
def test_a_16_bit_decode_state_stays_16_bit(simulate, profile, state_dtype):
    """Opt-in 16-bit state: decode keeps it in its dtype, and each step is the float32 step on the
    upcast state, rounded once (pytorch.chunk on the CPU, triton.recurrent through the interpreter)."""
    import os
    if profile is not None:
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("interpreter run")
        simulate(profile)
    x = make_inputs(Case("forward", "bfloat16", "realistic", 2, 1, 4, 32, 32), 3, "cpu")
    state = x["state"].to(state_dtype)
    o, s = rb.wkv7(*(x[n] for n in NAMES), state)
    assert s.dtype == state_dtype and o.dtype == torch.bfloat16
    o_ref, s_ref = wkv7_reference(*(x[n].double() for n in NAMES), state.double())
    assert relative_error(o, o_ref) < 1e-2 and relative_error(s, s_ref) < 1e-2
    assert rb.explain(*(x[n] for n in NAMES), state)["variant"] == ("pytorch.chunk" if profile is None
                                                                     else "triton.recurrent")


def test_a_16_bit_state_is_refused_by_the_chunk_variants_with_a_reason(simulate):
    simulate("nvidia:sm90")
    x = make_inputs(Case("forward", "bfloat16", "realistic", 1, 40, 2, 32, 32), 3, "cpu")
    leaves = [x[n].requires_grad_(True) for n in NAMES]
    state = x["state"].bfloat16().requires_grad_(True)
    e = rb.explain(*leaves, state)
    assert e["variant"] == "pytorch.chunk"
    assert any("bfloat16 state" in r for r in e["rejected"]["triton.chunk"])


def test_gradients_reach_a_16_bit_state():
    x = make_inputs(Case("forward", "float32", "realistic", 1, 20, 2, 16, 16), 4, "cpu")
    state = x["state"].bfloat16().requires_grad_(True)
    o, s = rb.wkv7(*(x[n] for n in NAMES), state, backend="pytorch")
    assert s.dtype == torch.bfloat16
    (o.sum() + s.float().sum()).backward()
    ref = state.detach().double().requires_grad_(True)
    o_ref, s_ref = wkv7_reference(*(x[n].double() for n in NAMES), ref)
    (o_ref.sum() + s_ref.sum()).backward()
    assert state.grad.dtype == torch.bfloat16 and relative_error(state.grad, ref.grad) < 1e-2


# ---------------------------------------------------------------------------------------------
# Calls without tokens, meta tensors, and errors under torch.compile

def _leaves(x, use_state=True):
    leaves = [x[n].clone().requires_grad_(True) for n in NAMES]
    return leaves, (x["state"].clone().requires_grad_(True) if use_state else None)


@pytest.mark.parametrize("profile", [None, "nvidia:sm90"])
@pytest.mark.parametrize("use_state", [True, False])
@pytest.mark.parametrize("B, T", [(0, 20), (2, 0), (0, 0)])
def test_a_call_without_tokens_returns_empty_outputs_and_the_state(simulate, B, T, use_state, profile):
    """B = 0 or T = 0, as torch ops do: o is empty [B, T, H, V], the final state is the initial one
    (zeros without one), and gradients are zeros, dstate passing through to the state."""
    if profile is not None:
        simulate(profile)
    x = _x(B=B, T=T, H=3, K=16, V=8, dtype="bfloat16", seed=11)
    leaves, st = _leaves(x, use_state)
    o, s = rb.wkv7(*leaves, st)
    assert o.shape == (B, T, 3, 8) and o.dtype == torch.bfloat16
    assert s.shape == (B, 3, 16, 8) and s.dtype == torch.float32
    if use_state:
        assert torch.equal(s, st) and (B == 0 or s.data_ptr() != st.data_ptr())
    else:
        assert not s.any()
    if use_state or o.requires_grad:
        dstate = torch.randn_like(s)
        (o.float().sum() + (s * dstate).sum()).backward()
        if use_state:
            assert torch.equal(st.grad, dstate)
        assert all(g.grad is None or (g.grad.shape == g.shape and not g.grad.any()) for g in leaves)
    assert rb.wkv7(*leaves, st, output_final_state=False)[1] is None


def test_packed_sequences_without_tokens_keep_their_states():
    x = _x(B=1, T=0, seed=12)
    init = torch.randn(3, 2, 16, 16)
    o, s = _call(x, state=init, cu_seqlens=torch.tensor([0, 0, 0, 0]))
    assert o.shape == (1, 0, 2, 16) and torch.equal(s, init)
    _, s = _call(x, state=None, cu_seqlens=torch.tensor([0, 0, 0, 0]))
    assert s.shape == (3, 2, 16, 16) and not s.any()


@pytest.mark.parametrize("varlen", [False, True])
def test_meta_tensors_infer_shapes_forward_and_backward(varlen):
    x = _x(B=1 if varlen else 2, T=24, H=2, K=16, V=8, dtype="float16", seed=13)
    N = 3 if varlen else x["k"].shape[0]
    meta = {n: x[n].to("meta").requires_grad_(True) for n in NAMES}
    st = torch.randn(N, 2, 16, 8).to("meta").requires_grad_(True)
    cu = torch.tensor([0, 5, 5, 24], device="meta") if varlen else None
    o, s = rb.wkv7(*(meta[n] for n in NAMES), st, cu_seqlens=cu)
    assert o.is_meta and o.shape == x["v"].shape and o.dtype == torch.float16
    assert s.is_meta and s.shape == (N, 2, 16, 8) and s.dtype == torch.float32
    (o.float().sum() + s.sum()).backward()
    assert all(meta[n].grad.shape == meta[n].shape for n in NAMES) and st.grad.shape == st.shape
    with pytest.raises(ValueError, match="state: expected shape"):
        rb.wkv7(*(meta[n] for n in NAMES), st[:, :1], cu_seqlens=cu)
    with pytest.raises(ValueError, match="k: .*meta"):
        rb.explain(*(meta[n] for n in NAMES), st, cu_seqlens=cu)


# Bad arguments as test_bad_input_names_the_argument / test_bad_options_name_the_argument have them.
COMPILE_CASES = [
    (lambda x: x.update(r=x["r"][0]), {}, ValueError, "r: expected a 4-D tensor"),
    (lambda x: x.update(a=x["a"][:, :-1]), {}, ValueError, "a: expected shape"),
    (lambda x: x.update(b=x["b"].double()), {}, TypeError, "b: expected dtype"),
    (lambda x: x.update(state=x["state"][:, :1]), {}, ValueError, "state: expected shape"),
    (lambda x: x.update(state=x["state"].double()), {}, TypeError, "state: expected dtype"),
    (lambda x: x.update(r=x["r"].tolist()), {}, TypeError, "r: expected a torch.Tensor"),
    (None, dict(w_form="exp"), ValueError, "w_form: expected one of"),
    (None, dict(scale="1"), TypeError, "scale: expected a finite"),
    (None, dict(scale=True), TypeError, "scale: expected a finite"),
    (None, dict(backend="cuda-magic"), ValueError, "backend: unknown backend"),
    (None, dict(output_final_state=1), TypeError, "output_final_state: expected a bool"),
]


@pytest.mark.parametrize("warm", [False, True], ids=["first-call", "after-a-good-call"])
@pytest.mark.parametrize("mutate, kw, exc, match", COMPILE_CASES)
def test_compiled_call_raises_what_eager_raises(mutate, kw, exc, match, warm):
    """torch.compile(fullgraph=True) raises the eager error, not torch._dynamo.exc.Unsupported:
    on a first compile (static shapes) and on a recompile after a good call (dynamic shapes)."""
    torch._dynamo.reset()
    opts = {}

    def f(r, w, k, v, a, b, state):
        o, s = rb.wkv7(r, w, k, v, a, b, state, **opts)
        return o.float().sum() + (s.sum() if s is not None else 0)

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    if warm:
        good = _x(B=3, T=7, seed=15)
        compiled(*(good[n] for n in NAMES), good["state"])
    opts.update(kw)
    x = _x(seed=14)
    if mutate is not None:
        mutate(x)
    with pytest.raises(exc, match=match) as eager:
        f(*(x[n] for n in NAMES), x["state"])
    with pytest.raises(exc, match=match) as traced:
        compiled(*(x[n] for n in NAMES), x["state"])
    assert str(traced.value) == str(eager.value)


def test_compiled_call_without_tokens():
    torch._dynamo.reset()
    compiled = torch.compile(lambda *args: rb.wkv7(*args), backend="eager", fullgraph=True)
    x = _x(B=0, seed=16)
    o, s = compiled(*(x[n] for n in NAMES), x["state"])
    assert o.shape == (0, 20, 2, 16) and s.shape == (0, 2, 16, 16)


@pytest.mark.parametrize("kw, exc", [(dict(state_slice=True), ValueError), (dict(scale=True), TypeError)])
def test_compiled_call_raises_when_its_outputs_go_unused(kw, exc):
    """The graph keeps a refused call: it raises as eager does, even when nothing reads its outputs."""
    torch._dynamo.reset()
    kw = dict(kw)
    x = _x(seed=17)
    state = x["state"][:, :1] if kw.pop("state_slice", False) else x["state"]

    def f(r, w, k, v, a, b, state):
        rb.wkv7(r, w, k, v, a, b, state, **kw)
        return r * 2

    with pytest.raises(exc):
        torch.compile(f, backend="eager", fullgraph=True)(*(x[n] for n in NAMES), state)


# ---------------------------------------------------------------------------------------------
# Layout mistakes: warnings where shapes or values make one likely, and hints in the errors

def _layout_warnings(call):
    """The wkv7 warnings `call()` gives, every one of them (not once per call site)."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if "wkv7:" in str(w.message)]


def _raw_w(shape, seed):
    """RWKV-LM's w: -softplus(-(w0 + lora)) - 0.5, its decay exp(-exp(w))."""
    g = torch.Generator().manual_seed(seed)
    w0 = -7 + 9 * torch.rand(shape, generator=g)
    return -torch.nn.functional.softplus(-w0) - 0.5


def test_inputs_laid_out_b_h_t_k_warn():
    x = _x(B=1, T=160, H=2, K=8, V=8, seed=21)        # [B, T, H, K] with T = 160 > 128
    heads_first = {n: x[n].transpose(1, 2) for n in NAMES}
    messages = _layout_warnings(lambda: rb.wkv7(*(heads_first[n] for n in NAMES)))
    assert len(messages) == 1 and "[B, H, T, K]" in messages[0] and "transpose(1, 2)" in messages[0]
    # the right layout, decode (T = 1 reads the same either way) and a prompt shorter than H: quiet
    assert not _layout_warnings(lambda: rb.wkv7(*(x[n] for n in NAMES)))
    step = _x(B=2, T=1, H=160, K=8, V=8, seed=22)
    assert not _layout_warnings(lambda: rb.wkv7(*(step[n] for n in NAMES)))
    short = _x(B=1, T=5, H=32, K=8, V=8, seed=23)
    assert not _layout_warnings(lambda: rb.wkv7(*(short[n] for n in NAMES)))


def test_inputs_laid_out_b_h_t_k_with_a_state_name_the_layout_in_the_error():
    x = _x(B=2, T=12, H=3, K=8, V=8, seed=24)
    heads_first = [x[n].transpose(1, 2) for n in NAMES]
    with pytest.raises(ValueError, match=r"state: expected shape .*look like \[B, H, T, K\].*transpose\(1, 2\)"):
        rb.wkv7(*heads_first, x["state"])


def test_a_state_in_rwkv_lm_layout_names_the_transpose_in_the_error():
    x = _x(B=2, T=12, H=3, K=16, V=8, seed=25)
    with pytest.raises(ValueError, match=r"state: expected shape .*\[N, H, V, K\].*transpose\(-1, -2\)"):
        _call(x, state=x["state"].transpose(-1, -2).contiguous())


def test_rwkv_lm_raw_w_read_as_log_decay_warns():
    x = _x(B=2, T=20, H=2, K=16, V=16, seed=26)
    x["w"] = _raw_w(x["w"].shape, seed=27)
    messages = _layout_warnings(lambda: _call(x))
    assert len(messages) == 1 and "w_form='raw'" in messages[0]
    assert not _layout_warnings(lambda: _call(x, w_form="raw"))


def test_log_decay_above_zero_warns():
    x = _x(B=2, T=20, H=2, K=16, V=16, seed=28)
    x["w"] = x["w"] + 0.7                                  # some channels above 0
    messages = _layout_warnings(lambda: _call(x))
    assert len(messages) == 1 and "> 0" in messages[0] and "w_form='clampw'" in messages[0]


@pytest.mark.parametrize("regime", ["realistic", "strong", "unit", "strong everywhere", "no decay"])
def test_valid_log_decays_do_not_warn(regime):
    x = make_inputs(Case("forward", "float32", "strong" if regime == "strong everywhere" else
                         "realistic" if regime == "no decay" else regime, 2, 20, 2, 16, 16), 29, "cpu")
    if regime == "strong everywhere":
        x["w"] = -10 - 20 * torch.rand_like(x["w"])
    if regime == "no decay":
        x["w"] = torch.where(torch.rand_like(x["w"]) < 0.5, -torch.inf, 0.0)
    assert not _layout_warnings(lambda: _call(x))


def test_a_warning_shows_once_per_call_site():
    import warnings
    x = _x(B=2, T=20, H=2, K=16, V=16, seed=30)
    x["w"] = _raw_w(x["w"].shape, seed=31)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            _call(x)
    shown = [w for w in caught if "wkv7:" in str(w.message)]
    assert len(shown) == 1 and shown[0].filename == __file__      # attributed to the caller


def test_subpackages_are_attributes():
    import rwkv_backends as rb
    assert callable(rb.distributed.wkv7) and callable(rb.compat.patch_fla)
    with pytest.raises(AttributeError):
        rb.no_such_thing
