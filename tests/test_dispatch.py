"""Device detection (monkeypatched torch/Triton), profiles, known issues, dispatch and the doctor."""

import json
import types

import pytest
import torch

from rwkv_backends import device as dev
from rwkv_backends import known_issues
from rwkv_backends.config import KernelConfig
from rwkv_backends.doctor import PLAN_PROBLEMS, _problem, collect
# Imported here, while _support's TRITON_INTERPRET is set: Triton decides at decoration time whether
# a kernel is interpreted, and the tests below that unset the variable and plan (the Gluon fallbacks
# import the launcher) would otherwise make the kernels' first import compiled-only for the session.
from rwkv_backends.kernels import recurrent, training  # noqa: F401  (every Triton kernel module)
from rwkv_backends.registry import plan

PROFILES = ["nvidia:sm80", "nvidia:sm89", "nvidia:sm90", "nvidia:sm120", "amd:gfx942", "amd:gfx1100",
            "intel:alchemist", "intel:pvc", "musa:mp31", "musa:mp22", "metax:c500"]


@pytest.fixture
def fake_torch(monkeypatch):
    """Make torch look like another vendor's build; undo the detection caches afterwards."""
    def apply(cuda=False, hip=None, maca=None, hcu=False, xpu=False, target=None):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.version, "hip", hip, raising=False)
        monkeypatch.setattr(torch.version, "maca", maca, raising=False)
        if hcu:
            monkeypatch.setattr(torch, "__hcu_version__", "1.0", raising=False)
        else:
            monkeypatch.delattr(torch, "__hcu_version__", raising=False)
        monkeypatch.setattr(torch, "xpu", types.SimpleNamespace(is_available=lambda: xpu), raising=False)
        monkeypatch.setattr(dev, "triton_target", lambda: target)
        dev._vendor_of_torch.cache_clear()
    yield apply
    dev._vendor_of_torch.cache_clear()


@pytest.mark.parametrize("kw, vendor", [
    (dict(), "cpu"),
    (dict(cuda=True), "nvidia"),
    (dict(cuda=True, hip="6.2"), "amd"),
    (dict(cuda=True, hip="6.2", hcu=True), "hygon"),          # Hygon DCU also sets torch.version.hip
    (dict(cuda=True, maca="2.33"), "metax"),                  # MetaX reports device type "cuda"
    (dict(xpu=True, target=("xpu", {"name": "arc"}, 32)), "intel"),
    (dict(xpu=True, target=("xpu", "xpu3", 32)), "kunlunxin"),  # Kunlunxin's "xpu" arch is not a dict
])
def test_vendor_detection(fake_torch, kw, vendor):
    fake_torch(**kw)
    assert dev._vendor_of_torch() == vendor


def test_musa_detected_through_torch_musa(fake_torch, monkeypatch):
    import sys
    fake_torch()
    monkeypatch.setitem(sys.modules, "torch_musa", types.ModuleType("torch_musa"))
    monkeypatch.setattr(torch, "musa", types.SimpleNamespace(is_available=lambda: True), raising=False)
    dev._vendor_of_torch.cache_clear()
    assert dev._vendor_of_torch() == "musa"


def test_vendor_hooks_describe_real_devices(monkeypatch):
    from rwkv_backends import amd, metax, musa, nvidia
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132,
                                  gcnArchName="gfx942:sramecc+:xnack-")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    info = nvidia.describe(0, ("cuda", 90, 32))
    assert (info.arch, info.warp_size, info.shared_memory_per_block) == ("sm90", 32, 232448)
    assert amd.describe(0, ("hip", "gfx942", 64)).arch == "gfx942"          # cut at ':'
    assert amd.describe(0, ("hip", "gfx942", 64)).warp_size == 64
    assert amd.warp_size_for("gfx1100") == 32
    props.name = "MetaX C500"
    m = metax.describe(0, None)
    assert (m.arch, m.warp_size, m.triton_backend) == ("c500", 64, "maca")
    assert musa.warp_size_for(2) == 128 and musa.warp_size_for(3) == 32


def test_detection_without_triton_driver(monkeypatch):
    monkeypatch.setattr(dev, "triton_target", lambda: None)
    assert dev.detect("cpu").vendor == "cpu"


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_plans_training_prefill_decode(profile):
    info = dev.profile(profile)
    for cls, kw in PLAN_PROBLEMS.items():
        p = plan(_problem(info.device_type, **kw), info, runtime=False)
        assert p.variant.backend == "triton", (profile, cls, p.rejected)
        assert p.configs, (profile, cls)


