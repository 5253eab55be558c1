"""wkv7 called from several threads at once under TRITON_INTERPRET=1: Triton's interpreter patches
module-wide state during a launch, so interpreted launches take turns (kernels/common.py)."""

import os
import threading

import pytest
import torch

import rwkv_backends as rb
from _support import HAS_GPU
from rwkv_backends.conformance import Case, make_inputs

pytestmark = pytest.mark.skipif(HAS_GPU or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="interpreter tests run on CPU-only machines")

NAMES = ("r", "w", "k", "v", "a", "b")


def _call(x, variant, grad):
    leaves = [x[n].clone().requires_grad_(grad) for n in NAMES]
    with torch.set_grad_enabled(grad):
        o, s = rb.wkv7(*leaves, x["state"], cu_seqlens=x["cu_seqlens"], backend=variant)
        if not grad:
            return [o, s]
        return [o, s, *torch.autograd.grad((o * x["do"]).sum() + (s * x["dstate"]).sum(), leaves)]


def test_concurrent_interpreted_calls_give_their_single_threaded_results(simulate):
    simulate("nvidia:sm90")
    jobs = [
        (make_inputs(Case("forward", "float32", "realistic", 2, 21, 2, 16, 16), 101, "cpu"), "triton.chunk", False),
        (make_inputs(Case("forward", "float32", "strong", 1, 30, 1, 16, 32), 102, "cpu"), "triton.chunk", False),
        (make_inputs(Case("varlen", "float32", "realistic", 1, 25, 2, 16, 16, seqlens=(9, 0, 16)), 103, "cpu"),
         "triton.recurrent", False),
        (make_inputs(Case("backward", "float32", "unit", 1, 18, 2, 16, 16), 104, "cpu"), "triton.chunk_transition",
         True),
    ]
    alone = [_call(*job) for job in jobs]
    start = threading.Barrier(len(jobs))
    results, errors = [None] * len(jobs), []

    def work(i):
        try:
            start.wait()
            results[i] = [_call(*jobs[i]) for _ in range(2)]
        except Exception as exc:  # a crashed thread fails the test with its exception
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, (want, got) in enumerate(zip(alone, results)):
        for run in got:
            assert all(torch.equal(a, b) for a, b in zip(want, run)), f"job {i}"
