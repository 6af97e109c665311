"""Helpers shared by the PEFT integration tests: counting fused-op calls and building model pairs."""

from __future__ import annotations

import copy

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastprompt.testing import tiny_models


class FastpromptOps(TorchDispatchMode):
    """Records every ``torch.ops.fastprompt.*`` call that reaches the dispatcher while active.

    ``ops.forward`` counts ``fastprompt.prompt_concat`` (one per fused concat), ``ops.names`` lists all.
    """

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastprompt":
            self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))

    @property
    def forward(self) -> int:
        return sum(name.startswith("prompt_concat.") for name in self.names)


def peft_config(task: str, num_virtual_tokens: int = 3, **kwargs):
    import peft

    return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=num_virtual_tokens, **kwargs)


def model_pair(family: str, task: str, *, num_virtual_tokens: int = 3, dtype=None, seed: int = 0):
    """(PEFT model, fastprompt model): the same base weights and the same prompt weights (RANDOM init)."""
    import peft

    import fastprompt

    base = tiny_models.build(family, task, seed=seed, dtype=dtype)
    torch.manual_seed(seed + 1)
    reference = peft.get_peft_model(copy.deepcopy(base), peft_config(task, num_virtual_tokens))
    torch.manual_seed(seed + 1)
    fast = fastprompt.get_peft_model(copy.deepcopy(base), peft_config(task, num_virtual_tokens))
    assert torch.equal(
        reference.prompt_encoder["default"].embedding.weight, fast.prompt_encoder["default"].embedding.weight
    )
    # classification heads are new modules_to_save copies: make them identical too
    fast.load_state_dict(reference.state_dict())
    return reference.eval(), fast.eval()


def main_output(output) -> torch.Tensor:
    """The first tensor a task model returns (logits, start_logits or last_hidden_state)."""
    for key in ("logits", "start_logits", "last_hidden_state"):
        if key in output:
            return output[key]
    raise KeyError(list(output.keys()))


class CausalRows(torch.utils.data.Dataset):
    """``n`` causal-LM rows of random tokens (labels = inputs, full attention mask), the same every time."""

    def __init__(self, n: int = 8, seq_len: int = 6):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(4, tiny_models.VOCAB, (n, seq_len), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def train(model, output_dir, *, max_steps: int = 3, **arguments) -> list[float]:
    """``Trainer`` over :class:`CausalRows` on the CPU (batch 4, lr 0.1, seed 0, ``arguments`` added to the
    ``TrainingArguments``); returns the logged losses."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=0.1,
        report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", seed=0, dataloader_num_workers=0,
        **arguments,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=CausalRows())
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def reset_accelerator_state() -> None:
    """Forget accelerate's process-wide ``AcceleratorState`` (its mixed precision among others): an
    ``Accelerator`` or ``Trainer`` with another ``mixed_precision`` than an earlier one raises otherwise."""
    try:
        from accelerate.state import AcceleratorState
    except ImportError:
        return
    AcceleratorState._reset_state()


def layer0_lengths(model) -> list:
    """The sequence lengths the first decoder layer of a PEFT model's base sees, one per call (a list the
    hook appends to): how tests see that the prompt ran once (``[N, L]``: the prompt pass, then the rows)."""
    lengths: list[int] = []
    decoder = model.get_base_model().get_decoder()
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    layers[0].register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    return lengths
