"""pytorch.chunk's training split for the torch.library op: pytorch_chunked's forward keeps what
its backward takes (step by step: every state and every a-read; by chunks: the chunk start
states; packed sequences: each length class's, in one buffer), so the backward runs no forward.
The variant's own `run` keeps its autograd Functions for callers that use it directly."""

from __future__ import annotations

import torch

from .. import pytorch_chunked as pc
from ..reference import log_decay
from ..registry import register_training
from .pytorch import _dw


def _layout(k, v, cu_seqlens):
    """("step", "chunk" or "packed", the chunk size, the _Packing or None), as run_chunked chooses."""
    T = k.shape[1]
    chunk = pc.DEFAULT_CHUNK if cu_seqlens is not None else pc.chunk_for(T)
    if cu_seqlens is not None:
        return "packed", chunk, pc._Packing(cu_seqlens, k.device, chunk)
    return ("step" if T <= pc.SHORT_MAX else "chunk"), chunk, None


def _class_shapes(pack, H, K, V) -> list:
    """The shapes packed_forward keeps, class by class, in its order."""
    shapes = []
    for g in pack.classes:
        Z = g.n * H
        if g.Tp <= pc.SHORT_MAX:
            shapes += [(g.Tp + 1, Z, K, V), (g.Tp, Z, 1, V)]
        else:
            shapes.append((max(1, -(-g.Tp // g.chunk)), Z, K, V))
    return shapes


class PyTorchTraining:
    keeps_for_backward = True

    def train_forward(self, r, w, k, v, a, b, state, *, problem, plan, cu_seqlens):
        L = log_decay(w.float(), problem.w_form)
        if state is None:
            state = torch.zeros(problem.N, problem.H, problem.K, problem.V, dtype=torch.float32, device=k.device)
        path, chunk, pack = _layout(k, v, cu_seqlens)
        with pc._float32_math(k.device):
            if path == "step":
                o, final, kept = pc.step_forward(r, L, k, v, a, b, state.float(), problem.scale, keep=True)
            elif path == "chunk":
                o, final, starts = pc.chunked_forward(r, L, k, v, a, b, state.float(), problem.scale, chunk)
                kept = (starts,)
            else:
                o, final, starts = pc.packed_forward(pack, r, L, k, v, a, b, state.float(), problem.scale)
                parts = [x.reshape(-1) for s in starts for x in (s if isinstance(s, tuple) else (s,))]
                kept = (torch.cat(parts) if parts else None,)
        return o, final, kept

    def train_backward(self, r, w, k, v, a, b, state, do, dstate, kept, *, problem, plan, cu_seqlens):
        w32 = w.float()
        L = log_decay(w32, problem.w_form)
        B, T, H, K = k.shape
        V = v.shape[-1]
        path, chunk, pack = _layout(k, v, cu_seqlens)
        with pc._float32_math(k.device):
            if path == "step":
                saved = (kept[0].view(T + 1, B * H, K, V), kept[1].view(T, B * H, 1, V))
                grads = pc.step_backward(r, L, k, v, a, b, saved, do, dstate, problem.scale)
            elif path == "chunk":
                starts = kept[0].view(-1, B * H, K, V)
                grads = pc.chunked_backward(r, L, k, v, a, b, starts, do, dstate, problem.scale, chunk)
            else:
                shapes = _class_shapes(pack, H, K, V)
                flat = kept[0].split([int(torch.Size(s).numel()) for s in shapes])
                views = iter(x.view(s) for x, s in zip(flat, shapes))
                starts = [(next(views), next(views)) if g.Tp <= pc.SHORT_MAX else next(views) for g in pack.classes]
                grads = pc.packed_backward(pack, r, L, k, v, a, b, starts, do, dstate, problem.scale)
        dr, dL, dk, dv, da, db, dst = grads
        dw = _dw(dL.float(), w32, L, problem.w_form)
        out = [g.to(x.dtype) for g, x in zip((dr, dw, dk, dv, da, db), (r, w, k, v, a, b))]
        return (*out, dst.to(state.dtype) if state is not None else None)


register_training("pytorch.chunk", PyTorchTraining())
