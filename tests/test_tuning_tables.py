"""The tuning tables as data files: every profile has an entry for every role, the tune tool writes
its picks with their provenance, the files follow their schema and ship in the wheel, and a role
without an entry refuses its variant with that reason."""

import json
import os
from types import SimpleNamespace

import pytest

from rwkv_backends.config import KernelConfig
from rwkv_backends.doctor import PLAN_PROBLEMS, _problem
from rwkv_backends.registry import plan
from rwkv_backends.tuning import lookup
from rwkv_backends.vendors import all_profiles


@pytest.mark.parametrize("profile", sorted(all_profiles()))
def test_every_profile_has_an_entry_for_every_role(profile):
    """Nothing falls back to a built-in config: every role and bucket comes from a table."""
    from rwkv_backends.config import KERNELS
    info = all_profiles()[profile]
    for role in KERNELS:
        for K in (64, 128):
            _, source = lookup(info, role, SimpleNamespace(K=K, V=K))
            assert "fallback" not in source, (profile, role, K, source)


def test_tune_writes_its_picks_with_provenance_into_a_table_file(tmp_path, capsys):
    """--write-table merges the picked entries into a table file, each with a provenance record
    naming the card, the versions, the date, the command line and the measured figure; the other
    entries stay, and the result loads as a table."""
    from rwkv_backends import tune, tuning
    info = all_profiles()["nvidia:sm90"]
    fast, slow = KernelConfig(num_warps=8, gluon=True, keep_u=True), KernelConfig(num_warps=4)
    ranked = {"chunk_bwd": [(3.74, 3.6e-3, fast, 1796.0), (4.84, 3.7e-3, slow, 1796.0)]}
    shapes = {"chunk_bwd": (8, 4096, 32)}
    entries = tune.table_entries(ranked, 64, info, {"torch": "2.11.0", "triton": "3.6.0"}, shapes,
                                 "python -m rwkv_backends.tune --kernels chunk_bwd --write-table")
    prov = entries["chunk_bwd"]["64"]["provenance"]
    assert prov["card"] == info.name and prov["triton"] == "3.6.0" and "--kernels chunk_bwd" in prov["run"]
    assert prov["measured"].startswith("3.740 ms at B8 T4096 H32")
    path = tmp_path / "sm90.json"
    path.write_text(open(tuning.table_path("nvidia", "sm90")).read())
    assert tune.write_table(entries, info, str(path)) == str(path)
    doc = json.loads(path.read_text())
    parsed = tuning.parse_table(doc, str(path), vendor="nvidia", arch="sm90")
    assert parsed["chunk_bwd"]["64"].config == fast
    assert parsed["chunk_bwd"]["64"].provenance["measured"] == prov["measured"]
    before = tuning.tables("nvidia")["sm90"]
    assert parsed["chunk_bwd"]["128"] == before["chunk_bwd"]["128"]        # the rest is kept
    assert parsed["chunk_fwd"] == before["chunk_fwd"]
    assert tune.write_table(entries, info, None) is None                    # without the flag: says where
    assert "nvidia/tables/sm90.json" in capsys.readouterr().out


def test_every_table_file_follows_the_schema():
    """Every entry names where it comes from; the files the package ships parse, and a broken one
    is an error that names the file and the field."""
    from rwkv_backends import tuning
    from rwkv_backends.vendors import PROBE_ORDER
    seen = 0
    for vendor in PROBE_ORDER:
        package = tuning.tables_package(vendor)
        for arch, roles in tuning.tables(package).items():
            for role, buckets in roles.items():
                for bucket, entry in buckets.items():
                    seen += 1
                    assert entry.provenance["run"], (package, arch, role, bucket)
                    if entry.provenance["card"] is None:
                        assert entry.provenance["run"].startswith("default"), (package, arch, role, bucket)
        if package in ("nvidia", "amd", "intel", "musa", "metax"):
            assert "default" in tuning.tables(package), package
    assert seen > 100
    doc = {"schema": tuning.SCHEMA, "vendor": "nvidia", "arch": "x", "about": "t",
           "entries": {"chunk_fwd": {"64": {"config": {"num_warps": 3},
                                            "provenance": dict.fromkeys(tuning.PROVENANCE_KEYS, "r")}}}}
    with pytest.raises(tuning.TableError, match="x.json: entries.chunk_fwd.64.config: num_warps"):
        tuning.parse_table(doc, "x.json")
    doc["entries"]["chunk_fwd"]["64"] = {"config": {}, "provenance": {"run": "r"}}
    with pytest.raises(tuning.TableError, match="provenance: expected the keys"):
        tuning.parse_table(doc, "x.json")


