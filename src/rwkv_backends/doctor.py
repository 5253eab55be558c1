"""`python -m rwkv_backends.doctor`: what this machine is, what wkv7 will run on it, and why.

    python -m rwkv_backends.doctor [--json] [--simulate PROFILE] [--triton-version X.Y.Z]
                                   [--list-profiles] [--no-probe]

Exit code 0 when no check failed (SPEC §5).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile

SCHEMA = "rwkv-backends-doctor/1"

# Representative problems for the plan (SPEC §5): training, prefill, decode; and training on one
# long sequence, which few (sequence, head) pairs send to other kernels on a large device.
PLAN_PROBLEMS = {
    "training": dict(B=8, T=4096, H=32, K=64, V=64, needs_grad=True),
    "prefill": dict(B=8, T=4096, H=32, K=64, V=64, needs_grad=False),
    "decode": dict(B=256, T=1, H=32, K=64, V=64, needs_grad=False),
    "decode B1": dict(B=1, T=1, H=32, K=64, V=64, needs_grad=False),
    "long training": dict(B=1, T=16384, H=32, K=64, V=64, needs_grad=True),
}


def _problem(device_type, B, T, H, K, V, needs_grad):
    import torch

    from .problem import Problem
    return Problem(B=B, T=T, H=H, K=K, V=V, N=B, dtype=torch.bfloat16, w_dtype=torch.bfloat16,
                   device_type=device_type, w_form="log", scale=1.0, varlen=False, has_state=True,
                   output_final_state=True, needs_grad=needs_grad, state_dtype=torch.float32)


def _check(name, status, detail):
    return {"name": name, "status": status, "detail": detail}


@contextlib.contextmanager
def _simulating(profile):
    """RWKV_BACKENDS_SIMULATE=profile (unset when None) for the duration only: the doctor must not
    leave later wkv7 calls in the same process planning for another device."""
    from .device import SIMULATE_ENV
    before = os.environ.get(SIMULATE_ENV)
    if profile:
        os.environ[SIMULATE_ENV] = profile
    else:
        os.environ.pop(SIMULATE_ENV, None)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(SIMULATE_ENV, None)
        else:
            os.environ[SIMULATE_ENV] = before


def _settings(simulate, triton_version_as):
    """(profile, Triton version to plan as, settings checks). A profile, backend or Triton version
    that is not known becomes a failed check naming it and what is accepted; the report then
    describes this machine and its installed Triton."""
    from .device import SIMULATE_ENV, list_profiles, parse_version, simulated_profile_name
    from .registry import BACKEND_ENV, backends, variants
    checks = []
    source = "--simulate" if simulate else SIMULATE_ENV
    profile = (simulate or "").strip() or simulated_profile_name()
    if profile:
        known = sorted(list_profiles())
        if profile not in known:
            checks.append(_check("simulated profile", "fail",
                                 f"{source}: unknown profile {profile!r}; known: {', '.join(known)} "
                                 "(--list-profiles names them); reporting this machine instead"))
            profile = None
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        names = variants()
        if forced not in names and forced not in backends():
            checks.append(_check("backend setting", "fail",
                                 f"{BACKEND_ENV}: unknown backend {forced!r}; registered backends: "
                                 f"{', '.join(backends())}; variants: {', '.join(sorted(names))} "
                                 f"(wkv7 raises until {BACKEND_ENV} is one of them or unset)"))
    if triton_version_as is not None and not parse_version(triton_version_as):
        checks.append(_check("triton version", "fail",
                             f"--triton-version: expected a release X.Y.Z such as 3.6.0, got {triton_version_as!r}; "
                             "planning as the installed Triton instead"))
        triton_version_as = None
    return profile, triton_version_as, checks


def collect(simulate=None, triton_version_as=None, probe=True) -> dict:
    """The doctor's report as a dict (SPEC §5), planning as on `simulate` (or the profile that
    RWKV_BACKENDS_SIMULATE names) when given. Bad settings are failed checks, never exceptions."""
    profile, triton_version_as, settings = _settings(simulate, triton_version_as)
    with _simulating(profile):
        return _collect(profile, triton_version_as, probe, settings)


def _collect(simulate, triton_version_as, probe, settings) -> dict:
    from . import known_issues
    from .device import (CPU, default_device, detect, interpreter_enabled, python_ok, triton_target,
                         triton_version, versions)
    from .registry import plan
    from .tuning import provenance

    checks = list(settings)
    try:
        info = detect(None if simulate else default_device())
    except Exception as exc:
        checks.append(_check("device", "fail", f"detection raised {type(exc).__name__}: {exc}; "
                                               "reporting the CPU instead"))
        info = CPU
    tv = triton_version_as or triton_version()
    py = versions()["python"]
    checks.append(_check("python", "ok" if python_ok() else "fail",
                         f"Python {py}" + ("" if python_ok() else ": rwkv-backends needs >= 3.10 (triton#5224)")))

    if triton_version() is None:
        checks.append(_check("triton", "warn", "Triton is not installed: only the PyTorch backend is available "
                                               "(pip install triton on Linux x86-64/aarch64)"))
    else:
        checks.append(_triton_release_check(triton_version(), tv if triton_version_as else None))
    target = triton_target()
    if simulate:
        checks.append(_check("triton driver", "ok", f"simulated {simulate}: no driver needed for planning"
                                                    + ("; kernels run through the interpreter" if interpreter_enabled() else "")))
    elif target is None:
        checks.append(_check("triton driver", "warn", "no active Triton driver: Triton kernels cannot run here "
                                                      "(set TRITON_INTERPRET=1 with RWKV_BACKENDS_SIMULATE to interpret them)"))
    else:
        checks.append(_check("triton driver", "ok", f"active target: backend {target[0]}, arch {target[1]}"))

    if info.vendor == "cpu":
        checks.append(_check("device", "warn", "no accelerator visible: wkv7 runs the PyTorch backend on the CPU"))
    else:
        checks.append(_check("device", "ok", f"{info.name} ({info.vendor} {info.arch}, warp {info.warp_size}, "
                                             f"{info.multiprocessors} multiprocessors)"
                             + (" [simulated profile, not real hardware]" if info.simulated else "")))
    checks.append(_check("float64 on device", "ok" if info.has_float64 else "warn",
                         "available" if info.has_float64 else
                         "not available: the conformance suite runs the float64 reference on the CPU"))
    checks.append(_cache_check())

    active = known_issues.active(info, tv)
    relevant = [i.id for i in active if i.id != "interpreter"]
    checks.append(_check("known issues", "warn" if relevant else "ok",
                         ("active: " + ", ".join(relevant) + " (configs are narrowed to avoid them)") if relevant
                         else "none of the catalogued issues applies here"))

    plans = {}
    chosen = None
    crashed = []
    for cls, kw in PLAN_PROBLEMS.items():
        problem = _problem("cpu" if info.vendor == "cpu" else info.device_type, **kw)
        try:
            p = plan(problem, info, triton_version_as=triton_version_as, runtime=not simulate)
            plans[cls] = {"variant": p.variant.name, "backend": p.variant.backend,
                          "config": {k: c.as_dict() for k, c in p.configs.items()},
                          "config_source": p.config_sources,
                          "config_provenance": p.config_provenance,
                          "adjusted_by_known_issues": {k: v for k, v in p.adjusted_by.items() if v},
                          "rejected": p.rejected}
            chosen = chosen or p.variant.backend
        except ValueError as exc:          # NoBackendError, or a backend setting that names nothing
            plans[cls] = {"error": str(exc)}
        except Exception as exc:
            plans[cls] = {"error": f"{type(exc).__name__}: {exc}"}
            crashed.append(cls)
    if crashed:
        checks.append(_check("plan", "fail", f"planning raised for {', '.join(crashed)}: "
                                             f"{plans[crashed[0]]['error']}"))
    if probe:
        checks.append(_guarded("compile probe", _compile_probe, info, tv, plans))
    blocked = next((c for c in settings if c["name"] == "backend setting"), None)
    if blocked is not None:
        checks += [_check(name, "warn", f"not run: {blocked['detail'].split(';')[0]}")
                   for name in ("self-test", "self-test backward")]
    else:
        checks += _self_tests(info, simulate)

    report = {
        "schema": SCHEMA, "python": py, "packages": versions() | ({"triton_planned_as": tv} if triton_version_as else {}),
        "device": info.as_dict() | {"triton_backend": info.triton_backend, "device_type": info.device_type},
        "backend": chosen, "tables": provenance(info), "plan": plans,
        "known_issues": known_issues.report(info, tv), "checks": checks,
    }
    report["ok"] = all(c["status"] != "fail" for c in checks)
    return report


def _guarded(name, fn, *args):
    """fn(*args), a check; an exception it raises becomes a failed check of that name."""
    try:
        return fn(*args)
    except Exception as exc:
        return _check(name, "fail", f"raised {type(exc).__name__}: {exc}")


def _cache_check():
    cache = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    try:
        os.makedirs(cache, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache):
            pass
        return _check("triton cache", "ok", f"{cache} is writable")
    except OSError as exc:
        return _check("triton cache", "fail", f"{cache} is not writable ({exc}); set TRITON_CACHE_DIR to a writable folder")


def _triton_release_check(installed: str, planned_as: str | None) -> dict:
    """The installed (or planned-as) Triton release against the supported range, and what runs there."""
    from .device import parse_version
    from .known_issues import GLUON_CHECKED_TRITON, SUPPORTED_TRITON, supported_triton
    from .known_issues import _release_words as words
    tv = parse_version(planned_as or installed)
    head = f"Triton {installed} imports" + (f"; planning as Triton {planned_as}" if planned_as else "")
    span = f"{words(SUPPORTED_TRITON[0])} to {words(SUPPORTED_TRITON[1])}"
    gluon = ", ".join(words(v) for v in GLUON_CHECKED_TRITON)
    if not supported_triton(tv):
        return _check("triton", "warn", f"{head}: {words(tv[:3])} is outside the supported range {span} (the "
                                        "releases torch 2.11 to 2.15 pin); the Triton kernels run unverified there and "
                                        "the Gluon kernels are off (known issue triton-release-unsupported); install a "
                                        "torch that pins a supported Triton")
    note = "" if tv[:2] in GLUON_CHECKED_TRITON else f"; the Gluon kernels are off on it (checked on a card with {gluon})"
    return _check("triton", "ok", f"{head} (supported: {span}){note}")


def _compile_probe(info, tv, plans):
    """Compile the planned Triton configs in a subprocess: a compiler assertion aborts that process,
    not the doctor, and becomes a failed check naming the matching known issue."""
    wanted = []
    for p in plans.values():
        configs = dict(p.get("config", {}))
        # Each chunk size below is the one the variant walks at (the walks have no chunk size of
        # their own in the tables). Two-pass training also runs a state-gradient sweep, at the
        # walk's launch shape; it has no table entry of its own either.
        if "chunk_transition" in configs:
            walk = configs["chunk_fwd_transition"] | {"chunk_size": configs["chunk_transition"]["chunk_size"]}
            configs["chunk_fwd_transition"] = walk
            if "chunk_bwd_split" in configs:
                configs["chunk_dstate_transition"] = walk
        elif "chunk_bwd_split" in configs:
            configs["chunk_dstate"] = configs["chunk_fwd_loaded"] | {"chunk_size": configs["chunk_prep"]["chunk_size"]}
        for kernel, cfg in configs.items():
            if p.get("backend") == "triton" and (kernel, cfg) not in wanted:
                wanted.append((kernel, cfg))
    if not wanted:
        return _check("compile probe", "ok", "no Triton kernel is planned here: nothing to compile")
    if info.triton_backend != "cuda":
        return _check("compile probe", "warn", f"not run: compiling for {info.triton_backend} needs that vendor's "
                                               "toolchain (NVIDIA targets compile anywhere)")
    from .device import triton_version
    if tv != triton_version():
        return _check("compile probe", "warn", f"not run: planning as Triton {tv}, installed {triton_version()}")
    from .config import KernelConfig
    from .kernels.aot import compile_in_subprocess
    arch = info.triton_target_arch if isinstance(info.triton_target_arch, int) else int(info.arch[2:])
    jobs = [(kernel, KernelConfig.make(**cfg)) for kernel, cfg in wanted]
    try:
        rc, done, stderr = compile_in_subprocess(jobs, arch=arch, warp_size=info.warp_size)
    except Exception as exc:
        return _check("compile probe", "warn", f"not run: {type(exc).__name__}: {exc}")
    if rc != 0:
        hint = ""
        if rc < 0 and ("mma" in stderr or "LinearLayout" in stderr):
            hint = "; the abort matches triton#4492 / triton#5609 (see known_issues)"
        return _check("compile probe", "fail", f"the compiler {'aborted' if rc < 0 else 'failed'} "
                                               f"(exit {rc}){hint}: {stderr.strip()[-400:]}")
    return _check("compile probe", "ok", f"compiled for sm{arch}: " + ", ".join(
        f"{d['kernel']} ({d['num_warps']} warps, {d['shared_bytes']} B shared)" for d in done))


_SELF_TEST_CASE = ("float32", "realistic", 1, 40, 2, 32, 32)
_GRADIENTS = ("r", "w", "k", "v", "a", "b", "state")


def _self_tests(info, simulate):
    """wkv7 forward (without gradients) and backward (the training path: outputs and the gradients
    of r, w, k, v, a, b and state) against the float64 reference, its gradients by autograd."""
    import torch

    from .device import interpreter_enabled
    if simulate and not interpreter_enabled():
        why = "skipped for a simulated profile without TRITON_INTERPRET=1 (nothing to run)"
        return [_check("self-test", "ok", why), _check("self-test backward", "ok", why)]
    from .conformance.cases import TOLERANCES, Case, make_inputs
    device = torch.device("cpu") if (simulate or info.vendor == "cpu") else torch.device(info.device_type, info.index)
    ref_device = device if info.has_float64 else torch.device("cpu")
    case = Case("backward", *_SELF_TEST_CASE)
    x = make_inputs(case, 1234, device)
    limits = TOLERANCES[case.dtype]
    shape = f"{case.dtype} B{case.B} T{case.T} H{case.H} K{case.K}"
    return [_guarded("self-test", _forward_test, x, ref_device, limits[0], shape),
            _guarded("self-test backward", _backward_test, x, ref_device, limits, shape)]


def _forward_test(x, ref_device, limit, shape):
    import torch

    from . import explain, wkv7, wkv7_reference
    from .conformance.cases import relative_error
    ins = [x[n] for n in _GRADIENTS]
    with torch.no_grad():
        variant = explain(*ins)["variant"]
        o, s = wkv7(*ins)
        o_ref, s_ref = wkv7_reference(*(t.to(ref_device) for t in ins))
    errs = {"o": relative_error(o, o_ref), "state_out": relative_error(s, s_ref)}
    return _verdict("self-test", f"wkv7 ({variant}) forward vs float64 reference, {shape}", errs, limit)


def _backward_test(x, ref_device, limits, shape):
    import torch

    from . import explain, wkv7, wkv7_reference
    from .conformance.cases import relative_error
    ins = [x[n].detach().clone().requires_grad_() for n in _GRADIENTS]
    refs = [x[n].detach().to(ref_device, torch.float64).requires_grad_() for n in _GRADIENTS]
    do, dstate = x["do"], x["dstate"]
    with torch.enable_grad():
        variant = explain(*ins)["variant"]
        o, s = wkv7(*ins)
        grads = torch.autograd.grad((o.float() * do.float()).sum() + (s * dstate).sum(), ins)
        o_ref, s_ref = wkv7_reference(*refs)
        loss = (o_ref * do.to(ref_device, torch.float64)).sum() + (s_ref * dstate.to(ref_device, torch.float64)).sum()
        ref_grads = torch.autograd.grad(loss, refs)
    out = {"o": relative_error(o, o_ref), "state_out": relative_error(s, s_ref)}
    grad = {f"d{n}": relative_error(g, gr) for n, g, gr in zip(_GRADIENTS, grads, ref_grads)}
    what = f"wkv7 ({variant}) forward and backward vs float64 reference with autograd, {shape}"
    first = _verdict("self-test backward", what, out, limits[0])
    second = _verdict("self-test backward", "gradients", grad, limits[1])
    status = "fail" if "fail" in (first["status"], second["status"]) else "ok"
    return _check("self-test backward", status, f"{first['detail']}; {second['detail']}")


def _verdict(name, what, errors, limit):
    """A check over relative errors: ok when every one is within `limit`, else fail naming those over."""
    over = [n for n, e in errors.items() if not e <= limit]
    listed = ", ".join(f"{n} {e:.1e}" for n, e in errors.items())
    detail = f"{what}: rel. error {listed} (limit {limit:g})"
    if over:
        detail += f"; over the limit: {', '.join(over)}"
    return _check(name, "fail" if over else "ok", detail)


# Every KernelConfig field a kernel may use (config.KERNELS "uses"); the flags show only when set.
_FIELD_WORDS = {"chunk_size": "chunk {}", "block_v": "BV {}", "block_k": "BK {}", "num_warps": "warps {}",
                "num_stages": "stages {}", "dot_precision": "{}", "keep_u": "keeps U", "gluon": "Gluon"}
_FLAGS = ("keep_u", "gluon")


def _config_text(kernel, c):
    """One kernel's launch config in a few words, only the fields that kernel uses."""
    from .config import KERNELS
    uses = KERNELS.get(kernel, {}).get("uses", tuple(_FIELD_WORDS))
    words = [_FIELD_WORDS[f].format(c[f]) for f in uses
             if f in c and not (f == "num_stages" and c[f] == 1) and not (f in _FLAGS and not c[f])]
    if c["vendor_options"]:
        words.append(str(c["vendor_options"]))
    return f"{kernel}: " + " ".join(words)


