"""Tiny transformers models built from configs (no hub, no network), and a locally trained tokenizer.

The test families: ``build(family, task, seed=0, dtype=None)`` returns a randomly initialized model in
eval mode:

    family: gpt2, llama, qwen2, opt, gemma3 (scaled embeddings), t5, bart (scale_embedding=True),
            bert, roberta
    task:   one of PEFT's task types: CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS, TOKEN_CLS, QUESTION_ANS,
            FEATURE_EXTRACTION (``SUPPORTED`` lists the pairs)

Hidden size 16, 2 layers, vocabulary ``VOCAB`` = 128 for every family, so a batch costs milliseconds.
``OTHER_FAMILIES`` (Gemma2, Mistral, Qwen2, MBart, DeBERTa-v2) are each checked in one task.
``save_tokenizer(directory)`` trains a word-level tokenizer on a few sentences with ``tokenizers`` and
saves it with ``save_pretrained`` (``AutoTokenizer.from_pretrained(directory)`` loads it).

The built-in causal LMs of the command line and the benchmarks (``TINY_MODELS``: ``tiny-gpt2``,
``tiny-llama``, hidden size 256 and a 32k vocabulary), loaded by ``load_base_model`` (which also loads
a real model by name or path), and ``prompt_tuned_pair``: one base model prompt-tuned by PEFT and by
fastprompt with identical prompt weights, to compare and time side by side.
"""

from __future__ import annotations

import copy

import torch

VOCAB = 128
HIDDEN = 16
PAD, BOS, EOS, UNK = 0, 1, 2, 3

CORPUS = [
    "classify the sentiment of this review",
    "the movie was great and the actors were good",
    "the food was bad but the service was fine",
    "translate english to german : hello world",
    "answer the question about the text",
]


# family -> (transformers config class, its arguments): hidden size 16, 2 layers, no dropout.
_COMMON = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
_NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0)
FAMILIES = {
    "gpt2": ("GPT2Config", dict(n_embd=HIDDEN, n_layer=2, n_head=2, n_inner=32, n_positions=128,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **_COMMON)),
    "llama": ("LlamaConfig", dict(hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                  **_COMMON)),
    "qwen2": ("Qwen2Config", dict(hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                  **_COMMON)),
    "opt": ("OPTConfig", dict(hidden_size=HIDDEN, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                              max_position_embeddings=128, word_embed_proj_dim=HIDDEN, **_NO_DROPOUT,
                              **_COMMON)),
    "gemma3": ("Gemma3TextConfig", dict(hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                        max_position_embeddings=128, sliding_window=16, **_COMMON)),
    "t5": ("T5Config", dict(d_model=HIDDEN, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
                            dropout_rate=0.0, decoder_start_token_id=PAD, vocab_size=VOCAB, pad_token_id=PAD,
                            eos_token_id=EOS)),
    "bart": ("BartConfig", dict(d_model=HIDDEN, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                max_position_embeddings=128, scale_embedding=True, **_NO_DROPOUT,
                                activation_dropout=0.0, decoder_start_token_id=EOS, forced_eos_token_id=None,
                                **_COMMON)),
    "bert": ("BertConfig", dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=128, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0, vocab_size=VOCAB, pad_token_id=PAD)),
    "roberta": ("RobertaConfig", dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=160,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                      **_COMMON)),
}  # fmt: skip

# More families, each checked in one task (the fused path on other embeddings): family -> task.
_LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=128,
    pad_token_id=PAD,
)
FAMILIES.update({
    "gemma2": ("Gemma2Config", dict(head_dim=8, **_LLAMA_LIKE)),  # buffer-scaled embeddings, like Gemma3
    "mistral": ("MistralConfig", _LLAMA_LIKE),
    "qwen2": ("Qwen2Config", _LLAMA_LIKE),
    "mbart": ("MBartConfig", dict(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, scale_embedding=True, max_position_embeddings=64)),
    "deberta-v2": ("DebertaV2Config", dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2,
                                           num_attention_heads=2, intermediate_size=32,
                                           max_position_embeddings=64, num_labels=3)),
})  # fmt: skip
OTHER_FAMILIES = {
    "gemma2": "CAUSAL_LM",
    "mistral": "CAUSAL_LM",
    "qwen2": "SEQ_CLS",
    "mbart": "SEQ_2_SEQ_LM",  # float-scaled embeddings, like BART
    "deberta-v2": "TOKEN_CLS",
}

