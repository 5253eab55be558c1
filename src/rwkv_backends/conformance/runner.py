"""Running conformance cases against a backend and writing the reports (SPEC §5)."""

from __future__ import annotations

import time
import traceback
from xml.sax.saxutils import quoteattr

import torch

from ..api import explain, wkv7
from ..reference import wkv7_reference
from ..registry import NoBackendError
from .cases import TOLERANCES, Case, make_inputs, relative_error
from .golden import ReferenceMismatch, check_reference  # noqa: F401  (ReferenceMismatch: the runner's error)

SCHEMA = "rwkv-backends-conformance/1"
GRAD_NAMES = ("r", "w", "k", "v", "a", "b", "state")

# Devices whose float64 reference reproduced the golden cases in this process.
_REFERENCE_CHECKED: set = set()


def ensure_reference(ref_device, fresh=False) -> None:
    """Every case is judged by the float64 reference: it must reproduce the golden cases first (SPEC
    §2, golden.check_reference), once per process and device (every time with `fresh`). Raises
    ReferenceMismatch otherwise."""
    key = str(ref_device)
    if fresh or key not in _REFERENCE_CHECKED:
        _REFERENCE_CHECKED.discard(key)
        check_reference(ref_device)
        _REFERENCE_CHECKED.add(key)


def _reference(x: dict, case: Case, ref_device):
    """Float64 reference on the case's inputs (already rounded to the test dtype)."""
    def up(t):
        return None if t is None else t.detach().to(ref_device, torch.float64).requires_grad_(True)
    ins = {n: up(x[n]) for n in ("r", "w", "k", "v", "a", "b", "state")}
    cu = None if x["cu_seqlens"] is None else x["cu_seqlens"].cpu()
    with torch.enable_grad():
        o, s = wkv7_reference(*(ins[n] for n in ("r", "w", "k", "v", "a", "b")), ins["state"],
                              w_form=case.w_form, scale=case.scale, cu_seqlens=cu)
    return ins, o, s


def _call(x: dict, case: Case, backend, **over):
    args = {n: x[n] for n in ("r", "w", "k", "v", "a", "b")}
    args.update({n: over.pop(n) for n in list(over) if n in args})
    return wkv7(*(args[n] for n in ("r", "w", "k", "v", "a", "b")), over.pop("state", x["state"]),
                w_form=case.w_form, scale=case.scale, cu_seqlens=over.pop("cu_seqlens", x["cu_seqlens"]),
                backend=backend)


def _check_forward(x, case, backend, ref_device, errors, tol):
    o, s = _call(x, case, backend)
    _, o_ref, s_ref = _reference(x, case, ref_device)
    errors["o"], tol["o"] = relative_error(o, o_ref), TOLERANCES[case.dtype][0]
    errors["state_out"], tol["state_out"] = relative_error(s, s_ref), TOLERANCES[case.dtype][0]


def _check_backward(x, case, backend, ref_device, errors, tol):
    leaves = {n: (None if x[n] is None else x[n].detach().clone().requires_grad_(True)) for n in GRAD_NAMES}
    with torch.enable_grad():
        o, s = wkv7(*(leaves[n] for n in GRAD_NAMES[:6]), leaves["state"], w_form=case.w_form, scale=case.scale,
                    cu_seqlens=x["cu_seqlens"], backend=backend)
        loss = (o.float() * x["do"].float()).sum() + (s * x["dstate"]).sum()
        present = [n for n in GRAD_NAMES if leaves[n] is not None]
        grads = torch.autograd.grad(loss, [leaves[n] for n in present])
        ins, o_ref, s_ref = _reference(x, case, ref_device)
        loss_ref = (o_ref * x["do"].to(ref_device, torch.float64)).sum() \
            + (s_ref * x["dstate"].to(ref_device, torch.float64)).sum()
        grads_ref = torch.autograd.grad(loss_ref, [ins[n] for n in present])
    errors["o"], tol["o"] = relative_error(o, o_ref), TOLERANCES[case.dtype][0]
    for n, g, gr in zip(present, grads, grads_ref):
        errors["d" + n], tol["d" + n] = relative_error(g, gr), TOLERANCES[case.dtype][1]


