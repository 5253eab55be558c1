"""The examples run as a user would run them (each checks its own result and exits non-zero on failure)."""

import os
import subprocess
import sys

import pytest

from _support import REPO

EXAMPLES = ["demo.py", "train_time_mix.py", "generate.py", "context_parallel.py"]


@pytest.mark.parametrize("script", EXAMPLES)
def test_example_runs(script):
    env = {k: v for k, v in os.environ.items() if k not in ("RWKV_BACKENDS_SIMULATE",)}
    res = subprocess.run([sys.executable, script], cwd=REPO / "examples", capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
