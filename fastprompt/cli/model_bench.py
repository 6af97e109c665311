"""Model-level workloads of a prompt-tuned causal LM (timed by ``pytest bench`` and the CLI).

- ``TrainStep``: one prompt-tuning step (forward with labels, backward, AdamW step on the prompt).
- ``greedy_generate``: greedy decoding of a few new tokens.
"""

from __future__ import annotations

import torch

from .tiny_models import token_batch


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


def greedy_generate(
    model, input_ids: torch.Tensor, new_tokens: int, *, use_cache: bool = True
) -> torch.Tensor:
    """Greedy decoding of exactly ``new_tokens`` tokens after ``input_ids``; the generated ids.

    ``use_cache=False`` recomputes the whole sequence at every step: slow, but free of any KV-cache
    handling, so it is the reference the cached decoding must match.
    """
    model.eval()
    with torch.no_grad():
        return model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.config.eos_token_id,
            use_cache=use_cache,
        )
