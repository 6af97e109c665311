"""``cat(prompts, word_embeddings(input_ids))`` for a PEFT prompt-tuning model, through ``prompt_concat``.

This is the one place where the fused op replaces PEFT's three steps (lookup, ``get_prompt``, cast +
``torch.cat``). Where the word-embedding module cannot be fused (see ``word_embeddings.lookup_spec``),
the module is called and the prompts concatenated exactly as PEFT does; that is logged at debug level.

``CALLS`` counts both outcomes ("fused" / "unfused"), for tests and diagnostics.
"""

from __future__ import annotations

import collections
import logging

import torch

from ..ops import prompt_concat
from .word_embeddings import FUSABLE_DTYPES, lookup_spec

logger = logging.getLogger("fastprompt")

CALLS: collections.Counter = collections.Counter()


def _unfused(peft_model, input_ids: torch.Tensor, num_prompt: int, reason: str) -> torch.Tensor:
    """PEFT's own three steps (the fallback)."""
    CALLS["unfused"] += 1
    logger.debug("fastprompt: unfused prompt concat (%s)", reason)
    inputs_embeds = peft_model.word_embeddings(input_ids)
    prompts = peft_model.get_prompt(batch_size=input_ids.shape[0])
    prompts = prompts.to(inputs_embeds.dtype)
    return torch.cat((prompts[:, :num_prompt], inputs_embeds), dim=1)


def prompted_inputs_embeds(peft_model, input_ids: torch.Tensor, num_prompt: int) -> torch.Tensor:
    """The active adapter's first ``num_prompt`` prompt rows, then the token rows of ``input_ids``.

    Args:
        peft_model: a PEFT model whose active adapter is prompt tuning.
        input_ids: [B, L] token ids (int64 or int32).
        num_prompt: N, the virtual tokens to put before the tokens (the table may have more rows:
            seq2seq models have 2N, of which the encoder uses N).

    Returns:
        [B, N + L, D] in the word embeddings' dtype: equal to PEFT's
        ``cat((get_prompt(B)[:, :N].to(dtype), word_embeddings(input_ids)), 1)``, with gradients to the
        prompt table (and to the word table where it requires grad).
    """
    prompt_encoder = peft_model.prompt_encoder[peft_model.active_adapter]
    prompt_weight = prompt_encoder.embedding.weight
    spec = lookup_spec(peft_model.word_embeddings)
    if spec is None:
        return _unfused(peft_model, input_ids, num_prompt, "word-embedding module not known to be a lookup")
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        return _unfused(peft_model, input_ids, num_prompt, "input_ids not a 2-D integer tensor")
    if type(prompt_encoder.embedding).forward is not torch.nn.Embedding.forward:
        return _unfused(peft_model, input_ids, num_prompt, "prompt embedding with a custom forward")
    weight = spec.weight
    if input_ids.device != weight.device or prompt_weight.dtype not in FUSABLE_DTYPES:
        return _unfused(peft_model, input_ids, num_prompt, "devices or dtypes")
    if prompt_weight.numel() == 0 or prompt_weight.is_meta:  # ZeRO-3 sharded / not materialized
        return _unfused(peft_model, input_ids, num_prompt, "prompt table not materialized")
    if prompt_weight.device != weight.device:
        prompt_weight = prompt_weight.to(weight.device)
    # seq2seq: the encoder takes the first N of 2N rows; the other rows get zero gradient.
    prompt_rows = prompt_weight if num_prompt == prompt_weight.shape[0] else prompt_weight[:num_prompt]
    out = prompt_concat(
        input_ids, weight, prompt_rows, embed_scale=spec.embed_scale, padding_idx=spec.padding_idx
    )
    if spec.require_grad_hook and not out.requires_grad and torch.is_grad_enabled():
        out.requires_grad_(True)
    CALLS["fused"] += 1
    return out
