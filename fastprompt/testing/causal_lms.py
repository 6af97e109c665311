"""Tiny random causal LMs for every model type in the installed transformers' causal-LM mapping.

The test matrix that proves prompt tuning exact on every decoder-only family builds its models here:

- ``causal_lm_types()``: every model type of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, sorted.
- ``SKIPPED``: model type -> (category, reason) for the types the matrix does not run; the category is one
  of ``SKIP_REASONS``. ``matrix_types()``: the others. ``MUST_COVER``: families that are never skipped.
- ``tiny_config(model_type, **overrides)`` and ``tiny_causal_lm(model_type, seed=0, dtype=..., **overrides)``.

Every tiny config has vocabulary ``VOCAB`` = 128 (pad 0, bos 1, eos 2 where the config has them), hidden size
64, 4 attention heads of size 16 (2 key/value heads where the family has grouped-query attention), 4 layers,
intermediate size 64, at least 256 positions and every float dropout 0. Weight tying keeps the family's
default. Features are switched on where the family has them, so the matrix exercises them: a sliding window of
``SLIDING_WINDOW`` = 16 tokens (sliding and full layers alternate where the family has ``layer_types``), 4
experts with top-2 routing (``output_router_logits`` False), a dense first layer before the MoE layers
(``first_k_dense_replace``), small multi-head latent attention (DeepSeek V2/V3 and their descendants),
soft capping (Gemma 2), LongRoPE with ``original_max_position_embeddings`` 16 (Phi-3), chunked attention of
16 tokens and no-RoPE layers (Llama 4 text), KV-shared layers (Gemma 3n text; Gemma 4 text where the
installed transformers runs them).

A generic recipe sets whichever of the common field names a config class has (``hidden_size`` / ``n_embd`` /
``d_model``, ``num_hidden_layers`` / ``n_layer`` / ``num_layers``, ...), read from the class's defaults; the
types it cannot describe have an entry in ``_OVERRIDES``. A type missing from the installed transformers is
simply absent from every list here.

All dropouts are 0, so ``model.train()`` computes the same function as ``eval()``. Reformer needs it: its
reversible layers backpropagate only in training mode, where a sequence length must also be a multiple of its
chunk length (2 here). Reformer is also the one matrix type whose earlier outputs can change with a later
token: LSH attention sorts the whole sequence into buckets before cutting it into chunks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from typing import Any

import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

__all__ = [
    "BOS",
    "EOS",
    "HEADS",
    "HEAD_DIM",
    "HIDDEN",
    "KV_HEADS",
    "LAYERS",
    "MUST_COVER",
    "PAD",
    "SLIDING_WINDOW",
    "VOCAB",
    "SKIPPED",
    "SKIP_REASONS",
    "causal_lm_types",
    "matrix_types",
    "tiny_causal_lm",
    "tiny_config",
]

VOCAB = 128
PAD, BOS, EOS = 0, 1, 2
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
LAYERS = 4
INTERMEDIATE = 64
MAX_POSITIONS = 256
SLIDING_WINDOW = 16
EXPERTS = 4
TOP_K = 2

SKIP_REASONS = (
    "encoder",
    "encoder-decoder",
    "multimodal input",
    "needs CUDA kernel",
    "no attention mask",
    "multimodal wrapper",
)
"""Why a causal-LM type is not in the matrix:

- ``encoder``: a BERT-like encoder registered as a causal LM (bidirectional unless made a decoder).
- ``encoder-decoder``: the decoder of a seq2seq model, or a model that attends to another model's states.
- ``multimodal input``: its causal LM cannot run on text-only ``input_ids`` / ``inputs_embeds``.
- ``needs CUDA kernel``: cannot run on the CPU.
- ``no attention mask``: its forward takes no ``attention_mask``, which PEFT's prompt tuning passes.
- ``multimodal wrapper``: a multimodal model whose tiny config does not build, or builds towers too large
  for the matrix.