def _check_chain(x, case, backend, ref_device, errors, tol):
    cut = case.split
    first = {n: x[n][:, :cut] for n in ("r", "w", "k", "v", "a", "b")}
    second = {n: x[n][:, cut:] for n in ("r", "w", "k", "v", "a", "b")}
    o1, s1 = _call(x, case, backend, **first)
    o2, s2 = _call(x, case, backend, **second, state=s1)
    o_one, s_one = _call(x, case, backend)
    _, o_ref, s_ref = _reference(x, case, ref_device)
    t = TOLERANCES[case.dtype][0]
    o_chain = torch.cat([o1, o2], dim=1)
    errors["o"], tol["o"] = relative_error(o_chain, o_ref), t
    errors["state_out"], tol["state_out"] = relative_error(s2, s_ref), t
    errors["chain_vs_one_call"], tol["chain_vs_one_call"] = relative_error(o_chain, o_one.double()), t


def _check_decode_chain(x, case, backend, ref_device, errors, tol):
    s = x["state"]
    outs = []
    for t in range(case.T):
        step = {n: x[n][:, t:t + 1] for n in ("r", "w", "k", "v", "a", "b")}
        o_t, s = _call(x, case, backend, **step, state=s)
        outs.append(o_t)
    _, o_ref, s_ref = _reference(x, case, ref_device)
    errors["o"], tol["o"] = relative_error(torch.cat(outs, dim=1), o_ref), TOLERANCES[case.dtype][0]
    errors["state_out"], tol["state_out"] = relative_error(s, s_ref), TOLERANCES[case.dtype][0]


def _check_varlen(x, case, backend, ref_device, errors, tol):
    _check_forward(x, case, backend, ref_device, errors, tol)
    # Equal to separate calls, one per sequence (an empty one returns its state unchanged).
    o, s = _call(x, case, backend)
    offsets = x["cu_seqlens"].tolist()
    worst_o, worst_s = 0.0, 0.0
    for n in range(len(offsets) - 1):
        lo, hi = offsets[n], offsets[n + 1]
        piece = {m: x[m][:, lo:hi] for m in ("r", "w", "k", "v", "a", "b")}
        st = x["state"][n:n + 1] if x["state"] is not None else None
        if hi > lo:
            o_n, s_n = _call(x, case, backend, **piece, state=st, cu_seqlens=None)
            worst_o = max(worst_o, relative_error(o[:, lo:hi], o_n.double()))
        else:                                   # an empty sequence returns its state unchanged
            s_n = st if st is not None else torch.zeros_like(s[n:n + 1])
        worst_s = max(worst_s, relative_error(s[n:n + 1], s_n))   # absolute when s_n is all zeros
    errors["varlen_vs_separate_o"], tol["varlen_vs_separate_o"] = worst_o, TOLERANCES[case.dtype][0]
    errors["varlen_vs_separate_state"], tol["varlen_vs_separate_state"] = worst_s, TOLERANCES[case.dtype][0]


def _check_determinism(x, case, backend, ref_device, errors, tol):
    runs = []
    for _ in range(2):
        leaves = [x[n].detach().clone().requires_grad_(True) for n in ("r", "w", "k", "v", "a", "b")]
        with torch.enable_grad():
            o, s = wkv7(*leaves, x["state"], w_form=case.w_form, scale=case.scale, backend=backend)
            grads = torch.autograd.grad((o.float() * x["do"].float()).sum() + (s * x["dstate"]).sum(), leaves)
        runs.append([o, s, *grads])
    same = all(torch.equal(p, q) for p, q in zip(*runs))
    errors["bitwise_mismatch"], tol["bitwise_mismatch"] = (0.0 if same else 1.0), 0.0
    _, o_ref, _ = _reference(x, case, ref_device)
    errors["o"], tol["o"] = relative_error(runs[0][0], o_ref), TOLERANCES[case.dtype][0]


