"""Model-level workloads of a prompt-tuned causal LM (timed by ``pytest bench`` and the CLI).

- ``TrainStep``: one prompt-tuning step (forward with labels, backward, AdamW step on the prompt).
- ``greedy_generate`` (from ``fastprompt.testing.tiny_models``): greedy decoding of a few new tokens.
"""

from __future__ import annotations

import torch

from ..testing.tiny_models import greedy_generate, token_batch

__all__ = ["TrainStep", "greedy_generate"]


class TrainStep:
    """One training step of ``model`` on a fixed random batch; call it to run a step, get the loss."""

    def __init__(self, model, batch: int, seq: int, *, lr: float = 1e-3, seed: int = 0):
        self.model = model
        self.input_ids = token_batch(model, batch, seq, seed=seed)
        self.attention_mask = torch.ones_like(self.input_ids)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr)

    def __call__(self) -> float:
        self.model.train()
        out = self.model(input_ids=self.input_ids, attention_mask=self.attention_mask, labels=self.input_ids)
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()
