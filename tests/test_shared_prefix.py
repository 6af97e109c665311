"""``share_prompt_prefix``: the virtual tokens run once per adapter per batch, with PEFT's results.

Every case compares with PEFT's own model (same base and prompt weights): the loss, every position's
logits (virtual ones included), and the prompt table's gradient under a random upstream gradient, with
left padding and ``-100`` labels. It also checks that the prompt really ran once: the first decoder layer
never sees ``N + L`` positions while sharing.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft_helpers import CausalRows, model_pair, peft_config

import fastprompt
from fastprompt.prompt_once import policy as shared_prefix
from fastprompt.testing import tiny_models

peft = pytest.importorskip("peft")

N = 12  # virtual tokens: more than Gemma3's sliding window below
RTOL = 2e-5  # fp32 rounding: the shared path sums the same terms in another order


def _batch(batch: int = 4, length: int = 7, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, tiny_models.VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[min(2, batch - 1), :1] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[1 % batch, 2] = -100
    return ids, mask, labels


def _pair(family: str, task: str = "CAUSAL_LM", n: int = N, **overrides):
    if overrides:  # a smaller sliding window etc.
        base = tiny_models.build(family, task)
        config = tiny_models.config(family, **overrides)
        base = type(base)(config)
        torch.manual_seed(1)
        reference = peft.get_peft_model(copy.deepcopy(base), peft_config(task, n))
        torch.manual_seed(1)
        fast = fastprompt.get_peft_model(copy.deepcopy(base), peft_config(task, n))
        fast.load_state_dict(reference.state_dict())
        return reference, fast
    return model_pair(family, task, num_virtual_tokens=n)


def _first_layer(model):
    base = model.get_base_model()
    inner = getattr(base, base.base_model_prefix)
    for path in ("layers", "h", "decoder.layers", "encoder.layer"):
        found = inner
        for part in path.split("."):
            found = getattr(found, part, None)
        if found is not None:
            return found[0]
    raise AttributeError(f"no decoder layers found in {type(inner).__name__}")


def _checkpointing(model, reentrant: bool):
    """Gradient checkpointing on, by the name this transformers version has for it."""
    base = model.get_base_model()
    kwargs = {"use_reentrant": reentrant}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class _Positions:
    """Records the sequence lengths the first decoder layer runs over."""

    def __init__(self, model):
        self.seen: list[tuple[int, int]] = []
        self.handle = _first_layer(model).register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.seen.append(tuple(hidden.shape[:2]))

    def close(self):
        self.handle.remove()


def _close(actual, expected, what: str):
    scale = expected.abs().max().clamp_min(1e-6)
    error = ((actual - expected).abs().max() / scale).item()
    assert error <= RTOL, f"{what}: relative error {error:.2e}"


def _grad(model, name: str = "default") -> torch.Tensor:
    return model.prompt_encoder[name].embedding.weight.grad


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("llama", {}),
        ("qwen2", {}),
        ("mistral", {}),
        ("gpt2", {}),
        ("opt", {}),
        ("gemma2", {}),
        ("gemma3", {"sliding_window": 8}),  # a window shorter than N
    ],
)
def test_causal_lm_equals_peft(family, overrides, backend):
    reference, fast = _pair(family, **overrides)
    reference.train(), fast.train()
    ids, mask, labels = _batch()
    expected = reference(input_ids=ids, attention_mask=mask, labels=labels)
    positions = _Positions(fast)
    try:
        actual = fast(input_ids=ids, attention_mask=mask, labels=labels, share_prompt_prefix=True)
    finally:
        positions.close()
    assert positions.seen == [(1, N), (4, 7)]  # the prompt once (batch 1), then the tokens alone
    assert actual.logits.shape == expected.logits.shape == (4, N + 7, tiny_models.VOCAB)
    _close(actual.logits, expected.logits, "logits")
    _close(actual.loss, expected.loss, "loss")
    upstream = torch.randn_like(expected.logits)
    (expected.loss + (expected.logits * upstream).sum()).backward()
    (actual.loss + (actual.logits * upstream).sum()).backward()
    _close(_grad(fast), _grad(reference), "prompt gradient")


def test_loss_only_gradient_and_cache(backend):
    """The loss alone (the last virtual position predicts the first label) and the N+L cache."""
    reference, fast = _pair("llama")
    ids, mask, labels = _batch()
    expected = reference(input_ids=ids, attention_mask=mask, labels=labels, use_cache=True)
    actual = fast(input_ids=ids, attention_mask=mask, labels=labels, use_cache=True, share_prompt_prefix=True)
    expected.loss.backward()
    actual.loss.backward()
    _close(_grad(fast), _grad(reference), "prompt gradient from the loss")
    cache, reference_cache = actual.past_key_values, expected.past_key_values
    assert cache.get_seq_length() == reference_cache.get_seq_length() == N + 7
    for layer, reference_layer in zip(cache.layers, reference_cache.layers, strict=True):
        _close(layer.keys, reference_layer.keys, "cached keys")
        _close(layer.values, reference_layer.values, "cached values")


@pytest.mark.parametrize("loss", ["default", "custom loss_function"])
def test_loss_num_items_and_no_labels_left(loss):
    """The loss with ``num_items_in_batch`` (int and tensor) and with every label ``-100`` (NaN, as PEFT's
    mean over nothing), by transformers' ``ForCausalLMLoss`` (computed without the [B, L+1, V] copy) and by
    any other ``loss_function``, which gets ``cat(last virtual, tokens)`` and ``[-100, labels]``."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    reference, fast = _pair("llama")
    seen = []
    if loss != "default":

        def custom(logits, labels, **kwargs):
            seen.append((tuple(logits.shape), labels[:, 0].tolist()))
            return ForCausalLMLoss(logits, labels, **kwargs)

        for model in (reference, fast):
            model.get_base_model().loss_function = custom
    ids, mask, labels = _batch()
    for num_items in (None, 11, torch.tensor(13)):
        extra = {} if num_items is None else {"num_items_in_batch": num_items}
        expected = reference(input_ids=ids, attention_mask=mask, labels=labels, **extra)
        actual = fast(input_ids=ids, attention_mask=mask, labels=labels, share_prompt_prefix=True, **extra)
        _close(actual.loss, expected.loss, f"loss, num_items_in_batch={num_items}")
    ignored = torch.full_like(labels, -100)
    expected = reference(input_ids=ids, attention_mask=mask, labels=ignored)
    actual = fast(input_ids=ids, attention_mask=mask, labels=ignored, share_prompt_prefix=True)
    assert expected.loss.isnan() and actual.loss.isnan()
    if loss != "default":
        batch, length = ids.shape
        assert (tuple(seen[1][0]), seen[1][1]) == ((batch, length + 1, tiny_models.VOCAB), [-100] * batch)


