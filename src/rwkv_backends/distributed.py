"""Context parallelism for WKV7 (SPEC §7): the time axis split over the ranks of a process group.

    o, state_out = rwkv_backends.distributed.wkv7(r, w, k, v, a, b, state, group=group)

Each rank holds a contiguous slice of the time axis, the ranks in the order of their rank. The state
map over a slice is affine in the state that enters it, S_out = M S_in + P, with M (K x K) the
product of the slice's transitions diag(exp(L_t)) + b_t a_t^T and P (K x V) the state the slice
builds from zero. One call of `rwkv_backends.wkv7` with value width K + V, values [0, v] and initial
state [I, 0] gives both: the transitions act on rows, so every column evolves on its own, and the
identity columns carry no k v^T term. The ranks all-gather their (M, P), each folds in the ranks
before it to get its incoming state, and a plain local call gives its o. docs/context-parallel.md
describes the protocol, its cost and the gradient conventions.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .api import wkv7 as _local_wkv7
from .problem import validate
from .reference import W_FORMS

__all__ = ["wkv7"]

# The summary call runs at value width K + V where the Triton kernels take it (they take value
# heads up to 128, backends/triton.py MAX_HEAD); wider, M and P come from two calls of widths K and V.
FUSED_SUMMARY_MAX_WIDTH = 128

_ARGUMENTS = ("r", "w", "k", "v", "a", "b", "state", "cu_seqlens", "w_form", "scale",
              "output_final_state", "backend", "group")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The metadata every rank contributes (one all-gather of int64s before any data moves).
_META = ("error", "T", "B", "H", "K", "V", "N", "has_state", "varlen", "w_form", "scale",
         "output_final_state", "needs_grad", "dtype", "w_dtype", "cu_sum", "cu_weighted", "cu_last")
# What must agree across ranks, and the argument named when it does not.
_MUST_AGREE = (("B", "k"), ("H", "k"), ("K", "k"), ("V", "v"), ("dtype", "k"), ("w_dtype", "w"),
               ("varlen", "cu_seqlens"), ("N", "cu_seqlens"), ("cu_sum", "cu_seqlens"),
               ("cu_weighted", "cu_seqlens"), ("cu_last", "cu_seqlens"), ("has_state", "state"),
               ("w_form", "w_form"), ("scale", "scale"), ("output_final_state", "output_final_state"))


@dataclass(frozen=True)
class _Piece:
    """The part of one sequence that lies in one rank's slice."""

    seq: int          # sequence index (0 without cu_seqlens: the batch moves as one)
    lo: int           # local token range [lo, hi)
    hi: int
    carried: bool     # the sequence starts before this slice: its incoming state comes from the fold
    exported: bool    # other ranks need its outgoing state


def _plan_rank(bounds, start, end, output_final_state):
    """The pieces of the slice [start, end) of the concatenated sequences with offsets `bounds`."""
    pieces = []
    if end <= start:
        return pieces
    n = bisect.bisect_right(bounds, start) - 1        # the sequence holding token `start`
    while n < len(bounds) - 1 and bounds[n] < end:
        lo, hi = bounds[n], bounds[n + 1]
        if hi > lo and hi > start:
            pieces.append(_Piece(seq=n, lo=max(lo, start) - start, hi=min(hi, end) - start,
                                 carried=lo < start, exported=output_final_state or hi > end))
        n += 1
    return pieces


def _layout(pieces, rows, H, K, V):
    """Where a rank's exported states lie in its flat buffer: P rows (one [rows, H, K, V] block
    per exported piece, in order), then the carried piece's M, if exported. Returns ({sequence:
    position of its P block}, offset of M or None, used size)."""
    exported = [p for p in pieces if p.exported]
    position = {p.seq: i for i, p in enumerate(exported)}
    p_size = len(exported) * rows * H * K * V
    if exported and exported[0].carried:
        return position, p_size, p_size + rows * H * K * K
    return position, None, p_size


