"""``PromptEmbedding``: the virtual-token table of prompt tuning, a drop-in for PEFT's.

Same construction as ``peft.tuners.prompt_tuning.PromptEmbedding`` (PEFT 0.21): the same RNG calls in the
same order, so the same seed gives bit-identical weights for RANDOM, SAMPLE_VOCAB and TEXT; the same
``embedding`` attribute, state-dict key (``embedding.weight``) and ``forward``. One difference: text that
tokenizes to no ids raises a ValueError that says so, where PEFT divides by zero.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch

from .config import PromptTuningInit
from .deepspeed_zero3 import is_zero3_param
from .inputs_embeds import prompted_inputs_embeds


@contextlib.contextmanager
def _gathered(params: Iterable[torch.nn.Parameter]):
    """Gather DeepSpeed ZeRO-3 partitioned parameters while the word rows are read (as PEFT's
    ``gather_params_ctx``, which does so only under HF's ZeRO-3 config: here any ZeRO-3 parameter is
    gathered, so a model built under a plain ``deepspeed.zero.Init()`` works too). Read only: nothing is
    written back."""
    params = [p for p in params if is_zero3_param(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def _text_init_ids(config, total_virtual_tokens: int) -> list[int]:
    """The TEXT init token ids, truncated or repeated to ``total_virtual_tokens`` (PEFT's rule)."""
    from transformers import AutoTokenizer

    tokenizer_kwargs = config.tokenizer_kwargs or {}
    # security (as PEFT): never let a checkpoint's config run remote code. PEFT pops from the config's own
    # dict, so the key is gone from the config afterwards too.
    tokenizer_kwargs.pop("trust_remote_code", None)
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **tokenizer_kwargs)
    init_token_ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    num_text_tokens = len(init_token_ids)
    if num_text_tokens == 0:
        raise ValueError(
            f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} tokenizes to no tokens with the "
            f"tokenizer {config.tokenizer_name_or_path!r}, so it cannot initialize {total_virtual_tokens} "
            "virtual tokens. Use a non-empty text (or a tokenizer that adds special tokens), or "
            "prompt_tuning_init='RANDOM'."
        )
    if num_text_tokens < total_virtual_tokens:
        init_token_ids = init_token_ids * math.ceil(total_virtual_tokens / num_text_tokens)
    return init_token_ids[:total_virtual_tokens]


class PromptEmbedding(torch.nn.Module):
    """The virtual-token embeddings of one prompt-tuning adapter.

    Args:
        config: a ``PromptTuningConfig`` (fastprompt's or PEFT's) with ``num_virtual_tokens`` (N),
            ``num_transformer_submodules`` (S) and ``token_dim`` (D) set.
        word_embeddings: the base model's word-embedding module; read (through its ``forward``, so
            scaled embeddings apply their scale) for SAMPLE_VOCAB and TEXT init.

    Attributes:
        embedding: ``torch.nn.Embedding(N * S, D)``; its weight is float32 after SAMPLE_VOCAB / TEXT
            init, and in the default dtype for RANDOM (``normal_(0, 1)``).

    ``forward(indices)``: ``indices`` [B, T] int64 in ``[0, N * S)`` -> [B, T, D] in the weight's dtype
    (PEFT's). ``prepend(input_ids, word_embeddings)``: the fused ``inputs_embeds`` of a prompted model.
    """

    def __init__(self, config, word_embeddings: torch.nn.Module):
        super().__init__()
        total_virtual_tokens = config.num_virtual_tokens * config.num_transformer_submodules
        # Always created first: its normal_ init is the first draw from the RNG, as in PEFT.
        self.embedding = torch.nn.Embedding(total_virtual_tokens, config.token_dim)
        init = config.prompt_tuning_init
        if init == PromptTuningInit.SAMPLE_VOCAB and not config.inference_mode:
            vocab_size = word_embeddings.num_embeddings
            init_token_ids = torch.randint(0, vocab_size, (total_virtual_tokens,), dtype=torch.long)
            self._init_from_words(word_embeddings, init_token_ids)
        elif init == PromptTuningInit.TEXT and not config.inference_mode:
            init_token_ids = torch.LongTensor(_text_init_ids(config, total_virtual_tokens))
            self._init_from_words(word_embeddings, init_token_ids)

    def _init_from_words(self, word_embeddings: torch.nn.Module, init_token_ids: torch.Tensor) -> None:
        """Copy the word rows ``init_token_ids`` [N*S] (through the module) into a float32 weight."""
        init_token_ids = init_token_ids.to(word_embeddings.weight.device)
        with _gathered(word_embeddings.parameters()):
            word_embedding_weights = word_embeddings(init_token_ids).detach().clone()
        self.embedding.weight = torch.nn.Parameter(word_embedding_weights.to(torch.float32))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows ``indices`` [B, T] of the table -> [B, T, D]."""
        return self.embedding(indices)

    def prepend(
        self, input_ids: torch.Tensor, word_embeddings: torch.nn.Module, num_prompt: int | None = None
    ) -> torch.Tensor:
        """The base model's ``inputs_embeds`` with this prompt before the tokens, in one fused pass.

        Args:
            input_ids: [B, L] int64 or int32 token ids.
            word_embeddings: the model's word-embedding module (``model.get_input_embeddings()``).
            num_prompt: how many of the table's first rows to prepend (default all N * S; a seq2seq
                encoder takes N).

        Returns:
            [B, N + L, D] in the word embeddings' dtype, equal to
            ``cat(self(arange(N)).expand(B, -1, -1).to(dtype), word_embeddings(input_ids))``,
            differentiable w.r.t. the prompt table (and the word table where it requires grad).
        """
        return prompted_inputs_embeds(input_ids, word_embeddings, self, num_prompt=num_prompt)
