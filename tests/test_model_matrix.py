"""The model matrix: every decoder-only causal-LM type of the installed transformers, exact on every path.

``fastprompt.testing.model_matrix.check_type`` runs one type on every prompt-once path against PEFT (or a
no-cache greedy loop). Every path must be exact; every path must share (the prompt run once) unless the
type is in ``model_matrix.EXPECTED_DECLINES`` for that path with the words of its reason. A type that
declines without being listed fails, and so does a listed type that shares (the list stays true). The
list lives in :mod:`fastprompt.testing.model_matrix`, beside the code that renders the support page.

The README's test command runs ``FAST_SUBSET``; ``FASTPROMPT_MATRIX=all`` runs every type (``.ci/run``:
the rest after the subset on transformers 5.24, all of it on 5.22). ``docs/models.md`` is rendered from
the same facts; a test fails where the two drift apart.
"""

from __future__ import annotations

import os
import pathlib
import re

import pytest

from fastprompt.testing import causal_lms, model_matrix

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

EXPECTED_DECLINES = model_matrix.EXPECTED_DECLINES

# A fast subset for the README's test command: dense and MoE, sliding windows and layer types, QK-norm,
# LongRoPE, chunked attention, MLA, absolute positions, ALiBi, a hybrid with linear-attention layers.
FAST_SUBSET = (
    "llama",
    "qwen3_5_text",
    "qwen3",
    "qwen3_moe",
    "gemma3_text",
    "phi3",
    "gpt_oss",
    "llama4_text",
    "deepseek_v3",
    "gpt2",
    "bloom",
)
DOCS_PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "models.md"


def _types():
    """``FASTPROMPT_MATRIX``: unset, the fast subset; ``all``, every type; ``rest``, every type outside the
    fast subset (``.ci/run``, after the README's test command has run the subset)."""
    available = causal_lms.matrix_types()
    which = os.environ.get("FASTPROMPT_MATRIX")
    if which == "all":
        return available
    if which == "rest":
        return [t for t in available if t not in FAST_SUBSET]
    return [t for t in FAST_SUBSET if t in available]


def test_matrix_covers_every_causal_lm_type():
    """Every causal-LM type is in the matrix or skipped for a reason of the closed set; the named ones
    are never skipped."""
    everything = set(causal_lms.causal_lm_types())
    in_matrix = set(causal_lms.matrix_types())
    assert in_matrix | set(causal_lms.SKIPPED) == everything
    assert not in_matrix & set(causal_lms.SKIPPED)
    assert {category for category, _ in causal_lms.SKIPPED.values()} <= set(causal_lms.SKIP_REASONS)
    assert set(causal_lms.MUST_COVER) <= in_matrix
    assert {t for t in EXPECTED_DECLINES if t in everything} <= in_matrix  # others: other releases


@pytest.mark.parametrize("model_type", _types())
def test_model_type_is_exact_and_shares(model_type):
    results = model_matrix.check_type(model_type)
    expected = EXPECTED_DECLINES.get(model_type, {})
    problems = []
    for path, result in results.items():
        if not result.exact:
            problems.append(f"{path}: not exact ({result.detail})")
        if path in expected:
            if result.shared and model_matrix.release_dependent(model_type, path):
                continue  # this release does not have the cause
            if result.shared or expected[path] not in (result.reason or ""):
                problems.append(f"{path}: expected to decline with {expected[path]!r}, got {result}")
        elif not result.shared:
            problems.append(f"{path}: declined unexpectedly ({result.detail}; {result.reason})")
    assert not problems, f"{model_type}:\n" + "\n".join(problems)


def test_support_page_is_the_matrix():
    """docs/models.md is what the matrix's facts render to (regenerate it with
    ``python -m fastprompt.testing.model_matrix --write docs/models.md``)."""
    page = DOCS_PAGE.read_text()
    version = re.search(r"causal-LM type of transformers (\S+),", page).group(1)
    if version != transformers.__version__:
        pytest.skip(f"the page is of transformers {version}, this is {transformers.__version__}")
    assert page == model_matrix.support_page()