def test_return_dict_false_gives_peft_tuple():
    reference, fast = _pair("llama")
    ids, mask, labels = _batch()
    expected = reference(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    actual = fast(
        input_ids=ids, attention_mask=mask, labels=labels, return_dict=False, share_prompt_prefix=True
    )
    assert isinstance(actual, tuple) and len(actual) == len(expected)
    _close(actual[0], expected[0], "loss")
    _close(actual[1], expected[1], "logits")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sequence_classification_equals_peft(family):
    reference, fast = _pair(family, "SEQ_CLS")
    reference.train(), fast.train()
    ids, mask, _ = _batch()
    mask = torch.ones_like(mask)  # PEFT's causal classifiers pool the last position: no right padding
    labels = torch.tensor([0, 1, 1, 0])
    expected = reference(input_ids=ids, attention_mask=mask, labels=labels)
    actual = fast(input_ids=ids, attention_mask=mask, labels=labels, share_prompt_prefix=True)
    _close(actual.logits, expected.logits, "pooled logits")
    _close(actual.loss, expected.loss, "loss")
    expected.loss.backward()
    actual.loss.backward()
    _close(_grad(fast), _grad(reference), "prompt gradient")


def test_token_classification_equals_peft():
    reference, fast = _pair("llama", "TOKEN_CLS")
    ids, mask, _ = _batch()
    expected = reference(input_ids=ids, attention_mask=mask)
    actual = fast(input_ids=ids, attention_mask=mask, share_prompt_prefix=True)
    assert actual.logits.shape == expected.logits.shape
    _close(actual.logits, expected.logits, "logits of every position")
    upstream = torch.randn_like(expected.logits)
    (expected.logits * upstream).sum().backward()
    (actual.logits * upstream).sum().backward()
    _close(_grad(fast), _grad(reference), "prompt gradient")


def test_mixed_adapters_each_prompt_runs_once(backend):
    """adapter_names: one prompt pass of batch K; each row equals that row run alone with set_adapter."""
    _, fast = _pair("llama")
    torch.manual_seed(7)
    fast.add_adapter("other", peft_config("CAUSAL_LM", N))
    ids, mask, labels = _batch(batch=5)
    names = ["default", "other", "other", "default", "other"]
    positions = _Positions(fast)
    try:
        shared = fast(
            input_ids=ids, attention_mask=mask, labels=labels, adapter_names=names, share_prompt_prefix=True
        )
    finally:
        positions.close()
    assert positions.seen == [(2, N), (5, 7)]
    upstream = torch.randn_like(shared.logits)
    (shared.loss + (shared.logits * upstream).sum()).backward()
    grads = {name: _grad(fast, name).clone() for name in ("default", "other")}
    fast.zero_grad()
    plain = fast(
        input_ids=ids, attention_mask=mask, labels=labels, adapter_names=names, share_prompt_prefix=False
    )
    (plain.loss + (plain.logits * upstream).sum()).backward()
    _close(shared.logits, plain.logits, "logits")
    _close(shared.loss, plain.loss, "loss")
    for name, grad in grads.items():
        _close(grad, _grad(fast, name), f"gradient of {name}")
    for row, name in enumerate(names):  # and each row as PEFT runs it alone
        fast.set_adapter(name)
        alone = fast(
            input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1], share_prompt_prefix=False
        )
        _close(shared.logits[row : row + 1], alone.logits, f"row {row}")


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_gradient_checkpointing_two_steps(family, reentrant):
    reference, fast = _pair(family, **({"sliding_window": 8} if family == "gemma3" else {}))
    ids, mask, labels = _batch()
    for model in (reference, fast):
        model.train()
        _checkpointing(model, reentrant)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (reference, fast)]
    positions = _Positions(fast)
    try:
        for _ in range(2):
            expected = reference(input_ids=ids, attention_mask=mask, labels=labels)
            actual = fast(input_ids=ids, attention_mask=mask, labels=labels, share_prompt_prefix=True)
            _close(actual.loss, expected.loss, "loss")
            expected.loss.backward()
            actual.loss.backward()
            _close(_grad(fast), _grad(reference), "prompt gradient")
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()
    finally:
        positions.close()
    assert (4, N + 7) not in positions.seen
    _close(
        fast.prompt_encoder["default"].embedding.weight,
        reference.prompt_encoder["default"].embedding.weight,
        "table",
    )


