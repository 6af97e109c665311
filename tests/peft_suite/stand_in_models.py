"""Local stand-ins for the hub models PEFT's prompt-tuning tests load: tiny random weights saved at the
model id's path (``<org>/<name>/`` under the given directory) and a 256-token WordLevel tokenizer.

``python stand_in_models.py DIRECTORY``; PEFT's tests then run with ``cwd=DIRECTORY`` and
``HF_HUB_OFFLINE=1``, so ``from_pretrained("hf-internal-testing/tiny-random-gpt2")`` finds the local copy.
The weights are random: tests comparing a model with itself hold; stored hub outputs would not.
"""

import os
import sys

import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers, processors

V = 256
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<mask>", "[CLS]", "[SEP]"]
WORDS = (
    "the a an of to and in is it that for on with as was by be this are or his from at which "
    "but not have one had they you were her all she there would their we him been has when who "
    "will more no if out so said what up its about into than them can only other new some could "
    "time these two may then do first any my now such like our over man me even most made after "
    "also did many before must through back years where much your way well down should because "
    "each just those people how too little state good very make world still own see men work "
    "long get here between both life being under never day same another know while last might "
    "us great old year off come since against go came right used take three positive negative "
    "classify text sentiment quote love life happy sad movie review great bad ok hello world "
    "tweet complaint"
).split()
vocab = {}
for t in SPECIAL + WORDS + [chr(c) for c in range(33, 127)]:
    if t not in vocab and len(vocab) < V:
        vocab[t] = len(vocab)
i = 0
while len(vocab) < V:
    vocab[f"tok{i}"] = len(vocab)
    i += 1
assert len(vocab) == V
PAD, BOS, EOS, UNK, MASK, CLS, SEP = range(7)


def make_tokenizer(path, kind):
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kw = dict(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        bos_token="<s>",
        model_max_length=512,
    )
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)],
        )
        kw.update(cls_token="[CLS]", sep_token="[SEP]", mask_token="<mask>")
    elif kind == "eos":  # t5 / bart: append eos
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", EOS)]
        )
    ft = T.PreTrainedTokenizerFast(**kw)
    ft.save_pretrained(path)


ids = dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
small = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=512,
)
llama_like = dict(small, num_key_value_heads=2, vocab_size=V, **ids)
bert_like = dict(small, vocab_size=V, type_vocab_size=2, pad_token_id=PAD)

SPECS = {
    # decoders
    "peft-internal-testing/tiny-random-OPTForCausalLM": (
        T.OPTForCausalLM,
        T.OPTConfig(
            vocab_size=V,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=4,
            word_embed_proj_dim=16,
            max_position_embeddings=100,
            **ids,
        ),
        "dec",
    ),
    "peft-internal-testing/tiny-random-GPT2LMHeadModel": (
        T.GPT2LMHeadModel,
        T.GPT2Config(
            vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=512, bos_token_id=BOS, eos_token_id=EOS
        ),
        "dec",
    ),
    "hf-internal-testing/tiny-random-gpt2": (
        T.GPT2LMHeadModel,
        T.GPT2Config(
            vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=512, bos_token_id=BOS, eos_token_id=EOS
        ),
        "dec",
    ),
    "peft-internal-testing/tiny-random-GPTJForCausalLM": (
        T.GPTJForCausalLM,
        T.GPTJConfig(
            vocab_size=V,
            n_embd=32,
            n_layer=2,
            n_head=4,
            rotary_dim=4,
            n_positions=512,
            bos_token_id=BOS,
            eos_token_id=EOS,
        ),
        "dec",
    ),
    "trl-internal-testing/tiny-random-LlamaForCausalLM": (
        T.LlamaForCausalLM,
        T.LlamaConfig(**llama_like),
        "dec",
    ),
    "hf-internal-testing/tiny-random-MistralForCausalLM": (
        T.MistralForCausalLM,
        T.MistralConfig(**llama_like),
        "dec",
    ),
    "peft-internal-testing/tiny-dummy-qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config(**llama_like), "dec"),
    "hf-internal-testing/tiny-random-Gemma3ForCausalLM": (
        T.Gemma3ForCausalLM,
        T.Gemma3TextConfig(**llama_like, head_dim=8, sliding_window=16),
        "dec",
    ),
    # encoder-decoders
    "peft-internal-testing/tiny-random-T5ForConditionalGeneration-calibrated": (
        T.T5ForConditionalGeneration,
        T.T5Config(
            vocab_size=V,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            pad_token_id=PAD,
            eos_token_id=EOS,
            decoder_start_token_id=PAD,
        ),
        "eos",
    ),
    "peft-internal-testing/tiny-random-BartForConditionalGeneration": (
        T.BartForConditionalGeneration,
        T.BartConfig(
            vocab_size=V,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=37,
            decoder_ffn_dim=37,
            max_position_embeddings=512,
            decoder_start_token_id=EOS,
            forced_eos_token_id=EOS,
            **ids,
        ),
        "eos",
    ),
    # feature extraction
    "peft-internal-testing/tiny-random-BertModel": (T.BertModel, T.BertConfig(**bert_like), "bert"),
    "peft-internal-testing/tiny-random-RobertaModel": (T.RobertaModel, T.RobertaConfig(**bert_like), "bert"),
    "peft-internal-testing/tiny-random-DebertaModel": (T.DebertaModel, T.DebertaConfig(**bert_like), "bert"),
    "peft-internal-testing/tiny-random-DebertaV2Model": (
        T.DebertaV2Model,
        T.DebertaV2Config(**bert_like),
        "bert",
    ),
    # sequence classification
    "peft-internal-testing/tiny-random-BertForSequenceClassification": (
        T.BertForSequenceClassification,
        T.BertConfig(**bert_like),
        "bert",
    ),
    "peft-internal-testing/tiny-random-RobertaForSequenceClassification": (
        T.RobertaForSequenceClassification,
        T.RobertaConfig(**bert_like),
        "bert",
    ),
    "trl-internal-testing/tiny-LlamaForSequenceClassification-3.2": (
        T.LlamaForSequenceClassification,
        T.LlamaConfig(**llama_like),
        "dec",
    ),
}

if __name__ == "__main__":
    torch.manual_seed(0)
    for mid, (cls, cfg, kind) in SPECS.items():
        path = os.path.join(sys.argv[1], mid)
        os.makedirs(path, exist_ok=True)
        model = cls(cfg)
        model.save_pretrained(path, safe_serialization=True)
        make_tokenizer(path, kind)
        # sanity: reload through the Auto classes the tests use
        tok = T.AutoTokenizer.from_pretrained(path)
        assert len(tok) == cfg.vocab_size == V, (mid, len(tok))
        print("ok", mid, cls.__name__)
