"""The Hopper miscompiles flash-linear-attention reports for Triton 3.4 up to 3.7.1 (wrong gradients
at chunk 64: a `tl.trans` of an accumulated `tl.dot` result fed to another dot, and 4-warp programs
of a 64-row chunk) against our Triton kernels: every chunked variant's training at chunk 64, 4 and 8
warps, against the float64 reference. The tables run chunks of 16 and 32; this holds the kernels to
the reference where those miscompiles were seen, on whatever release the card has.

On Hopper the gradient kernel at chunk 64 is refused (known issue hopper-wgmma-gradient-chunk64:
its products all lower to wgmma there, and the H200 faulted with an illegal memory access in this
test's first case on Triton 3.6): there the test checks that the plan refuses it and says why. To
check a new release on a card, drop that entry's `refuses_config` and run this file."""

import pytest
import torch

from _support import patch_nvidia_tables_at_chunk, requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]

# kernel roles whose chunk size each variant's training takes from the table
_ROLES = {"triton.chunk": ("chunk_fwd", "chunk_bwd"),
          "triton.chunk_twopass": ("chunk_prep", "chunk_fwd_loaded", "chunk_bwd_split", "chunk_recompute"),
          "triton.chunk_transition": ("chunk_transition",)}


@pytest.mark.parametrize("num_warps", [4, 8])
@pytest.mark.parametrize("variant", sorted(_ROLES))
@pytest.mark.parametrize("regime", ["realistic", "strong", "unit"])
def test_gpu_chunk64_training_matches_the_reference(monkeypatch, num_warps, variant, regime):
    import triton

    from rwkv_backends import explain, registry
    from rwkv_backends.conformance import Case, make_inputs
    from rwkv_backends.conformance.runner import run_case
    patch_nvidia_tables_at_chunk(monkeypatch, 64, num_warps)
    case = Case("backward", "bfloat16", regime, 2, 300, 4, 64, 64)
    x = make_inputs(case, 0, "cuda")
    leaves = [x[n].requires_grad_() for n in ("r", "w", "k", "v", "a", "b")]
    # Hopper's 227 KB hold every kernel at these configs (compile_check); a smaller card may not
    hopper = torch.cuda.get_device_capability() >= (9, 0)
    if torch.cuda.get_device_capability()[0] == 9:
        with pytest.raises(registry.NoBackendError, match="hopper-wgmma-gradient-chunk64"):
            explain(*leaves, x["state"].requires_grad_(), backend=variant)
        registry._plan_cached.cache_clear()
        return
    plan = explain(*leaves, x["state"], backend=variant)
    chunks = {role: plan["config"][role]["chunk_size"] for role in _ROLES[variant] if role in plan["config"]}
    assert chunks and set(chunks.values()) == {64}, chunks
    try:
        res = run_case(case, backend=variant, device="cuda", base_seed=11)
    except triton.runtime.errors.OutOfResources as exc:
        if hopper:
            raise
        pytest.skip(f"{variant} at chunk 64, {num_warps} warps does not fit this card: {exc}")
    finally:
        registry._plan_cached.cache_clear()
    if res["status"] != "passed" and "OutOfResources" in str(res.get("detail")) and not hopper:
        pytest.skip(f"{variant} at chunk 64, {num_warps} warps does not fit this card")
    assert res["variant"] == variant
    assert res["status"] == "passed", res.get("detail")