def test_few_sequence_head_pairs_take_a_two_pass_variant():
    """Fewer (sequence, head) pairs than multiprocessors: a two-pass variant for prefill and training
    (chunk transitions at K, V <= 64, the loaded forward above); otherwise the one-pass kernels, and
    the two-pass variants say why they were passed over."""
    info = dev.profile("nvidia:sm90")
    for needs_grad in (False, True):
        few = plan(_problem(info.device_type, B=1, T=16384, H=32, K=64, V=64, needs_grad=needs_grad), info,
                   runtime=False)
        assert few.variant.name == "triton.chunk_transition"
        assert set(few.configs) == {"chunk_transition", "chunk_fwd_transition", "chunk_bwd_split", "chunk_recompute"}
        wide = plan(_problem(info.device_type, B=4, T=4096, H=16, K=128, V=128, needs_grad=needs_grad), info,
                    runtime=False)
        assert wide.variant.name == "triton.chunk_twopass"
        assert set(wide.configs) == {"chunk_prep", "chunk_fwd_loaded", "chunk_bwd_split", "chunk_recompute",
                                     "chunk_states"}
        assert any("cost more than they save" in r for r in wide.rejected["triton.chunk_transition"])
        many = plan(_problem(info.device_type, B=8, T=4096, H=32, K=64, V=64, needs_grad=needs_grad), info,
                    runtime=False)
        assert many.variant.name == "triton.chunk"
        for name in ("triton.chunk_transition", "triton.chunk_twopass"):
            assert any("fill the 132 multiprocessors" in r for r in many.rejected[name])


@pytest.mark.parametrize("B, V, block_v", [(1, 64, 16), (2, 64, 16), (4, 64, 32), (256, 64, 64), (1, 16, 16)])
def test_decode_with_few_pairs_splits_v_finer(B, V, block_v):
    """Decode programs are one per (sequence, head, V block): with fewer than the multiprocessors,
    the V block halves (to 16 at least) until they fill the device, and the plan says why."""
    info = dev.profile("nvidia:sm90")
    p = plan(_problem(info.device_type, B=B, T=B, H=32, K=64, V=V, needs_grad=False), info, runtime=False)
    assert p.variant.name == "triton.recurrent"
    assert min(p.configs["recurrent_fwd"].block_v, V) == block_v      # the launch takes at most V
    changed = block_v < min(64, V)
    assert ("multiprocessors" in p.config_sources["recurrent_fwd"]) == changed


@pytest.mark.parametrize("shape, kernel, field, table, capped", [
    # chunks of 32 miss the float32 bar in the strong regime
    (dict(B=1, T=16384, H=32, K=64, V=64, needs_grad=False), "chunk_transition", "chunk_size", 32, 16),
    # float32 loads double the backward's shared-memory staging: V block 128 did not fit the H100
    (dict(B=4, T=4096, H=16, K=128, V=128, needs_grad=True), "chunk_bwd_split", "block_v", 128, 64),
])
def test_float32_inputs_get_narrower_configs(shape, kernel, field, table, capped):
    """The lookup narrows two table entries for float32 inputs, and says so in the config's source."""
    import dataclasses
    info = dev.profile("nvidia:sm90")
    bf16 = _problem(info.device_type, **shape)
    f32 = dataclasses.replace(bf16, dtype=torch.float32, w_dtype=torch.float32)
    assert getattr(plan(bf16, info, runtime=False).configs[kernel], field) == table
    p = plan(f32, info, runtime=False)
    assert getattr(p.configs[kernel], field) == capped and "float32" in p.config_sources[kernel]


@pytest.mark.parametrize("vendor", ["nvidia", "amd", "intel", "musa", "metax"])
def test_tables_keep_the_two_pass_chunk_sizes_equal(vendor):
    """chunk_fwd_loaded loads what chunk_prep built: one chunk size for both in every table."""
    from rwkv_backends.tuning import tables
    for arch, table in tables(vendor).items():
        for bucket, prep in table.get("chunk_prep", {}).items():
            assert table["chunk_fwd_loaded"][bucket].config.chunk_size == prep.config.chunk_size, (vendor, arch, bucket)


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown profile"):
        dev.profile("nvidia:sm99")


def _chained(kernel_cfgs):
    return {k: c for k, c in kernel_cfgs.items() if k in ("chunk_fwd", "chunk_bwd")}


@pytest.mark.parametrize("tv, active_4492, active_5609", [
    ("3.1.0", True, False), ("3.2.0", True, True), ("3.3.1", False, True), ("3.4.0", False, False),
    ("3.6.0", False, False),
])
def test_hopper_known_issues_follow_triton_version(tv, active_4492, active_5609):
    ids = {i.id for i in known_issues.active(dev.profile("nvidia:sm90"), tv)}
    assert ("triton#4492" in ids) == active_4492
    assert ("triton#5609" in ids) == active_5609


