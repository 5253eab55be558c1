"""Backend registry and dispatcher.

A *variant* is one way to compute WKV7 ("triton.chunk", "triton.recurrent", "pytorch.chunk"). Each
says, for a problem on a device, why it cannot take it (an empty list means it can), which kernels
it launches, and runs. The dispatcher tries the variants in the vendor's order of preference for the
problem class, takes the first without reasons, looks its kernels' configs up in the vendor's
tuning tables (a variant whose kernel has no entry there is refused, and says so), narrows them by
the active known issues, and caches the whole decision.
"""

from __future__ import annotations

import contextvars
import functools
from dataclasses import dataclass, field

from . import known_issues
from .device import DeviceInfo, triton_version
from .problem import Problem
from .settings import BACKEND_ENV, Settings
from .tuning import MissingEntry, entry_provenance, lookup

# "0" keeps the Gluon kernels off (the tables' `gluon` configs run their Triton kernels instead):
# for comparing the two, or for a Triton build whose Gluon misbehaves before a known issue says so.
GLUON_ENV = known_issues.GLUON_ENV
# The settings a plan is being made under, for the variants' reasons and fit_configs.
_PLANNING: contextvars.ContextVar = contextvars.ContextVar("rwkv_backends_planning", default=None)

_VARIANTS: dict = {}
_generation = 0            # bumped by register(): callers that cache plans key on it


def generation() -> int:
    """Changes whenever the registered variants change, so plans cached elsewhere expire."""
    return _generation


class NoBackendError(ValueError):
    """No registered variant can take the inputs; the message lists every candidate's reasons."""


class Variant:
    """Base class. Subclasses set `name`, `backend`, `kernels` and implement `reasons` and `run`."""

    name: str = ""
    backend: str = ""
    kernels: tuple = ()            # table keys of the kernels it launches (see config.KERNELS)
    state_dtypes: tuple = ("float32",)   # state dtypes it keeps (problem.STATE_DTYPES lists the options)

    def reasons(self, problem: Problem, device: DeviceInfo, runtime: bool = True) -> list:
        """Why this variant cannot take `problem` on `device` (empty: it can). With runtime=False
        (planning for a simulated device or another Triton release) only the problem counts."""
        raise NotImplementedError

    def run(self, r, w, k, v, a, b, state, *, problem: Problem, plan: "Plan", cu_seqlens):
        """Returns (o in float32 or the input dtype, final state float32)."""
        raise NotImplementedError

    def fit_configs(self, problem: Problem, device: DeviceInfo, configs: dict) -> dict:
        """Changes this problem needs to its table configs (which are tuned per head size), as
        {kernel: (config, why)}; `why` goes into the plan's config_source. None by default."""
        return {}

    def backward(self, r, w, k, v, a, b, state, do, dstate, *, problem: Problem, plan: "Plan", cu_seqlens):
        """Gradients (dr, dw, dk, dv, da, db, dstate or None) from the inputs alone, without building
        an autograd graph: what the default train_backward calls."""
        raise NotImplementedError(f"{self.name} has no backward")

    # Whether train_forward keeps what train_backward needs (no forward in the backward). wkv7 then
    # trains through the torch.library op in eager mode too (ops.py); without, eager training calls
    # `run`, which builds the variant's own autograd graph.
    keeps_for_backward: bool = False

    def train_forward(self, r, w, k, v, a, b, state, *, problem: Problem, plan: "Plan", cu_seqlens) -> tuple:
        """(o, final state, kept): a training call's forward, without an autograd graph, and what
        train_backward needs beyond the inputs: up to KEPT_SLOTS float32 tensors, None where a
        slot stays empty. This default runs `run` without gradients and keeps nothing."""
        import dataclasses

        import torch
        with torch.no_grad():
            o, ht = self.run(r, w, k, v, a, b, state, problem=dataclasses.replace(problem, needs_grad=False),
                             plan=plan, cu_seqlens=cu_seqlens)
        return o, ht, ()

    def train_backward(self, r, w, k, v, a, b, state, do, dstate, kept, *, problem: Problem, plan: "Plan",
                       cu_seqlens) -> tuple:
        """Gradients (dr, dw, dk, dv, da, db, dstate or None) from the inputs and train_forward's kept
        tensors, each flattened to 1-D (KEPT_SLOTS of them; empty where train_forward kept None).
        This default calls `backward`, which runs the forward again."""
        return self.backward(r, w, k, v, a, b, state, do, dstate, problem=problem, plan=plan, cu_seqlens=cu_seqlens)


# How many tensors a train_forward may keep (the torch.library op returns that many, 1-D).
KEPT_SLOTS = 5
_TRAINING: dict = {}


def register_training(name: str, split) -> None:
    """Gives variant `name` the train_forward / train_backward / keeps_for_backward of `split`, for
    a variant whose own module does not define them."""
    _TRAINING[name] = split


def training_split(variant: Variant):
    """What trains `variant`: the split registered for it, or the variant itself."""
    return _TRAINING.get(variant.name, variant)


def register(variant: Variant) -> Variant:
    if variant.name in _VARIANTS:
        raise ValueError(f"variant {variant.name!r} is registered already")
    global _generation
    _VARIANTS[variant.name] = variant
    _generation += 1
    _plan_cached.cache_clear()
    return variant


def variants() -> dict:
    _ensure_builtin()
    return dict(_VARIANTS)


def backends() -> list:
    return sorted({v.backend for v in variants().values()})


