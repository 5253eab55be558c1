"""Launch grids within CUDA's limits (y and z at most 65535) for any number of (sequence, head) pairs,
and launches split over slices of sequences giving the unsplit launches' results to the bit."""

import os

import pytest
import torch

import rwkv_backends as rb
from _support import HAS_GPU
from rwkv_backends.config import KernelConfig
from rwkv_backends.conformance import Case, make_inputs, relative_error
from rwkv_backends.kernels import backward, chunk, common, recurrent, training, twopass
from rwkv_backends.reference import wkv7_reference

interpreter = pytest.mark.skipif(HAS_GPU or os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="interpreter tests run on CPU-only machines")

CUDA_GRID_YZ = 65535
NAMES = ("r", "w", "k", "v", "a", "b")


class _Recorded:
    """Stands in for a kernel: records its launch grids and runs nothing."""

    def __init__(self, name, grids):
        self.name, self.grids = name, grids

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.grids.append((self.name, tuple(grid)))
        return run


def _record_launches(monkeypatch, grids):
    """Every kernel of the launcher modules (Triton and Gluon) records its grids; no Gluon check."""
    from rwkv_backends.kernels import transition
    from rwkv_backends.kernels.gluon import backward as gluon_backward
    from rwkv_backends.kernels.gluon import backward_ksplit, forward, loaded_walks, prep, states
    for module in (recurrent, chunk, twopass, transition, backward, gluon_backward, backward_ksplit, forward,
                   loaded_walks, prep, states):
        for name in dir(module):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, _Recorded(name, grids))
        if hasattr(module, "_check_gluon"):
            monkeypatch.setattr(module, "_check_gluon", lambda *a, **kw: None)


def _random_inputs(B, T, H, K, V, seed):
    g = torch.Generator().manual_seed(seed)
    x = {n: torch.randn(B, T, H, V if n == "v" else K, generator=g) for n in NAMES}
    x["w"] = -torch.rand(B, T, H, K, generator=g)
    return x


def _all_launches(x, state, cu):
    """Every launcher's every kernel: forwards, the two-pass and transition paths, the backward's
    one-walk and segmented forms, Triton and Gluon, decode."""
    ins = [x[n] for n in NAMES]
    do = torch.randn_like(x["v"])
    dht = torch.randn_like(state)
    kw = dict(scale=1.0, cu_seqlens=cu, w_form="log")
    c16 = KernelConfig(chunk_size=16, block_v=16)
    gl16 = c16.with_(block_v=64, gluon=True)      # the Gluon kernels take all V columns in one program
    chunk.chunk_forward(*ins, state, **kw, cfg=c16)
    chunk.chunk_forward(*ins, state, **kw, cfg=gl16)
    recurrent.recurrent_forward(*ins, state, **kw, cfg=c16)
    for prep, fwd in ((c16, c16), (gl16, gl16)):
        twopass.twopass_forward(*ins, state, **kw, cfg_prep=prep, cfg_fwd=fwd, programs_per_sequence=2)
    plans = [
        training.TrainingPlan(c16, c16.with_(block_v=16)),                        # V split over two blocks
        training.TrainingPlan(c16, c16.with_(keep_u=True), cfg_states=c16),
        training.TrainingPlan(gl16, gl16, cfg_states=gl16),
        training.TrainingPlan(c16, c16, cfg_prep=c16, prep_programs=2, segments=3, cfg_states=c16),
        training.TrainingPlan(gl16, gl16, cfg_prep=gl16, prep_programs=2, segments=3,
                              cfg_states=gl16),
        training.TrainingPlan(c16, c16, cfg_prep=c16, prep_programs=2, segments=3, transitions=True),
    ]
    for how in plans:
        _, _, kept, seg_len = training.training_forward(*ins, state, **kw, how=how)
        training.training_backward(*ins, state, do, dht, kept, seg_len, **kw, how=how)