"""

_ENC, _ED, _MMI, _NO_MASK, _MMW = (
    "encoder",
    "encoder-decoder",
    "multimodal input",
    "no attention mask",
    "multimodal wrapper",
)

# model type -> (category, reason), for every type known to need one; filtered to the installed types below.
_ALL_SKIPPED: dict[str, tuple[str, str]] = {
    # BERT-like encoders: bidirectional unless configured as a decoder
    "bert": (_ENC, "BERT encoder; BertLMHeadModel is the decoder half of an EncoderDecoderModel"),
    "bert-generation": (_ENC, "BERT encoder used as the decoder of an EncoderDecoderModel"),
    "big_bird": (_ENC, "BigBird encoder (block-sparse bidirectional attention)"),
    "camembert": (_ENC, "RoBERTa-style encoder"),
    "data2vec-text": (_ENC, "RoBERTa-style encoder"),
    "electra": (_ENC, "ELECTRA encoder"),
    "ernie": (_ENC, "ERNIE 1-3 BERT-style encoder"),
    "megatron-bert": (_ENC, "Megatron BERT encoder"),
    "rembert": (_ENC, "RemBERT encoder"),
    "roberta": (_ENC, "RoBERTa encoder"),
    "roberta-prelayernorm": (_ENC, "RoBERTa encoder (pre-layer-norm)"),
    "roc_bert": (_ENC, "RoCBert encoder (pronunciation and glyph embeddings)"),
    "roformer": (_ENC, "RoFormer encoder (BERT with rotary positions)"),
    "xlm": (_ENC, "XLM encoder: masked LM unless causal=True (the CLM checkpoints)"),
    "xlm-roberta": (_ENC, "XLM-RoBERTa encoder"),
    "xlm-roberta-xl": (_ENC, "XLM-RoBERTa-XL encoder"),
    "xlnet": (_ENC, "XLNet permutation LM: bidirectional attention unless given a perm_mask, no causal mask"),
    "xmod": (_ENC, "X-MOD encoder (per-language adapters, needs a language id)"),
    "reformer": (
        _ENC,
        "not causal: its LSH attention sorts the whole sequence into buckets, so later tokens change earlier "
        "outputs (measured); training needs lengths that are multiples of its chunk length",
    ),
    # decoders of seq2seq models, and models that attend to another model's states
    "bart": (_ED, "decoder of the BART encoder-decoder"),
    "bigbird_pegasus": (_ED, "decoder of the BigBird-Pegasus encoder-decoder"),
    "blenderbot": (_ED, "decoder of the Blenderbot encoder-decoder"),
    "blenderbot-small": (_ED, "decoder of the Blenderbot-small encoder-decoder"),
    "marian": (_ED, "decoder of the Marian translation encoder-decoder"),
    "mbart": (_ED, "decoder of the mBART encoder-decoder"),
    "mvp": (_ED, "decoder of the MVP encoder-decoder"),
    "pegasus": (_ED, "decoder of the Pegasus encoder-decoder"),
    "plbart": (_ED, "decoder of the PLBart encoder-decoder"),
    "prophetnet": (_ED, "decoder of the ProphetNet encoder-decoder (n-gram streams)"),
    "trocr": (_ED, "text decoder of the TrOCR vision encoder-decoder (cross-attends to image features)"),
    "whisper": (_ED, "decoder of the Whisper speech encoder-decoder"),
    "musicgen": (
        _ED,
        "audio-code decoder of the MusicGen text-to-audio encoder-decoder; input_ids are codebooks",
    ),
    "musicgen_melody": (
        _ED,
        "audio-code decoder of MusicGen-Melody (text/chroma conditioning); ids are codebooks",
    ),
    "gemma4_assistant": (
        _ED,
        "speculative-decoding drafter: attends to the target Gemma 4's shared_kv_states",
    ),
    "gemma4_unified_assistant": (
        _ED,
        "speculative-decoding drafter: attends to the target's shared_kv_states",
    ),
    # no inputs_embeds path
    "cpmant": (
        _MMI,
        "forward takes input_ids only (no inputs_embeds): prepends its own prompt ids, pads by id 0",
    ),
    # linear attention, convolutions, recurrences or state spaces in some or all layers
    # a forward without attention_mask (PEFT's prompt tuning passes one)
    "xlstm": (_NO_MASK, "xLSTM recurrent blocks; PEFT's generate passes an attention_mask it does not take"),
    # the causal-LM entry is a ConditionalGeneration wrapper or takes a multimodal config
    "dots3_note": (_MMW, "its per_layer_config names layers 25-39: no tiny config builds"),
    "git": (_MMW, "GIT image-to-text model: its CLIP vision tower stays 86M parameters at the tiny sizes"),
    "phi4_multimodal": (_MMW, "Phi4MultimodalConfig: its vision and audio towers stay 870M parameters"),
}

_INSTALLED = frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)

SKIPPED: dict[str, tuple[str, str]] = {t: r for t, r in sorted(_ALL_SKIPPED.items()) if t in _INSTALLED}
"""Model type -> (category from ``SKIP_REASONS``, one-line reason), for the installed types."""

MUST_COVER: tuple[str, ...] = tuple(
    t
    for t in """
    llama qwen3 qwen3_moe gemma gemma2 gemma3_text phi3 phi mixtral qwen2_moe olmo2 olmo3 olmoe granite
    granitemoe smollm3 gpt_oss cohere cohere2 glm4 glm4_moe exaone4 ministral ministral3 seed_oss helium
    apertus hunyuan_v1_dense ernie4_5 starcoder2 stablelm gpt_neox gptj persimmon nanochat vaultgemma
    llama4_text minimax_m2 bloom gpt_bigcode biogpt deepseek_v3 gemma4_text gpt2 opt mistral qwen2
    qwen3_5_text qwen3_5_moe_text qwen3_next lfm2 falcon_h1 nemotron_h olmo_hybrid granitemoehybrid jamba
    bamba zamba2 mamba falcon_mamba rwkv gemma3 gemma4 gemma3n llama4 qwen3_5 mllama
    """.split()
    if t in _INSTALLED
)
"""Families the matrix never skips (those in the installed transformers)."""

_SW = ["sliding_attention", "full_attention"] * (LAYERS // 2)  # alternating, last layer full (Gemma needs it)

# Field names the generic recipe looks for, first the model's main sizes.
_HIDDEN = ("hidden_size", "n_embd", "d_model", "emb_dim", "embed_dim", "embedding_dim")
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers")
_HEADS = (
    "num_attention_heads",
    "n_head",
    "n_heads",
    "attention_heads",
    "num_heads",
    "decoder_attention_heads",
    "encoder_attention_heads",
)
_KV_HEADS = ("num_key_value_heads", "num_kv_heads")
_HEAD_DIM = ("head_dim", "d_head", "dim_head", "kv_channels", "attention_head_size")
_FFN = (
    "intermediate_size",
    "ffn_dim",
    "n_inner",
    "d_inner",
    "ffn_hidden_size",
    "dim_ff",
    "dff",
    "decoder_ffn_dim",
    "encoder_ffn_dim",
)
_EXPERT_FFN = (
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "moe_shared_expert_intermediate_size",
    "shared_intermediate_size",
    "shared_experts_intermediate_size",
    "expert_ffn_hidden_size",
    "dense_intermediate_size",
)
_POSITIONS = ("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx", "context_length")
_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOP_K = ("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "top_k_experts")
_SHARED_EXPERTS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
_OWN_TOKENS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")

# Per-type settings the generic recipe cannot derive, applied over it (and under the caller's overrides).
_OVERRIDES: dict[str, dict[str, Any]] = {
    # byte-level patches: static patching (entropy patching needs input_ids); no cache (BltModel's cache
    # fails in transformers 5.24: DynamicCache cannot read BltConfig's layers); local hidden size 32 so that
    # no projection has VOCAB rows (PEFT finds the word embeddings by their row count)
    "blt": dict(
        use_cache=False,
        patching_mode="static",
        encoder_hash_byte_group_vocab=VOCAB,
        encoder_hash_byte_group_size=[3, 4],
        local_attention_window_len=SLIDING_WINDOW,
        patcher_config=dict(
            hidden_size=HIDDEN,
            num_hidden_layers=1,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            vocab_size=VOCAB,
            max_position_embeddings=MAX_POSITIONS,
        ),
        encoder_config=dict(
            hidden_size=HIDDEN // 2,
            hidden_size_global=HIDDEN,
            num_hidden_layers=1,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            vocab_size=VOCAB,
            max_position_embeddings=MAX_POSITIONS,
        ),
        decoder_config=dict(
            hidden_size=HIDDEN // 2,
            hidden_size_global=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            vocab_size=VOCAB,
            max_position_embeddings=MAX_POSITIONS,
        ),
        global_config=dict(
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=MAX_POSITIONS,
        ),
    ),
    # multimodal RoPE sections sized for head_dim 16 (sum 8)
    "cohere_compass_text": dict(
        layer_types=_SW,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
        },
    ),
    # sizes live in sub-configs; DbrxAttention reads attn_config.rope_theta and clamps with clip_qkv
    "dbrx": dict(
        attn_config=dict(kv_n_heads=KV_HEADS, rope_theta=10000.0, clip_qkv=8.0, attn_pdrop=0.0),
        ffn_config=dict(ffn_hidden_size=INTERMEDIATE, moe_num_experts=EXPERTS, moe_top_k=TOP_K),
    ),
    # compression rates that compress within 18 tokens; no hash-routed MoE layers (they route by input_ids,
    # which a prompt-tuned forward does not pass)
    "deepseek_v4": dict(
        mlp_layer_types=["moe"] * LAYERS,
        o_groups=2,
        o_lora_rank=16,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    ),
    "dots1": dict(n_shared_experts=1),
    # the sliding-window layers' MLA sizes come from swa_* arguments
    "dots3_note_text": dict(
        swa_num_attention_heads=HEADS,
        swa_num_key_value_heads=HEADS,
        swa_q_lora_rank=32,
        swa_kv_lora_rank=16,
        swa_head_dim=HEAD_DIM,
        swa_qk_nope_head_dim=8,
        swa_v_head_dim=HEAD_DIM,
    ),
    "dory": dict(n_input_layers=1, n_recurrent_layers=2, n_output_layers=1, n_recurrent_loops=2),
    "gemma3_text": dict(layer_types=_SW),
    "gemma3n_text": dict(
        layer_types=_SW,
        num_kv_shared_layers=2,
        vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=16,
        laurel_rank=8,
        activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0],
    ),
    # no per-layer embeddings: with them Gemma 4 recovers input_ids from inputs_embeds and rejects soft
    # prompts
    "gemma4_text": dict(
        layer_types=_SW,
        num_kv_shared_layers=2,
        global_head_dim=2 * HEAD_DIM,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=VOCAB,
        enable_moe_block=True,
        num_experts=EXPERTS,
        moe_intermediate_size=32,
    ),
    "gemma4_unified_text": dict(global_head_dim=2 * HEAD_DIM),
    "gpt_neo": dict(attention_types=[[["global", "local"], LAYERS // 2]], window_size=SLIDING_WINDOW),
    "hrm_text": dict(H_cycles=2, L_cycles=1),
    # chunked attention; no-RoPE layers 1 and 3 (temperature tuning from position 4 on); dense and MoE
    # layers
    "llama4_text": dict(
        attention_chunk_size=SLIDING_WINDOW,
        no_rope_layer_interval=2,
        floor_scale=4,
        interleave_moe_layer_step=2,
        intermediate_size_mlp=INTERMEDIATE,
    ),
    "longcat_flash": dict(zero_expert_num=2),
    "modernbert-decoder": dict(local_attention=2 * SLIDING_WINDOW, global_attn_every_n_layers=2),
    # LongRoPE: sequences past 16 positions switch to the long factors
    "phi3": dict(
        original_max_position_embeddings=16,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.1 * i for i in range(HEAD_DIM // 2)],
            "long_factor": [1.0 + 0.5 * i for i in range(HEAD_DIM // 2)],
            "original_max_position_embeddings": 16,
        },
    ),
    # a causal LM only as a decoder; plain position embeddings (axial ones need the full length in training);
    # seeded LSH hashing, so every forward hashes alike
    "reformer": dict(
        is_decoder=True,
        attn_layers=["local", "lsh", "local", "lsh"],
        attention_head_size=HEAD_DIM,
        axial_pos_embds=False,
        feed_forward_size=INTERMEDIATE,
        local_attn_chunk_length=2,
        lsh_attn_chunk_length=2,
        num_buckets=4,
        hash_seed=0,
    ),
    # Hybrids: attention and their non-attention layers both present (the prompt-once paths are checked on
    # both kinds), and sizes their layers accept.
    "bailing_hybrid": dict(layer_group_size=2),
    "bamba": dict(attn_layer_indices=[1, 3]),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"] * (LAYERS // 2)),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1),
    "kimi_linear": dict(
        linear_attn_config={
            "full_attn_layers": [2, 4],
            "kda_layers": [1, 3],
            "head_dim": 16,
            "num_heads": HEADS,
        }
    ),
    "lfm2": dict(full_attn_idxs=[1, 3]),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"] * (LAYERS // 2), num_dense_layers=1),
    "mamba2": dict(num_heads=8, n_groups=1, state_size=16),
    "qwen4_exp_text": dict(
        indexer_n_heads=2,
        indexer_kv_heads=1,
        indexer_head_dim=16,
        indexer_budget=16,
        indexer_compress_ratio=4,
        hc_lowrank=16,
    ),
    "xlstm": dict(qk_dim_factor=1.0),  # 0.5 fails in the native inference kernel at these sizes
    "zamba": dict(layers_block_type=["linear_attention", "hybrid"] * (LAYERS // 2)),
    "zamba2": dict(layers_block_type=["linear_attention", "hybrid"] * (LAYERS // 2)),
    "zaya": dict(num_experts_per_tok=1),
}


def causal_lm_types() -> list[str]:
    """The model types of the installed transformers' causal-LM mapping, sorted."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def matrix_types() -> list[str]:
    """The causal-LM types the matrix runs: ``causal_lm_types()`` less ``SKIPPED``."""
    return [t for t in causal_lm_types() if t not in SKIPPED]


