"""Scale cases on a large NVIDIA card (written for an H200, 141 GB): a million (sequence, head) pairs,
one sequence of 2^21 steps, and tensors of more than 2^31 elements, in prefill and in training.

    python -m pytest -q -m gpu tests/test_scale_gpu.py -s

Each case checks everything it returns for NaN and Inf, and a part of it against the float64
reference on the card: whole sequences picked from the packed ones; for one long sequence, windows
of it (at its start, in its middle, at its end: the last elements of tensors past 2^31 elements).
A window's reference starts WARM steps before the window from a zero state, and its gradients run
WARM steps past it: the inputs' decay is kept in [-0.6065, -0.05] (inside a real layer's range), so
what the state carries over WARM steps shrinks by e^(-0.05 WARM), ~1e-22, below any tolerance.
"""

from __future__ import annotations

import pytest
import torch

import rwkv_backends as rb
from rwkv_backends.conformance import relative_error
from rwkv_backends.reference import wkv7_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or torch.version.hip is not None,
                                                  reason="needs an NVIDIA GPU")]

NAMES = ("r", "w", "k", "v", "a", "b")
O_TOL, GRAD_TOL = 1e-2, 2e-2          # SPEC §2, bfloat16 inputs
WARM = 1024                            # steps of warm-up (and of gradient run-out) around a window
WINDOW = 256


