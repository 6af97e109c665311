"""CausalLM ``generate(..., reuse_prompt_kv=...)``: the virtual tokens' keys/values computed once per adapter.

Reference: decoding from scratch without a cache (at every step the base model runs over the whole
``cat(prompt rows, token embeddings)`` with the prefixed mask, and the argmax is taken), written here by
hand from the adapter's table and the word-embedding module, independent of fastprompt's path. Reuse on
must also equal reuse off (``reuse_prompt_kv=False``: the prompts in the prefill, as PEFT) for beam
search, ``num_return_sequences`` and sampling.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft_helpers import FastpromptOps, model_pair, peft_config

from fastprompt.testing import tiny_models

peft = pytest.importorskip("peft")
import fastprompt  # noqa: E402
from fastprompt.prompt_once import kv_store as prompt_kv  # noqa: E402

CAUSAL = ["gpt2", "llama", "qwen2", "opt", "gemma3"]
NEW = 5
GREEDY = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=tiny_models.PAD)


def _table(model, name):
    return model.prompt_encoder[name].embedding.weight


@torch.no_grad()
def scratch_generate(model, input_ids, attention_mask, names, steps, *, eos=tiny_models.EOS, min_new=0):
    """Greedy decoding without a cache: the full prompt + tokens forward at each step, argmax.

    ``names``: one adapter per row. Rows that produced ``eos`` (the tiny models' EOS unless given)
    continue with PAD, as transformers does.
    """
    base = model.get_base_model()
    word = model.word_embeddings
    n = model.peft_config[names[0]].num_virtual_tokens
    ids, mask = input_ids.clone(), attention_mask.clone() if attention_mask is not None else None
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for step in range(steps):
        tokens = word(ids)
        prompts = torch.stack([_table(model, name)[:n] for name in names]).to(tokens.dtype)
        full_mask = None
        if mask is not None:
            full_mask = torch.cat([torch.ones(ids.shape[0], n, dtype=mask.dtype), mask], 1)
        logits = base(inputs_embeds=torch.cat([prompts, tokens], 1), attention_mask=full_mask).logits[:, -1]
        if eos is not None and step < min_new:
            logits[:, eos] = -float("inf")
        nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, tiny_models.PAD), nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if eos is not None:
            done |= nxt == eos
            if done.all():
                break
    return ids


def _fast(family, n=3, seed=0):
    return model_pair(family, "CAUSAL_LM", num_virtual_tokens=n, seed=seed)[1]


def _counts():
    return dict(prompt_kv.CALLS)


def _delta(before):
    return {k: prompt_kv.CALLS[k] - before.get(k, 0) for k in ("computed", "reused")}


# ------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize(
    "family,n", [*((f, 3) for f in CAUSAL), ("llama", 20), ("gemma3", 20)]
)  # gemma3 N=20 > its sliding window (16)
def test_greedy_equals_reuse_off_and_scratch(family, n):
    model = _fast(family, n)
    inputs = tiny_models.batch()  # last row left-padded
    expected = scratch_generate(model, **inputs, names=["default"] * 3, steps=NEW)
    before = _counts()
    first = model.generate(**inputs, **GREEDY)
    again = model.generate(**inputs, reuse_prompt_kv=True, **GREEDY)
    assert _delta(before) == {"computed": 1, "reused": 1}
    off = model.generate(**inputs, reuse_prompt_kv=False, **GREEDY)
    assert torch.equal(first, expected) and torch.equal(again, expected) and torch.equal(off, expected)
    assert first.shape == (3, 6 + NEW) and torch.equal(first[:, :6], inputs["input_ids"])


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_no_attention_mask_and_positional_ids(family):
    model = _fast(family)
    inputs = tiny_models.batch(left_pad=False)
    expected = scratch_generate(model, inputs["input_ids"], None, ["default"] * 3, NEW)
    assert torch.equal(model.generate(inputs["input_ids"], **GREEDY), expected)
    assert torch.equal(model.generate(input_ids=inputs["input_ids"], **GREEDY), expected)


@pytest.mark.parametrize("family,n", [("llama", 3), ("gemma3", 20)])
def test_static_cache_with_and_without_reuse(family, n):
    from transformers import GenerationConfig

    model = _fast(family, n)
    inputs = tiny_models.batch()
    expected = scratch_generate(model, **inputs, names=["default"] * 3, steps=NEW)
    for reuse in (True, False):
        out = model.generate(**inputs, cache_implementation="static", reuse_prompt_kv=reuse, **GREEDY)
        assert torch.equal(out, expected), reuse
    config = GenerationConfig(cache_implementation="static", **GREEDY)
    assert torch.equal(model.generate(**inputs, generation_config=config), expected)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_beam_search_and_return_sequences_equal_reuse_off(family):
    model = _fast(family, 4)
    inputs = tiny_models.batch()
    beams = dict(
        GREEDY, num_beams=3, num_return_sequences=2, return_dict_in_generate=True, output_scores=True
    )
    on = model.generate(**inputs, **beams)
    off = model.generate(**inputs, reuse_prompt_kv=False, **beams)
    assert on.sequences.shape == (6, 6 + NEW) and torch.equal(on.sequences, off.sequences)
    torch.testing.assert_close(on.sequences_scores, off.sequences_scores, atol=1e-5, rtol=1e-5)


def test_sampling_with_a_seed_equals_reuse_off():
    model = _fast("qwen2")
    inputs = tiny_models.batch()
    sampling = dict(max_new_tokens=NEW, do_sample=True, top_k=20, num_return_sequences=2, pad_token_id=0)
    torch.manual_seed(3)
    on = model.generate(**inputs, **sampling)
    torch.manual_seed(3)
    off = model.generate(**inputs, reuse_prompt_kv=False, **sampling)
    assert on.shape == (6, 6 + NEW) and torch.equal(on, off)


def test_greedy_scores_close_to_reuse_off():
    model = _fast("llama")
    inputs = tiny_models.batch()
    kwargs = dict(GREEDY, return_dict_in_generate=True, output_scores=True, output_logits=True)
    on = model.generate(**inputs, **kwargs)
    off = model.generate(**inputs, reuse_prompt_kv=False, **kwargs)
    assert torch.equal(on.sequences, off.sequences)
    for a, b in zip(on.logits, off.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_generation_config_min_new_tokens_and_eos_stopping():
    from transformers import GenerationConfig

    model = _fast("llama")
    inputs = tiny_models.batch()
    greedy = scratch_generate(model, **inputs, names=["default"] * 3, steps=NEW)
    eos = int(greedy[0, 6 + 1])  # row 0's second new token: row 0 stops there
    for min_new in (0, 3):
        config = GenerationConfig(
            max_new_tokens=NEW, min_new_tokens=min_new, eos_token_id=eos, pad_token_id=0, do_sample=False
        )
        expected = scratch_generate(
            model, **inputs, names=["default"] * 3, steps=NEW, eos=eos, min_new=min_new
        )
        on = model.generate(**inputs, generation_config=config)
        off = model.generate(**inputs, generation_config=config, reuse_prompt_kv=False)
        assert torch.equal(on, expected) and torch.equal(off, expected), min_new
    # max_length counts the L input tokens only, as without reuse
    out = model.generate(**inputs, max_length=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy[:, :8])


def test_use_cache_false_does_not_reuse():
    model = _fast("gpt2")
    inputs = tiny_models.batch()
    expected = scratch_generate(model, **inputs, names=["default"] * 3, steps=NEW)
    before = _counts()
    with FastpromptOps() as ops:
        out = model.generate(**inputs, use_cache=False, reuse_prompt_kv=True, **GREEDY)
    assert _delta(before) == {"computed": 0, "reused": 0} and ops.forward == NEW
    assert torch.equal(out, expected)


# ------------------------------------------------------------------------------ the decoder work saved


def _first_layer(base):
    for path in ("model.layers", "transformer.h", "model.decoder.layers"):
        obj = base
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj[0]
    raise AttributeError(type(base).__name__)


class RowsSeen:
    """Records the [batch, positions] of every call of the base model's first decoder layer."""

    def __init__(self, model):
        self.shapes: list[tuple[int, int]] = []
        self.handle = _first_layer(model.get_base_model()).register_forward_pre_hook(
            self._hook, with_kwargs=True
        )

    def _hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.shapes.append(tuple(hidden.shape[:2]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
def test_repeated_generate_does_not_run_the_decoder_over_the_virtual_tokens(family):
    n = 7
    model = _fast(family, n)
    inputs = tiny_models.batch()  # B=3, L=6
    with RowsSeen(model) as first:
        model.generate(**inputs, **GREEDY)
    assert first.shapes == [(1, n), (3, 6)] + [(3, 1)] * (NEW - 1)  # the prompt once, then L only
    with RowsSeen(model) as again, FastpromptOps() as ops:
        model.generate(**inputs, **GREEDY)
    assert again.shapes == [(3, 6)] + [(3, 1)] * (NEW - 1)
    assert ops.forward == 0  # no concat at all: the prompt rows come from the cache
    with RowsSeen(model) as off:
        model.generate(**inputs, reuse_prompt_kv=False, **GREEDY)
    assert off.shapes == [(3, n + 6)] + [(3, 1)] * (NEW - 1)


def test_stored_prompt_kv_is_never_written_by_generation():
    model = _fast("gemma3", 20)
    inputs = tiny_models.batch()
    model.generate(**inputs, **GREEDY)
    entry = prompt_kv.prompt_kv_store(model).get(model, "default")
    saved = [t.clone() for t in (*entry.keys, *entry.values)]
    model.generate(**inputs, num_beams=3, **GREEDY)
    model.generate(**inputs, cache_implementation="static", **GREEDY)
    assert all(torch.equal(a, b) for a, b in zip(saved, (*entry.keys, *entry.values), strict=True))


# ---------------------------------------------------------------------------------- never stale


def _check_recomputed(model, inputs, change):
    """Generate, apply ``change``, generate again: one recompute, and the result of the changed model."""
    model.generate(**inputs, **GREEDY)
    change()
    before = _counts()
    out = model.generate(**inputs, **GREEDY)
    assert _delta(before) == {"computed": 1, "reused": 0}
    names = [model.active_adapter] * inputs["input_ids"].shape[0]
    assert torch.equal(out, scratch_generate(model, **inputs, names=names, steps=NEW))
    return out


def _perturb_in_place(tensor, scale=0.5):
    with torch.no_grad():
        tensor.add_(scale * torch.randn_like(tensor))


@pytest.mark.parametrize(
    "how",
    ["optimizer_step", "in_place", "data_assignment", "data_in_place", "base_in_place", "base_replaced"],
)
def test_any_change_of_the_table_or_the_base_model_recomputes(how):
    torch.manual_seed(0)
    model = _fast("llama")
    inputs = tiny_models.batch()
    weight = _table(model, "default")
    base_weight = _first_layer(model.get_base_model()).self_attn.v_proj.weight

    def change():
        if how == "optimizer_step":
            optimizer = torch.optim.SGD([weight], lr=10.0)
            logits = model(**inputs).logits
            (logits * torch.randn_like(logits)).sum().backward()
            optimizer.step()
        elif how == "in_place":
            _perturb_in_place(weight)
        elif how == "data_assignment":
            weight.data = torch.randn_like(weight)
        elif how == "data_in_place":  # bypasses the version counter: the rows themselves are compared
            weight.data.mul_(-1.5)
        elif how == "base_in_place":
            _perturb_in_place(base_weight, 2.0)
        elif how == "base_replaced":
            layer = _first_layer(model.get_base_model()).self_attn.v_proj
            layer.weight = torch.nn.Parameter(torch.randn_like(layer.weight), requires_grad=False)

    first = model.generate(**inputs, **GREEDY)
    assert not torch.equal(_check_recomputed(model, inputs, change), first) or how == "optimizer_step"


def test_dtype_change_recomputes():
    model = _fast("llama")
    inputs = tiny_models.batch()
    model.generate(**inputs, **GREEDY)
    model.to(torch.float64)
    before = _counts()
    out = model.generate(**inputs, **GREEDY)
    assert _delta(before)["computed"] == 1
    entry = prompt_kv.prompt_kv_store(model).get(model, "default")
    assert entry.keys[0].dtype == torch.float64
    assert torch.equal(out, scratch_generate(model, **inputs, names=["default"] * 3, steps=NEW))


def test_fingerprint_sees_device_dtype_and_storage():
    base = tiny_models.build("gpt2", "CAUSAL_LM")
    key = prompt_kv.base_fingerprint(base)
    assert prompt_kv.base_fingerprint(base) == key
    moved = copy.deepcopy(base)  # other storage: another model
    assert prompt_kv.base_fingerprint(moved) != key
    base.to("meta")  # stands in for a device move on a machine with one device
    assert prompt_kv.base_fingerprint(base) != key


def _two_adapters(family="llama"):
    model = _fast(family)
    torch.manual_seed(5)
    model.add_adapter("other", peft_config("CAUSAL_LM", 3))
    return model.eval()


def test_set_adapter_uses_each_adapters_own_prompt_kv():
    model = _two_adapters()
    inputs = tiny_models.batch()
    before = _counts()
    outs = {}
    for name in ("default", "other", "default", "other"):
        model.set_adapter(name)
        outs.setdefault(name, []).append(model.generate(**inputs, **GREEDY))
    assert _delta(before) == {"computed": 2, "reused": 2}
    for name, (a, b) in outs.items():
        expected = scratch_generate(model, **inputs, names=[name] * 3, steps=NEW)
        assert torch.equal(a, expected) and torch.equal(b, expected)
    assert not torch.equal(outs["default"][0], outs["other"][0])


def test_load_adapter_and_delete_adapter(tmp_path):
    model = _two_adapters()
    inputs = tiny_models.batch()
    donor = _fast("llama", seed=7)  # same base weights, other prompt table
    donor.save_pretrained(tmp_path)
    model.set_adapter("other")
    model.generate(**inputs, **GREEDY)
    store = prompt_kv.prompt_kv_store(model)
    assert "other" in store.names()
    model.delete_adapter("other")  # freed at once, not at the next generate
    assert "other" not in store.names()
    model.load_adapter(tmp_path, adapter_name="other")
    model.set_adapter("other")
    before = _counts()
    out = model.generate(**inputs, **GREEDY)
    assert _delta(before)["computed"] == 1
    assert torch.equal(out, scratch_generate(model, **inputs, names=["other"] * 3, steps=NEW))
    assert torch.equal(_table(model, "other"), _table(donor, "default"))


def test_bounded_number_of_adapters():
    model = _two_adapters()
    torch.manual_seed(9)
    model.add_adapter("third", peft_config("CAUSAL_LM", 3))
    model.eval()
    inputs = tiny_models.batch()
    store = prompt_kv.prompt_kv_store(model)
    store.max_adapters = 2
    for name in ("default", "other", "third"):
        model.set_adapter(name)
        model.generate(**inputs, **GREEDY)
    assert store.names() == ["other", "third"] and store.nbytes() > 0  # least recently used dropped
    store.max_adapters = 0
    assert len(store) == 0
    before = _counts()
    model.generate(**inputs, **GREEDY)
    model.generate(**inputs, **GREEDY)
    assert _delta(before) == {"computed": 2, "reused": 0} and len(store) == 0
    with pytest.raises(ValueError, match="max_adapters"):
        store.max_adapters = -1
    store.max_adapters = 3
    model.generate(**inputs, **GREEDY)
    store.clear()
    assert len(store) == 0


def test_training_mode_never_reuses():
    model = _fast("gpt2")
    inputs = tiny_models.batch()
    model.generate(**inputs, **GREEDY)
    model.train()
    before = _counts()
    model.generate(**inputs, reuse_prompt_kv=True, **GREEDY)
    model.generate(**inputs, **GREEDY)
    assert _delta(before) == {"computed": 0, "reused": 0}
    model.eval()
    model.generate(**inputs, **GREEDY)
    assert _delta(before) == {"computed": 0, "reused": 1}


# ---------------------------------------------------------------------------------- mixed adapters


@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapter_names_rows_equal_each_row_alone(family, reuse):
    model = _two_adapters(family)
    names = ["other", "default", "other"]
    inputs = tiny_models.batch()
    before = _counts()
    out = model.generate(**inputs, adapter_names=names, reuse_prompt_kv=reuse, **GREEDY)
    if reuse:
        assert _delta(before)["computed"] == 2
    assert torch.equal(out, scratch_generate(model, **inputs, names=names, steps=NEW))
    beams = dict(GREEDY, num_beams=3, num_return_sequences=2)
    mixed = model.generate(**inputs, adapter_names=names, reuse_prompt_kv=reuse, **beams)
    for row, name in enumerate(names):
        model.set_adapter(name)
        alone = model.generate(
            **{k: v[row : row + 1] for k, v in inputs.items()}, reuse_prompt_kv=False, **beams
        )
        assert torch.equal(mixed[2 * row : 2 * row + 2], alone), (row, name)
    model.set_adapter("default")


def test_adapter_names_reuse_with_static_cache_and_sampling():
    model = _two_adapters("gemma3")
    names = ["default", "other", "other"]
    inputs = tiny_models.batch()
    expected = scratch_generate(model, **inputs, names=names, steps=NEW)
    out = model.generate(**inputs, adapter_names=names, cache_implementation="static", **GREEDY)
    assert torch.equal(out, expected)
    sampling = dict(max_new_tokens=NEW, do_sample=True, num_return_sequences=2, pad_token_id=0)
    torch.manual_seed(1)
    on = model.generate(**inputs, adapter_names=names, **sampling)
    torch.manual_seed(1)
    assert torch.equal(on, model.generate(**inputs, adapter_names=names, reuse_prompt_kv=False, **sampling))


@pytest.mark.parametrize(
    "names,error,match",
    [
        (["default", "nope", "default"], ValueError, "'nope'.*prompt-tuning adapters"),
        (["default", "other"], ValueError, "2 names but the batch has 3"),
        ("default", TypeError, "list"),
    ],
)
def test_generate_bad_adapter_names(names, error, match):
    model = _two_adapters()
    with pytest.raises(error, match=match):
        model.generate(**tiny_models.batch(), adapter_names=names, **GREEDY)


# ----------------------------------------------------------------------------- keyword and errors


def test_keyword_never_reaches_transformers(monkeypatch):
    model = _fast("gpt2")
    base = model.get_base_model()
    seen = []
    original = base.generate

    def spy(*args, **kwargs):
        seen.append(set(kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(base, "generate", spy)
    inputs = tiny_models.batch()
    for reuse in (True, False, None):
        model.generate(**inputs, reuse_prompt_kv=reuse, **GREEDY)
    with model.disable_adapter():
        out = model.generate(**inputs, reuse_prompt_kv=True, **GREEDY)
    plain = tiny_models.build("gpt2", "CAUSAL_LM")
    assert torch.equal(out, plain.generate(**inputs, **GREEDY))
    assert seen and all("reuse_prompt_kv" not in keys and "adapter_names" not in keys for keys in seen)


def test_what_cannot_reuse_is_a_clear_error_when_asked_and_falls_back_otherwise():
    from transformers import DynamicCache

    model = _fast("llama")
    inputs = tiny_models.batch()
    expected = model.generate(**inputs, reuse_prompt_kv=False, **GREEDY)
    with pytest.raises(TypeError, match="reuse_prompt_kv must be True, False or None"):
        model.generate(**inputs, reuse_prompt_kv="yes", **GREEDY)
    cases = [
        (dict(output_attentions=True, return_dict_in_generate=True), "output_attentions"),
        (dict(cache_implementation="quantized"), "cache_implementation='quantized'"),
    ]
    for extra, match in cases:
        with pytest.raises(ValueError, match=f"reuse_prompt_kv=True cannot apply: .*{match}"):
            model.generate(**inputs, reuse_prompt_kv=True, **GREEDY, **extra)
    out = model.generate(**inputs, output_attentions=True, return_dict_in_generate=True, **GREEDY)
    assert torch.equal(out.sequences, expected)  # the default falls back to no reuse
    with pytest.raises(ValueError, match=r"a cache was passed in \((cache|past_key_values)=\.\.\.\)"):
        model.generate(**inputs, reuse_prompt_kv=True, past_key_values=DynamicCache(), **GREEDY)


@pytest.mark.parametrize("cache_key", ["cache", "past_key_values"])
def test_prefill_writes_the_prompt_kv_under_either_cache_name(cache_key):
    """transformers < 5.24 passes ``past_key_values``, >= 5.24 ``cache``: the prefill fills either."""
    from transformers import DynamicCache

    from fastprompt.integrations import peft_generate

    model = _fast("gpt2", 4)
    entry = prompt_kv.prompt_kv_store(model).get(model, "default")
    input_ids = torch.randint(4, 100, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)

    def fake_base_prepare(input_ids, **kwargs):
        return {"input_ids": input_ids, **kwargs}

    model.base_model_prepare_inputs_for_generation = fake_base_prepare
    state = peft_generate.GenerationState(
        4, None, peft_generate.PendingKV(entry.keys, entry.values, None, None)
    )
    peft_generate.generation_states()[model] = state
    try:
        cache = DynamicCache()
        out = peft_generate.causal_lm_prepare_inputs_for_generation(
            model, (input_ids,), {cache_key: cache, "attention_mask": mask}
        )
    finally:
        peft_generate.generation_states().pop(model)
    assert cache.get_seq_length() == 4 and state.pending is None
    assert torch.equal(cache.layers[0].keys, entry.keys[0].expand(2, -1, -1, -1))
    assert "inputs_embeds" not in out and torch.equal(out["input_ids"], input_ids)
    assert out["attention_mask"].shape == (2, 4 + 5)


def test_patch_peft_models_reuse_too():
    base = tiny_models.build("llama", "CAUSAL_LM")
    torch.manual_seed(1)
    fastprompt.patch_peft()
    try:
        model = peft.get_peft_model(base, peft_config("CAUSAL_LM", 3)).eval()
        inputs = tiny_models.batch()
        before = _counts()
        out = model.generate(**inputs, **GREEDY)
        assert _delta(before)["computed"] == 1
        assert torch.equal(out, scratch_generate(model, **inputs, names=["default"] * 3, steps=NEW))
    finally:
        fastprompt.unpatch_peft()
