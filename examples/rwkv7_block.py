"""A minimal RWKV-7 time-mix block on rwkv_backends.wkv7, shared by the two examples.

It follows RWKV-7's structure in miniature:
- r, k, v projections;
- a data-dependent decay w in RWKV-LM's raw form (w_form="raw");
- a = -kk and b = kk * lr, with kk the unit-norm key per head and lr an in-context learning rate.
"""

import torch
import torch.nn.functional as F
from torch import nn

import rwkv_backends as rb


class TimeMix(nn.Module):
    def __init__(self, dim=64, head_size=16):
        super().__init__()
        self.H, self.N = dim // head_size, head_size
        self.r, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.w_lora = nn.Sequential(nn.Linear(dim, 16, bias=False), nn.Tanh(), nn.Linear(16, dim, bias=False))
        self.w0 = nn.Parameter(torch.full((dim,), -0.5))
        self.lr = nn.Linear(dim, dim)
        self.ln = nn.GroupNorm(self.H, dim)

    def forward(self, x, state=None):
        B, T, C = x.shape
        heads = lambda t: t.view(B, T, self.H, self.N)  # noqa: E731
        r, k, v = heads(self.r(x)), heads(self.k(x)), heads(self.v(x))
        w = heads(-F.softplus(-(self.w0 + self.w_lora(x))) - 0.5)   # raw form: decay = exp(-exp(w))
        lr = heads(torch.sigmoid(self.lr(x)))
        kk = F.normalize(k, dim=-1)
        o, state = rb.wkv7(r, w, k, v, -kk, kk * lr, state, w_form="raw")
        o = self.ln(o.reshape(B * T, C)).view(B, T, C)
        return self.o(o), state


class TinyLM(nn.Module):
    def __init__(self, vocab=32, dim=64, head_size=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = TimeMix(dim, head_size)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens, state=None):
        x = self.emb(tokens)
        y, state = self.mix(x, state)
        return self.head(x + y), state