@pytest.mark.parametrize("profile", [p for p in PROFILES if p != "nvidia:sm90"])
def test_hopper_issues_never_on_other_profiles(profile):
    for tv in ("3.1.0", "3.2.0", "3.3.0"):
        ids = {i.id for i in known_issues.active(dev.profile(profile), tv)}
        assert not ids & {"triton#4492", "triton#5609"}


def test_constraints_apply_exactly_when_the_predicate_holds():
    eight = KernelConfig(num_warps=8)
    hopper = dev.profile("nvidia:sm90")
    old = known_issues.active(hopper, "3.1.0")
    cfg, by = known_issues.constrain("chunk_bwd", eight, old)
    assert cfg.num_warps == 4 and by == ["triton#4492"]
    cfg, by = known_issues.constrain("recurrent_fwd", eight, old)      # no chained dots: untouched
    assert cfg.num_warps == 8 and by == []
    cfg, by = known_issues.constrain("chunk_bwd", eight, known_issues.active(hopper, "3.6.0"))
    assert cfg.num_warps == 8 and by == []
    cfg, by = known_issues.constrain("recurrent_fwd", eight, known_issues.active(hopper, "3.3.0"))
    assert cfg.num_warps == 4 and by == ["triton#5609"]


def test_bf16_dots_run_as_tf32_only_under_the_interpreter(monkeypatch):
    """triton#11584: the interpreter multiplies bf16 bit patterns, so a table's "bf16" is narrowed
    to "tf32" there (the plan names the issue), and the launcher does the same for direct launches;
    on hardware both leave it alone."""
    from rwkv_backends.kernels import common
    hopper = dev.profile("nvidia:sm90")
    bf16 = KernelConfig(num_warps=8, dot_precision="bf16")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg, by = known_issues.constrain("chunk_bwd", bf16, known_issues.active(hopper, "3.6.0"))
    assert cfg.dot_precision == "tf32" and "triton#11584" in by
    assert common._dot_precision(bf16, torch.bfloat16) == "tf32"
    monkeypatch.delenv("TRITON_INTERPRET")
    cfg, by = known_issues.constrain("chunk_bwd", bf16, known_issues.active(hopper, "3.6.0"))
    assert cfg.dot_precision == "bf16" and by == []
    assert common._dot_precision(bf16, torch.bfloat16) == "bf16"
    assert common._dot_precision(bf16, torch.float32) == "ieee"        # float32 inputs: never rounded