@functools.lru_cache(maxsize=None)
def _ensure_builtin():
    from .backends import pytorch, pytorch_training, triton  # noqa: F401  (each registers its variants)


@dataclass(frozen=True)
class Plan:
    variant: Variant
    device: DeviceInfo
    configs: dict                  # kernel -> KernelConfig
    config_sources: dict           # kernel -> "vendor/arch/kernel/bucket" table entry it came from
    adjusted_by: dict              # kernel -> [known-issue ids that changed its config]
    rejected: dict                 # variant name -> [reasons]
    known_issues: tuple = field(default_factory=tuple)
    config_provenance: dict = field(default_factory=dict)   # kernel -> the table entry's provenance record

    def explain(self, problem: Problem) -> dict:
        return {
            "backend": self.variant.backend,
            "variant": self.variant.name,
            "problem_class": problem.problem_class,
            "problem": problem.describe(),
            "config": {k: c.as_dict() for k, c in self.configs.items()},
            "config_source": dict(self.config_sources),
            "config_provenance": {k: dict(v) for k, v in self.config_provenance.items()},
            "adjusted_by_known_issues": {k: list(v) for k, v in self.adjusted_by.items() if v},
            "rejected": {k: list(v) for k, v in self.rejected.items()},
            "device": self.device.as_dict(),
            "known_issues_active": list(self.known_issues),
        }


def planning_settings() -> Settings:
    """The settings the plan being made uses (a fresh snapshot outside planning)."""
    return _PLANNING.get() or Settings.read()


def plan(problem: Problem, device: DeviceInfo, backend: str | None = None, *,
         triton_version_as: str | None = None, runtime: bool = True, settings: Settings | None = None) -> Plan:
    """The variant and configs for `problem` on `device`; raises NoBackendError when none fits.
    `triton_version_as` plans as if that Triton release were installed (the doctor's option);
    `settings` is the environment snapshot to plan under (read now when None)."""
    _ensure_builtin()
    settings = settings or Settings.read()
    forced = backend or settings.backend
    if forced is not None and forced not in _VARIANTS and forced not in backends():
        source = "backend" if backend else BACKEND_ENV
        raise ValueError(f"{source}: unknown backend {forced!r}; registered backends: {', '.join(backends())}; "
                         f"variants: {', '.join(sorted(_VARIANTS))}")
    # The settings are part of the key: known issues (triton#11584, gluon-experimental) narrow
    # configs under the interpreter, and GLUON_ENV turns the Gluon kernels off.
    return _plan_cached(problem, device, forced, triton_version_as or triton_version(), runtime, settings)


@functools.lru_cache(maxsize=4096)
def _plan_cached(problem: Problem, device: DeviceInfo, forced: str | None, tv: str | None, runtime: bool,
                 settings: Settings) -> Plan:
    token = _PLANNING.set(settings)
    try:
        return _choose(problem, device, forced, tv, runtime)
    finally:
        _PLANNING.reset(token)


def _choose(problem: Problem, device: DeviceInfo, forced: str | None, tv: str | None, runtime: bool) -> Plan:
    from .vendors import preferences
    order = list(preferences(device).get(problem.problem_class, []))
    order += sorted(n for n in _VARIANTS if n not in order)
    issues = known_issues.active(device, tv)
    rejected = {}
    for name in order:
        variant = _VARIANTS.get(name)
        if variant is None:
            continue
        if forced is not None and forced not in (variant.name, variant.backend):
            rejected[name] = [f"not the forced backend {forced!r}"]
            continue
        reasons = list(variant.reasons(problem, device, runtime))
        state_dtype = str(problem.state_dtype).replace("torch.", "")
        if state_dtype not in variant.state_dtypes:
            reasons.append(f"{state_dtype} state: keeps only a {'/'.join(variant.state_dtypes)} state")
        if variant.backend == "triton":
            reasons += [f"{i.id}: {i.summary}" for i in issues if i.refuses]
        found = {}
        for kernel in variant.kernels:
            try:
                found[kernel] = lookup(device, kernel, problem), entry_provenance(device, kernel, problem)
            except MissingEntry as exc:
                if str(exc) not in reasons:
                    reasons.append(str(exc))
        if reasons:
            rejected[name] = reasons
            continue
        configs, sources, adjusted, provenance = {}, {}, {}, {}
        for kernel, ((cfg, source), prov) in found.items():
            configs[kernel], adjusted[kernel] = known_issues.constrain(kernel, cfg, issues)
            sources[kernel], provenance[kernel] = source, prov
        for kernel, (cfg, why) in variant.fit_configs(problem, device, configs).items():
            configs[kernel] = cfg
            sources[kernel] += f"; {why}"
        refused = [f"{i.id}: {why}" for kernel, cfg in configs.items() for i in issues
                   if (why := i.refuses_config(kernel, cfg))]
        if refused:
            rejected[name] = refused
            continue
        for other in order[order.index(name) + 1:]:
            if other in _VARIANTS and other not in rejected:
                rejected[other] = [f"lower in {device.vendor}'s order of preference for {problem.problem_class} than {name}"]
        return Plan(variant, device, configs, sources, adjusted, rejected, tuple(i.id for i in issues), provenance)
    lines = "\n".join(f"  {n}: " + "; ".join(rs) for n, rs in rejected.items())
    raise NoBackendError(f"no backend can take {problem.describe()} on {device.name} ({device.vendor}):\n{lines}")