class _AllGather(torch.autograd.Function):
    """All-gather of equal flat buffers into [R, n]; the backward reduce-scatters, so every rank
    receives the sum over ranks of the gradients for its own buffer."""

    @staticmethod
    def forward(ctx, buf, group, comm_device):
        ctx.group, ctx.device, ctx.comm_device = group, buf.device, comm_device
        R = dist.get_world_size(group)
        src = buf.detach().to(comm_device).contiguous()
        out = src.new_empty(R * src.numel())
        _all_gather_flat(out, src, group)
        return out.view(R, -1).to(buf.device)

    @staticmethod
    def backward(ctx, grad):
        R = dist.get_world_size(ctx.group)
        src = grad.to(ctx.comm_device).contiguous().view(-1)
        out = src.new_empty(src.numel() // R)
        _reduce_scatter_flat(out, src, ctx.group)
        return out.to(ctx.device), None, None


class _Joined(torch.autograd.Function):
    """A copy of x with the gathered buffer as an input: a backward through it reaches the
    all-gather's backward, so this rank joins the reduce-scatter. For an o computed before the
    all-gather (a slice that starts no carried sequence, which makes no summary call)."""

    @staticmethod
    def forward(ctx, gathered, x):
        ctx.gathered_shape, ctx.gathered_dtype = gathered.shape, gathered.dtype
        ctx.gathered_device = gathered.device
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        zero = torch.zeros(ctx.gathered_shape, dtype=ctx.gathered_dtype, device=ctx.gathered_device)
        return zero, grad


def _all_gather_flat(out, src, group):
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, src, group=group)


def _reduce_scatter_flat(out, src, group):
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, src, op=dist.ReduceOp.SUM, group=group)


def _comm_device(group, device):
    """The device the collectives run on: the tensors' own, except CPU for a gloo group."""
    return torch.device("cpu") if dist.get_backend(group) == "gloo" else device


def _argument_of(error):
    """The argument an error message names (messages start with "name: ..."), else "r"."""
    head = str(error).partition(":")[0].strip()
    for name in _ARGUMENTS:
        if head == name or head.startswith(name + ","):
            return name
    return "r"


def _local_checks(r, w, k, v, a, b, state, w_form, scale, cu_seqlens, output_final_state, backend):
    """This rank's arguments, checked as far as they can be alone. Returns (metadata dict, the
    cu_seqlens offsets as a list or None)."""
    problem = validate(r, w, k, v, a, b, None, w_form=w_form, scale=scale, cu_seqlens=None,
                       output_final_state=output_final_state)
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend: expected a backend name (str) or None, got {type(backend).__name__}")
    B, T, H, K, V = problem.B, problem.T, problem.H, problem.K, problem.V
    bounds = None
    N = B
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor):
            raise TypeError(f"cu_seqlens: expected a torch.Tensor or None, got {type(cu_seqlens).__name__}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens: expected a 1-D tensor [N+1] with N >= 1, got shape "
                             f"{tuple(cu_seqlens.shape)}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens: expected dtype int32 or int64, got {cu_seqlens.dtype}")
        if B != 1:
            raise ValueError(f"cu_seqlens: packed sequences need B == 1, got B={B}")
        bounds = [int(x) for x in cu_seqlens.tolist()]
        if bounds[0] != 0:
            raise ValueError(f"cu_seqlens: expected global offsets starting at 0, got {bounds[0]}")
        if any(y < x for x, y in zip(bounds, bounds[1:])):
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got {bounds}")
        N = len(bounds) - 1
    if state is not None:
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"state: expected a torch.Tensor or None, got {type(state).__name__}")
        if tuple(state.shape) != (N, H, K, V):
            raise ValueError(f"state: expected shape [N, H, K, V] = {(N, H, K, V)}, got {tuple(state.shape)}")
        if state.dtype != torch.float32:
            raise TypeError(f"state: expected dtype float32, got {state.dtype}")
        if state.device != k.device:
            raise ValueError(f"state: expected a tensor on {k.device} (the device of k), got one on {state.device}")
    needs_grad = torch.is_grad_enabled() and any(
        x.requires_grad for x in (r, w, k, v, a, b, state) if x is not None)
    meta = dict(error=0, T=T, B=B, H=H, K=K, V=V, N=N, has_state=int(state is not None),
                varlen=int(bounds is not None), w_form=W_FORMS.index(w_form),
                scale=struct.unpack("<q", struct.pack("<d", float(scale)))[0],
                output_final_state=int(output_final_state), needs_grad=int(needs_grad),
                dtype=_DTYPES.index(k.dtype), w_dtype=_DTYPES.index(w.dtype),
                cu_sum=sum(bounds) if bounds else 0,
                cu_weighted=sum(i * x for i, x in enumerate(bounds)) % (1 << 61) if bounds else 0,
                cu_last=bounds[-1] if bounds else 0)
    return meta, bounds