@pytest.mark.parametrize("profile, tv, kept", [
    ("nvidia:sm90", "3.6.0", True), ("nvidia:sm80", "3.6.1", True), ("nvidia:sm90", "3.5.0", False),
    ("nvidia:sm90", "3.7.0", False),
])
def test_gluon_gradient_kernel_only_where_it_was_checked(monkeypatch, profile, tv, kept):
    """known issue gluon-experimental: on NVIDIA the Gluon gradient kernel stays on only from sm80 on,
    with the Triton releases it ran on, never under the interpreter; elsewhere chunk_bwd runs in Triton."""
    gluon = KernelConfig(num_warps=8, dot_precision="bf16", keep_u=True, gluon=True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg, by = known_issues.constrain("chunk_bwd", gluon, known_issues.active(dev.profile(profile), tv))
    assert cfg.gluon == kept
    assert ("gluon-experimental" in by) == (not kept)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg, by = known_issues.constrain("chunk_bwd", gluon, known_issues.active(dev.profile(profile), tv))
    assert not cfg.gluon and "gluon-experimental" in by


@pytest.mark.parametrize("profile", ["amd:gfx942", "intel:pvc", "musa:mp31", "metax:c500"])
def test_gluon_gradient_kernel_is_nvidia_only(monkeypatch, profile):
    """Other vendors have no Gluon kernel: the known issue is not theirs (the doctor stays quiet), and
    a table entry that asked for it would still get the Triton kernel, with the reason in the plan."""
    from rwkv_backends.backends.triton import TritonChunk
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    info = dev.profile(profile)
    assert "gluon-experimental" not in {i.id for i in known_issues.active(info, "3.6.0")}
    configs = {"chunk_fwd": KernelConfig(dot_precision="tf32", gluon=True),
               "chunk_bwd": KernelConfig(num_warps=8, dot_precision="bf16", keep_u=True, gluon=True),
               "chunk_states": KernelConfig(dot_precision="tf32", gluon=True)}
    fitted = TritonChunk().fit_configs(_problem(info.device_type, B=8, T=4096, H=32, K=64, V=64, needs_grad=True),
                                       info, configs)
    assert set(fitted) == set(configs)
    assert all(not cfg.gluon and "written for NVIDIA" in why for cfg, why in fitted.values())


@pytest.mark.parametrize("kernel, precision", [("chunk_bwd", "bf16"), ("chunk_fwd", "tf32"), ("chunk_states", "tf32")])
@pytest.mark.parametrize("change, phrase", [
    (dict(K=32), "K = 32"), (dict(V=128), "V = 128"), (dict(chunk_size=32), "chunk_size 32"),
    (dict(dtype=torch.float32, dot_precision="ieee"), "float32 inputs"), (dict(dot_precision="x"), "'x'"),
    (dict(segmented=True), "segments"), (dict(T=1), "T = 1"),
])
def test_gluon_kernels_say_why_they_cannot_take_a_launch(kernel, precision, change, phrase):
    from rwkv_backends.kernels import gluon
    fits = dict(K=64, V=64, chunk_size=16, block_v=64, dtype=torch.bfloat16, dot_precision=precision, has_u=True,
                segmented=False)
    assert gluon.unsupported(kernel, **fits) is None
    assert gluon.unsupported(kernel, **(fits | dict(dtype=torch.float16))) is None
    if kernel == "chunk_states" and change == dict(segmented=True):     # it walks segments too (head 128)
        assert gluon.unsupported(kernel, **(fits | change)) is None
        return
    assert phrase in gluon.unsupported(kernel, **(fits | change))


def test_gluon_kernels_say_why_for_what_only_some_of_them_take():
    from rwkv_backends.kernels import gluon
    fits = dict(K=64, V=64, chunk_size=16, dtype=torch.bfloat16)
    assert "keep_u" in gluon.unsupported("chunk_bwd", **fits, block_v=64, dot_precision="bf16", has_u=False)
    assert "block_v 32" in gluon.unsupported("chunk_bwd", **fits, block_v=32, dot_precision="bf16")
    assert "block_v 32" in gluon.unsupported("chunk_fwd", **fits, block_v=32, dot_precision="tf32")
    assert gluon.unsupported("chunk_states", **fits, block_v=32, dot_precision="tf32") is None
    for mode in (dict(mats_mode="load"), dict(store_states=True)):
        assert "recompute" in gluon.unsupported("chunk_fwd", **fits, block_v=64, dot_precision="tf32", **mode)
    assert "no Gluon" in gluon.unsupported("chunk_transition", **fits, block_v=64, dot_precision="tf32")
    # head 128's two-pass kernels, and the state rebuild at both head sizes
    wide = dict(K=128, V=128, chunk_size=16, dtype=torch.bfloat16, dot_precision="tf32")
    for kernel in ("chunk_prep", "chunk_fwd_loaded", "chunk_states"):
        assert gluon.unsupported(kernel, **wide, block_v=64) is None, kernel
    for kernel in ("chunk_prep", "chunk_fwd_loaded"):
        assert "K = V = 128" in gluon.unsupported(kernel, **fits, block_v=64, dot_precision="tf32")
    assert gluon.unsupported("chunk_dstate", **wide, block_v=64, segmented=True) is None
    assert "no segments" in gluon.unsupported("chunk_dstate", **wide, block_v=64)
    assert "walks no segments" in gluon.unsupported("chunk_fwd_loaded", **wide, block_v=64, segmented=True)


def test_the_ksplit_gluon_kernel_says_why_it_cannot_take_a_launch():
    """Head 128's K-split gradient kernel takes only the segmented backward at K = V = 128, whole V,
    chunk 16, U kept, and dZ from a sweep at chunk 16."""
    from rwkv_backends.kernels import gluon
    fits = dict(K=128, V=128, chunk_size=16, block_v=128, dtype=torch.bfloat16, dot_precision="bf16", has_u=True,
                segmented=True, sweep_chunk_size=16)
    assert gluon.unsupported("chunk_bwd_split", **fits) is None
    for change, phrase in [(dict(K=64, V=64), "K = V = 128"), (dict(block_v=64), "block_v 64"),
                           (dict(has_u=False), "keep_u"), (dict(segmented=False), "no segments"),
                           (dict(sweep_chunk_size=32), "chunks of 32"), (dict(T=1), "T = 1"),
                           (dict(dtype=torch.float32, dot_precision="ieee"), "float32 inputs")]:
        assert phrase in gluon.unsupported("chunk_bwd_split", **(fits | change)), change


def test_head_128_plans_the_ksplit_gluon_kernel_or_says_why_not(monkeypatch):
    """B4 T4096 H16 K = V = 128 (64 pairs) plans the two-pass variant; its gradient kernel is the
    K-split Gluon one with U kept, except for float32 inputs, which get the Triton kernel (without U)
    and the reason."""
    import dataclasses
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    info = dev.profile("nvidia:sm90")
    problem = _problem(info.device_type, B=4, T=4096, H=16, K=128, V=128, needs_grad=True)
    p = plan(problem, info, triton_version_as="3.6.0", runtime=False)
    from rwkv_backends.kernels.common import keeps_u
    assert p.variant.name == "triton.chunk_twopass"
    assert p.configs["chunk_bwd_split"].gluon and keeps_u(p.configs["chunk_bwd_split"])
    assert "gluon off" not in p.config_sources["chunk_bwd_split"]
    fp32 = dataclasses.replace(problem, dtype=torch.float32, w_dtype=torch.float32)
    p = plan(fp32, info, triton_version_as="3.6.0", runtime=False)
    assert not p.configs["chunk_bwd_split"].gluon and "float32 inputs" in p.config_sources["chunk_bwd_split"]
    # the Triton kernel it falls back to trains without U, its faster form at head 128
    assert not keeps_u(p.configs["chunk_bwd_split"])


def test_plans_fall_back_from_the_gluon_kernels_and_say_why(monkeypatch):
    """On the H100 with Triton 3.6 the sm90 table's one-pass kernels are the Gluon ones; a problem they
    cannot take gets the Triton kernels with the same entries, and each config's source says why."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    info = dev.profile("nvidia:sm90")
    gluon_kernels = ("chunk_fwd", "chunk_bwd", "chunk_states")
    p = plan(_problem(info.device_type, B=8, T=4096, H=32, K=64, V=64, needs_grad=True), info,
             triton_version_as="3.6.0", runtime=False)
    assert p.variant.name == "triton.chunk" and all(p.configs[k].gluon for k in gluon_kernels)
    assert not any("gluon off" in p.config_sources[k] for k in gluon_kernels)
    p = plan(_problem(info.device_type, B=8, T=4096, H=32, K=48, V=64, needs_grad=True), info,
             triton_version_as="3.6.0", runtime=False)
    assert p.variant.name == "triton.chunk" and not any(p.configs[k].gluon for k in gluon_kernels)
    assert all("gluon off: K = 48" in p.config_sources[k] for k in gluon_kernels)
    assert p.configs["chunk_bwd"].keep_u and p.configs["chunk_bwd"].dot_precision == "bf16"
    import dataclasses
    fp32 = dataclasses.replace(_problem(info.device_type, B=8, T=4096, H=32, K=64, V=64, needs_grad=True),
                               dtype=torch.float32, w_dtype=torch.float32)
    p = plan(fp32, info, triton_version_as="3.6.0", runtime=False)
    assert not any(p.configs[k].gluon for k in gluon_kernels)
    assert "float32 inputs" in p.config_sources["chunk_fwd"]
    # one-step sequences (the H100 conformance run's forward.B64T1 and varlen pieces): Triton compiles
    # T = 1 as a constant, which the Gluon kernels' cp.async does not lower
    p = plan(_problem(info.device_type, B=64, T=1, H=8, K=64, V=64, needs_grad=True), info,
             triton_version_as="3.6.0", runtime=False)
    assert not any(p.configs[k].gluon for k in gluon_kernels if k in p.configs)


def test_gluon_can_be_switched_off_by_the_environment(monkeypatch):
    """RWKV_BACKENDS_GLUON=0 plans the Triton gradient kernel where the table asks for the Gluon one,
    says so, and is part of the plan's cache key (the same problem planned before and after)."""
    from rwkv_backends.registry import GLUON_ENV
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    info = dev.profile("nvidia:sm90")
    problem = _problem(info.device_type, B=8, T=4096, H=32, K=64, V=64, needs_grad=True)
    assert plan(problem, info, triton_version_as="3.6.0", runtime=False).configs["chunk_bwd"].gluon
    monkeypatch.setenv(GLUON_ENV, "0")
    off = plan(problem, info, triton_version_as="3.6.0", runtime=False)
    assert not off.configs["chunk_bwd"].gluon and f"gluon off: {GLUON_ENV}=0" in off.config_sources["chunk_bwd"]
    monkeypatch.setenv(GLUON_ENV, "1")
    assert plan(problem, info, triton_version_as="3.6.0", runtime=False).configs["chunk_bwd"].gluon


def test_alchemist_gets_large_grf_and_narrow_tiles():
    issues = known_issues.active(dev.profile("intel:alchemist"), "3.6.0")
    cfg, by = known_issues.constrain("chunk_fwd", KernelConfig(block_v=64), issues)
    assert dict(cfg.vendor_options)["grf_mode"] == "large" and cfg.block_v == 32
    assert "intel-xpu-backend-for-triton#3449" in by


def test_python_below_310_refuses_triton():
    issues = known_issues.active(dev.profile("nvidia:sm90"), "3.6.0", (3, 9))
    assert any(i.id == "triton#5224" and i.refuses for i in issues)


def test_doctor_json_keys_on_this_machine(capsys, monkeypatch):
    monkeypatch.delenv("RWKV_BACKENDS_SIMULATE", raising=False)
    from rwkv_backends.doctor import main
    rc = main(["--json", "--no-probe"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["ok"]
    assert {"schema", "python", "packages", "device", "backend", "plan", "known_issues", "checks", "ok"} <= set(report)
    assert report["schema"] == "rwkv-backends-doctor/1"
    assert {"training", "prefill", "decode"} <= set(report["plan"])
    assert all({"name", "status", "detail"} <= set(c) for c in report["checks"])
    assert all({"id", "active"} <= set(i) for i in report["known_issues"])
    assert {"torch", "triton", "rwkv_backends"} <= set(report["packages"])


def test_doctor_simulated_old_triton_on_hopper(monkeypatch):
    monkeypatch.delenv("RWKV_BACKENDS_SIMULATE", raising=False)
    report = collect(simulate="nvidia:sm90", triton_version_as="3.1.0", probe=False)
    active = {i["id"] for i in report["known_issues"] if i["active"]}
    assert "triton#4492" in active and "triton#5609" not in active
    for p in report["plan"].values():
        assert all(c["num_warps"] <= 4 for c in p["config"].values())
    report = collect(simulate="nvidia:sm90", triton_version_as="3.6.0", probe=False)
    assert not {i["id"] for i in report["known_issues"] if i["active"]} & {"triton#4492", "triton#5609"}


@pytest.mark.parametrize("profile", ["nvidia:sm90", "amd:gfx942"])
def test_doctor_text_report_names_every_planned_config(monkeypatch, profile):
    """The human-readable report (the doctor's default) renders every field a planned kernel uses,
    the keep_u and gluon flags included (it raised a KeyError on them before), and says the device
    is simulated."""
    from rwkv_backends.config import KERNELS
    from rwkv_backends.doctor import _FIELD_WORDS, render
    monkeypatch.delenv("RWKV_BACKENDS_SIMULATE", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert all(set(k["uses"]) <= set(_FIELD_WORDS) for k in KERNELS.values())
    text = render(collect(simulate=profile, triton_version_as="3.6.0", probe=False))
    assert f"SIMULATED {profile}" in text and "training" in text
    if profile == "nvidia:sm90":
        assert "Gluon" in text and "keeps U" in text


def test_doctor_simulation_does_not_outlive_the_call(monkeypatch):
    """collect(simulate=...) plans as the profile only while it runs: afterwards the process plans
    for its real device again (it used to leave RWKV_BACKENDS_SIMULATE set)."""
    import os
    monkeypatch.delenv("RWKV_BACKENDS_SIMULATE", raising=False)
    collect(simulate="nvidia:sm90", probe=False)
    assert "RWKV_BACKENDS_SIMULATE" not in os.environ
    monkeypatch.setenv("RWKV_BACKENDS_SIMULATE", "amd:gfx942")
    collect(simulate="nvidia:sm90", probe=False)
    assert os.environ["RWKV_BACKENDS_SIMULATE"] == "amd:gfx942"


def test_tune_sweeps_vendor_only_launch_options_on_that_vendor():
    from rwkv_backends.tune import candidates
    nvidia = candidates("chunk_bwd", "nvidia")
    assert any(dict(c.vendor_options) == {"maxnreg": 128} for c in nvidia)
    triton_only = [c for c in nvidia if not c.gluon]
    assert len(triton_only) == 2 * len(candidates("chunk_bwd", "amd"))
    # the Gluon kernel launches with its own warps and stages: one candidate per field it reads
    gluon = [c for c in nvidia if c.gluon]
    assert gluon and len(gluon) == len({(c.dot_precision, c.keep_u, c.chunk_size) for c in gluon})
    assert not any(c.gluon for c in candidates("chunk_bwd", "amd"))
    assert all(not c.vendor_options for c in candidates("chunk_bwd", "amd"))


def test_tune_gives_the_prep_and_the_loaded_forward_one_chunk_size():
    """Fastest alone, the prep is at chunk 16 and the loaded forward at 32; they must share one, the
    one with the least summed time (these numbers are the H100's sweep of 2026-11-27)."""
    from rwkv_backends.tune import pick
    ranked = {
        "chunk_prep": [(0.355, 0.0, KernelConfig(chunk_size=16, block_k=32, num_warps=2), 80.0),
                       (0.416, 0.0, KernelConfig(chunk_size=32, block_k=32, num_warps=2), 160.0),
                       (0.602, 0.0, KernelConfig(chunk_size=32, block_k=32, num_warps=4), 160.0)],
        "chunk_fwd_loaded": [(1.980, 0.0, KernelConfig(chunk_size=32, block_v=16), 70.0),
                             (2.998, 0.0, KernelConfig(chunk_size=16, block_v=16), 70.0)],
    }
    best = pick(ranked)
    assert best["chunk_prep"][2] == KernelConfig(chunk_size=32, block_k=32, num_warps=2)
    assert best["chunk_fwd_loaded"][2] == KernelConfig(chunk_size=32, block_v=16)
    # Swept alone, a kernel keeps its fastest config.
    assert pick({"chunk_prep": ranked["chunk_prep"]})["chunk_prep"][0] == 0.355


def test_tune_gives_the_backward_the_least_memory_near_the_fastest():
    """BV 16 was 2% faster than BV 32 on the long sequence and held 1.3 GB more: within 5% of the
    fastest, the least memory wins; further off, speed does."""
    from rwkv_backends.tune import pick
    bv16 = (17.77, 0.0, KernelConfig(block_v=16, num_warps=4, num_stages=2), 3777.0)
    bv32 = (18.20, 0.0, KernelConfig(block_v=32, num_warps=8, num_stages=2), 2497.0)
    bv64 = (20.22, 0.0, KernelConfig(block_v=64, num_warps=8, num_stages=2), 1900.0)
    assert pick({"chunk_bwd_split": [bv16, bv32, bv64]})["chunk_bwd_split"] is bv32
    assert pick({"chunk_bwd_split": [bv16, bv64]})["chunk_bwd_split"] is bv16
    # Peaks within 2% are a tie, and the faster wins (the H100's K = 64 sweep of 2026-11-27).
    ns2 = (5.616, 0.0, KernelConfig(block_v=64, num_warps=8, num_stages=2), 1033.5)
    ns3 = (5.839, 0.0, KernelConfig(block_v=64, num_warps=8, num_stages=3), 1033.0)
    assert pick({"chunk_bwd_split": [ns2, ns3]})["chunk_bwd_split"] is ns2


def test_tune_leaves_out_v_blocks_wider_than_the_head():
    """block_v 128 at V = 64 launches exactly as 64: the sweep tries it only for wider heads."""
    from rwkv_backends.tune import candidates
    assert {c.block_v for c in candidates("chunk_bwd_split", "nvidia", V=64)} == {32, 64}
    assert {c.block_v for c in candidates("chunk_bwd_split", "nvidia", V=128)} == {32, 64, 128}
    assert len(candidates("chunk_bwd", "nvidia", V=64)) == len(candidates("chunk_bwd", "nvidia"))


def test_tune_only_narrows_the_swept_fields():
    from rwkv_backends.tune import _parse_only, candidates
    fixed = _parse_only(["num_warps=8", "dot_precision=bf16,tf32", "block_k=32"])
    assert fixed == {"num_warps": (8,), "dot_precision": ("bf16", "tf32"), "block_k": (32,)}
    some = candidates("chunk_bwd", "nvidia", fixed=fixed)
    assert some and all(c.num_warps == 8 for c in some)
    assert {c.dot_precision for c in some} == {"tf32", "bf16"}
    triton_only = [c for c in candidates("chunk_bwd", "nvidia") if not c.gluon]    # (Gluon's are folded)
    assert len([c for c in some if not c.gluon]) == len(triton_only) // 2     # block_k: not swept, ignored
    for bad in (["warps=8"], ["num_warps"], ["num_warps=eight"], ["vendor_options=1"]):
        with pytest.raises(ValueError, match="--only"):
            _parse_only(bad)
    # A value outside a kernel's grid would leave it nothing to sweep: a clear error instead.
    with pytest.raises(ValueError, match="chunk_bwd sweeps num_warps over"):
        candidates("chunk_bwd", "nvidia", fixed={"num_warps": (3,)})
    assert _parse_only(["keep_u=true,0"]) == {"keep_u": (True, False)}
    assert {c.keep_u for c in candidates("chunk_bwd", "nvidia", fixed={"keep_u": (True,)})} == {True}
    with pytest.raises(ValueError, match="--only"):
        _parse_only(["keep_u=maybe"])
    with pytest.raises(ValueError, match="keep_u"):
        KernelConfig(keep_u="float32")


def test_tune_skips_chunk_states_where_no_u_is_kept(monkeypatch):
    """chunk_states only runs where the chunk_bwd entry keeps U: the tool says so instead of
    sweeping a kernel training never runs."""
    from rwkv_backends import tune
    for keep in (True, False):
        monkeypatch.setattr(tune, "_table_config", lambda kernel, K, keep=keep: KernelConfig(keep_u=keep))
        skipped = tune.unsweepable(["chunk_bwd", "chunk_states"], 64)
        assert ("chunk_states" in skipped) == (not keep)
        assert "chunk_bwd" not in skipped


def test_tune_report_keeps_every_timed_candidate():
    """--out holds the picked entry and the whole ranking, fastest first, so that a later change can
    be compared with what was swept (the session-17 files kept the winner only)."""
    from rwkv_backends.tune import tune_report
    fast, slow = KernelConfig(num_warps=8, gluon=True), KernelConfig(num_warps=4)
    ranked = {"chunk_bwd": [(3.74, 3.6e-3, fast, 1796.0), (4.84, 3.7e-3, slow, 1796.0)]}
    report = tune_report(ranked, 64)
    assert report["entry"]["chunk_bwd"]["64"]["gluon"] is True
    assert [row["_ms"] for row in report["ranked"]["chunk_bwd"]] == [3.74, 4.84]
    assert report["ranked"]["chunk_bwd"][1]["num_warps"] == 4


def test_a_kunlunxin_device_is_described_as_kunlunxin(fake_torch, monkeypatch):
    """Kunlunxin's torch also has torch.xpu: its own hooks describe it (not Intel's), and having no
    tuning tables, its plans refuse the Triton variants with that reason and run PyTorch."""
    fake_torch(xpu=True, target=("xpu", "xpu3", 64))
    props = types.SimpleNamespace(name="Kunlunxin P800", multi_processor_count=8)
    monkeypatch.setattr(torch, "xpu", types.SimpleNamespace(is_available=lambda: True,
                                                            get_device_properties=lambda i: props), raising=False)
    dev._detect_cached.cache_clear()
    try:
        info = dev.detect("xpu")
        assert (info.vendor, info.name, info.arch, info.warp_size, info.triton_backend) == \
            ("kunlunxin", "Kunlunxin P800", "xpu3", 64, "xpu")
        assert dev.default_device() == torch.device("xpu")
        p = plan(_problem("xpu", **PLAN_PROBLEMS["prefill"]), info, runtime=False)
        assert p.variant.backend == "pytorch"
        assert any("no tuning tables for kunlunxin" in r for r in p.rejected["triton.chunk"]), p.rejected
    finally:
        dev._detect_cached.cache_clear()


def test_an_intel_device_is_still_intel(fake_torch, monkeypatch):
    fake_torch(xpu=True, target=("xpu", {"name": "Intel(R) Arc(TM) A770 Graphics"}, 32))
    props = types.SimpleNamespace(name="Intel(R) Arc(TM) A770 Graphics", gpu_subslice_count=32, has_fp64=False)
    monkeypatch.setattr(torch, "xpu", types.SimpleNamespace(is_available=lambda: True,
                                                            get_device_properties=lambda i: props), raising=False)
    dev._detect_cached.cache_clear()
    try:
        info = dev.detect("xpu")
        assert (info.vendor, info.arch) == ("intel", "alchemist")
    finally:
        dev._detect_cached.cache_clear()


def test_hygon_is_described_by_amds_hooks_and_served_by_amds_tables(fake_torch, monkeypatch):
    fake_torch(cuda=True, hip="6.2", hcu=True)
    props = types.SimpleNamespace(name="DCU K100", multi_processor_count=120, gcnArchName="gfx928")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    dev._detect_cached.cache_clear()
    try:
        info = dev.detect("cuda")
        assert (info.vendor, info.arch, info.warp_size, info.triton_backend) == ("hygon", "gfx928", 64, "hip")
        p = plan(_problem("cuda", **PLAN_PROBLEMS["prefill"]), info, runtime=False)
        assert p.variant.backend == "triton"
        assert all(source.startswith("amd/default/") for source in p.config_sources.values())
    finally:
        dev._detect_cached.cache_clear()


def test_every_vendor_folder_declares_its_probe_and_description():
    from rwkv_backends.vendors import PROBE_ORDER, vendor_module
    for vendor in PROBE_ORDER:
        module = vendor_module(vendor)
        assert module.VENDOR == vendor
        assert callable(module.probe) and callable(module.describe)
        assert module.DEVICE_TYPE and module.DESCRIPTION and isinstance(module.PROFILES, dict)


def test_only_nvidia_runs_the_gluon_kernels():
    from rwkv_backends.vendors import runs_gluon
    assert runs_gluon(dev.profile("nvidia:sm90"))
    assert not any(runs_gluon(dev.profile(p)) for p in PROFILES if not p.startswith("nvidia"))