def _fill(x, block, seed, kind):
    """x ([tokens, H, D] view) filled block by block, so no float32 copy of the whole tensor exists."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    for lo in range(0, x.shape[0], block):
        part = x[lo:lo + block]
        if kind == "w":       # log-decay in [-0.6065, -0.05]
            part.copy_(-0.05 - 0.5565 * torch.rand(part.shape, generator=g, device=x.device))
        else:
            part.copy_(torch.randn(part.shape, generator=g, device=x.device) * (2 * part.shape[-1] ** -0.5 if kind == "k"
                                                                                else 1.0))


def _inputs(B, T, H, K, V, seed, N=None, state=True, dtype=torch.bfloat16):
    """Fresh random inputs on the card, as a real RWKV-7 layer's (a = -kk, b = kk * lr, kk unit-norm)."""
    x = {n: torch.empty(B, T, H, V if n == "v" else K, dtype=dtype, device="cuda") for n in NAMES}
    block = max(1, (1 << 26) // (H * max(K, V)))
    for i, n in enumerate(("r", "w", "k", "v")):
        _fill(x[n].view(B * T, H, -1), block, seed + i, n)
    g = torch.Generator(device="cuda").manual_seed(seed + 7)
    a, b = x["a"].view(B * T, H, K), x["b"].view(B * T, H, K)
    for lo in range(0, B * T, block):
        kk = torch.nn.functional.normalize(torch.randn(a[lo:lo + block].shape, generator=g, device="cuda"), dim=-1)
        a[lo:lo + block].copy_(-kk)
        b[lo:lo + block].copy_(kk * torch.rand(kk.shape, generator=g, device="cuda"))
    N = B if N is None else N
    x["state"] = torch.randn(N, H, K, V, generator=g, device="cuda") if state else None
    return x


def _finite(*tensors):
    for t in tensors:
        if t is not None:
            assert bool(torch.isfinite(t).all()), "NaN or Inf"


def _train(x, cu=None):
    """Outputs, final state and the gradients (r, w, k, v, a, b, state) of Σ o·do + Σ state_out·dstate,
    with do and dstate fresh random; also returns do and dstate."""
    leaves = [x[n].requires_grad_(True) for n in NAMES]
    st = x["state"].requires_grad_(True) if x["state"] is not None else None
    o, s = rb.wkv7(*leaves, st, cu_seqlens=cu)
    g = torch.Generator(device="cuda").manual_seed(99)
    do = torch.empty_like(o)
    _fill(do.view(-1, *o.shape[2:]), max(1, (1 << 26) // (o.shape[2] * o.shape[3])), 98, "v")
    dstate = torch.randn(s.shape, generator=g, device="cuda")
    torch.autograd.backward((o, s), (do, dstate))
    grads = [t.grad for t in leaves] + [st.grad if st is not None else None]
    for t in leaves + ([st] if st is not None else []):
        t.grad = None
        t.requires_grad_(False)
    return o.detach(), s.detach(), grads, do, dstate


def _check_sequences(x, cu, picks, o, s, grads=None, do=None, dstate=None):
    """Sequences `picks` of a packed call against the float64 reference, run on them alone."""
    bounds = cu.tolist()
    spans = [(bounds[n], bounds[n + 1]) for n in picks]
    sub_cu = torch.tensor([0] + [sum(hi - lo for lo, hi in spans[:i + 1]) for i in range(len(spans))])
    take = lambda t: torch.cat([t[:, lo:hi] for lo, hi in spans], dim=1)  # noqa: E731
    ins = [take(x[n]).double().requires_grad_(grads is not None) for n in NAMES]
    st = x["state"][picks].double().requires_grad_(grads is not None) if x["state"] is not None else None
    with torch.set_grad_enabled(grads is not None):
        o_ref, s_ref = wkv7_reference(*ins, st, cu_seqlens=sub_cu)
        assert relative_error(take(o), o_ref) < O_TOL
        assert relative_error(s[picks], s_ref) < O_TOL
        if grads is None:
            return
        wrt = ins + ([st] if st is not None else [])
        refs = torch.autograd.grad((o_ref, s_ref), wrt, (take(do).double(), dstate[picks].double()))
    for name, got, ref in zip(NAMES, grads, refs):
        assert relative_error(take(got), ref) < GRAD_TOL, name
    if st is not None:
        assert relative_error(grads[6][picks], refs[6]) < GRAD_TOL, "state"


def _check_window(x, t0, t1, heads, o, s, grads=None, do=None, dstate=None, seq=0):
    """Steps [t0, t1) of sequence `seq` of x, heads `heads`, against the float64 reference run on
    [t0 - WARM, t1 + WARM) (clipped to the sequence) from a zero state, or from the initial state at
    step 0 (and the final state and its gradient where the window reaches the end)."""
    T = x["k"].shape[1]
    lo, hi = max(0, t0 - WARM), min(T, t1 + (WARM if grads is not None else 0))
    cut = lambda t: t[seq:seq + 1, lo:hi, heads]  # noqa: E731
    rows = lambda t: t[seq:seq + 1, heads]  # noqa: E731
    ins = [cut(x[n]).double().requires_grad_(grads is not None) for n in NAMES]
    st = None
    if lo == 0 and x["state"] is not None:
        st = rows(x["state"]).double().requires_grad_(grads is not None)
    with torch.set_grad_enabled(grads is not None):
        o_ref, s_ref = wkv7_reference(*ins, st)
        assert relative_error(o[seq:seq + 1, t0:t1, heads], o_ref[:, t0 - lo:t1 - lo]) < O_TOL
        if hi == T:
            assert relative_error(rows(s), s_ref) < O_TOL
        if grads is None:
            return
        ds = rows(dstate).double() if hi == T else torch.zeros_like(s_ref)
        wrt = ins + ([st] if st is not None else [])
        refs = torch.autograd.grad((o_ref, s_ref), wrt, (cut(do).double(), ds))
    for name, got, ref in zip(NAMES, grads, refs):
        assert relative_error(got[seq:seq + 1, t0:t1, heads], ref[:, t0 - lo:t1 - lo]) < GRAD_TOL, name
    if st is not None:
        assert relative_error(rows(grads[6]), refs[6]) < GRAD_TOL, "state"


def _packed(N, H, max_len, seed):
    """cu_seqlens of N sequences of random lengths in [0, max_len] (empty ones among them)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, max_len + 1, (N,), generator=g)
    lens[:3] = torch.tensor([0, max_len, 1])
    cu = torch.zeros(N + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(lens, 0)
    return cu


def _picks(N):
    return sorted({0, 1, 2, N // 3, N // 2, N - 2, N - 1} | set(range(N // 4, N // 4 + 24)))


@pytest.fixture(autouse=True)
def _memory_report(request):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    yield
    torch.cuda.synchronize()
    print(f"\n{request.node.name}: peak {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB")
    torch.cuda.empty_cache()


def test_prefill_a_million_packed_pairs():
    """125,000 packed sequences x 8 heads (10^6 pairs, 15 times CUDA's grid y limit) of up to 16 steps."""
    N, H = 125_000, 8
    cu = _packed(N, H, 16, 1)
    x = _inputs(1, int(cu[-1]), H, 64, 64, 10, N=N)
    cu = cu.cuda()
    with torch.no_grad():
        o, s = rb.wkv7(*(x[n] for n in NAMES), x["state"], cu_seqlens=cu)
    _finite(o, s)
    _check_sequences(x, cu, _picks(N), o, s)


def test_decode_a_million_pairs():
    """One step of 125,000 sequences x 8 heads (the recurrent kernel's cached launch)."""
    x = _inputs(125_000, 1, 8, 64, 64, 20)
    with torch.no_grad():
        o, s = rb.wkv7(*(x[n] for n in NAMES), x["state"])
    _finite(o, s)
    picks = _picks(125_000)
    ins = [x[n][picks].double() for n in NAMES]
    o_ref, s_ref = wkv7_reference(*ins, x["state"][picks].double())
    assert relative_error(o[picks], o_ref) < O_TOL and relative_error(s[picks], s_ref) < O_TOL


def test_train_160000_packed_pairs():
    """20,000 packed sequences x 8 heads of up to 24 steps, with an initial state: forward and backward."""
    N, H = 20_000, 8
    cu = _packed(N, H, 24, 2)
    x = _inputs(1, int(cu[-1]), H, 64, 64, 30, N=N)
    cu = cu.cuda()
    o, s, grads, do, dstate = _train(x, cu)
    _finite(o, s, *grads)
    _check_sequences(x, cu, _picks(N), o, s, grads, do, dstate)


@pytest.mark.parametrize("train", [False, True], ids=["prefill", "training"])
def test_one_sequence_of_2_21_steps(train):
    T, H = 2 ** 21, 2
    x = _inputs(1, T, H, 64, 64, 40)
    if train:
        o, s, grads, do, dstate = _train(x)
        _finite(o, s, *grads)
    else:
        with torch.no_grad():
            o, s = rb.wkv7(*(x[n] for n in NAMES), x["state"])
        _finite(o, s)
        grads = do = dstate = None
    for t0 in (0, T // 2 + 77, T - WINDOW):
        _check_window(x, t0, t0 + WINDOW, [0, H - 1], o, s, grads, do, dstate)


@pytest.mark.parametrize("B, T, V, train", [
    (1, 2 ** 21 + 2 ** 15, 64, False), (9, 2 ** 18, 64, False), (1, 2 ** 21 + 2 ** 15, 32, True)],
    ids=["prefill-B1", "prefill-B9", "training-B1-V32"])
def test_tensors_past_2_31_elements(B, T, V, train):
    """H = 16, K = 64: more than 2^31 elements in r, w, k, a, b and their gradients (4+ GiB each in
    bfloat16), in v and o too where V = 64. B1 walks the few-pair variants, B9 (144 pairs) the
    one-pass kernels (Gluon on sm90); training takes V = 32 to stay within about 110 GiB. The windows
    at the end of the last sequence read and write elements past index 2^31."""
    H = 16
    x = _inputs(B, T, H, 64, V, 50)
    assert x["r"].numel() > 2 ** 31
    if train:
        o, s, grads, do, dstate = _train(x)
        _finite(o, s, *grads)
    else:
        with torch.no_grad():
            o, s = rb.wkv7(*(x[n] for n in NAMES), x["state"])
        _finite(o, s)
        grads = do = dstate = None
    print(f"\n{rb.explain(*(x[n] for n in NAMES), x['state'])['variant']} (forward)")
    for seq, t0 in ((0, 0), (B - 1, T - WINDOW)):
        _check_window(x, t0, t0 + WINDOW, [0, H - 1], o, s, grads, do, dstate, seq=seq)
