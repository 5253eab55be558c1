"""The tuning tables resolve every (vendor, arch, kernel role, head bucket) and plan every profile's
problems exactly as the Python tables they replace did.

tests/fixtures/tables_before_data_files.json is a frozen snapshot taken from those Python tables
(`rwkv_backends/<vendor>/tables.py`) before they were converted to data files: `lookup` maps
"vendor/arch/role/K" to the config (fields that differ from KernelConfig's defaults) and its source;
`plans` maps "profile|problem|dtype" to the variant, configs, sources, rejections and known-issue
adjustments of `registry.plan` (Triton 3.6.0, runtime=False). Where the Python tables had no entry,
the lookup fell back to KernelConfig() ("built-in fallback"); the data files hold that config as the
vendor's explicit default entry, so the source names the vendor's default table instead.
"""

import dataclasses
import json
import os
import re
from types import SimpleNamespace

import pytest
import torch

from rwkv_backends.config import KernelConfig
from rwkv_backends.device import DeviceInfo
from rwkv_backends.doctor import PLAN_PROBLEMS, _problem
from rwkv_backends.registry import plan
from rwkv_backends.tuning import lookup
from rwkv_backends.vendors import all_profiles

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tables_before_data_files.json")
PROBLEMS = dict(PLAN_PROBLEMS) | {
    "training K128": dict(B=8, T=4096, H=16, K=128, V=128, needs_grad=True),
    "prefill K128": dict(B=8, T=4096, H=16, K=128, V=128, needs_grad=False),
    "few training K128": dict(B=4, T=4096, H=16, K=128, V=128, needs_grad=True),
    "few prefill K128": dict(B=4, T=4096, H=16, K=128, V=128, needs_grad=False),
    "long prefill": dict(B=1, T=16384, H=32, K=64, V=64, needs_grad=False),
    "decode K128": dict(B=256, T=1, H=32, K=128, V=128, needs_grad=False),
    "odd head": dict(B=2, T=512, H=4, K=48, V=96, needs_grad=True),
}
_FALLBACK = re.compile(r"built-in fallback \((\w+) has no (\w+) entry\)")


def _frozen():
    with open(FIXTURE) as f:
        return json.load(f)


def _config(fields: dict) -> dict:
    return KernelConfig.make(**fields).as_dict()


def _now_from_file(source: str, bucket: str) -> str:
    """A frozen source with the built-in fallback replaced by the vendor's default entry."""
    return _FALLBACK.sub(lambda m: f"{m.group(1)}/default/{m.group(2)}/{bucket}", source)


def test_fixture_covers_every_profile_and_vendor():
    frozen = _frozen()
    vendors = {key.split("/")[0] for key in frozen["lookup"]}
    assert vendors == {"nvidia", "amd", "hygon", "intel", "musa", "metax"}
    assert {key.split("|")[0] for key in frozen["plans"]} == set(all_profiles())


def test_every_entry_resolves_as_the_python_tables_did():
    wrong = []
    for key, want in _frozen()["lookup"].items():
        vendor, arch, role, K = key.split("/")
        device = DeviceInfo(vendor=vendor, device_type="cuda", name="x", arch=arch, warp_size=32,
                            multiprocessors=100, shared_memory_per_block=65536, has_float64=True,
                            triton_backend="cuda")
        cfg, source = lookup(device, role, SimpleNamespace(K=int(K), V=int(K)))
        bucket = "64" if int(K) <= 64 else "128"
        if cfg.as_dict() != _config(want["config"]) or source != _now_from_file(want["source"], bucket):
            wrong.append((key, cfg.as_dict(), source, want))
    assert not wrong, wrong[:5]


def test_every_plan_is_as_before(monkeypatch):
    # As the snapshot was taken: compiled (no interpreter), no setting forcing a backend or Gluon.
    for name in ("TRITON_INTERPRET", "RWKV_BACKENDS_GLUON", "RWKV_BACKENDS_BACKEND", "RWKV_BACKENDS_SIMULATE"):
        monkeypatch.delenv(name, raising=False)
    profiles = all_profiles()
    wrong = []
    for key, want in _frozen()["plans"].items():
        name, cls, dt = key.split("|")
        info = profiles[name]
        kw = PROBLEMS[cls]
        problem = _problem(info.device_type, **kw)
        problem = dataclasses.replace(problem, dtype=getattr(torch, dt), w_dtype=getattr(torch, dt))
        p = plan(problem, info, runtime=False, triton_version_as="3.6.0")
        bucket = "64" if max(kw["K"], kw["V"]) <= 64 else "128"
        got = {"variant": p.variant.name, "configs": {k: c.as_dict() for k, c in p.configs.items()},
               "config_sources": dict(p.config_sources), "rejected": dict(p.rejected),
               "adjusted_by": {k: v for k, v in p.adjusted_by.items() if v}}
        expected = dict(want, configs={k: _config(c) for k, c in want["configs"].items()},
                        config_sources={k: _now_from_file(s, bucket) for k, s in want["config_sources"].items()})
        if got != expected:
            wrong.append((key, got, expected))
    assert not wrong, wrong[:3]


@pytest.mark.parametrize("profile", sorted(all_profiles()))
def test_every_profile_has_an_entry_for_every_role(profile):
    """Nothing falls back to a built-in config: every role and bucket comes from a table."""
    from rwkv_backends.config import KERNELS
    info = all_profiles()[profile]
    for role in KERNELS:
        for K in (64, 128):
            _, source = lookup(info, role, SimpleNamespace(K=K, V=K))
            assert "fallback" not in source, (profile, role, K, source)
