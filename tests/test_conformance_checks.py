"""Faults the conformance suite must catch: a float64 reference that is off (the runner checks it
against the golden cases first and refuses to run), and float32 outputs that differ from run to run
by less than any tolerance (SPEC §2: bitwise identical)."""

import json
import math
import os

import numpy as np
import pytest
import torch

from _support import GOLDEN_DIR, HAS_GPU
from rwkv_backends import reference
from rwkv_backends.conformance import Case, __main__ as conformance_main, golden, runner
from rwkv_backends.kernels import training

interpreter = pytest.mark.skipif(HAS_GPU or os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="interpreter tests run on CPU-only machines")


# ---- the reference against the golden cases -------------------------------------------------

def test_the_package_ships_its_golden_cases():
    files = {p.name for p in golden.GOLDEN_DIR.iterdir()}
    assert {"cases.json", "wkv7_golden.npz"} <= files
    names = {c["name"] for c, _ in golden.load_cases()}
    cases = [c for c, _ in golden.load_cases()]
    assert {c["w_form"] for c in cases} == {"log", "raw", "clampw"}
    assert any(c["varlen"] for c in cases) and any(not c["has_state"] for c in cases)
    assert any(not c["output_final_state"] for c in cases) and any(c["scale"] != 1.0 for c in cases)
    assert len(names) == len(cases)


@pytest.mark.skipif(not (GOLDEN_DIR / "cases.json").exists(), reason=f"no shared golden cases at {GOLDEN_DIR}")
def test_the_shipped_golden_cases_are_the_shared_ones_unchanged():
    shared_meta = {c["name"]: c for c in json.loads((GOLDEN_DIR / "cases.json").read_text())}
    with np.load(GOLDEN_DIR / "wkv7_golden.npz") as shared, np.load(golden.GOLDEN_DIR / "wkv7_golden.npz") as ours:
        for case, arrays in golden.load_cases():
            assert case == shared_meta[case["name"]]
            names = {n for n in shared.files if n.startswith(case["name"] + "/")}
            assert {f"{case['name']}/{n}" for n in arrays} == names
            for n in names:
                assert ours[n].dtype == shared[n].dtype and np.array_equal(ours[n], shared[n]), n


def test_the_reference_reproduces_the_shipped_golden_cases():
    errors = golden.check_reference()
    assert set(errors) == {c["name"] for c, _ in golden.load_cases()}
    assert all(0 <= e <= 1e-12 for errs in errors.values() for e in errs.values())


def _a_read_after_decay(r, L, k, v, a, b, h, scale):
    """The reference's step with a classic slip: the a-read takes the decayed state, not h_{t-1}."""
    outs = []
    for t in range(k.shape[1]):
        decayed = torch.exp(L[:, t]).unsqueeze(-1) * h
        a_read = (a[:, t].unsqueeze(-1) * decayed).sum(dim=-2, keepdim=True)
        h = decayed + b[:, t].unsqueeze(-1) * a_read + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        outs.append(scale * (h * r[:, t].unsqueeze(-1)).sum(dim=-2))
    return (torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape)), h


@pytest.mark.parametrize("fault", ["clampw bound", "a-read step"])
def test_the_suite_refuses_to_run_on_a_wrong_reference(monkeypatch, capsys, tmp_path, fault):
    """A wrong constant (the clampw bound off in its fifth digit) or a wrong step (the a-read after
    the decay) in the float64 reference: the conformance command refuses to run, naming the golden
    cases it misses, and so does every case run through the runner."""
    if fault == "clampw bound":
        monkeypatch.setattr(reference, "CLAMPW_BOUND", math.exp(-0.5) * 1.00001)
    else:
        monkeypatch.setattr(reference, "_run", _a_read_after_decay)
    with pytest.raises(golden.ReferenceMismatch, match="clampw_state" if fault == "clampw bound" else "raw_nostate"):
        golden.check_reference()
    report = tmp_path / "report.json"
    code = conformance_main.main(["--backend", "cpu", "--quick", "--filter", "forward.float32.realistic",
                                  "--report", str(report)])
    assert code == 2
    err = capsys.readouterr().err
    assert "refusing to run" in err and "golden" in err
    assert json.loads(report.read_text())["refused"]
    monkeypatch.setattr(runner, "_REFERENCE_CHECKED", set())
    case = Case("forward", "float32", "realistic", 1, 8, 1, 16, 16)
    with pytest.raises(golden.ReferenceMismatch):
        runner.run_case(case, backend="pytorch", device="cpu", base_seed=1)


def test_the_suite_runs_on_the_real_reference(capsys):
    code = conformance_main.main(["--backend", "cpu", "--quick", "--filter", "forward.float32.realistic"])
    assert code == 0 and "refusing" not in capsys.readouterr().err


# ---- float32 determinism --------------------------------------------------------------------

def _determinism_case(backend):
    shape = (2, 37, 2, 16, 16) if backend == "pytorch" else (1, 33, 2, 16, 16)
    return Case("determinism", "float32", "realistic", *shape)


@pytest.mark.parametrize("backend", ["pytorch", pytest.param("triton", marks=interpreter)])
def test_float32_runs_are_bitwise_identical(simulate, backend):
    """SPEC §2: the same float32 inputs twice give bitwise-identical outputs, final states and
    gradients (the suite's own determinism cases are bfloat16)."""
    simulate("nvidia:sm90")
    res = runner.run_case(_determinism_case(backend), backend=backend, device="cpu", base_seed=11)
    assert res["status"] == "passed", res.get("detail")
    assert res["errors"]["bitwise_mismatch"] == 0.0


def _noisy(real, seen):
    """real, with float32 outputs off by a fresh relative 1e-7 on every call (a run-to-run noise far
    below the float32 ceiling of 2e-5)."""
    def run(*args, **kw):
        o, ht, *rest = real(*args, **kw)
        if o is not None:
            seen.append(o.dtype)
            noise = torch.randn(o.shape, generator=torch.Generator().manual_seed(len(seen)))
            o = (o.float() * (1 + 1e-7 * noise)).to(o.dtype)
        return (o, ht, *rest)
    return run


@interpreter
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float32_run_to_run_noise_fails_the_determinism_check(simulate, monkeypatch, dtype):
    """Noise of 1e-7 on the training forward's outputs stays within every tolerance: in float32 only
    the bitwise comparison catches it, and it must; in bfloat16 it rounds away (why a float32
    determinism case is needed)."""
    simulate("nvidia:sm90")
    seen = []
    monkeypatch.setattr(training, "training_forward", _noisy(training.training_forward, seen))
    case = Case("determinism", dtype, "realistic", 1, 33, 2, 16, 16)
    res = runner.run_case(case, backend="triton.chunk", device="cpu", base_seed=11)
    assert seen, "the noisy forward did not run"
    assert res["errors"]["o"] <= res["tolerances"]["o"]
    if dtype == "float32":
        assert res["status"] == "failed" and res["errors"]["bitwise_mismatch"] == 1.0
    else:
        assert res["status"] == "passed", res.get("detail")
