"""Test set-up. Without a GPU, Triton kernels run through the interpreter: the variable must be set
before any kernel is defined, so _support sets it as this conftest loads, before the tests import
rwkv_backends."""

import pytest

import _support  # noqa: F401  (sets TRITON_INTERPRET on CPU-only machines)


@pytest.fixture
def simulate(monkeypatch):
    """Plan as on a profile, with CPU tensors run through the interpreter (SPEC §5)."""
    def use(profile):
        monkeypatch.setenv("RWKV_BACKENDS_SIMULATE", profile)
    return use
