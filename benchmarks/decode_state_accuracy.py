"""Accuracy of the opt-in 16-bit decode state: T decode steps (one wkv7 call per token, the state
carried between calls) with a float32, bfloat16 or float16 state, against a float64 recurrence run
on the same inputs from the same start state.

    PYTHONPATH=src python benchmarks/decode_state_accuracy.py [--steps 1,16,256,2048] [--device cuda]

Each call computes in float32 and rounds the state to its dtype once, on the CPU (pytorch.chunk) as
on a GPU (triton.recurrent), so the errors measure the rounding of the stored state.
"""

from __future__ import annotations

import argparse

import torch

import rwkv_backends as rb
from rwkv_backends.conformance import Case, make_inputs, relative_error
from rwkv_backends.reference import wkv7_reference

NAMES = ("r", "w", "k", "v", "a", "b")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", default="1,16,256,2048")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--regime", default="realistic", choices=("realistic", "strong", "unit"))
    args = p.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    T = max(steps)
    x = make_inputs(Case("forward", "bfloat16", args.regime, args.B, T, args.H, 64, 64), 7, args.device)
    ins = [x[n] for n in NAMES]
    ref = [t.double() for t in ins]
    print(f"device {args.device}, B{args.B} H{args.H} K=V=64, bf16 inputs, {args.regime} decay; "
          f"variant for a bf16 state: {rb.explain(*(t[:, :1] for t in ins), x['state'].bfloat16())['variant']}")
    print(f"{'steps':>6} {'state dtype':>12} {'o error':>10} {'state error':>12}")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        state, outs = x["state"].to(dtype), []
        s_ref = x["state"].to(dtype).double()          # the same rounded start state for the reference
        for t in range(T):
            o, state = rb.wkv7(*(u[:, t:t + 1] for u in ins), state)
            outs.append(o)
            if t + 1 in steps:
                o_ref, s_ref_t = wkv7_reference(*(u[:, :t + 1] for u in ref), s_ref)
                err_o = relative_error(torch.cat(outs, 1), o_ref)
                err_s = relative_error(state, s_ref_t)
                print(f"{t + 1:>6} {str(dtype).replace('torch.', ''):>12} {err_o:>10.2e} {err_s:>12.2e}", flush=True)


if __name__ == "__main__":
    main()
