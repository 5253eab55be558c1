"""The recurrent forward: one step at a time, for decode and short sequences, launched through a
CachedLaunch (decode at small batch is host-bound)."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..config import KernelConfig
from ..device import interpreter_enabled
from .common import (GRID_YZ_MAX, W_FORM_CODES, _Cut, _Pairs, _cdiv, _contiguous, _interpreted, _launch_options,
                     _log_decay, _num_sequences, _or, _pow2, _seq_bounds)

try:                         # Triton 3.4 and later; CachedLaunch uses them on FAST_LAUNCH_TRITON only
    from triton import knobs as _knobs
    from triton.runtime import driver as _driver
except ImportError:          # pragma: no cover - older Triton
    _knobs = _driver = None

@triton.jit
def recurrent_fwd_kernel(
    r, w, k, v, a, b, o, h0, ht, cu_seqlens, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    W_FORM: tl.constexpr, HAS_STATE: tl.constexpr, STORE_FINAL: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    s_off = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_STATE:
        S += tl.load(h0 + s_off, mask=m_kv, other=0.0).to(tl.float32)       # float32, or a 16-bit state
    for t in range(bos, eos):
        p_k = (t * H + i_h) * K + o_k
        p_v = (t * H + i_h) * V + o_v
        r_t = tl.load(r + p_k, mask=m_k, other=0.0).to(tl.float32)
        w_t = tl.load(w + p_k, mask=m_k, other=0.0).to(tl.float32)
        k_t = tl.load(k + p_k, mask=m_k, other=0.0).to(tl.float32)
        a_t = tl.load(a + p_k, mask=m_k, other=0.0).to(tl.float32)
        b_t = tl.load(b + p_k, mask=m_k, other=0.0).to(tl.float32)
        v_t = tl.load(v + p_v, mask=m_v, other=0.0).to(tl.float32)
        d_t = tl.exp(_log_decay(w_t, W_FORM))
        u_t = tl.sum(a_t[:, None] * S, axis=0)                                # a_tᵀ h_{t-1}
        S = S * d_t[:, None] + b_t[:, None] * u_t[None, :] + k_t[:, None] * v_t[None, :]
        o_t = tl.sum(S * r_t[:, None], axis=0) * scale
        tl.store(o + p_v, o_t.to(o.dtype.element_ty), mask=m_v)
    if STORE_FINAL:
        tl.store(ht + s_off, S.to(ht.dtype.element_ty), mask=m_kv)


# Triton's JIT launch re-derives the kernel's specialization from every argument on every call.
# On the H100's host that is 31 us per decode launch, against 14 us for the compiled kernel's own
# runner, and decode at small batch is host-bound. So the decode kernel launches through a
# CachedLaunch: one per launch shape (grid, constexprs, options), holding the kernels Triton
# compiled for it, keyed by what Triton specializes on that the launch shape leaves open: each
# tensor's dtype and 16-byte alignment, each scalar's class (for integers: width, whether it is 1,
# whether 16 divides it), and the current device. Only where this was checked (bitwise equal to the
# JIT launch, tests/test_triton_kernels.py): NVIDIA devices and these Triton versions. Other vendors,
# other versions and the interpreter take the JIT launch.
FAST_LAUNCH_TRITON = ("3.6.",)
_COMPILED_MAX = 64           # compiled kernels per launch shape (alignment and dtype patterns)


def _scalar_class(x):
    if isinstance(x, int) and not isinstance(x, bool):
        return int, -2 ** 31 <= x < 2 ** 31, x == 1, x % 16 == 0
    return type(x)


class CachedLaunch:
    """kernel[grid](*tensors, *scalars, **constexprs, **options) for one launch shape. The first call
    with a new specialization goes through Triton's JIT and keeps its compiled kernel; later calls
    launch that kernel directly, skipping the JIT's argument binding and, while no launch hook is
    installed (a profiler's), the runner's hook metadata."""

    def __init__(self, kernel, grid, constexprs: dict, options: dict, on_cuda: bool):
        self.kernel = kernel
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.constexprs, self.options = constexprs, options
        self.cacheable = on_cuda and torch.version.hip is None and not interpreter_enabled()
        self.compiled: dict = {}
        self.trailing = None         # the constexprs in the kernel's argument order, after the runtime ones
        self.current_stream = None   # Triton's own stream query, looked up once

    def __call__(self, tensors: tuple, scalars: tuple):
        args = tensors + scalars
        if not (self.cacheable and triton.__version__.startswith(FAST_LAUNCH_TRITON)):
            with _interpreted():
                self.kernel[self.grid](*args, **self.constexprs, **self.options)
            return
        device = torch.cuda.current_device()      # Triton launches on the current device
        key = (device, tuple([t.dtype for t in tensors]), tuple([t.data_ptr() % 16 == 0 for t in tensors]),
               tuple(map(_scalar_class, scalars)))
        compiled = self.compiled.get(key)
        if compiled is None:
            compiled = self.kernel[self.grid](*args, **self.constexprs, **self.options)
            if len(self.compiled) >= _COMPILED_MAX:
                self.compiled.clear()
            self.compiled[key] = compiled
            self.trailing = tuple(self.constexprs[name] for name in self.kernel.arg_names[len(args):])
            self.current_stream = _driver.active.get_current_stream
            return
        # Triton's runner builds launch metadata for the launch hooks on every call. With no hook
        # installed (empty hook chains), launch as it would, with the hooks and their metadata None.
        enter, leave = _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
        if getattr(enter, "calls", True) or getattr(leave, "calls", True):
            compiled[self.grid](*args, *self.trailing)
            return
        compiled.run(*self.grid, self.current_stream(device), compiled.function, compiled.packed_metadata,
                     None, None, None, *args, *self.trailing)


@functools.lru_cache(maxsize=256)
def _recurrent_launch(on_cuda, N, H, K, V, w_form, has_state, store_final, varlen, cfg) -> CachedLaunch:
    BV = min(_pow2(V), cfg.block_v)
    return CachedLaunch(
        recurrent_fwd_kernel, (_cdiv(V, BV), N * H),
        dict(H=H, K=K, V=V, BK=_pow2(K), BV=BV, W_FORM=W_FORM_CODES[w_form], HAS_STATE=has_state,
             STORE_FINAL=store_final, IS_VARLEN=varlen),
        _launch_options(cfg), on_cuda)


def recurrent_forward(r, w, k, v, a, b, h0, *, scale, cu_seqlens, w_form, cfg: KernelConfig, store_final=True):
    r, w, k, v, a, b, h0, cu_seqlens = _contiguous(r, w, k, v, a, b, h0, cu_seqlens)
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = _num_sequences(B, cu_seqlens)
    o = torch.empty_like(v)
    state_dtype = h0.dtype if h0 is not None else torch.float32          # a 16-bit state stays 16-bit
    ht = torch.empty(N, H, K, V, dtype=state_dtype, device=k.device) if store_final else None
    shape = (H, K, V, w_form, h0 is not None, store_final, cu_seqlens is not None, cfg)
    if N * H <= GRID_YZ_MAX:                # decode's common case: no slicing on the host's path
        _recurrent_launch(k.is_cuda, N, *shape)(
            (r, w, k, v, a, b, o, _or(h0, v), _or(ht, v), _or(cu_seqlens, v)),
            (float(scale), T))
        return o, ht
    P = _Pairs(N, H, cu_seqlens is not None)
    args = (*(P.tokens(x) for x in (r, w, k, v, a, b, o)), P.rows(h0, v), P.rows(ht, v),
            P.bounds(cu_seqlens, v))
    for n0, n1 in P.slices():
        _recurrent_launch(k.is_cuda, n1 - n0, *shape)(
            tuple(x.cut(n0, n1) if isinstance(x, _Cut) else x for x in args), (float(scale), T))
    return o, ht
