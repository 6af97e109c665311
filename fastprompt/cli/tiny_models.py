"""The built-in tiny causal LMs (built from configs, no hub) and prompt-tuned pairs of them.

``python -m fastprompt bench|check|demo`` and ``pytest bench`` run offline on these by default:

- ``TINY_MODELS`` / ``tiny_config``: GPT-2 and Llama configs, two layers, a realistic 32k vocabulary
  so the embedding gather has real work.
- ``load_base_model``: a tiny model by name, or a real one by name or local path (``--model``).
- ``prompt_tuned_pair``: the same base model prompt-tuned twice, once by PEFT and once by fastprompt,
  with identical prompt weights, so their results can be compared and timed side by side.
"""

from __future__ import annotations

import copy

import torch

TINY_VOCAB = 32000


# name -> (transformers config class, its arguments): two layers, no dropout, a 32k vocabulary.
TINY_MODELS = {
    "tiny-gpt2": (
        "GPT2Config",
        dict(vocab_size=TINY_VOCAB, n_positions=512, n_embd=256, n_layer=2, n_head=4, n_inner=512,
             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=1),
    ),
    "tiny-llama": (
        "LlamaConfig",
        dict(vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             bos_token_id=0, eos_token_id=1, pad_token_id=1),
    ),
}  # fmt: skip


def tiny_config(name: str):
    """The transformers config of built-in tiny model ``name``."""
    import transformers

    config_class, kwargs = TINY_MODELS[name]
    return getattr(transformers, config_class)(**kwargs)


def load_base_model(name: str = "tiny-gpt2", *, seed: int = 0, dtype: torch.dtype | None = None):
    """A causal LM: a built-in tiny one (``tiny-gpt2``, ``tiny-llama``) built from its config with
    random weights, or any other name or local path through ``AutoModelForCausalLM.from_pretrained``.

    Dropout is off (``eval()``) so two runs of the same batch give the same result.
    """
    from transformers import AutoModelForCausalLM

    if name in TINY_MODELS:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(name))
        if dtype is not None:
            model = model.to(dtype)
    else:
        kwargs = {} if dtype is None else {"dtype": dtype}
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    return model.eval()


def prompt_tuning_config(num_virtual_tokens: int):
    """PEFT's ``PromptTuningConfig`` for a causal LM, RANDOM init (no tokenizer needed)."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

    return PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.RANDOM,
    )


def prompt_tuned(base_model, provider: str, num_virtual_tokens: int, *, seed: int = 0):
    """A deep copy of ``base_model``, prompt-tuned by ``peft`` or by ``fastprompt``'s ``get_peft_model``."""
    import peft

    from fastprompt import get_peft_model

    model = copy.deepcopy(base_model)
    config = prompt_tuning_config(num_virtual_tokens)
    torch.manual_seed(seed)
    if provider == "peft":
        return peft.get_peft_model(model, config)
    if provider == "fastprompt":
        return get_peft_model(model, config)
    raise ValueError(f"unknown provider {provider!r}: expected 'peft' or 'fastprompt'")


def prompt_tuned_pair(base_model, num_virtual_tokens: int, *, seed: int = 0):
    """(PEFT model, fastprompt model) from copies of ``base_model``, with the same prompt weights."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    reference = prompt_tuned(base_model, "peft", num_virtual_tokens, seed=seed)
    fast = prompt_tuned(base_model, "fastprompt", num_virtual_tokens, seed=seed)
    set_peft_model_state_dict(fast, get_peft_model_state_dict(reference))
    return reference, fast


def token_batch(model, batch: int, seq: int, *, seed: int = 0) -> torch.Tensor:
    """[batch, seq] random token ids for ``model``'s vocabulary, on its device."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(2, vocab, (batch, seq), generator=gen).to(model.device)