@pytest.mark.parametrize("varlen", [True, False])
def test_launch_grids_stay_within_cuda_limits_at_160000_pairs(monkeypatch, varlen):
    """20,000 sequences x 8 heads: every launch's y and z sizes stay at most 65535, and the launches
    of each kernel together cover every (sequence, head) pair exactly once per call."""
    grids = []
    _record_launches(monkeypatch, grids)
    recurrent._recurrent_launch.cache_clear()
    N, H, K, V = 20_000, 8, 16, 32
    if varlen:
        lens = torch.randint(0, 4, (N,), generator=torch.Generator().manual_seed(1))
        cu = torch.zeros(N + 1, dtype=torch.int64)
        cu[1:] = torch.cumsum(lens, 0)
        x = _random_inputs(1, int(cu[-1]), H, K, V, 2)
    else:
        cu = None
        x = _random_inputs(N, 2, H, K, V, 2)
    try:
        _all_launches(x, torch.randn(N, H, K, V), cu)
    finally:
        recurrent._recurrent_launch.cache_clear()
    names = {name for name, _ in grids}
    assert {"chunk_fwd_kernel", "chunk_fwd_gluon_kernel", "recurrent_fwd_kernel", "chunk_prep_kernel",
            "chunk_prep_gluon_kernel", "chunk_fwd_loaded_gluon_kernel", "chunk_bwd_kernel", "chunk_bwd_gluon_kernel",
            "chunk_states_kernel", "chunk_states_gluon_kernel", "chunk_dstate_kernel", "chunk_dstate_gluon_kernel",
            "chunk_bwd_ksplit_gluon_kernel", "chunk_transition_kernel", "chunk_transition_fwd_kernel",
            "chunk_transition_dstate_kernel"} <= names
    for name, grid in grids:
        assert len(grid) <= 3 and all(g <= CUDA_GRID_YZ for g in grid[1:]), (name, grid)
        assert grid[0] < 2 ** 31, (name, grid)
    # Launches of one kernel in one call follow each other; their y sizes add up to N * H.
    covered, run = [], None
    for name, grid in grids:
        if run is not None and run[0] == name and run[1] < N * H:
            run[1] += grid[1]
        else:
            run = [name, grid[1]]
            covered.append(run)
    assert all(total == N * H for _, total in covered), covered


