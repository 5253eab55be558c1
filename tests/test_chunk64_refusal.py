"""Known issue hopper-wgmma-gradient-chunk64: on Hopper the Triton gradient kernel at chunk 64 is
refused, with the reason, for every chunked variant (the H200 faulted there: an illegal memory access
in the backward of tests/test_chunk64_gpu.py's first case, Triton 3.6). The refusal tests only plan;
the last runs chunk-64 training under the interpreter with every load and store bounds-checked, the
evidence that the fault is not the kernels' indexing (a partial last chunk included)."""

import dataclasses

import pytest
import triton
import triton.language as tl

import _bounds
from _support import HAS_GPU, patch_nvidia_tables_at_chunk
from rwkv_backends import known_issues

from rwkv_backends import explain, registry, tuning
from rwkv_backends.conformance import Case, make_inputs
from rwkv_backends.registry import NoBackendError

VARIANTS = ("triton.chunk", "triton.chunk_twopass", "triton.chunk_transition")


@pytest.fixture
def tables_at(monkeypatch):
    yield lambda chunk_size: patch_nvidia_tables_at_chunk(monkeypatch, chunk_size)
    registry._plan_cached.cache_clear()


def _training_inputs():
    x = make_inputs(Case("backward", "bfloat16", "realistic", 2, 300, 4, 64, 64), 11, "cpu")
    return [x[n].requires_grad_() for n in ("r", "w", "k", "v", "a", "b")], x["state"].requires_grad_()


@pytest.mark.parametrize("variant", VARIANTS)
def test_hopper_refuses_the_gradient_kernel_at_chunk_64(simulate, tables_at, variant):
    simulate("nvidia:sm90")
    tables_at(64)
    leaves, state = _training_inputs()
    with pytest.raises(NoBackendError, match="hopper-wgmma-gradient-chunk64") as exc:
        explain(*leaves, state, backend=variant)
    assert "chunk_size 64" in str(exc.value) and "illegal memory access" in str(exc.value)
    # unforced, training plans another variant instead of the faulting kernel
    plan = explain(*leaves, state)
    assert all(plan["config"][role]["chunk_size"] < 64 for role in ("chunk_bwd", "chunk_bwd_split")
               if role in plan["config"]), plan["config"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunk_32_and_other_archs_are_not_refused(simulate, tables_at, variant):
    leaves, state = _training_inputs()
    simulate("nvidia:sm90")
    tables_at(32)
    assert explain(*leaves, state, backend=variant)["variant"] == variant
    simulate("nvidia:sm80")                       # not Hopper: no wgmma, the entry does not apply
    tables_at(64)
    plan = explain(*leaves, state, backend=variant)
    assert plan["variant"] == variant and "hopper-wgmma-gradient-chunk64" not in plan["known_issues_active"]


def test_the_tables_plan_no_refused_config():
    """Every table entry of the gradient kernel stays below chunk 64 (the refusal costs no planned config)."""
    for arch in tuning.tables("nvidia").values():
        for role in ("chunk_bwd", "chunk_bwd_split"):
            for entry in arch.get(role, {}).values():
                assert entry.config.chunk_size < 64, (role, entry.config)


@triton.jit
def _one_past_the_end(x, y, n, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    tl.store(y + o, tl.load(x + o, mask=o <= n, other=0.0), mask=o < n)


@pytest.mark.skipif(HAS_GPU, reason="the bounds check wraps Triton's interpreter")
def test_the_bounds_check_catches_an_overrun(monkeypatch):
    violations = _bounds.install(monkeypatch)
    import torch
    _one_past_the_end[(1,)](torch.zeros(10), torch.zeros(10), 10, BLOCK=16)
    assert violations == [("_one_past_the_end", "load", 1, ["x[10] of 10"])]


@pytest.mark.skipif(HAS_GPU, reason="the bounds check wraps Triton's interpreter")
@pytest.mark.parametrize("variant", VARIANTS)
def test_chunk64_training_indexes_in_bounds(monkeypatch, simulate, tables_at, variant):
    """The card's failing case, shortened (T = 100: a full chunk and a partial one of 36 rows), at the
    plan the card ran (the refusal lifted): right against float64, and no lane out of bounds."""
    from rwkv_backends.conformance.runner import run_case
    monkeypatch.setattr(known_issues, "CATALOG", tuple(
        dataclasses.replace(i, refuses_config=lambda k, c: None) if hasattr(i, "refuses_config") else i
        for i in known_issues.CATALOG))
    simulate("nvidia:sm90")
    tables_at(64)
    violations = _bounds.install(monkeypatch)
    res = run_case(Case("backward", "bfloat16", "realistic", 2, 100, 2, 64, 64), backend=variant, device="cpu",
                   base_seed=11)
    assert res["status"] == "passed" and res["variant"] == variant, res.get("detail")
    assert violations == []
