"""The environment variables that steer planning, read together into one frozen snapshot.

A call reads `Settings.read()` once; the snapshot is part of every plan cache key (dispatch's
per-call cache and registry's plan cache), and planning code asks `registry.planning_settings()`
for the snapshot it plans under instead of reading the environment again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .device import SIMULATE_ENV, detect, interpreter_enabled, profile
from .known_issues import GLUON_ENV

# Forces a backend ("triton", "pytorch") or a variant ("triton.chunk", ...) for every call.
BACKEND_ENV = "RWKV_BACKENDS_BACKEND"


@dataclass(frozen=True)
class Settings:
    """What steers planning besides the call itself."""

    backend: str | None      # BACKEND_ENV, None when unset or empty
    simulate: str | None     # SIMULATE_ENV: a vendor profile to plan for ("nvidia:sm90"), or None
    gluon: str | None        # GLUON_ENV: "0" keeps the Gluon kernels off, "check" runs them on unchecked releases
    interpreted: bool        # TRITON_INTERPRET: Triton kernels run through the interpreter

    @classmethod
    def read(cls) -> "Settings":
        """The snapshot of the current environment."""
        environ = os.environ
        return cls(backend=environ.get(BACKEND_ENV) or None,
                   simulate=environ.get(SIMULATE_ENV, "").strip() or None,
                   gluon=environ.get(GLUON_ENV),
                   interpreted=interpreter_enabled())

    def device(self, device=None):
        """The DeviceInfo to plan for: the simulated profile, or what `device` is."""
        return profile(self.simulate) if self.simulate else detect(device)