# The built-in models of ``python -m fastprompt bench|check|demo`` and ``pytest bench``: name ->
# (family, what differs from it). Two layers, no dropout, a realistic 32k vocabulary so the embedding
# gather has real work.
TINY_VOCAB = 32000
TINY_MODELS = {
    "tiny-gpt2": ("gpt2", dict(vocab_size=TINY_VOCAB, n_positions=512, n_embd=256, n_head=4, n_inner=512,
                               pad_token_id=None, bos_token_id=0, eos_token_id=1)),
    "tiny-llama": ("llama", dict(vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=512,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 bos_token_id=0, eos_token_id=1, pad_token_id=1)),
}  # fmt: skip


_AUTO = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}

SUPPORTED = {
    "gpt2": ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"),
    "llama": ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"),
    "qwen2": ("CAUSAL_LM",),
    "opt": ("CAUSAL_LM", "SEQ_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"),
    "gemma3": ("CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION"),
    # encoder-decoder models need input_ids for their decoder inputs in the other task types
    "t5": ("SEQ_2_SEQ_LM",),
    "bart": ("SEQ_2_SEQ_LM",),
    "bert": ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"),
    "roberta": ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"),
}


def config(family: str, **overrides):
    """The tiny transformers config of ``family`` (a key of ``FAMILIES``), ``overrides`` applied."""
    import transformers

    config_class, kwargs = FAMILIES[family]
    return getattr(transformers, config_class)(**{**kwargs, **overrides})


def tiny_config(name: str):
    """The transformers config of built-in model ``name`` (a key of ``TINY_MODELS``)."""
    family, overrides = TINY_MODELS[name]
    return config(family, **overrides)


def build(family: str, task: str, *, seed: int = 0, dtype: torch.dtype | None = None):
    """A tiny ``family`` model for PEFT task type ``task``, random weights from ``seed``, in eval mode."""
    import transformers

    cfg = config(family)
    if task in ("SEQ_CLS", "TOKEN_CLS"):
        cfg.num_labels = 3
    auto = getattr(transformers, _AUTO[task])
    torch.manual_seed(seed)
    model = auto.from_config(cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def batch(
    batch_size: int = 3,
    seq_len: int = 6,
    *,
    seed: int = 0,
    left_pad: bool = True,
    token_type_ids: bool = False,
):
    """Random ids [B, L] in [4, VOCAB) with the last row left-padded by 2 (PAD ids, mask 0)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, VOCAB, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    if left_pad and batch_size > 1:
        input_ids[-1, :2] = PAD
        attention_mask[-1, :2] = 0
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids:
        out["token_type_ids"] = torch.randint(0, 2, (batch_size, seq_len), generator=generator)
    return out


def save_tokenizer(directory) -> str:
    """Train a word-level tokenizer on ``CORPUS`` and ``save_pretrained`` it into ``directory``.

    Ids: [PAD]=0, [BOS]=1, [EOS]=2, [UNK]=3, then the words. The post-processor adds [BOS] ... [EOS],
    so ``tokenizer("")["input_ids"]`` is not empty; ``save_tokenizer(d, special=False)`` is not offered:
    use ``save_tokenizer_without_specials`` for a tokenizer that maps "" to no ids.
    """
    return _save(directory, with_specials=True)


def save_tokenizer_without_specials(directory) -> str:
    """Like :func:`save_tokenizer`, but no special tokens are added: "" tokenizes to []."""
    return _save(directory, with_specials=False)


def _save(directory, with_specials: bool) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=specials))
    if with_specials:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[BOS] $A [EOS]", special_tokens=[("[BOS]", BOS), ("[EOS]", EOS)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )
    fast.save_pretrained(str(directory))
    return str(directory)


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
