"""``python -m fastprompt demo``: a short prompt-tuning run with fastprompt, loss going down.

A built-in tiny causal LM (random weights, frozen) learns, through its soft prompt alone, to predict a
fixed batch of token sequences; the loss is printed as it falls.
"""

from __future__ import annotations

import time
import warnings

import torch

from ..benchmarks.models import TrainStep
from ..testing.tiny_models import load_base_model, prompt_tuned


def run_demo(
    model_name: str = "tiny-llama",
    *,
    steps: int = 40,
    device: str | torch.device = "cpu",
    print_every: int = 5,
    lr: float = 0.3,
) -> tuple[float, float]:
    """Prompt-tune ``model_name`` with ``fastprompt.get_peft_model``; print the loss; (first, last) loss."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = load_base_model(model_name).to(device)
        model = prompt_tuned(base, "fastprompt", num_virtual_tokens=10)
    trainable, total = model.get_nb_trainable_parameters()
    print(f"{model_name} ({type(model).__name__}): {total:,} parameters, {trainable:,} trained (prompt)")
    step = TrainStep(model, batch=4, seq=16, lr=lr)
    start = time.perf_counter()
    first = last = float("nan")
    for i in range(1, steps + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            last = float(step())
        if i == 1:
            first = last
        if i == 1 or i % print_every == 0 or i == steps:
            print(f"step {i:3d}  loss {last:.4f}")
    print(f"loss {first:.4f} -> {last:.4f} in {steps} steps, {time.perf_counter() - start:.1f} s")
    return first, last
