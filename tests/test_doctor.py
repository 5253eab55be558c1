"""The doctor as users run it: `python -m rwkv_backends.doctor --json` in a subprocess.

It always prints its report; a bad setting is a failed check that names the value and what is
accepted, and the exit code follows `ok` (SPEC §5). The self-test runs wkv7 forward and backward
against the float64 reference.
"""

import json
import os
import subprocess
import sys

import pytest

from _support import REPO

SETTINGS = ("RWKV_BACKENDS_SIMULATE", "RWKV_BACKENDS_BACKEND", "RWKV_BACKENDS_GLUON", "TRITON_INTERPRET")


def run_doctor(*args, env=None, code=None):
    """(exit code, report) of the doctor with `args` and only the settings in `env`; `code` runs
    first in the same process (to break something before the doctor looks)."""
    environ = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    environ.update(env or {})
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), environ.get("PYTHONPATH")]))
    script = (code or "") + "\nimport sys\nfrom rwkv_backends.doctor import main\nsys.exit(main(sys.argv[1:]))\n"
    done = subprocess.run([sys.executable, "-c", script, "--json", "--no-probe", *args], env=environ,
                          capture_output=True, text=True, timeout=300)
    assert "Traceback" not in done.stderr, done.stderr
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"no JSON report (exit {done.returncode}):\nstdout: {done.stdout[-2000:]}\n"
                    f"stderr: {done.stderr[-2000:]}")
    assert done.returncode == (0 if report["ok"] else 1), (done.returncode, report["ok"])
    assert report["schema"] == "rwkv-backends-doctor/1"
    return done.returncode, report


def checks(report):
    return {c["name"]: c for c in report["checks"]}


def failed(report):
    return [c for c in report["checks"] if c["status"] == "fail"]


def test_simulated_profile_from_the_environment_plans_without_running_kernels():
    rc, report = run_doctor(env={"RWKV_BACKENDS_SIMULATE": "nvidia:sm90"})
    assert rc == 0 and report["ok"], failed(report)
    assert report["device"]["simulated"] == "nvidia:sm90"
    assert report["backend"] == "triton"
    assert all("variant" in p for p in report["plan"].values())
    for name in ("self-test", "self-test backward"):
        assert "skipped" in checks(report)[name]["detail"]


def test_simulated_profile_from_the_environment_interpreted():
    """With TRITON_INTERPRET=1 the self-test runs the profile's Triton variants on the CPU."""
    rc, report = run_doctor(env={"RWKV_BACKENDS_SIMULATE": "nvidia:sm90", "TRITON_INTERPRET": "1"})
    assert rc == 0 and report["ok"], failed(report)
    c = checks(report)
    assert c["self-test"]["status"] == "ok" and "triton." in c["self-test"]["detail"]
    assert c["self-test backward"]["status"] == "ok" and "triton." in c["self-test backward"]["detail"]


@pytest.mark.parametrize("how", ["env", "flag"])
def test_unknown_profile_is_a_failed_check(how):
    if how == "env":
        rc, report = run_doctor(env={"RWKV_BACKENDS_SIMULATE": "nvidia:sm91"})
    else:
        rc, report = run_doctor("--simulate", "nvidia:sm91")
    assert rc == 1 and not report["ok"]
    (bad,) = failed(report)
    assert "'nvidia:sm91'" in bad["detail"] and "nvidia:sm90" in bad["detail"] and "amd:gfx942" in bad["detail"]
    assert ("RWKV_BACKENDS_SIMULATE" if how == "env" else "--simulate") in bad["detail"]
    # the rest of the report is the real device's
    assert report["device"]["simulated"] is None and report["backend"] == "pytorch"


def test_unknown_backend_setting_is_a_failed_check():
    rc, report = run_doctor(env={"RWKV_BACKENDS_BACKEND": "tritonn"})
    assert rc == 1 and not report["ok"]
    bad = failed(report)
    assert bad and all("RWKV_BACKENDS_BACKEND" in c["detail"] for c in bad)
    assert "'tritonn'" in bad[0]["detail"] and "pytorch" in bad[0]["detail"] and "triton.chunk" in bad[0]["detail"]
    assert all("error" in p and "tritonn" in p["error"] for p in report["plan"].values())


def test_unparsable_triton_version_is_a_failed_check():
    rc, report = run_doctor("--triton-version", "three", env={"RWKV_BACKENDS_SIMULATE": "nvidia:sm90"})
    assert rc == 1
    (bad,) = failed(report)
    assert "--triton-version" in bad["detail"] and "'three'" in bad["detail"] and "X.Y.Z" in bad["detail"]


@pytest.mark.parametrize("tv, supported", [("3.5.1", False), ("3.8.0", True), ("3.10.0", False)])
def test_the_triton_release_is_held_to_the_supported_range(tv, supported):
    """Outside the range the doctor names the release and what is off, and still reports."""
    rc, report = run_doctor("--triton-version", tv, env={"RWKV_BACKENDS_SIMULATE": "nvidia:sm90"})
    check = checks(report)["triton"]
    assert check["status"] == ("ok" if supported else "warn"), check
    assert "3.6 to 3.9" in check["detail"]
    if not supported:
        assert tv in check["detail"] and "Gluon kernels are off" in check["detail"]
    active = {i["id"] for i in report["known_issues"] if i["active"]}
    assert ("triton-release-unsupported" in active) == (not supported)


def test_self_test_runs_the_backward():
    rc, report = run_doctor()
    assert rc == 0, failed(report)
    c = checks(report)
    assert c["self-test"]["status"] == "ok"
    back = c["self-test backward"]
    assert back["status"] == "ok"
    assert all(f"d{n}" in back["detail"] for n in ("r", "w", "k", "v", "a", "b", "state"))


def test_self_test_fails_on_a_wrong_gradient():
    """A backward that returns a wrong gradient of w fails the doctor; the forward still reads ok."""
    broken = ("from rwkv_backends.backends.pytorch_training import PyTorchTraining as p\n"
              "good = p.train_backward\n"
              "def bad(self, *args, **kwargs):\n"
              "    g = list(good(self, *args, **kwargs))\n"
              "    g[1] = g[1] * 1.01\n"
              "    return tuple(g)\n"
              "p.train_backward = bad\n")
    rc, report = run_doctor(code=broken)
    assert rc == 1 and not report["ok"]
    c = checks(report)
    assert c["self-test"]["status"] == "ok"
    assert c["self-test backward"]["status"] == "fail" and "dw" in c["self-test backward"]["detail"]


def test_a_planner_that_raises_is_a_failed_check():
    broken = ("import rwkv_backends.registry as reg\n"
              "def plan(*args, **kwargs):\n"
              "    raise RuntimeError('planner broke')\n"
              "reg.plan = plan\n")
    rc, report = run_doctor(code=broken)
    assert rc == 1 and not report["ok"]
    c = checks(report)
    assert c["plan"]["status"] == "fail" and "planner broke" in c["plan"]["detail"]
    assert all("planner broke" in p["error"] for p in report["plan"].values())
    assert c["self-test"]["status"] == "fail"


def test_the_report_prints_when_collecting_it_raises():
    broken = ("import rwkv_backends.doctor as d\n"
              "def collect(*args, **kwargs):\n"
              "    raise RuntimeError('collector broke')\n"
              "d.collect = collect\n")
    rc, report = run_doctor(code=broken)
    assert rc == 1 and not report["ok"]
    (bad,) = failed(report)
    assert "collector broke" in bad["detail"]
    assert {"schema", "python", "packages", "device", "backend", "plan", "known_issues", "checks", "ok"} <= set(report)