def test_a_role_without_an_entry_refuses_the_variant(monkeypatch):
    """A vendor whose tables lack a role a variant needs: the variant is refused with that reason and
    the next one in the order of preference plans (nothing runs on built-in defaults)."""
    from rwkv_backends import registry, tuning
    full, original = tuning.tables("amd"), tuning.tables
    trimmed = {arch: {role: b for role, b in roles.items() if role != "recurrent_fwd"} for arch, roles in full.items()}
    monkeypatch.setattr(tuning, "tables", lambda package: trimmed if package == "amd" else original(package))
    registry._plan_cached.cache_clear()
    try:
        info = all_profiles()["amd:gfx942"]
        p = plan(_problem(info.device_type, **PLAN_PROBLEMS["decode"]), info, runtime=False)
        assert p.variant.name != "triton.recurrent"
        assert any("no tuning table entry for recurrent_fwd at head 64 in amd/gfx942 or amd/default" in r
                   for r in p.rejected["triton.recurrent"]), p.rejected
        assert all(not source.startswith("built-in") for source in p.config_sources.values())
    finally:
        registry._plan_cached.cache_clear()


def test_plans_name_the_provenance_of_their_entries():
    info = all_profiles()["nvidia:sm90"]
    p = plan(_problem(info.device_type, **PLAN_PROBLEMS["training"]), info, runtime=False)
    prov = p.config_provenance["chunk_bwd"]
    assert prov["card"] == "NVIDIA H100 80GB HBM3" and "tune-sm90" in prov["run"]
    assert p.explain(_problem(info.device_type, **PLAN_PROBLEMS["training"]))["config_provenance"]["chunk_bwd"] == prov


@pytest.mark.slow
def test_an_installed_wheel_ships_and_loads_every_table(tmp_path):
    """pyproject's package-data puts every tables/*.json into the wheel: installed from it (no
    source tree on the path), every vendor's tables load and every profile plans from them."""
    import shutil
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(root, name), project / name)
    shutil.copytree(os.path.join(root, "src"), project / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(project)], capture_output=True, text=True)
    if build.returncode != 0:
        pytest.skip(f"no wheel build here: {build.stderr[-300:]}")
    wheel = next((tmp_path / "dist").glob("*.whl"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(wheel)], check=True, capture_output=True)
    shipped = sorted(os.path.relpath(p, project / "src") for p in (project / "src").glob("rwkv_backends/*/tables/*.json"))
    check = f"""
import json, os, sys
sys.path = [p for p in sys.path if os.path.abspath(p) not in ({root!r}, {os.path.join(root, 'src')!r}, '')]
sys.path.insert(0, {str(site)!r})
import rwkv_backends, rwkv_backends.tuning as t
from rwkv_backends.vendors import PROBE_ORDER, all_profiles
from rwkv_backends.doctor import PLAN_PROBLEMS, _problem
from rwkv_backends.registry import plan
assert rwkv_backends.__file__.startswith({str(site)!r}), rwkv_backends.__file__
files = sorted(os.path.relpath(os.path.join(d, f), {str(site)!r}) for d, _, fs in os.walk({str(site)!r})
               for f in fs if f.endswith('.json') and os.path.basename(d) == 'tables')
n = sum(len(b) for v in PROBE_ORDER for roles in t.tables(t.tables_package(v)).values() for b in roles.values())
plans = [plan(_problem(i.device_type, **kw), i, runtime=False).variant.backend
         for i in all_profiles().values() for kw in PLAN_PROBLEMS.values()]
print(json.dumps({{"files": files, "entries": n, "backends": sorted(set(plans))}}))
"""
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=str(tmp_path),
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["files"] == shipped and len(shipped) >= 10
    assert got["entries"] > 100 and got["backends"] == ["triton"]
