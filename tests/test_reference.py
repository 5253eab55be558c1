"""The float64 reference against the shared golden cases (SPEC §2: to 1e-12)."""

import json

import numpy as np
import pytest
import torch

from _support import GOLDEN_DIR
from rwkv_backends import wkv7, wkv7_reference

pytestmark = pytest.mark.skipif(not (GOLDEN_DIR / "cases.json").exists(), reason=f"no golden cases at {GOLDEN_DIR}")


def _cases():
    if not (GOLDEN_DIR / "cases.json").exists():
        return []
    return json.loads((GOLDEN_DIR / "cases.json").read_text())


def _load(case):
    data = np.load(GOLDEN_DIR / "wkv7_golden.npz")
    name = case["name"]
    return {k.split("/", 1)[1]: torch.from_numpy(data[k]) for k in data.files if k.startswith(name + "/")}


def _run(fn, case, g, dtype=torch.float64):
    leaves = {n: g[n].to(dtype).requires_grad_(True) for n in "rwkvab"}
    state = g["state"].float().requires_grad_(True) if case["has_state"] else None
    if dtype == torch.float64 and state is not None:
        state = g["state"].requires_grad_(True)
    o, s = fn(*(leaves[n] for n in "rwkvab"), state, w_form=case["w_form"], scale=case["scale"],
              cu_seqlens=g.get("cu_seqlens"), output_final_state=case["output_final_state"])
    loss = (o.double() * g["do"]).sum()
    if s is not None:
        loss = loss + (s.double() * g["dfinal_state"]).sum()
    loss.backward()
    grads = {"d" + n: leaves[n].grad for n in "rwkvab"}
    if state is not None:
        grads["dstate"] = state.grad
    return o, s, grads


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["name"])
def test_reference_reproduces_golden(case):
    g = _load(case)
    o, s, grads = _run(wkv7_reference, case, g)
    assert (o - g["o"]).abs().max() < 1e-12
    if case["output_final_state"]:
        assert (s - g["final_state"]).abs().max() < 1e-12
    else:
        assert s is None
    for name, grad in grads.items():
        assert (grad - g[name]).abs().max() < 1e-12, name


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["name"])
def test_dispatched_wkv7_matches_golden_in_float32(case):
    """The op as users call it (float32 inputs) against the golden outputs and gradients."""
    g = _load(case)
    o, s, grads = _run(wkv7, case, g, dtype=torch.float32)
    rel = lambda x, y: ((x.double() - y).norm() / y.norm()).item()  # noqa: E731
    assert rel(o, g["o"]) < 2e-5
    if case["output_final_state"]:
        assert rel(s, g["final_state"]) < 2e-5
    for name, grad in grads.items():
        assert rel(grad, g[name]) < 1e-4, name
