"""Shared by the adapters: the peers accept a state of any float dtype; wkv7 wants float32."""

import torch


def float_state(state):
    return None if state is None else state.float()


def reject(name, value, why):
    if value:
        raise NotImplementedError(f"{name}: {why}")


def default_scale(scale, k: torch.Tensor):
    """fused_recurrent_rwkv7's default: 1/sqrt(K) when scale is None."""
    return k.shape[-1] ** -0.5 if scale is None else scale
