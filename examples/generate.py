"""Greedy generation with the tiny RWKV-7 block, carrying the state one token at a time; checks
that the step-by-step logits equal one call over the whole sequence."""

import torch

from rwkv7_block import TinyLM

torch.manual_seed(1)
model = TinyLM().eval()
prompt = torch.randint(0, 32, (1, 12))
with torch.no_grad():
    logits, state = model(prompt)                                      # prefill: state out
    tokens = [int(logits[0, -1].argmax())]
    step_logits = [logits[0, -1]]
    for _ in range(20):                                                # decode: T = 1, state carried
        logits, state = model(torch.tensor([[tokens[-1]]]), state)
        step_logits.append(logits[0, -1])
        tokens.append(int(logits[0, -1].argmax()))
    full, _ = model(torch.cat([prompt, torch.tensor([tokens[:-1]])], dim=1))
    err = (torch.stack(step_logits) - full[0, prompt.shape[1] - 1:]).abs().max().item()
print("generated:", tokens)
print(f"step-by-step vs one call, max |logit difference|: {err:.2e}")
assert err < 1e-4, "carrying the state did not reproduce the full-sequence logits"