def _defaults(config_class: type) -> dict[str, Any]:
    """Field name -> default of a config class (its dataclass fields, else its ``__init__`` arguments)."""
    if dataclasses.is_dataclass(config_class):
        out = {}
        for field in dataclasses.fields(config_class):
            if field.default is not dataclasses.MISSING:
                out[field.name] = field.default
            elif field.default_factory is not dataclasses.MISSING:
                out[field.name] = field.default_factory()
            else:
                out[field.name] = None
        return out
    parameters = inspect.signature(config_class.__init__).parameters.values()
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {
        p.name: None if p.default is p.empty else p.default
        for p in parameters
        if p.name != "self" and p.kind not in variadic
    }


def _generic_kwargs(defaults: dict[str, Any]) -> dict[str, Any]:
    """The tiny sizes, under whichever of the common field names the config class has."""
    kw: dict[str, Any] = {}

    def put(names: tuple[str, ...], value: Any, *, if_enabled: bool = False) -> None:
        # if_enabled: only where the family's default turns the feature on (not None, not 0)
        for name in names:
            if name in defaults and not (if_enabled and defaults[name] in (None, 0)):
                kw[name] = value

    put(("vocab_size",), VOCAB)
    put(("pad_token_id",), PAD)
    put(("bos_token_id",), BOS)
    put(("eos_token_id",), EOS)
    # other special tokens whose default lies outside the tiny vocabulary: the top ids
    spare = iter(range(VOCAB - 1, EOS, -1))
    for name, value in defaults.items():
        if name.endswith(("_token_id", "_token_index")) and name not in _OWN_TOKENS:
            if isinstance(value, int) and not isinstance(value, bool) and value >= VOCAB:
                kw[name] = next(spare)
    put(_HIDDEN, HIDDEN)
    put(_LAYERS, LAYERS)
    put(_HEADS, HEADS)
    put(_KV_HEADS, KV_HEADS)
    put(_HEAD_DIM, HEAD_DIM)
    put(_FFN, INTERMEDIATE)
    put(_EXPERT_FFN, INTERMEDIATE // 2, if_enabled=True)
    put(_POSITIONS, MAX_POSITIONS)
    put(("rotary_dim",), HEAD_DIM // 2, if_enabled=True)
    # mixture of experts
    put(_EXPERTS, EXPERTS)
    put(_TOP_K, TOP_K)
    put(_SHARED_EXPERTS, 1, if_enabled=True)
    put(("n_group", "topk_group"), 1)
    put(("first_k_dense_replace", "num_dense_layers"), 1)
    put(("router_jitter_noise", "input_jitter_noise"), 0.0)
    put(("output_router_logits",), False)
    # multi-head latent attention: head_dim is the rotary part, one key/value head per query head
    put(("q_lora_rank",), 32, if_enabled=True)
    put(("kv_lora_rank",), 16)
    put(("qk_rope_head_dim", "qk_nope_head_dim"), 8)
    put(("v_head_dim",), HEAD_DIM)
    if "kv_lora_rank" in defaults:
        put(_KV_HEADS, HEADS)
        if "qk_rope_head_dim" in defaults:
            put(("head_dim",), 8)
    # sparse-attention indexers (DeepSeek V3.2 and its descendants): top-k shorter than the test sequences
    put(("index_n_heads",), 2)
    put(("index_head_dim",), 16)
    put(("index_topk",), SLIDING_WINDOW)
    # sliding windows (Qwen-style configs switch them on per layer from max_window_layers)
    put(("sliding_window",), SLIDING_WINDOW)
    put(("use_sliding_window",), True)
    put(("max_window_layers",), LAYERS // 2)
    # linear-attention sizes (hybrid families)
    put(("linear_num_key_heads",), 2)
    put(("linear_num_value_heads",), 4)
    put(("linear_key_head_dim", "linear_value_head_dim", "linear_head_dim"), 16)
    put(("unpadded_vocab_size",), VOCAB, if_enabled=True)
    for name, value in defaults.items():
        if "drop" in name and isinstance(value, float):
            kw[name] = 0.0
    return kw


@functools.cache
def _gemma4_runs_kv_sharing() -> bool:
    """Whether Gemma 4 text runs KV-shared layers without per-layer embeddings.

    transformers 5.24 slices ``per_layer_inputs`` before the KV-shared layers even when it is None (no
    per-layer embeddings) and raises TypeError; 5.22 runs them.
    """
    config = CONFIG_MAPPING["gemma4_text"](
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        global_head_dim=HEAD_DIM,
        layer_types=["full_attention"] * 2,
        num_kv_shared_layers=1,
        hidden_size_per_layer_input=0,
    )
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[BOS, 3]]))
    except TypeError:
        return False
    return True