class _Data(CausalRows):
    """``CausalRows`` whose rows have different numbers of labels: ``num_items_in_batch`` matters."""

    def __getitem__(self, i):
        row = super().__getitem__(i)
        row["labels"][: i % 3] = -100
        return row


def _train(model, output_dir) -> torch.Tensor:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=0.1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
    )
    Trainer(model=model, args=args, train_dataset=_Data()).train()
    return model.prompt_encoder["default"].embedding.weight.detach().clone()


def test_trainer_with_gradient_accumulation(tmp_path):
    """Trainer passes num_items_in_batch under accumulation: the shared loss uses it as the model would."""
    reference, fast = _pair("llama", n=16)
    fastprompt.accelerate(fast, share_prompt_prefix=True)  # the model-wide default: no change to the loop
    before = shared_prefix.CALLS["shared"]
    expected = _train(reference, tmp_path / "peft")
    actual = _train(fast, tmp_path / "fast")
    assert shared_prefix.CALLS["shared"] - before == 4  # 2 steps x 2 micro-batches
    _close(actual, expected, "prompt table after training")


# ------------------------------------------------------------------------------------- when not


def _fallback_case(name: str):
    """(model, call keywords) for a case where sharing is not exact, and the reason's words."""
    ids, mask, labels = _batch()
    call = dict(input_ids=ids, attention_mask=mask)
    if name == "dropout":
        base = tiny_models.build("gpt2", "CAUSAL_LM")
        base = type(base)(tiny_models.config("gpt2", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1))
        model = fastprompt.get_peft_model(base, peft_config("CAUSAL_LM", N)).train()
        return model, call, "dropout"
    if name == "bidirectional":
        _, model = _pair("bert", "SEQ_CLS")
        return model, call, "'bert'"
    if name == "encoder-decoder":
        _, model = _pair("t5", "SEQ_2_SEQ_LM")
        call["decoder_input_ids"] = ids[:, :3]
        return model, call, "task type"
    if name == "question answering":
        _, model = _pair("llama", "QUESTION_ANS")
        return model, call, "task type"
    _, model = _pair("llama")
    if name == "output_attentions":
        call["output_attentions"] = True
    elif name == "output_hidden_states":
        call["output_hidden_states"] = True
    elif name == "cache passed in":
        from transformers import DynamicCache

        call["past_key_values"] = DynamicCache()
        return model, call, "cache"
    elif name == "checkpointed gpt2":
        _, model = _pair("gpt2")
        _checkpointing(model.train(), reentrant=False)
        call["labels"] = labels
        return model, call, "gradient checkpointing"
    elif name == "token classification labels":
        _, model = _pair("llama", "TOKEN_CLS")
        call["labels"] = labels
        return model, call, "labels"
    return model, call, name


