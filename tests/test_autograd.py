"""One autograd path: a training step (forward and backward) runs the forward once, eager and under
torch.compile, for the Triton variants and the PyTorch backend; the kept tensors' layout; the
settings snapshot that keys the plans; the api/ops import cycle."""

import collections
import functools
import os
import subprocess
import sys

import pytest
import torch

import rwkv_backends as rb
from _support import HAS_GPU
from rwkv_backends import pytorch_chunked
from rwkv_backends.backends import pytorch as pytorch_backend
from rwkv_backends.conformance import Case, make_inputs

NAMES = ("r", "w", "k", "v", "a", "b")
interpreter = pytest.mark.skipif(HAS_GPU or os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter run")


class _ForwardCounter:
    """Counts forward passes: outermost calls of the forward entry points, outside a backward
    (whose state recompute may call a forward kernel of its own)."""

    def __init__(self):
        self.forwards = 0
        self.depth = 0
        self.in_backward = 0

    def forward(self, fn):
        @functools.wraps(fn)
        def run(*args, **kw):
            if self.depth == 0 and not self.in_backward:
                self.forwards += 1
            self.depth += 1
            try:
                return fn(*args, **kw)
            finally:
                self.depth -= 1
        return run

    def backward(self, fn):
        @functools.wraps(fn)
        def run(*args, **kw):
            self.in_backward += 1
            try:
                return fn(*args, **kw)
            finally:
                self.in_backward -= 1
        return run


@pytest.fixture
def counter(monkeypatch):
    from rwkv_backends.kernels import backward, chunk, recurrent, training, transition, twopass
    c = _ForwardCounter()
    # each launcher where it is defined, and where training.py holds it by name
    forwards = {training: ("training_forward", "chunk_forward", "twopass_forward", "transition_twopass"),
                chunk: ("chunk_forward",), twopass: ("twopass_forward",), transition: ("transition_twopass",),
                recurrent: ("recurrent_forward",)}
    for module, names in forwards.items():
        for name in names:
            monkeypatch.setattr(module, name, c.forward(getattr(module, name)))
    for module, name in ((training, "training_backward"), (training, "chunk_backward"), (backward, "chunk_backward")):
        monkeypatch.setattr(module, name, c.backward(getattr(module, name)))
    for module in (pytorch_chunked, pytorch_backend):
        for name in ("step_forward", "chunked_forward", "packed_forward", "step_decode"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, c.forward(getattr(module, name)))
        for name in ("step_backward", "chunked_backward", "packed_backward"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, c.backward(getattr(module, name)))
    return c


def _inputs(T, seqlens=None):
    if seqlens:
        case = Case("backward", "float32", "realistic", 1, sum(seqlens), 2, 16, 16, seqlens=seqlens)
        return make_inputs(case, 4, "cpu")
    return make_inputs(Case("backward", "float32", "realistic", 2, T, 2, 16, 16), 4, "cpu")


def _step(x, mode, **kw):
    """One forward and backward; returns the input gradients."""
    def loss(r, w, k, v, a, b, s):
        o, st = rb.wkv7(r, w, k, v, a, b, s, **kw)
        return (o.float() * x["do"]).sum() + (st * x["dstate"]).sum()

    fn = loss if mode == "eager" else torch.compile(loss, fullgraph=True, backend="aot_eager")
    leaves = [x[n].clone().requires_grad_(True) for n in NAMES] + [x["state"].clone().requires_grad_(True)]
    return torch.autograd.grad(fn(*leaves), leaves)


def _forwards_per_step(counter, x, mode, **kw):
    torch._dynamo.reset()
    if mode == "compiled":
        _step(x, mode, **kw)                   # the first call traces (fake tensors run nothing)
    counter.forwards = 0
    grads = _step(x, mode, **kw)
    assert all(torch.isfinite(g).all() for g in grads)
    return counter.forwards


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("T, seqlens", [(20, None), (12, None), (None, (12, 0, 25))],
                         ids=["chunked", "step", "packed"])
def test_pytorch_backend_runs_one_forward_per_training_step(counter, monkeypatch, mode, T, seqlens):
    monkeypatch.setenv("RWKV_BACKENDS_BACKEND", "pytorch")
    x = _inputs(T, seqlens)
    kw = dict(cu_seqlens=x["cu_seqlens"]) if seqlens else {}
    assert _forwards_per_step(counter, x, mode, **kw) == 1


@interpreter
@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("variant", [None, "triton.chunk", "triton.chunk_twopass"])
def test_triton_variants_run_one_forward_per_training_step(counter, simulate, monkeypatch, mode, variant):
    simulate("nvidia:sm90")
    if variant:
        monkeypatch.setenv("RWKV_BACKENDS_BACKEND", variant)
    assert _forwards_per_step(counter, _inputs(37), mode) == 1


def test_compiled_training_graph_saves_what_the_forward_keeps():
    """The forward graph's wkv7 node returns the kept tensors, which the backward graph takes as
    inputs and hands to its one wkv7_backward node; the backward graph holds no forward node."""
    from torch._dynamo.backends.common import aot_autograd
    graphs = []

    def keep(gm, _):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    x = _inputs(20)
    leaves = [x[n].clone().requires_grad_(True) for n in NAMES] + [x["state"].clone().requires_grad_(True)]
    f = torch.compile(lambda *t: rb.wkv7(*t)[0].sum(), fullgraph=True,
                      backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
    f(*leaves).backward()
    fw, bw = graphs
    forward_ops = [n for n in fw.graph.nodes if n.target is torch.ops.rwkv_backends.wkv7.default]
    backward_ops = [n for n in bw.graph.nodes if n.target is torch.ops.rwkv_backends.wkv7_backward.default]
    assert len(forward_ops) == 1 and len(backward_ops) == 1
    assert not [n for n in bw.graph.nodes if n.target is torch.ops.rwkv_backends.wkv7.default]
    kept = backward_ops[0].args[10]          # the kept tensors: inputs of the backward graph
    assert isinstance(kept, (list, tuple)) and len(kept) == 5 and all(n.op == "placeholder" for n in kept)


@interpreter
def test_kept_layout_gives_the_shapes_training_forward_keeps():
    from rwkv_backends.config import KernelConfig
    from rwkv_backends.kernels import training as launch
    c16 = KernelConfig(chunk_size=16, block_v=16)
    plans = [
        launch.TrainingPlan(c16, c16),
        launch.TrainingPlan(c16.with_(chunk_size=32), c16),            # no matrices kept
        launch.TrainingPlan(c16, c16.with_(keep_u=True), cfg_states=c16),
        launch.TrainingPlan(c16, c16, cfg_prep=c16, prep_programs=2),
        launch.TrainingPlan(c16, c16, cfg_prep=c16, prep_programs=2, segments=3, cfg_states=c16),
        launch.TrainingPlan(c16, c16, cfg_prep=c16, prep_programs=2, segments=3, transitions=True),
    ]
    for seqlens in (None, (12, 0, 25)):
        x = _inputs(37, seqlens)
        cu = x["cu_seqlens"] if seqlens else None
        ins = [x[n] for n in NAMES]
        for how in plans:
            _, _, kept, seg_len = launch.training_forward(*ins, x["state"], scale=1.0, cu_seqlens=cu, w_form="log",
                                                          how=how)
            shapes, layout_seg_len = launch.kept_layout(x["r"], x["k"], x["v"], cu, how)
            assert shapes == tuple(None if t is None else tuple(t.shape) for t in kept), how
            assert layout_seg_len == seg_len, how


class _CountingEnviron(collections.abc.MutableMapping):
    def __init__(self, real):
        self.real, self.reads = real, collections.Counter()

    def __getitem__(self, key):
        self.reads[key] += 1
        return self.real[key]

    def get(self, key, default=None):
        self.reads[key] += 1
        return self.real.get(key, default)

    def __contains__(self, key):
        self.reads[key] += 1
        return key in self.real

    def __setitem__(self, key, value):
        self.real[key] = value

    def __delitem__(self, key):
        del self.real[key]

    def __iter__(self):
        return iter(self.real)

    def __len__(self):
        return len(self.real)


def test_a_call_reads_each_setting_once(monkeypatch):
    """A call reads the environment once, into the settings snapshot that keys the plans, and the
    planning steps use that snapshot."""
    from rwkv_backends import dispatch, registry
    x = _inputs(20)
    args = [x[n] for n in NAMES]
    watched = ("RWKV_BACKENDS_BACKEND", "RWKV_BACKENDS_GLUON", "TRITON_INTERPRET")
    for fresh in (True, False):
        if fresh:
            dispatch._PLANNED.clear()
            registry._plan_cached.cache_clear()
        environ = _CountingEnviron(os.environ)
        monkeypatch.setattr(os, "environ", environ)
        rb.wkv7(*args, x["state"])
        monkeypatch.setattr(os, "environ", environ.real)
        # known_issues' predicates (run while a plan is made, under its snapshot's key) read the
        # interpreter setting themselves.
        checked = watched[:2] if fresh else watched
        assert {name: environ.reads[name] for name in checked} == dict.fromkeys(checked, 1), fresh


def test_settings_snapshot_keys_the_plan_caches(monkeypatch):
    """A setting that changes gives a new snapshot, and with it a new plan in both caches."""
    from rwkv_backends import dispatch, registry
    from rwkv_backends.settings import Settings
    x = _inputs(20)
    dispatch._PLANNED.clear()
    registry._plan_cached.cache_clear()
    snapshots = []
    for gluon in ("0", "1", "0"):
        monkeypatch.setenv("RWKV_BACKENDS_GLUON", gluon)
        snapshots.append(Settings.read())
        rb.wkv7(*(x[n] for n in NAMES), x["state"])
    assert snapshots[0] == snapshots[2] != snapshots[1] and snapshots[1].gluon == "1"
    assert {key[3] for key in dispatch._PLANNED} == set(snapshots)
    assert registry._plan_cached.cache_info().currsize == 2


def test_api_and_ops_do_not_import_each_other():
    import ast
    import pathlib
    src = pathlib.Path(rb.__file__).parent
    for name, other in (("api", "ops"), ("ops", "api")):
        tree = ast.parse((src / f"{name}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported.add(node.module or "")
                imported.update(a.name for a in node.names if not node.module)
        assert other not in imported, f"{name} imports {other}"


def test_compat_is_an_attribute_and_the_package_is_typed():
    code = "import rwkv_backends, sys; f = rwkv_backends.compat.patch_fla; print(callable(f))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.strip() == "True", out.stderr
    import pathlib
    assert (pathlib.Path(rb.__file__).parent / "py.typed").is_file()


def test_wkv7_and_explain_docstrings_run():
    import doctest

    from rwkv_backends import api
    for fn in (api.wkv7, api.explain):
        assert all(part in fn.__doc__ for part in ("Args:", "Returns:", "Raises:", "Example:")), fn.__name__
    assert doctest.testmod(api).failed == 0