def _exchange_metadata(meta, group, device):
    """All-gather every rank's metadata; returns one dict per rank."""
    R = dist.get_world_size(group)
    src = torch.tensor([meta.get(name, 0) for name in _META], dtype=torch.int64, device=device)
    out = src.new_empty(R * src.numel())
    _all_gather_flat(out, src, group)
    rows = out.view(R, -1).tolist()
    return [dict(zip(_META, row)) for row in rows]


def _check_group_metadata(metas, rank):
    """The same ValueError on every rank where any rank's arguments are bad or disagree."""
    for j, m in enumerate(metas):
        if m["error"] and j != rank:
            name = _ARGUMENTS[m["error"] - 1]
            raise ValueError(f"{name}: rank {j} of the group refused its {name} (its own error says why); "
                             "every rank of the group raises")
    first = metas[0]
    for key, name in _MUST_AGREE:
        for j, m in enumerate(metas):
            if m[key] != first[key]:
                raise ValueError(f"{name}: expected the same {key} on every rank of the group, "
                                 f"got {first[key]} on rank 0 and {m[key]} on rank {j}")
    for j, m in enumerate(metas):
        if m["needs_grad"] != first["needs_grad"]:
            raise ValueError(f"r: expected every rank of the group to need gradients or none to, got "
                             f"needs_grad={bool(first['needs_grad'])} on rank 0 and {bool(m['needs_grad'])} "
                             f"on rank {j} (the backward is a collective)")
    if first["varlen"]:
        lengths = [m["T"] for m in metas]
        if sum(lengths) != first["cu_last"]:
            raise ValueError(f"cu_seqlens: expected it to end at the total of the slice lengths, "
                             f"{sum(lengths)} (slices {lengths}), got {first['cu_last']}")


