"""The shared conformance suite as pytest, for vendors' CI: the same cases as
`python -m rwkv_backends.conformance` (SPEC §2), with stable ids and the seed in each failure.

    pytest conformance/ --wkv7-backend triton [--wkv7-tier full]

Without --wkv7-backend it checks the PyTorch backend on the CPU with the quick tier.
"""

import pytest

from rwkv_backends.conformance import full_cases, quick_cases
from rwkv_backends.conformance.runner import run_case


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        tier = metafunc.config.getoption("--wkv7-tier")
        cases = full_cases() if tier == "full" else quick_cases()
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


def test_case(case, wkv7_backend, wkv7_device, wkv7_seed):
    res = run_case(case, backend=wkv7_backend, device=wkv7_device, base_seed=wkv7_seed)
    if res["status"] == "skipped":
        pytest.skip(res["detail"])
    assert res["status"] == "passed", f"seed {res['seed']}: {res.get('detail')}"
