"""Drop-in adapters with the peers' exact signatures and conventions, all computing through
`rwkv_backends.wkv7`:

- `compat.fla`: fla-core 0.6.0's `chunk_rwkv7` and `fused_recurrent_rwkv7` (w = log-decay);
- `compat.rwkv_fla`: rwkv-fla's keyword forms (`w=` raw decay or `log_w=`);
- `compat.rwkvlm`: RWKV-LM's `RUN_CUDA_RWKV7g` on [B, T, C] tensors, a state-carrying form with
  RWKV-LM's [B, H, V, K] state layout, and the clampw form;
- `compat.patch_fla()`: routes an installed fla / rwkv-fla `RWKV7Attention` through `wkv7`.
"""

from .patch import patch_fla  # noqa: F401