def _register_locally(monkeypatch, family: str, config_class, model_class) -> str:
    """Subclasses of a family's config and causal LM registered under a new model type (as a user's or a
    ``trust_remote_code`` model is), which ``causal_lms.tiny_causal_lm`` then builds on the family's tiny
    config; the new model type."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    local_config = type("LocalConfig", (config_class,), {"model_type": f"fastprompt_test_local_{family}"})
    local_model = type("LocalForCausalLM", (model_class,), {"config_class": local_config})
    AutoConfig.register(local_config.model_type, local_config, exist_ok=True)
    AutoModelForCausalLM.register(local_config, local_model, exist_ok=True)
    tiny = causal_lms.tiny_config(family)
    build = causal_lms.tiny_causal_lm

    def tiny_local(model_type, **overrides):
        if model_type != local_config.model_type:
            return build(model_type, **overrides)
        config = local_config(**{**tiny.to_dict(), **overrides})
        config._attn_implementation = tiny._attn_implementation
        torch.manual_seed(0)
        return local_model(config).eval()

    monkeypatch.setattr(causal_lms, "tiny_causal_lm", tiny_local)
    return local_config.model_type


def test_a_locally_registered_model_type_shares(monkeypatch):
    """A model type transformers does not ship (here a subclass of Qwen3's classes registered under a new
    name, as a user's or a ``trust_remote_code`` model is): the same run-time checks, so it shares on every
    path, exactly."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model_type = _register_locally(monkeypatch, "qwen3", Qwen3Config, Qwen3ForCausalLM)
    results = model_matrix.check_type(model_type, paths=("train", "packed", "generate"))
    assert all(r.exact and r.shared for r in results.values()), results


def test_a_model_that_drops_the_cache_is_found_out_and_exact():
    """A model of its own making whose decoder ignores the cache it is given: the run-time check finds
    that the prompt's cache was not read, the forward takes PEFT's path (exact), and
    ``share_prompt_prefix=True`` says why; never an AttributeError or a silently wrong result."""
    import copy

    import peft
    import torch
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaModel

    import fastprompt
    from fastprompt.prompt_once import policy

    class CachelessModel(LlamaModel):
        def forward(self, *args, **kwargs):
            kwargs.pop("past_key_values", None), kwargs.pop("cache", None)
            return super().forward(*args, **{**kwargs, "use_cache": False})

    class CachelessForCausalLM(LlamaForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            self.model = CachelessModel(config)

    config = causal_lms.tiny_config("llama")
    torch.manual_seed(0)
    base = CachelessForCausalLM(config).eval()
    prompt = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=model_matrix.N)
    torch.manual_seed(1)
    reference = peft.get_peft_model(copy.deepcopy(base), prompt)
    fast = fastprompt.get_peft_model(copy.deepcopy(base), copy.deepcopy(prompt))
    fast.load_state_dict(reference.state_dict())
    ids, mask, labels = model_matrix._batch()
    policy.OBSERVED.clear()
    before = dict(policy.CALLS)
    out = fast(input_ids=ids, attention_mask=mask, labels=labels)
    expected = reference(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, expected.loss)
    assert policy.CALLS["shared"] == before.get("shared", 0)
    with pytest.raises(ValueError, match="did not fill the cache it was given"):
        fast(input_ids=ids, attention_mask=mask, labels=labels, share_prompt_prefix=True)


ROPE_BY_LENGTH = {
    # LongRoPE whose switch to long factors falls between the prompt's N = 40 and N + L = 49 positions
    "phi3 longrope straddling": ("phi3", {"original_max_position_embeddings": 44}, "longrope"),
    # dynamic NTK rescaling past 32 positions, which N + L goes past
    "llama dynamic": (
        "llama",
        {"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 32},
        "dynamic",
    ),
    # YaRN: fixed frequencies whatever the length (no decline)
    "llama yarn": (
        "llama",
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
        None,
    ),
}


@pytest.mark.parametrize("case", sorted(ROPE_BY_LENGTH))
def test_rope_scaling_that_depends_on_length_stays_exact(monkeypatch, case):
    """Rope scalings whose frequencies depend on the forward's length (LongRoPE past
    ``original_max_position_embeddings``, dynamic NTK past ``max_position_embeddings``): where the prompt
    run apart would get other frequencies than PEFT's one pass, training and generation's reuse decline
    with the reason; every path stays exact."""
    import torch
    import transformers

    family, rope, declines = ROPE_BY_LENGTH[case]

    def build(model_type, **overrides):
        config = causal_lms.tiny_config(family)
        parameters = dict(config.rope_parameters or {"rope_theta": 10000.0})
        fields = dict(rope)
        if "max_position_embeddings" in fields:
            config.max_position_embeddings = fields.pop("max_position_embeddings")
        parameters.update(fields)
        config.rope_parameters = parameters
        if "original_max_position_embeddings" in fields:  # Phi-3 keeps it on the config too
            config.original_max_position_embeddings = fields["original_max_position_embeddings"]
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        return model.eval()

    monkeypatch.setattr(causal_lms, "tiny_causal_lm", build)
    results = model_matrix.check_type(family, paths=("train", "packed", "generate"))
    assert all(r.exact for r in results.values()), results
    for path in ("train", "generate"):
        if declines:
            assert (
                not results[path].shared
                and "rope scaling depends on the forward's length" in results[path].reason
            )
        else:
            assert results[path].shared, results[path]


@pytest.mark.parametrize("path", ["train", "packed", "seq_cls"])
def test_bidirectional_attention_declines_and_stays_exact(monkeypatch, path):
    """A causal-LM family configured with bidirectional attention (EmbeddingGemma: Gemma 3 with
    ``use_bidirectional_attention``): its prompt would see the tokens, so nothing is shared; exact."""
    config = causal_lms.tiny_config  # tiny_causal_lm builds from it too
    monkeypatch.setattr(
        causal_lms, "tiny_config", lambda t, **k: config(t, **{"use_bidirectional_attention": True, **k})
    )
    result = model_matrix.check_type("gemma3_text", paths=(path,))[path]
    assert result.exact and not result.shared, result
    assert "bidirectional" in result.reason


def test_a_registered_subclass_of_a_denied_family_is_denied(monkeypatch):
    """``policy.DENIED`` matches a family by its modeling module: a Llama 4 subclass registered under a
    new model type runs packed rows unpacked (exact), as Llama 4 does."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    model_type = _register_locally(monkeypatch, "llama4_text", Llama4TextConfig, Llama4ForCausalLM)
    result = model_matrix.check_type(model_type, paths=("packed",))["packed"]
    assert result.exact and not result.shared and "temperature tuning" in result.reason, result


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "qwen3_moe", "gemma3_text", "phi3"])
def test_sdpa_shares_exactly(monkeypatch, model_type):
    """The matrix runs eager attention; SDPA (transformers' default, a boolean packed mask, a padded prefix
    cache) on a few families: training and packed rows shared and exact."""
    build = causal_lms.tiny_causal_lm
    monkeypatch.setattr(
        causal_lms, "tiny_causal_lm", lambda t, **k: build(t, **{"attn_implementation": "sdpa", **k})
    )
    results = model_matrix.check_type(model_type, paths=("train", "packed"))
    assert all(r.exact and r.shared for r in results.values()), results
