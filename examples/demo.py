"""Run wkv7 on the default device (CPU included) and print its error against the float64 reference."""

import torch

import rwkv_backends as rb
from rwkv_backends.conformance import Case, make_inputs, relative_error
from rwkv_backends.device import default_device

device = default_device()
dtype = "bfloat16" if device.type != "cpu" else "float32"
case = Case("forward", dtype, "realistic", B=2, T=300, H=4, K=64, V=64)
x = make_inputs(case, seed=0, device=device)
args = [x[n] for n in ("r", "w", "k", "v", "a", "b")]
o, state = rb.wkv7(*args, x["state"])
ref_dev = device if device.type in ("cpu", "cuda") else torch.device("cpu")
o_ref, s_ref = rb.wkv7_reference(*(t.to(ref_dev) for t in args), x["state"].to(ref_dev))
plan = rb.explain(*args, x["state"])
print(f"device {device}, {dtype}, B2 T300 H4 K64: variant {plan['variant']}")
print(f"relative error vs float64 reference: o {relative_error(o, o_ref):.2e}, state {relative_error(state, s_ref):.2e}")