def render(report: dict) -> str:
    d = report["device"]
    lines = [f"rwkv-backends doctor  (Python {report['python']}, torch {report['packages']['torch']}, "
             f"triton {report['packages']['triton']}, rwkv_backends {report['packages']['rwkv_backends']})",
             f"device : {d['name']}  [{d['vendor']} {d['arch']}, triton backend {d['triton_backend']}]"
             + (f"  SIMULATED {d['simulated']}" if d.get("simulated") else ""),
             f"backend: {report['backend']}   tables: {report['tables']}", "plan   :"]
    width = max((len(p["variant"]) for p in report["plan"].values() if "variant" in p), default=0) + 2
    name_width = max(map(len, report["plan"]), default=0) + 2
    for cls, p in report["plan"].items():
        if "error" in p:
            lines.append(f"  {cls:<{name_width}}no backend: {p['error'].splitlines()[0]}")
            continue
        cfg = "; ".join(_config_text(k, c) for k, c in p["config"].items())
        adj = f"  (narrowed by {p['adjusted_by_known_issues']})" if p["adjusted_by_known_issues"] else ""
        lines.append(f"  {cls:<{name_width}}{p['variant']:<{width}}{cfg}{adj}")
    active = [i["id"] for i in report["known_issues"] if i["active"]]
    lines.append(f"known issues active: {', '.join(active) or 'none'} (of {len(report['known_issues'])} catalogued)")
    lines.append("checks :")
    for c in report["checks"]:
        lines.append(f"  [{c['status']:^4}] {c['name']:<20}{c['detail']}")
    lines.append("OK" if report["ok"] else "FAILED: see the checks marked fail")
    return "\n".join(lines)