def _composite_config(model_type: str, config_class: type, overrides: dict):
    """The tiny config of a multimodal type (a config of sub-configs: ``text_config``, ``vision_config``,
    ...): the text model's own tiny config, the other towers shrunk by the same generic sizes (they are
    built, never run: prompt tuning is text-only), special token ids inside the tiny vocabulary."""
    default = config_class()
    kw: dict[str, Any] = {}
    for name in config_class.sub_configs:
        sub = getattr(default, name, None)
        if sub is None or not hasattr(sub, "to_dict"):
            continue
        if name == "text_config" and sub.model_type in CONFIG_MAPPING:
            kw[name] = tiny_config(sub.model_type)
        else:
            kw[name] = type(sub)(**{**sub.to_dict(), **_generic_kwargs(_defaults(type(sub)))})
    spare = iter(range(VOCAB - 1, EOS, -1))
    for name, value in _defaults(config_class).items():
        if (
            name.endswith(("_token_id", "_token_index"))
            and isinstance(value, int)
            and not isinstance(value, bool)
        ):
            if value >= VOCAB:
                kw[name] = next(spare)
    kw.update(_OVERRIDES.get(model_type, {}))
    kw.update(overrides)
    return config_class(**kw)


def tiny_config(model_type: str, **overrides: Any):
    """The tiny config of a causal-LM model type (see the module docstring); ``overrides`` are config fields.

    The generic sizes come first, then the type's entry in ``_OVERRIDES``, then ``overrides``. A family with a
    sliding window whose ``layer_types`` would come out all sliding or all full gets alternating layers. A
    multimodal type's config is made of tiny sub-configs (:func:`_composite_config`).
    """
    config_class = CONFIG_MAPPING[model_type]
    if "text_config" in getattr(config_class, "sub_configs", {}):
        return _composite_config(model_type, config_class, overrides)
    defaults = _defaults(config_class)
    kw = _generic_kwargs(defaults)
    kw.update(_OVERRIDES.get(model_type, {}))
    if model_type == "gemma4_text" and not _gemma4_runs_kv_sharing():
        kw["num_kv_shared_layers"] = 0
    kw.update(overrides)
    config = config_class(**kw)
    layer_types = getattr(config, "layer_types", None)
    if (
        "layer_types" not in kw
        and "layer_types" in defaults
        and kw.get("sliding_window")
        and isinstance(layer_types, list)
        and set(layer_types) in ({"sliding_attention"}, {"full_attention"})
    ):
        config = config_class(**kw, layer_types=list(_SW))
    return config