def wkv7(r, w, k, v, a, b, state=None, *, group=None, w_form="log", scale=1.0, cu_seqlens=None,
         output_final_state=True, backend=None):
    """WKV7 with the time axis split over the ranks of `group` (the world without one), SPEC §7.

    Each rank passes its contiguous slice of the time axis ([B, T_rank, H, K] and [B, T_rank, H, V];
    any length, empty allowed; the slices in the order of the ranks). `state` [N, H, K, V] float32
    is the initial state of the whole sequence(s), the same on every rank. `cu_seqlens` holds global
    offsets into the concatenation of the slices (B must be 1): sequences may start, end or span
    ranks, and every rank passes the same tensor. Returns (o [B, T_rank, H, V] for this rank's
    slice, state_out [N, H, K, V] float32, the final state of every sequence, on every rank; or
    None when output_final_state=False). `backend` forces the backend of the local calls.

    Gradients reach every input. Gradients for the replicated state_out are summed over ranks (as
    with torch.distributed.nn's collectives); the gradient of `state` is split over the ranks so
    that its sum over ranks is the full gradient. Every rank of the group makes the call, and every
    rank runs the backward through it when one does. A bad argument on any rank raises a ValueError
    or TypeError naming it on every rank; that `state` holds the same values everywhere is not
    checked.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialized (call "
                         "torch.distributed.init_process_group first)")
    if group is None:
        group = dist.group.WORLD
    rank, R = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the group")
    like = next((x for x in (k, v, r, w, a, b) if isinstance(x, torch.Tensor)), None)
    device = like.device if like is not None else torch.device("cpu")
    comm = _comm_device(group, device)

    try:
        meta, bounds = _local_checks(r, w, k, v, a, b, state, w_form, scale, cu_seqlens,
                                     output_final_state, backend)
        local_error = None
    except (TypeError, ValueError) as error:
        meta, bounds, local_error = {"error": _ARGUMENTS.index(_argument_of(error)) + 1}, None, error
    metas = _exchange_metadata(meta, group, comm)
    if local_error is not None:
        raise local_error
    _check_group_metadata(metas, rank)

    B, H, K, V = meta["B"], meta["H"], meta["K"], meta["V"]
    lengths = [m["T"] for m in metas]
    starts = [sum(lengths[:j]) for j in range(R)]
    if bounds is None:
        bounds, rows = [0, sum(lengths)], B     # one sequence whose B rows move together
    else:
        rows = 1
    N = len(bounds) - 1
    plans = [_plan_rank(bounds, starts[j], starts[j] + lengths[j], output_final_state) for j in range(R)]
    layouts = [_layout(p, rows, H, K, V) for p in plans]
    width = max(size for _, _, size in layouts)
    row_size = H * K * V
    width = -(-width // row_size) * row_size       # whole P rows, so the gathered buffer views as rows
    needs_grad = bool(meta["needs_grad"])

    def local(lo, hi, st, cu=None, final=True, values=None):
        """rwkv_backends.wkv7 on local tokens [lo, hi) (values replaces v there when given)."""
        vv = v[:, lo:hi] if values is None else values
        return _local_wkv7(r[:, lo:hi], w[:, lo:hi], k[:, lo:hi], vv, a[:, lo:hi], b[:, lo:hi], st,
                           w_form=w_form, scale=scale, cu_seqlens=cu, output_final_state=final,
                           backend=backend)

    pieces = plans[rank]
    head = pieces[0] if pieces and pieces[0].carried else None
    rest = pieces[1:] if head is not None else pieces

    # The carried piece's summary (M, P), before any communication.
    summary = None
    if head is not None and head.exported:
        summary = _summary(local, v, head.hi, rows, H, K, V)

    # The pieces that start in this slice, from their own initial states.
    o_rest, finals_rest = None, None
    if rest:
        lo, T_local = rest[0].lo, lengths[rank]
        seqs = [p.seq for p in rest]
        if meta["varlen"]:
            cu = torch.tensor([p.lo - lo for p in rest] + [T_local - lo], dtype=torch.int32, device=device)
            st = None if state is None else state.index_select(0, torch.tensor(seqs, device=device))
        else:
            cu, st = None, state
        o_rest, finals_rest = local(lo, T_local, st, cu, final=any(p.exported for p in rest))

    gathered = None
    if width:
        parts = []
        if summary is not None:
            parts.append(summary[1].reshape(-1))
        parts += [finals_rest[i * rows:(i + 1) * rows].reshape(-1)
                  for i, p in enumerate(rest) if p.exported]
        if summary is not None:
            parts.append(summary[0].reshape(-1))
        used = sum(x.numel() for x in parts)
        parts.append(torch.zeros(width - used, dtype=torch.float32, device=device))
        buf = torch.cat(parts)
        if needs_grad and not buf.requires_grad:
            buf.requires_grad_()                   # this rank still joins the backward's collective
        gathered = _AllGather.apply(buf, group, comm)

    fold = _Fold(gathered, plans, layouts, rows, H, K, V, width, state, N, device)
    o_head = None
    if head is not None:
        s_in = fold.state_before(head.seq, rank)
        o_head, _ = local(0, head.hi, s_in, final=False)

    if o_head is not None and o_rest is not None:
        o = torch.cat([o_head, o_rest], dim=1)
    else:
        o = o_head if o_head is not None else o_rest
    if o is None:                                  # an empty slice
        o, _ = local(0, 0, None, final=False)

    if gathered is not None and head is None:
        o = _Joined.apply(gathered, o)             # o_head and state_out depend on it already
    state_out = fold.finals(bounds) if output_final_state else None
    return o, state_out


def _summary(local, v, T, rows, H, K, V):
    """(M [rows, H, K, K], P [rows, H, K, V]) of tokens [0, T): the slice's state map S -> M S + P."""
    eye = torch.eye(K, dtype=torch.float32, device=v.device).expand(rows, H, K, K)
    zeros_v = torch.zeros(rows, H, K, V, dtype=torch.float32, device=v.device)
    if K + V <= FUSED_SUMMARY_MAX_WIDTH:
        values = torch.cat([v.new_zeros(rows, T, H, K), v[:, :T]], dim=-1)
        _, final = local(0, T, torch.cat([eye, zeros_v], dim=-1), values=values)
        return final[..., :K], final[..., K:]
    _, M = local(0, T, eye.contiguous(), values=v.new_zeros(rows, T, H, K))
    _, P = local(0, T, None)
    return M, P


