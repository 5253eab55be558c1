"""`python -m rwkv_backends.conformance`: run the suite against one backend and write reports."""

from __future__ import annotations

import argparse
import json
import os
import random
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rwkv_backends.conformance", description=__doc__)
    p.add_argument("--backend", required=True,
                   help="backend or variant to check: pytorch, triton, triton.chunk, ...; 'cpu' = pytorch on the CPU")
    p.add_argument("--simulate", metavar="PROFILE", help="plan as on this profile (e.g. nvidia:sm90), CPU tensors")
    p.add_argument("--interpret", action="store_true", help="run Triton kernels through TRITON_INTERPRET=1")
    p.add_argument("--quick", action="store_true", help="small shapes (minutes under the interpreter)")
    p.add_argument("--report", metavar="FILE.json")
    p.add_argument("--junit", metavar="FILE.xml")
    p.add_argument("--seed", type=int, default=None, help="base seed (default: fresh, named in the report)")
    p.add_argument("--filter", default="", help="run only cases whose id contains this text")
    args = p.parse_args(argv)

    # Both must be set before Triton kernels are defined (the interpreter is chosen at decoration).
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    if args.simulate:
        os.environ["RWKV_BACKENDS_SIMULATE"] = args.simulate

    import torch

    from ..device import detect, interpreter_enabled, versions
    from .cases import full_cases, quick_cases
    from .runner import SCHEMA, ReferenceMismatch, ensure_reference, junit_xml, run_case

    backend = "pytorch" if args.backend == "cpu" else args.backend
    if args.simulate or args.backend == "cpu":
        device = torch.device("cpu")
    else:
        from ..device import default_device
        device = default_device()
    info = detect(device)
    has_float64 = info.has_float64 or device.type == "cpu"
    try:
        ensure_reference(device if has_float64 else torch.device("cpu"), fresh=True)
    except ReferenceMismatch as exc:
        print(f"refusing to run: {exc}", file=sys.stderr, flush=True)
        if args.report:
            with open(args.report, "w") as f:
                json.dump({"schema": SCHEMA, "backend": args.backend, "refused": str(exc),
                           "summary": {"passed": 0, "failed": 0, "skipped": 0}, "cases": []}, f, indent=1)
        return 2
    base_seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 31)
    cases = quick_cases() if args.quick else full_cases()
    cases = [c for c in cases if args.filter in c.id]
    results = []
    for case in cases:
        res = run_case(case, backend=backend, device=device, base_seed=base_seed, has_float64=has_float64)
        results.append(res)
        worst = max(res["errors"].values(), default=float("nan"))
        print(f"{res['status']:>7}  {res['id']:<70} {res.get('variant', '-'):<17} worst={worst:.2e} "
              f"{res['seconds']:.1f}s", flush=True)
        if res["status"] == "failed":
            print("         " + res.get("detail", "").splitlines()[0], flush=True)
    summary = {s: sum(r["status"] == s for r in results) for s in ("passed", "failed", "skipped")}
    report = {
        "schema": SCHEMA, "backend": args.backend, "tier": "quick" if args.quick else "full",
        "device": info.as_dict(), "packages": versions(), "interpret": interpreter_enabled(),
        "simulate": args.simulate, "base_seed": base_seed, "summary": summary, "cases": results,
    }
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)
    if args.junit:
        with open(args.junit, "w") as f:
            f.write(junit_xml(report))
    print(f"{summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped")
    return 0 if summary["failed"] == 0 and summary["passed"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
