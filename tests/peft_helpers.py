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


def with_labels(inputs: dict, task: str) -> dict:
    """``inputs`` (``tiny_models.batch``) with the targets of PEFT task ``task``: CAUSAL_LM labels where
    the mask is on, 4 Seq2Seq label tokens, SEQ_CLS classes (random, seed 3); other tasks none."""
    batch = inputs["input_ids"].shape[0]
    generator = torch.Generator().manual_seed(3)
    if task == "CAUSAL_LM":
        inputs["labels"] = torch.where(inputs["attention_mask"].bool(), inputs["input_ids"], -100)
    elif task == "SEQ_2_SEQ_LM":
        inputs["labels"] = torch.randint(4, tiny_models.VOCAB, (batch, 4), generator=generator)
    elif task == "SEQ_CLS":
        inputs["labels"] = torch.randint(0, 3, (batch,), generator=generator)
    return inputs


def assert_same_step(reference, fast, inputs: dict, **fast_kwargs):
    """One forward/backward of ``fast`` (with ``fast_kwargs``) against PEFT's ``reference`` on ``inputs``:
    the loss, the main output and every trainable parameter's gradient equal within fp32 rounding, with a
    random upstream gradient on the output besides the loss. Returns ``fast``'s output."""
    reference.zero_grad(set_to_none=True)
    fast.zero_grad(set_to_none=True)
    expected, got = reference(**inputs), fast(**inputs, **fast_kwargs)
    out_ref, out_fast = main_output(expected), main_output(got)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(11))
    loss_ref, loss_fast = (out_ref * upstream).sum(), (out_fast * upstream).sum()
    if expected.get("loss") is not None:
        torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-5)
        loss_ref, loss_fast = loss_ref + expected.loss, loss_fast + got.loss
    loss_ref.backward()
    loss_fast.backward()
    fast_params = {name: p for name, p in fast.named_parameters() if p.requires_grad}
    ref_params = {name: p for name, p in reference.named_parameters() if p.requires_grad}
    assert ref_params.keys() == fast_params.keys()
    for name, param in ref_params.items():
        assert param.grad is not None and fast_params[name].grad is not None, name
        scale = max(1.0, param.grad.abs().max().item())
        torch.testing.assert_close(fast_params[name].grad, param.grad, rtol=1e-5, atol=1e-5 * scale)
    return got


@torch.no_grad()
def uncached_greedy(peft_model, input_ids, steps: int, task_ids=None) -> torch.Tensor:
    """Greedy decoding without a cache from PEFT's own prompts (``get_prompt``, with ``task_ids`` for
    multitask), EOS suppressed as ``min_new_tokens=steps`` does: the reference generation must match."""
    base = peft_model.get_base_model()
    ids = input_ids.clone()
    for _ in range(steps):
        tokens = peft_model.word_embeddings(ids)
        prompts = peft_model.get_prompt(ids.shape[0], task_ids=task_ids).to(tokens.dtype)
        logits = base(inputs_embeds=torch.cat([prompts, tokens], 1)).logits[:, -1]
        logits[:, tiny_models.EOS] = -float("inf")
        ids = torch.cat([ids, logits.argmax(-1)[:, None]], 1)
    return ids


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


def model_state(model):
    """(adapter names, active adapter, every parameter's value, every ``requires_grad`` flag) of a PEFT
    model, for :func:`assert_model_unchanged` after an operation that must leave it as it was."""
    return (
        list(model.peft_config),
        model.active_adapter,
        {name: p.detach().clone() for name, p in model.named_parameters()},
        {name: p.requires_grad for name, p in model.named_parameters()},
    )


def assert_model_unchanged(model, before) -> None:
    """``model`` is as :func:`model_state` recorded ``before``: same adapters, active adapter, parameters
    (bit for bit) and flags."""
    names, active, params, flags = before
    assert list(model.peft_config) == names and model.active_adapter == active
    now = dict(model.named_parameters())
    assert now.keys() == params.keys()
    for name, value in params.items():
        assert torch.equal(now[name], value), name
        assert now[name].requires_grad == flags[name], name