FALLBACKS = [
    "dropout",
    "bidirectional",
    "encoder-decoder",
    "question answering",
    "output_attentions",
    "output_hidden_states",
    "cache passed in",
    "checkpointed gpt2",
]


@pytest.mark.parametrize("name", FALLBACKS)
def test_true_raises_naming_the_reason(name):
    model, call, words = _fallback_case(name)
    with pytest.raises(ValueError, match=f"share_prompt_prefix=True cannot apply: .*{words}"):
        model(**call, share_prompt_prefix=True)


@pytest.mark.parametrize("name", [n for n in FALLBACKS if n not in ("encoder-decoder", "question answering")])
def test_default_falls_back_to_peft_path(name):
    """The default (None) takes PEFT's path where sharing is not exact, even where it would pay."""
    model, call, _ = _fallback_case(name)
    if name == "checkpointed gpt2":  # found at run time: the first call tries, then takes PEFT's path
        _check_first_call_is_peft(model, call)
    positions = _Positions(model)
    before = shared_prefix.CALLS["shared"]
    try:
        model(**call)
    finally:
        positions.close()
    assert shared_prefix.CALLS["shared"] == before
    assert positions.seen[0] == (4, N + 7)


def _check_first_call_is_peft(model, call):
    """A model that turns out at run time not to read the prompt's cache (GPT-2 hands its blocks no cache
    under checkpointing): the call that finds it out gives PEFT's result, and is counted not shared."""
    shared_prefix.OBSERVED.clear()
    reference = copy.deepcopy(model)
    ids, mask, labels = _batch(batch=8, length=9)  # where sharing pays: the default tries it
    call = {**call, "input_ids": ids, "attention_mask": mask, "labels": labels}
    before = dict(shared_prefix.CALLS)
    with pytest.warns(RuntimeWarning, match="takes PEFT's path from now on"):
        out = model(**call)
    expected = reference(**call, share_prompt_prefix=False)
    torch.testing.assert_close(out.logits, expected.logits, rtol=RTOL, atol=1e-6)
    assert shared_prefix.CALLS["not shared"] == before.get("not shared", 0) + 1
    assert shared_prefix.CALLS["shared"] == before.get("shared", 0)
    assert "gradient checkpointing" in shared_prefix.observed_reason(model.get_base_model(), True)


def test_token_classification_labels_are_left_to_peft():
    model, call, _ = _fallback_case("token classification labels")
    with pytest.raises(
        ValueError, match="share_prompt_prefix=True cannot apply: token classification labels"
    ):
        model(**call, share_prompt_prefix=True)


def test_default_shares_where_it_pays_and_not_where_it_does_not():
    _, fast = _pair("llama", n=40)
    positions = _Positions(fast)
    try:
        ids, mask, _ = _batch(batch=8, length=8)
        fast(input_ids=ids, attention_mask=mask)  # 8 x (40 + 8) positions: sharing pays
        ids, mask, _ = _batch(batch=2, length=100)
        fast(input_ids=ids, attention_mask=mask)  # 2 x (40 + 100): the saved 40 do not repay a second call
    finally:
        positions.close()
    assert positions.seen == [(1, 40), (8, 8), (2, 140)]


def test_cost_rule():
    assert shared_prefix.sharing_pays(batch=8, prompts=1, num_virtual=100, length=64)
    assert shared_prefix.sharing_pays(batch=4, prompts=1, num_virtual=200, length=256)
    assert shared_prefix.sharing_pays(batch=8, prompts=1, num_virtual=20, length=128)
    assert not shared_prefix.sharing_pays(batch=2, prompts=1, num_virtual=8, length=128)
    assert not shared_prefix.sharing_pays(batch=4, prompts=4, num_virtual=100, length=8)  # one row per prompt
    assert not shared_prefix.sharing_pays(batch=1, prompts=1, num_virtual=100, length=8)


