"""Tiny transformers models built from configs (no hub, no network), and a locally trained tokenizer.

``build(family, task, seed=0, dtype=None)`` returns a randomly initialized model in eval mode:

    family: gpt2, llama, qwen2, opt, gemma3 (scaled embeddings), t5, bart (scale_embedding=True),
            bert, roberta
    task:   one of PEFT's task types: CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS, TOKEN_CLS, QUESTION_ANS,
            FEATURE_EXTRACTION (``SUPPORTED`` lists the pairs)

Hidden size 16, 2 layers, vocabulary ``VOCAB`` = 128 for every family, so a batch costs milliseconds.
``save_tokenizer(directory)`` trains a word-level tokenizer on a few sentences with ``tokenizers`` and
saves it with ``save_pretrained`` (``AutoTokenizer.from_pretrained(directory)`` loads it).
"""

from __future__ import annotations

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


def _configs():
    from transformers import (
        BartConfig,
        BertConfig,
        Gemma3TextConfig,
        GPT2Config,
        LlamaConfig,
        OPTConfig,
        Qwen2Config,
        RobertaConfig,
        T5Config,
    )

    common = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    llama_like = dict(
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    )
    return {
        "gpt2": lambda: GPT2Config(
            n_embd=HIDDEN,
            n_layer=2,
            n_head=2,
            n_inner=32,
            n_positions=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        ),
        "llama": lambda: LlamaConfig(**llama_like, **common),
        "qwen2": lambda: Qwen2Config(**llama_like, **common),
        "opt": lambda: OPTConfig(
            hidden_size=HIDDEN,
            ffn_dim=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=128,
            word_embed_proj_dim=HIDDEN,
            dropout=0.0,
            attention_dropout=0.0,
            **common,
        ),
        "gemma3": lambda: Gemma3TextConfig(
            hidden_size=HIDDEN,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=128,
            sliding_window=16,
            **common,
        ),
        "t5": lambda: T5Config(
            d_model=HIDDEN,
            d_kv=8,
            d_ff=32,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=2,
            dropout_rate=0.0,
            decoder_start_token_id=PAD,
            vocab_size=VOCAB,
            pad_token_id=PAD,
            eos_token_id=EOS,
        ),
        "bart": lambda: BartConfig(
            d_model=HIDDEN,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=128,
            scale_embedding=True,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            decoder_start_token_id=EOS,
            forced_eos_token_id=None,
            **common,
        ),
        "bert": lambda: BertConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=128,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            vocab_size=VOCAB,
            pad_token_id=PAD,
        ),
        "roberta": lambda: RobertaConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=160,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            vocab_size=VOCAB,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=EOS,
        ),
    }


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


def config(family: str):
    """The tiny transformers config of ``family``."""
    return _configs()[family]()


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
