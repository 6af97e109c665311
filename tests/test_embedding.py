"""fastprompt.PromptEmbedding against peft's PromptEmbedding: bit-identical init, same module surface."""

from __future__ import annotations

import pytest
import torch

from fastprompt import PromptEmbedding, PromptTuningConfig, PromptTuningInit
from fastprompt.testing import tiny_models

peft = pytest.importorskip("peft")
from peft.tuners.prompt_tuning import PromptEmbedding as PeftPromptEmbedding  # noqa: E402

TEXT = "the movie was great and the actors were good"  # 9 words + [BOS] [EOS] = 11 ids


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return tiny_models.save_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _configs(init: str, num_virtual_tokens: int = 5, submodules: int = 1, **kwargs):
    common = dict(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_virtual_tokens,
        token_dim=tiny_models.HIDDEN,
        num_transformer_submodules=submodules,
        prompt_tuning_init=init,
        **kwargs,
    )
    theirs = peft.PromptTuningConfig(**common)
    if init not in PromptTuningInit.__members__:
        # fastprompt's config refuses an unknown init (PEFT treats it as RANDOM); its PromptEmbedding
        # given PEFT's config still does what PEFT does
        return theirs, theirs
    return theirs, PromptTuningConfig(**common)


def _word_embeddings(kind: str) -> torch.nn.Module:
    if kind == "plain":
        torch.manual_seed(0)
        return torch.nn.Embedding(tiny_models.VOCAB, tiny_models.HIDDEN, padding_idx=0)
    family = {"gemma3_bf16": "gemma3", "bart": "bart"}[kind]
    dtype = torch.bfloat16 if kind.endswith("bf16") else None
    return tiny_models.build(
        family, "CAUSAL_LM" if family != "bart" else "SEQ_2_SEQ_LM", dtype=dtype
    ).get_input_embeddings()


def _both(peft_config, our_config, word_embeddings, seed=1234):
    torch.manual_seed(seed)
    theirs = PeftPromptEmbedding(peft_config, word_embeddings)
    after_theirs = torch.rand(3)
    torch.manual_seed(seed)
    ours = PromptEmbedding(our_config, word_embeddings)
    after_ours = torch.rand(3)
    # the same RNG draws were consumed: what comes next is the same too
    assert torch.equal(after_theirs, after_ours)
    return theirs, ours


@pytest.mark.parametrize("kind", ["plain", "gemma3_bf16", "bart"])
@pytest.mark.parametrize("init", ["RANDOM", "SAMPLE_VOCAB", "UNKNOWN_INIT"])
@pytest.mark.parametrize("submodules", [1, 2])
def test_random_and_sample_vocab_bit_identical(kind, init, submodules):
    word_embeddings = _word_embeddings(kind)
    theirs, ours = _both(*_configs(init, submodules=submodules), word_embeddings)
    assert ours.embedding.weight.dtype == theirs.embedding.weight.dtype
    assert torch.equal(ours.embedding.weight, theirs.embedding.weight)
    assert ours.embedding.weight.shape == (5 * submodules, tiny_models.HIDDEN)
    if init == "SAMPLE_VOCAB":
        assert ours.embedding.weight.dtype == torch.float32


@pytest.mark.parametrize("kind", ["plain", "gemma3_bf16"])
@pytest.mark.parametrize("num_virtual_tokens", [2, 11, 25])  # truncated, exact, repeated
def test_text_init_bit_identical(tokenizer_dir, kind, num_virtual_tokens):
    configs = _configs(
        "TEXT", num_virtual_tokens, prompt_tuning_init_text=TEXT, tokenizer_name_or_path=tokenizer_dir
    )
    word_embeddings = _word_embeddings(kind)
    theirs, ours = _both(*configs, word_embeddings)
    assert ours.embedding.weight.dtype == torch.float32
    assert torch.equal(ours.embedding.weight, theirs.embedding.weight)
    # rows are the module's output (scale included) for the text ids, repeated / truncated
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(TEXT)["input_ids"]
    ids = (ids * num_virtual_tokens)[:num_virtual_tokens]
    expected = word_embeddings(torch.tensor(ids)).float()
    assert torch.equal(ours.embedding.weight.detach(), expected.detach())


def test_text_init_with_peft_and_our_config_alike(tokenizer_dir):
    peft_config, our_config = _configs(
        "TEXT", 4, prompt_tuning_init_text="food", tokenizer_name_or_path=tokenizer_dir
    )
    word_embeddings = _word_embeddings("plain")
    torch.manual_seed(0)
    a = PromptEmbedding(peft_config, word_embeddings)
    torch.manual_seed(0)
    b = PromptEmbedding(our_config, word_embeddings)
    assert torch.equal(a.embedding.weight, b.embedding.weight)


def test_tokenizer_kwargs_passed_and_trust_remote_code_removed(tokenizer_dir, monkeypatch):
    import transformers

    calls = []
    original = transformers.AutoTokenizer.from_pretrained

    def recording(path, **kwargs):
        calls.append((path, dict(kwargs)))
        return original(path)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recording)
    peft_config, our_config = _configs(
        "TEXT",
        3,
        prompt_tuning_init_text=TEXT,
        tokenizer_name_or_path=tokenizer_dir,
        tokenizer_kwargs={"trust_remote_code": True, "foo": "bar"},
    )
    PeftPromptEmbedding(peft_config, _word_embeddings("plain"))
    PromptEmbedding(our_config, _word_embeddings("plain"))
    assert calls[0] == calls[1] == (tokenizer_dir, {"foo": "bar"})
    assert our_config.tokenizer_kwargs == peft_config.tokenizer_kwargs == {"foo": "bar"}


def test_init_skipped_in_inference_mode():
    configs = _configs(
        "TEXT", 4, prompt_tuning_init_text=TEXT, tokenizer_name_or_path="/does/not/exist", inference_mode=True
    )
    theirs, ours = _both(*configs, _word_embeddings("plain"))
    assert torch.equal(ours.embedding.weight, theirs.embedding.weight)
    sample = _configs("SAMPLE_VOCAB", 4, inference_mode=True)
    theirs, ours = _both(*sample, _word_embeddings("plain"))
    assert torch.equal(ours.embedding.weight, theirs.embedding.weight)


def test_empty_text_is_a_clear_error(tmp_path):
    directory = tiny_models.save_tokenizer_without_specials(tmp_path)
    peft_config, our_config = _configs(
        "TEXT", 4, prompt_tuning_init_text="", tokenizer_name_or_path=directory
    )
    with pytest.raises(ZeroDivisionError):  # PEFT's behaviour, for the record
        PeftPromptEmbedding(peft_config, _word_embeddings("plain"))
    with pytest.raises(ValueError, match="tokenizes to no tokens"):
        PromptEmbedding(our_config, _word_embeddings("plain"))


def test_module_surface_matches_peft():
    theirs, ours = _both(*_configs("RANDOM", 3), _word_embeddings("plain"))
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["embedding.weight"]
    assert isinstance(ours.embedding, torch.nn.Embedding)
    indices = torch.tensor([[0, 2, 1], [1, 1, 0]])
    assert torch.equal(ours(indices), theirs(indices))
    assert ours(indices).shape == (2, 3, tiny_models.HIDDEN)
    # state dicts are interchangeable
    ours.load_state_dict(theirs.state_dict())
