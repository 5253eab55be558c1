"""The benchmark script's pieces that run without a GPU."""

import pytest

from benchmarks.bench_wkv7 import plot_speedups, sweep_shapes


def test_plot_speedups_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"shape": n, "mode": m, "T": T, "ours": {"ms": 1.0}, "fla": {"ms": 1.0 + T / 2048}, "rwkv-fla": {"error": "x"}}
            for n, (m, B, T, H, K) in sweep_shapes([1024, 2048, 4096]).items()]
    out = tmp_path / "speedup.png"
    plot_speedups(rows, ["fla", "rwkv-fla"], str(out), "test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
