"""A bounds check for Triton's interpreter, which does not catch out-of-bounds accesses itself: every
live (unmasked) lane of every tl.load and tl.store must fall inside one of the tensors passed to the
launch (their view extents). Installed with pytest's monkeypatch; `violations` lists what broke it."""

from __future__ import annotations

import inspect

import numpy as np
import torch


def _extents(fn, args, kwargs) -> list:
    bound = dict(zip(inspect.getfullargspec(fn).args, args)) | kwargs
    out = []
    for name, x in bound.items():
        if isinstance(x, torch.Tensor):
            last = sum((n - 1) * s for n, s in zip(x.shape, x.stride())) if x.numel() else -1
            out.append((name, x.data_ptr(), x.data_ptr() + (last + 1) * x.element_size(), x.element_size()))
    return out


def install(monkeypatch) -> list:
    """Patches the interpreter for the test's length; returns the list violations are appended to:
    (kernel, "load" or "store", lanes out of bounds, where the first few point)."""
    from triton.runtime import interpreter as interp
    violations, launch = [], {"kernel": None, "tensors": []}
    executor_call = interp.GridExecutor.__call__
    masked_load = interp.InterpreterBuilder.create_masked_load
    masked_store = interp.InterpreterBuilder.create_masked_store

    def call(self, *args, **kwargs):
        outer = dict(launch)
        launch.update(kernel=self.fn.__name__, tensors=_extents(self.fn, args, kwargs))
        try:
            return executor_call(self, *args, **kwargs)
        finally:
            launch.update(outer)

    def check(ptrs, mask, op):
        width = interp._get_np_dtype(ptrs.get_element_ty()).itemsize
        p = np.asarray(ptrs.data).astype(np.uint64)
        live = p[np.broadcast_to(np.asarray(mask.data).astype(bool), p.shape)]
        ok = np.zeros(live.shape, dtype=bool)
        for _, lo, hi, _ in launch["tensors"]:
            ok |= (live >= lo) & (live + width <= hi)
        if not ok.all():
            where = []
            for addr in live[~ok][:3]:
                below = [t for t in launch["tensors"] if t[1] <= addr]
                name, lo, hi, size = max(below, key=lambda t: t[1]) if below else ("?", 0, 0, 1)
                where.append(f"{name}[{(int(addr) - lo) // size}] of {(hi - lo) // size}")
            violations.append((launch["kernel"], op, int((~ok).sum()), where))

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        check(ptrs, mask, "load")
        return masked_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        check(ptrs, mask, "store")
        return masked_store(self, ptrs, value, mask, cache_policy)

    monkeypatch.setattr(interp.GridExecutor, "__call__", call)
    monkeypatch.setattr(interp.InterpreterBuilder, "create_masked_load", load)
    monkeypatch.setattr(interp.InterpreterBuilder, "create_masked_store", store)
    return violations