def test_segment_counts_stay_within_the_grid_z_limit(monkeypatch):
    """Packed sequences walk segments over a grid z sized for the whole token axis: segment_states
    lengthens the segments to keep that within the limit; a shorter seg_len is refused by name."""
    monkeypatch.setattr(common, "GRID_YZ_MAX", 50)
    N, T, H = 400, 4000, 1
    k, v = torch.randn(1, T, H, 16), torch.randn(1, T, H, 16)
    cu = torch.linspace(0, T, N + 1).long()
    _, seg_len = common.segment_states(k, v, cu, 4, (16,))
    assert seg_len % 16 == 0 and -(-T // seg_len) <= 50
    assert common._segment_launch(cu, N, T, seg_len, 16, "cpu")[2] <= 50
    with pytest.raises(ValueError, match="seg_len"):
        common._segment_launch(cu, N, T, 16, 16, "cpu")


def test_pair_slices_cover_every_sequence_in_aligned_steps(monkeypatch):
    pairs = common._Pairs(20_000, 8, True)
    slices = pairs.slices()
    assert slices[0] == (0, 8176) and slices[-1][1] == 20_000
    assert all(n0 == prev[1] for prev, (n0, _) in zip(slices, slices[1:]))
    assert all((n1 - n0) * 8 <= CUDA_GRID_YZ and n0 % 16 == 0 for n0, n1 in slices)
    assert common._Pairs(3, 8, False).slices() == [(0, 3)]
    with pytest.raises(ValueError, match="H"):
        common._Pairs(1, CUDA_GRID_YZ + 1, False).slices()


def _run(variant, x, state, cu, grad):
    leaves = [x[n].clone().requires_grad_(grad) for n in NAMES]
    st = state.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        o, s = rb.wkv7(*leaves, st, cu_seqlens=cu, backend=variant)
        if not grad:
            return [o, s]
        grads = torch.autograd.grad((o * x["do"]).sum() + (s * x["dstate"]).sum(), leaves + [st])
    return [o, s, *grads]


@pytest.fixture
def small_grid_cap(monkeypatch):
    """A grid y cap of 5 programs: H = 2 heads go out two sequences a launch. Returns the slice
    counts of the launches made since."""
    counts = []
    real = common._Pairs.slices

    def slices(self):
        out = real(self)
        counts.append(len(out))
        return out

    def cap(value=5):
        monkeypatch.setattr(common, "GRID_YZ_MAX", value)
        monkeypatch.setattr(recurrent, "GRID_YZ_MAX", value)
        monkeypatch.setattr(common._Pairs, "slices", slices)
        return counts
    return cap


@interpreter
@pytest.mark.parametrize("variant, grad", [
    ("triton.chunk", True), ("triton.chunk_twopass", True), ("triton.chunk_transition", True),
    ("triton.recurrent", False)])
@pytest.mark.parametrize("varlen", [True, False])
def test_sliced_launches_match_whole_ones_and_the_reference(simulate, small_grid_cap, variant, grad, varlen):
    """With the grid's y size capped at 5, every launch of the call is split over slices of two
    sequences: outputs, final states and gradients equal the unsplit call's to the bit, and the
    float64 reference's to the float32 ceilings (an empty sequence included)."""
    simulate("nvidia:sm90")
    lens = (5, 0, 17, 3, 9, 1, 12) if varlen else ()
    case = Case("backward", "float32", "realistic", 1 if varlen else 5, sum(lens) if varlen else 11, 2, 16, 32,
                seqlens=lens)
    x = make_inputs(case, 31, "cpu")
    state, cu = x["state"], x["cu_seqlens"]
    whole = _run(variant, x, state, cu, grad)
    counts = small_grid_cap()
    split = _run(variant, x, state, cu, grad)
    assert counts and min(counts) >= 3
    for a, b in zip(whole, split):
        assert torch.equal(a, b)
    ins = [x[n].double().requires_grad_(grad) for n in NAMES]
    st = state.double().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        o_ref, s_ref = wkv7_reference(*ins, st, cu_seqlens=cu)
        assert relative_error(split[0], o_ref) < 2e-5 and relative_error(split[1], s_ref) < 2e-5
        if grad:
            refs = torch.autograd.grad((o_ref * x["do"].double()).sum() + (s_ref * x["dstate"].double()).sum(),
                                       ins + [st])
            for got, want in zip(split[2:], refs):
                assert relative_error(got, want) < 1e-4


@interpreter
def test_sliced_backward_keeps_the_v_block_shares_apart(small_grid_cap):
    """Two V blocks: the gradient kernel writes each block's share of the r, w, k, a, b gradients
    r.numel() apart in a [2, B, T, H, K] buffer; sliced launches keep that stride."""
    x = make_inputs(Case("backward", "float32", "realistic", 5, 23, 2, 16, 32), 12, "cpu")
    args = [x[n] for n in NAMES]
    kw = dict(scale=0.9, cu_seqlens=None, w_form="log", cfg_fwd=KernelConfig(chunk_size=16, block_v=32),
              cfg_bwd=KernelConfig(chunk_size=16, block_v=16))
    whole = backward.chunk_backward(*args, x["state"], x["do"], x["dstate"], **kw)
    counts = small_grid_cap()
    split = backward.chunk_backward(*args, x["state"], x["do"], x["dstate"], **kw)
    assert counts and min(counts) == 3
    for a, b in zip(whole, split):
        assert torch.equal(a, b)