class _Fold:
    """The states between slices, from the gathered summaries: every rank computes the same ones.
    The fold runs in float64 (a few K x K by K x V products per sequence that spans ranks)."""

    def __init__(self, gathered, plans, layouts, rows, H, K, V, width, state, N, device):
        self.gathered, self.plans, self.layouts, self.device = gathered, plans, layouts, device
        self.rows, self.H, self.K, self.V, self.width = rows, H, K, V, width
        self.state, self.N = state, N
        self.touching = {}                 # seq -> [(rank, piece)] in rank order
        for j, pieces in enumerate(plans):
            for p in pieces:
                self.touching.setdefault(p.seq, []).append((j, p))
        self.walks = {}                    # seq -> {rank: state after that rank's piece}

    def _p_row(self, rank, piece):
        """Index of the piece's first P row in the gathered buffer viewed as rows."""
        position = self.layouts[rank][0][piece.seq]
        return rank * (self.width // (self.H * self.K * self.V)) + position * self.rows

    def _p(self, rank, piece):
        i = self._p_row(rank, piece)
        return self.gathered.view(-1, self.H, self.K, self.V)[i:i + self.rows]

    def _m(self, rank):
        offset = self.layouts[rank][1]
        size = self.rows * self.H * self.K * self.K
        return self.gathered[rank, offset:offset + size].view(self.rows, self.H, self.K, self.K)

    def _walk(self, seq, upto=None):
        """States of `seq` after each touching rank's piece (ranks before `upto` only, if given)."""
        walk = self.walks.setdefault(seq, {})
        S = None
        for j, p in self.touching[seq]:
            if upto is not None and j >= upto:
                break
            if j not in walk:
                if not p.carried:
                    walk[j] = self._p(j, p).double()
                else:
                    walk[j] = torch.matmul(self._m(j).double(), S) + self._p(j, p).double()
            S = walk[j]
        return S

    def state_before(self, seq, rank):
        """The state entering `rank`'s piece of `seq` (a sequence that started on an earlier rank)."""
        return self._walk(seq, upto=rank).float()

    def finals(self, bounds):
        """The final state of every sequence, [N * rows, H, K, V] float32."""
        rows, H, K, V = self.rows, self.H, self.K, self.V
        device = self.device
        if self.state is not None:
            initial = self.state
        else:
            initial = torch.zeros(self.N * rows, H, K, V, dtype=torch.float32, device=device)
        if self.gathered is None:                  # no tokens anywhere
            return initial.clone() if self.state is not None else initial
        gathered_rows = self.gathered.view(-1, H, K, V)
        n_gathered = gathered_rows.shape[0]
        spanning, index = [], []
        for n in range(self.N):
            where = self.touching.get(n)
            if where is None:                      # an empty sequence keeps its initial state
                first = n_gathered + n * rows
            elif len(where) == 1:
                first = self._p_row(*where[0])
            else:
                first = -1 - len(spanning)
                spanning.append(self._walk(n).float())
            index.append(first)
        offset = n_gathered + initial.shape[0]
        index = [offset + (-1 - i) * rows if i < 0 else i for i in index]
        flat = torch.tensor([i + j for i in index for j in range(rows)], dtype=torch.int64, device=device)
        sources = torch.cat([gathered_rows, initial, *spanning], dim=0)
        return sources.index_select(0, flat)
