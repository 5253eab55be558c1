"""The check of the float64 reference against golden data (SPEC §2: any reference reproduces the
golden cases to 1e-12) that the conformance suite runs before it judges a backend by that reference.

golden/ ships with the package: four cases of the shared golden set (golden/wkv7_golden.npz and
cases.json there), their arrays copied unchanged. Together they take every path through the
reference: each w_form, scale != 1, no initial state, K != V, a batch of sequences, packed
sequences with an empty one, and a one-step call without the final state; inputs, outputs and the
gradients of every input.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch

GOLDEN_DIR = pathlib.Path(__file__).with_name("golden")
TOLERANCE = 1e-12          # largest absolute difference allowed on any element
INPUTS = ("r", "w", "k", "v", "a", "b")


class ReferenceMismatch(RuntimeError):
    """The float64 reference does not reproduce the golden data: no backend can be judged by it."""


def load_cases(directory=GOLDEN_DIR) -> list:
    """[(case metadata from cases.json, {array name: float64 or int64 tensor})]."""
    directory = pathlib.Path(directory)
    meta = json.loads((directory / "cases.json").read_text())
    with np.load(directory / "wkv7_golden.npz") as data:
        arrays = {name: torch.from_numpy(data[name]) for name in data.files}
    return [(case, {n.split("/", 1)[1]: t for n, t in arrays.items() if n.startswith(case["name"] + "/")})
            for case in meta]


def reference_errors(device="cpu", directory=GOLDEN_DIR) -> dict:
    """{case: {quantity: largest absolute difference from the golden array}} for the reference as it
    is now (outputs, final state, and the gradients of every input and of the initial state)."""
    from .. import reference          # looked up per call: the reference as currently defined
    out = {}
    for case, g in load_cases(directory):
        g = {n: t.to(device) for n, t in g.items()}
        leaves = {n: g[n].clone().requires_grad_(True) for n in INPUTS}
        state = g["state"].clone().requires_grad_(True) if case["has_state"] else None
        with torch.enable_grad():
            o, s = reference.wkv7_reference(*(leaves[n] for n in INPUTS), state, w_form=case["w_form"],
                                            scale=case["scale"], cu_seqlens=g.get("cu_seqlens"),
                                            output_final_state=case["output_final_state"])
            loss = (o * g["do"]).sum()
            if case["output_final_state"]:
                loss = loss + (s * g["dfinal_state"]).sum()
            wrt = [leaves[n] for n in INPUTS] + ([state] if state is not None else [])
            grads = torch.autograd.grad(loss, wrt)
        errors = {"o": _worst(o, g["o"])}
        if case["output_final_state"]:
            errors["final_state"] = _worst(s, g["final_state"])
        elif s is not None:
            errors["final_state"] = float("inf")          # asked for no final state, returned one
        names = ["d" + n for n in INPUTS] + (["dstate"] if state is not None else [])
        errors.update({n: _worst(d, g[n]) for n, d in zip(names, grads)})
        out[case["name"]] = errors
    return out


def _worst(x, ref) -> float:
    if x is None or x.shape != ref.shape:
        return float("inf")
    diff = (x.detach().to(torch.float64) - ref).abs()
    return float("inf") if not torch.isfinite(diff).all() else float(diff.max()) if diff.numel() else 0.0


def check_reference(device="cpu", directory=GOLDEN_DIR) -> dict:
    """reference_errors, or ReferenceMismatch naming every case and quantity off by more than
    TOLERANCE (or that could not be computed)."""
    try:
        errors = reference_errors(device, directory)
    except Exception as exc:
        raise ReferenceMismatch(f"the float64 reference fails on the golden cases in {directory}: "
                                f"{type(exc).__name__}: {exc}") from exc
    bad = [f"{case}.{n}={e:.3g}" for case, errs in errors.items() for n, e in errs.items() if not e <= TOLERANCE]
    if bad:
        raise ReferenceMismatch(f"the float64 reference on {device} does not reproduce the golden cases in {directory} "
                                f"to {TOLERANCE:g} (SPEC §2): " + ", ".join(bad)
                                + "; no backend can be judged by it")
    return errors
