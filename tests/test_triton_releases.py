"""The supported Triton releases, the Gluon adaptation to each, and the ahead-of-time compile check."""

import pytest
import torch

from rwkv_backends import device as dev
from rwkv_backends import known_issues


@pytest.mark.parametrize("tv, supported", [("3.5.1", False), ("3.6.0", True), ("3.7.0", True), ("3.7.1", True),
                                           ("3.8.0", True), ("3.9.0", True), ("3.9.2", True), ("3.10.0", False)])
def test_outside_the_supported_range_the_release_is_named_and_gluon_is_off(monkeypatch, tv, supported):
    from rwkv_backends.config import KernelConfig
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    active = known_issues.active(dev.profile("nvidia:sm90"), tv)
    assert ("triton-release-unsupported" in {i.id for i in active}) == (not supported)
    if not supported:
        cfg, by = known_issues.constrain("chunk_bwd", KernelConfig(gluon=True, dot_precision="bf16"), active)
        assert not cfg.gluon and by
    # the CPU has no Triton target: nothing to say there
    monkeypatch.delenv("RWKV_BACKENDS_SIMULATE", raising=False)
    cpu = dev.detect(torch.device("cpu"))
    assert "triton-release-unsupported" not in {i.id for i in known_issues.active(cpu, tv)}


def test_pyproject_declares_the_supported_range():
    import pathlib
    import re
    text = (pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    lo, hi = known_issues.SUPPORTED_TRITON
    m = re.search(r'"triton>=([\d.]+),<([\d.]+);', text)
    assert m, "pyproject.toml declares no Triton range"
    assert dev.parse_version(m.group(1))[:2] == lo
    assert dev.parse_version(m.group(2))[:2] == (hi[0], hi[1] + 1)


def test_gluon_calls_resolve_for_the_installed_release():
    """kernels/gluon/api.py gives the kernels one name per call on whatever release is installed."""
    pytest.importorskip("triton")
    from rwkv_backends.kernels import gluon
    if not gluon.available():
        pytest.skip(gluon.IMPORT_ERROR)
    from rwkv_backends.kernels.gluon import api as gluon_api
    for fn in (gluon_api.barrier, gluon_api.async_load):
        assert getattr(fn, "__triton_builtin__", False), fn
    # Triton 3.9 keeps the old cp.async name as a stub that raises: the new one must win there
    assert gluon_api.async_load is getattr(gluon_api.cp, "async_load", gluon_api.async_load)


def test_planned_jobs_take_gluon_only_where_its_kernels_fit(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)      # plans as compiled, not interpreted
    from rwkv_backends.compile_check import planned_jobs
    sm90 = planned_jobs(dev.profile("nvidia:sm90"))
    gluon = {(k, head) for k, cfg, head in sm90 if cfg.gluon}
    assert {("chunk_bwd", 64), ("chunk_fwd", 64), ("chunk_bwd_split", 128), ("chunk_dstate", 128)} <= gluon
    assert not any(cfg.gluon for _, cfg, _ in planned_jobs(dev.profile("amd:gfx942")))
    assert not any(cfg.gluon for _, cfg, _ in planned_jobs(dev.profile("nvidia:sm80")))
    kernels = {k for k, _, _ in sm90}
    assert {"chunk_dstate", "chunk_dstate_transition", "recurrent_fwd"} <= kernels


def test_limits_are_checked_per_target():
    from rwkv_backends.compile_check import _limits_broken
    sm90, gfx942 = dev.profile("nvidia:sm90"), dev.profile("amd:gfx942")
    assert _limits_broken(sm90, {"shared_bytes": 1000, "registers": 200, "stack_bytes": 0, "gluon": True}) == []
    assert _limits_broken(sm90, {"shared_bytes": 300000, "registers": 200, "stack_bytes": 0})
    assert _limits_broken(sm90, {"shared_bytes": 0, "registers": 200, "stack_bytes": 4096, "gluon": True})
    assert not _limits_broken(sm90, {"shared_bytes": 0, "registers": 200, "stack_bytes": 4096, "gluon": False})
    assert _limits_broken(gfx942, {"shared_bytes": 70000, "vgprs": 128, "agprs": 0})
    assert not _limits_broken(gfx942, {"shared_bytes": 0, "vgprs": 512, "agprs": 256})   # unified total
    assert _limits_broken(dev.profile("amd:gfx1100"), {"shared_bytes": 0, "vgprs": 300, "agprs": 0})


def test_amd_configs_compile_without_rocm():
    """Triton's wheel compiles HIP targets with no ROCm installed; registers come from the amdgcn."""
    pytest.importorskip("triton")
    from rwkv_backends.config import KernelConfig
    from rwkv_backends.kernels.aot import compile_in_subprocess
    rc, results, stderr = compile_in_subprocess([("recurrent_fwd", KernelConfig(block_v=16, num_warps=2))],
                                                arch="gfx942", warp_size=64, backend="hip")
    assert rc == 0, stderr[-2000:]
    assert results[0]["vgprs"] > 0 and "vgpr_spills" in results[0]


def test_a_card_checks_a_new_release_with_gluon_forced_on(monkeypatch):
    """RWKV_BACKENDS_GLUON=check lifts gluon-experimental's release test inside the supported range only."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    sm90 = dev.profile("nvidia:sm90")
    unchecked = next(f"{lo}.{hi}.0" for lo, hi in [(3, 7), (3, 8), (3, 9)] if (lo, hi) not in known_issues.GLUON_CHECKED_TRITON)
    assert "gluon-experimental" in {i.id for i in known_issues.active(sm90, unchecked)}
    monkeypatch.setenv("RWKV_BACKENDS_GLUON", "check")
    assert "gluon-experimental" not in {i.id for i in known_issues.active(sm90, unchecked)}
    assert "gluon-experimental" in {i.id for i in known_issues.active(sm90, "3.10.0")}
    assert "gluon-experimental" in {i.id for i in known_issues.active(dev.profile("nvidia:sm89").__class__(
        **{**sm90.as_dict(), "arch": "sm75", "triton_target_arch": 75}), unchecked)}