def test_model_wide_and_global_defaults():
    reference, fast = _pair("llama", n=40)
    ids, mask, _ = _batch(batch=8, length=8)
    fastprompt.accelerate(fast, share_prompt_prefix=False)
    positions = _Positions(fast)
    try:
        fast(input_ids=ids, attention_mask=mask)  # the model's default: PEFT's path
        fast(input_ids=ids, attention_mask=mask, share_prompt_prefix=None)  # the call's word wins
    finally:
        positions.close()
    assert positions.seen == [(8, 48), (1, 40), (8, 8)]
    with pytest.raises(TypeError, match="share_prompt_prefix must be True, False or None"):
        fast(input_ids=ids, attention_mask=mask, share_prompt_prefix="yes")
    with pytest.raises(TypeError, match="share_prompt_prefix"):
        fastprompt.accelerate(fast, share_prompt_prefix=1)

    base = tiny_models.build("llama", "CAUSAL_LM")
    model = fastprompt.get_peft_model(base, peft_config("CAUSAL_LM", 4), share_prompt_prefix=True)
    with pytest.raises(ValueError, match="output_attentions"):
        model(input_ids=ids, output_attentions=True)

    fastprompt.patch_peft(share_prompt_prefix=False)
    try:
        patched = peft.get_peft_model(tiny_models.build("llama", "CAUSAL_LM"), peft_config("CAUSAL_LM", 40))
        positions = _Positions(patched)
        patched(input_ids=ids, attention_mask=mask)
        positions.close()
        assert positions.seen == [(8, 48)]
        built = fastprompt.get_peft_model(
            tiny_models.build("llama", "CAUSAL_LM"), peft_config("CAUSAL_LM", 40)
        )
        positions = _Positions(built)  # get_peft_model without the keyword follows patch_peft's default
        built(input_ids=ids, attention_mask=mask)
        positions.close()
        assert positions.seen == [(8, 48)]
    finally:
        fastprompt.unpatch_peft()
    assert shared_prefix.model_default(reference) is None


def test_inputs_embeds_path_rejects_true_and_ignores_the_rest():
    _, fast = _pair("llama")
    ids, mask, _ = _batch()
    embeds = fast.word_embeddings(ids)
    out = fast(inputs_embeds=embeds, attention_mask=mask, share_prompt_prefix=False)  # PEFT's own path
    assert out.logits.shape[1] == N + 7
    with pytest.raises(ValueError, match="share_prompt_prefix=True cannot apply"):
        fast(inputs_embeds=embeds, attention_mask=mask, share_prompt_prefix=True)


def test_eval_under_no_grad_and_generation_unchanged():
    reference, fast = _pair("llama", n=40)
    ids, mask, _ = _batch(batch=8, length=8)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask)
        actual = fast(input_ids=ids, attention_mask=mask, share_prompt_prefix=True)
    _close(actual.logits, expected.logits, "logits")
    tokens = fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    plain = fast.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, reuse_prompt_kv=False
    )
    assert torch.equal(tokens, plain)


@pytest.mark.parametrize("share", [True, False])
def test_torch_compile_of_the_model_and_a_static_cache(share):
    """``torch.compile(model)`` shares (dynamo runs the shared forward, graph breaks allowed) or not, with
    PEFT's loss, logits and gradient and no warning about fastprompt's code (dynamo warns on lru_cache'd
    functions it traces); a static cache passed in falls back to PEFT's path."""
    from transformers import StaticCache

    reference, fast = _pair("llama")
    fastprompt.accelerate(fast, share_prompt_prefix=share)
    ids, mask, labels = _batch()
    reference.train(), fast.train()
    expected = reference(input_ids=ids, attention_mask=mask, labels=labels)
    expected.loss.backward()
    before = shared_prefix.CALLS["shared"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        actual = torch.compile(fast)(input_ids=ids, attention_mask=mask, labels=labels)
    ours = [str(w.message) for w in seen if "fastprompt" in f"{w.filename} {w.message}"]
    assert not ours, ours
    actual.loss.backward()
    assert shared_prefix.CALLS["shared"] - before == int(share)
    _close(actual.loss, expected.loss, "loss")
    _close(actual.logits, expected.logits, "logits")
    _close(_grad(fast), _grad(reference), "prompt gradient")
    if not share:
        return

    reference, fast = _pair("llama", n=40)  # a shape where the default would share
    ids, mask, _ = _batch(batch=8, length=8)
    reference.eval(), fast.eval()
    config = fast.get_base_model().config
    caches = [StaticCache(config=config, max_cache_len=40 + ids.shape[1]) for _ in range(3)]
    before = dict(shared_prefix.CALLS)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, past_key_values=caches[0], use_cache=True)
        actual = fast(input_ids=ids, attention_mask=mask, past_key_values=caches[1], use_cache=True)
        with pytest.raises(ValueError, match="a cache was passed in"):
            fast(input_ids=ids, attention_mask=mask, past_key_values=caches[2], share_prompt_prefix=True)
    assert shared_prefix.CALLS["shared"] == before.get("shared", 0)
    _close(actual.logits, expected.logits, "logits with a static cache")