def _fallback_report(exc) -> dict:
    """The report when collecting it raised: what is known without planning, and a failed check."""
    from .device import versions
    v = versions()
    return {"schema": SCHEMA, "python": v["python"], "packages": v,
            "device": {"vendor": None, "name": None, "arch": None, "warp_size": None, "device_type": None,
                       "triton_backend": None, "simulated": None},
            "backend": None, "tables": None, "plan": {}, "known_issues": [],
            "checks": [_check("doctor", "fail", f"collecting the report raised {type(exc).__name__}: {exc}")],
            "ok": False}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rwkv_backends.doctor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object (SPEC §5)")
    p.add_argument("--simulate", metavar="PROFILE", help="plan as on this profile, e.g. nvidia:sm90")
    p.add_argument("--triton-version", metavar="X.Y.Z", help="plan as if this Triton release were installed")
    p.add_argument("--list-profiles", action="store_true", help="name every simulated profile")
    p.add_argument("--no-probe", action="store_true", help="skip the subprocess compile probe")
    args = p.parse_args(argv)
    if args.list_profiles:
        from .device import list_profiles
        profiles = list_profiles()
        if args.json:
            print(json.dumps({n: i.as_dict() for n, i in profiles.items()}, indent=1))
        else:
            for name, info in sorted(profiles.items()):
                print(f"{name:<18}{info.name}  (arch {info.arch}, warp {info.warp_size})")
        return 0
    try:
        report = collect(simulate=args.simulate, triton_version_as=args.triton_version, probe=not args.no_probe)
    except Exception as exc:
        report = _fallback_report(exc)
    print(json.dumps(report, indent=1, default=str) if args.json else render(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
