import os
import random

import pytest


def pytest_addoption(parser):
    parser.addoption("--wkv7-backend", default="pytorch", help="backend or variant to check (default: pytorch)")
    parser.addoption("--wkv7-tier", default="quick", choices=("quick", "full"))
    parser.addoption("--wkv7-device", default=None, help="torch device (default: the detected accelerator, else cpu)")
    parser.addoption("--wkv7-seed", type=int, default=None, help="base seed (default: fresh; printed)")


@pytest.fixture(scope="session")
def wkv7_backend(request):
    return request.config.getoption("--wkv7-backend")


@pytest.fixture(scope="session")
def wkv7_device(request, wkv7_backend):
    dev = request.config.getoption("--wkv7-device")
    if dev:
        return dev
    if wkv7_backend == "pytorch" or os.environ.get("RWKV_BACKENDS_SIMULATE"):
        return "cpu"
    from rwkv_backends.device import default_device
    return str(default_device())


@pytest.fixture(scope="session")
def wkv7_seed(request):
    seed = request.config.getoption("--wkv7-seed")
    seed = seed if seed is not None else random.SystemRandom().randrange(2 ** 31)
    print(f"\nwkv7 conformance base seed: {seed}")
    return seed