def _check_noncontiguous(x, case, backend, ref_device, errors, tol):
    # Views of one fused projection [B, T, H, 5K + V], as a model's linear layer would give.
    B, T, H, K, V = case.B, case.T, case.H, case.K, case.V
    fused = torch.empty(B, T, H, 5 * K + V, dtype=x["r"].dtype, device=x["r"].device)
    views = {}
    start = 0
    for n in ("r", "w", "k", "a", "b", "v"):
        width = V if n == "v" else K
        fused[..., start:start + width] = x[n]
        views[n] = fused[..., start:start + width]
        start += width
    assert not views["r"].is_contiguous()
    o, s = _call(x, case, backend, **views)
    _, o_ref, s_ref = _reference(x, case, ref_device)
    errors["o"], tol["o"] = relative_error(o, o_ref), TOLERANCES[case.dtype][0]
    errors["state_out"], tol["state_out"] = relative_error(s, s_ref), TOLERANCES[case.dtype][0]


CHECKS = {
    "forward": _check_forward, "backward": _check_backward, "chain": _check_chain,
    "decode_chain": _check_decode_chain, "varlen": _check_varlen, "determinism": _check_determinism,
    "noncontiguous": _check_noncontiguous,
}


def run_case(case: Case, *, backend, device, base_seed: int, has_float64: bool = True) -> dict:
    seed = case.seed(base_seed)
    ref_device = torch.device(device) if has_float64 else torch.device("cpu")
    ensure_reference(ref_device)          # raises: no case runs against a reference that is off
    result = {"id": case.id, "kind": case.kind, "dtype": case.dtype, "regime": case.regime,
              "shape": {"B": case.B, "T": case.T, "H": case.H, "K": case.K, "V": case.V},
              "w_form": case.w_form, "seed": seed, "errors": {}, "tolerances": {}}
    t0 = time.perf_counter()
    try:
        x = make_inputs(case, seed, device)
        needs_grad = case.kind in ("backward", "determinism")
        probe = [x[n].detach().requires_grad_(needs_grad) for n in ("r", "w", "k", "v", "a", "b")]
        with torch.set_grad_enabled(needs_grad):
            plan = explain(*probe, x["state"], w_form=case.w_form, scale=case.scale,
                           cu_seqlens=x["cu_seqlens"], backend=backend)
        result["variant"] = plan["variant"]
        CHECKS[case.kind](x, case, backend, ref_device, result["errors"], result["tolerances"])
        bad = {n: e for n, e in result["errors"].items() if not e <= result["tolerances"][n]}
        result["status"] = "failed" if bad else "passed"
        if bad:
            result["detail"] = "over tolerance: " + ", ".join(f"{n}={e:.3g} > {result['tolerances'][n]:.3g}"
                                                           for n, e in bad.items())
    except NoBackendError as exc:
        result["status"] = "skipped"
        result["detail"] = str(exc)
    except Exception as exc:  # a crash is a failure, with its story
        result["status"] = "failed"
        result["detail"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def junit_xml(report: dict) -> str:
    s = report["summary"]
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             f'<testsuite name={quoteattr("rwkv-backends-conformance." + report["backend"])} '
             f'tests="{len(report["cases"])}" failures="{s["failed"]}" skipped="{s["skipped"]}">']
    for c in report["cases"]:
        lines.append(f'  <testcase classname={quoteattr(c["kind"])} name={quoteattr(c["id"])} time="{c["seconds"]}">')
        if c["status"] == "failed":
            lines.append(f'    <failure message={quoteattr(c.get("detail", "")[:500])}/>')
        elif c["status"] == "skipped":
            lines.append(f'    <skipped message={quoteattr(c.get("detail", "")[:500])}/>')
        lines.append("  </testcase>")
    lines.append("</testsuite>")
    return "\n".join(lines) + "\n"