def tiny_causal_lm(model_type: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """``AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))`` in eval mode.

    Weights are drawn after ``torch.manual_seed(seed)``: the same seed gives the same model. The attention
    implementation is ``"eager"`` unless ``attn_implementation`` is given; ``"sdpa"`` works where the family
    supports it (transformers raises ValueError for the others: Bloom, Gemma 2, GPT-OSS, MPT, ...).
    """
    attn_implementation = overrides.pop("attn_implementation", "eager")
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    with _towers_without_timm():
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()


class TowerPlaceholder(torch.nn.Module):
    """Stands for a vision tower that needs ``timm`` (not installed here): text-only prompt tuning never
    calls it; calling it raises."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("a tiny test model's vision tower needs timm, which is not installed")


@contextlib.contextmanager
def _towers_without_timm():
    """While a tiny model is built without ``timm`` installed, a timm vision tower (Gemma 3n's) is a
    :class:`TowerPlaceholder`; everything else is built as ``AutoModel`` builds it."""
    import importlib.util

    from transformers import AutoModel

    if importlib.util.find_spec("timm") is not None:
        yield
        return
    original = AutoModel.from_config.__func__

    def from_config(cls, config, **kwargs):
        if getattr(config, "model_type", "") in ("timm_wrapper", "gemma3n_vision"):
            return TowerPlaceholder()
        return original(cls, config, **kwargs)

    AutoModel.from_config = classmethod(from_config)
    try:
        yield
    finally:
        AutoModel.from_config = classmethod(original)
