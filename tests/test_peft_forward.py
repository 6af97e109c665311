"""Forward / backward parity with PEFT for every task type, through the fused op.

Each model pair is built twice from the same weights: once by ``peft.get_peft_model`` (the reference)
and once by ``fastprompt.get_peft_model``. Beyond the outputs, the keyword arguments that reach the
base model (attention mask and its dtype, labels, token_type_ids, inputs_embeds) are captured and
compared, and the ``torch.ops.fastprompt`` calls are counted.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft_helpers import FastpromptOps, main_output, model_pair, peft_config

from fastprompt.integrations import CALLS
from fastprompt.testing import tiny_models, tolerance

peft = pytest.importorskip("peft")

PAIRS = [(family, task) for family, tasks in tiny_models.SUPPORTED.items() for task in tasks]
# one model per task type (and the scaled embeddings) for the Triton interpreter runs
TRITON_PAIRS = [
    ("gpt2", "CAUSAL_LM"),
    ("gemma3", "CAUSAL_LM"),
    ("bart", "SEQ_2_SEQ_LM"),
    ("t5", "SEQ_2_SEQ_LM"),
    ("bert", "SEQ_CLS"),
    ("roberta", "TOKEN_CLS"),
    ("llama", "QUESTION_ANS"),
    ("opt", "FEATURE_EXTRACTION"),
]


def _inputs(family: str, task: str, *, labels: bool = True) -> dict:
    inputs = tiny_models.batch(token_type_ids=family in ("bert",))
    if not labels:
        return inputs
    batch_size, seq_len = inputs["input_ids"].shape
    generator = torch.Generator().manual_seed(7)
    if task == "CAUSAL_LM":
        inputs["labels"] = torch.where(inputs["attention_mask"].bool(), inputs["input_ids"], -100)
    elif task == "SEQ_2_SEQ_LM":
        inputs["labels"] = torch.randint(4, tiny_models.VOCAB, (batch_size, 4), generator=generator)
    elif task == "SEQ_CLS":
        inputs["labels"] = torch.randint(0, 3, (batch_size,), generator=generator)
    elif task == "TOKEN_CLS":  # PEFT does not prefix TOKEN_CLS labels: they must cover the N virtual tokens
        inputs["labels"] = torch.randint(0, 3, (batch_size, 3 + seq_len), generator=generator)
    elif task == "QUESTION_ANS":
        inputs["start_positions"] = torch.randint(0, seq_len, (batch_size,), generator=generator)
        inputs["end_positions"] = torch.randint(0, seq_len, (batch_size,), generator=generator)
    return inputs


class _Capture:
    """Records the keyword arguments of every call of ``module`` (a forward pre-hook)."""

    def __init__(self, module):
        self.calls: list[dict] = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append(dict(kwargs))

    def remove(self):
        self.handle.remove()


def _assert_same_kwargs(reference: dict, fast: dict, *, exact_embeds: bool, dtype=torch.float32):
    assert set(reference) == set(fast)
    for key, value in reference.items():
        other = fast[key]
        if isinstance(value, torch.Tensor):
            assert isinstance(other, torch.Tensor) and other.dtype == value.dtype, key
            if key == "inputs_embeds" and not exact_embeds:
                torch.testing.assert_close(other, value, **tolerance(dtype))
            else:
                assert torch.equal(other, value), key
        else:
            assert other == value, key


def _run_pair(family, task, *, dtype=None, exact=True):
    reference, fast = model_pair(family, task, dtype=dtype)
    reference.train()
    fast.train()  # dropout is 0 in the tiny configs; train() exercises PEFT's training-mode get_prompt
    inputs = _inputs(family, task)
    captures = [_Capture(reference.base_model), _Capture(fast.base_model)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(11)  # same dropout masks where a head has dropout
        out_ref = reference(**inputs)
        torch.manual_seed(11)
        with FastpromptOps() as ops:
            out_fast = fast(**inputs)
    for capture in captures:
        capture.remove()
    assert ops.forward == 1, ops.names
    _assert_same_kwargs(
        captures[0].calls[0], captures[1].calls[0], exact_embeds=exact, dtype=dtype or torch.float32
    )

    tol = tolerance(dtype or torch.float32)
    if exact:
        assert torch.equal(main_output(out_fast), main_output(out_ref))
    else:
        torch.testing.assert_close(main_output(out_fast), main_output(out_ref), **tol)
    if out_ref.get("loss") is not None:
        torch.testing.assert_close(out_fast.loss, out_ref.loss, **tol)

    # the prompt gradient, from a random upstream gradient
    fused_embeds = captures[1].calls[0]["inputs_embeds"]
    fused_embeds.retain_grad()
    grad_out = torch.randn(main_output(out_ref).shape, generator=torch.Generator().manual_seed(3)).to(
        main_output(out_ref).dtype
    )
    main_output(out_ref).backward(grad_out)
    with FastpromptOps() as ops:
        main_output(out_fast).backward(grad_out)
    assert any(name.startswith("prompt_concat_prompt_grad") for name in ops.names), ops.names
    grad_ref = reference.prompt_encoder["default"].embedding.weight.grad
    grad_fast = fast.prompt_encoder["default"].embedding.weight.grad
    assert grad_fast is not None and grad_fast.dtype == grad_ref.dtype
    # the fused backward: the batch sum of the gradient reaching the prompt rows, fp32-accumulated
    expected = fused_embeds.grad[:, :3].float().sum(0)
    torch.testing.assert_close(grad_fast[:3], expected, **tolerance(dtype or torch.float32))
    if exact or dtype is None:
        # and equal to PEFT's (downstream of a bit-identical forward)
        torch.testing.assert_close(grad_fast, grad_ref, **tolerance(dtype or torch.float32, torch.float32))
    if task == "SEQ_2_SEQ_LM":  # 2N rows; the encoder uses the first N, the rest get zero gradient (as PEFT)
        assert grad_fast.shape[0] == 2 * 3
        assert torch.count_nonzero(grad_fast[3:]) == 0
    # the base model stays frozen
    assert all(
        p.grad is None
        for n, p in fast.named_parameters()
        if "prompt_encoder" not in n and not p.requires_grad
    )
    return reference, fast


@pytest.mark.parametrize("family,task", PAIRS)
def test_parity_fp32(family, task):
    _run_pair(family, task)


@pytest.mark.parametrize("family,task", TRITON_PAIRS)
def test_parity_triton_interpreter(backend, family, task):
    _run_pair(family, task, exact=backend == "torch")


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3", "bart", "bert"])
def test_parity_bf16(backend, family):
    task = tiny_models.SUPPORTED[family][0]
    _run_pair(family, task, dtype=torch.bfloat16, exact=backend == "torch")


def test_causal_lm_semantics():
    """Mask prefixed with float32 ones, labels with -100, position/token_type ids dropped with warnings."""
    reference, fast = model_pair("llama", "CAUSAL_LM")
    inputs = _inputs("llama", "CAUSAL_LM")
    inputs["position_ids"] = torch.arange(inputs["input_ids"].shape[1]).expand(3, -1)
    inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    capture = _Capture(fast.base_model)
    with pytest.warns(UserWarning) as records:
        fast(**inputs)
    messages = [str(r.message) for r in records]
    assert any("Position ids are not supported" in m for m in messages)
    assert any("Token type ids are not supported" in m for m in messages)
    kwargs = capture.calls[0]
    assert kwargs["position_ids"] is None and kwargs["token_type_ids"] is None and "input_ids" not in kwargs
    assert kwargs["attention_mask"].dtype == torch.float32
    assert torch.equal(kwargs["attention_mask"][:, :3], torch.ones(3, 3))
    assert torch.equal(kwargs["labels"][:, :3], torch.full((3, 3), -100))
    embeds = kwargs["inputs_embeds"]
    assert embeds.shape == (3, 3 + 6, tiny_models.HIDDEN)
    # prompts first, then the left padding of the last row, then its tokens: P P P pad pad x x x x
    prompt = fast.prompt_encoder["default"].embedding.weight
    assert torch.equal(embeds[-1, :3], prompt)
    assert torch.equal(embeds[-1, 3:5], fast.word_embeddings(inputs["input_ids"][-1, :2]))


def test_token_type_ids_prefixed_for_classification():
    reference, fast = model_pair("bert", "SEQ_CLS")
    inputs = _inputs("bert", "SEQ_CLS")
    capture = _Capture(fast.base_model)
    fast(**inputs)
    token_type_ids = capture.calls[0]["token_type_ids"]
    assert token_type_ids.dtype == torch.long
    assert torch.equal(token_type_ids[:, :3], torch.zeros(3, 3, dtype=torch.long))
    assert torch.equal(token_type_ids[:, 3:], inputs["token_type_ids"])


def test_inputs_embeds_given_falls_back_to_peft():
    reference, fast = model_pair("gpt2", "CAUSAL_LM")
    embeds = fast.get_input_embeddings()(torch.tensor([[5, 6, 7]]))
    with FastpromptOps() as ops:
        out = fast(inputs_embeds=embeds)
    assert ops.forward == 0
    assert torch.equal(out.logits, reference(inputs_embeds=embeds).logits)


def test_inference_mode_and_no_grad():
    reference, fast = model_pair("opt", "CAUSAL_LM")
    inputs = _inputs("opt", "CAUSAL_LM", labels=False)
    with torch.inference_mode(), FastpromptOps() as ops:
        a = fast(**inputs).logits
    with torch.no_grad():
        b = reference(**inputs).logits
    assert ops.forward == 1 and torch.equal(a, b)


class _Shifted(torch.nn.Embedding):
    """A word-embedding module whose forward is more than a lookup: must not be fused."""

    def forward(self, input_ids):
        return super().forward(input_ids) * 0.5 + 1.0


class _PlainSubclass(torch.nn.Embedding):
    """Keeps nn.Embedding.forward: fused."""


@pytest.mark.parametrize("module_cls,fused", [(_Shifted, False), (_PlainSubclass, True)])
def test_unknown_word_embedding_modules(module_cls, fused):
    import copy

    import fastprompt

    base = tiny_models.build("gpt2", "CAUSAL_LM")
    old = base.get_input_embeddings()
    new = module_cls(old.num_embeddings, old.embedding_dim)
    new.load_state_dict(old.state_dict())
    base.set_input_embeddings(new)
    torch.manual_seed(0)
    reference = peft.get_peft_model(copy.deepcopy(base), peft_config("CAUSAL_LM"))
    torch.manual_seed(0)
    fast = fastprompt.get_peft_model(copy.deepcopy(base), peft_config("CAUSAL_LM"))
    inputs = _inputs("gpt2", "CAUSAL_LM", labels=False)
    before = CALLS["unfused"]
    with FastpromptOps() as ops:
        out = fast(**inputs).logits
    assert ops.forward == (1 if fused else 0)
    assert CALLS["unfused"] - before == (0 if fused else 1)
    assert torch.equal(out, reference(**inputs).logits)


def test_foreign_forward_hook_is_respected():
    reference, fast = model_pair("gpt2", "CAUSAL_LM")
    handle = fast.word_embeddings.register_forward_hook(lambda module, args, output: output * 2)
    inputs = _inputs("gpt2", "CAUSAL_LM", labels=False)
    with FastpromptOps() as ops:
        out = fast(**inputs).logits
    assert ops.forward == 0  # the module (and its hook) is called instead
    handle.remove()
    handle = reference.word_embeddings.register_forward_hook(lambda module, args, output: output * 2)
    assert torch.equal(out, reference(**inputs).logits)
    handle.remove()


def test_require_grad_hook_is_reproduced():
    """transformers' enable_input_require_grads hook: still fused, output requires grad like PEFT's."""
    reference, fast = model_pair("llama", "CAUSAL_LM", num_virtual_tokens=2)
    for model in (reference, fast):
        model.enable_input_require_grads()
        model.prompt_encoder["default"].embedding.weight.requires_grad_(False)
    capture = [_Capture(reference.base_model), _Capture(fast.base_model)]
    inputs = _inputs("llama", "CAUSAL_LM", labels=False)
    reference(**inputs)
    with FastpromptOps() as ops:
        fast(**inputs)
    assert ops.forward == 1
    assert (
        capture[1].calls[0]["inputs_embeds"].requires_grad
        == capture[0].calls[0]["inputs_embeds"].requires_grad
    )


def test_non_prompt_tuning_models_left_alone():
    import fastprompt

    base = tiny_models.build("gpt2", "CAUSAL_LM")
    lora = fastprompt.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["c_attn"]))
    assert type(lora) is peft.PeftModelForCausalLM
    prefix = fastprompt.get_peft_model(
        tiny_models.build("gpt2", "CAUSAL_LM"),
        peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
    )
    # prefix tuning is fastprompt's (tests/test_prefix_tuning.py); its keys/values never go through the concat
    assert isinstance(prefix, peft.PeftModelForCausalLM) and type(prefix) is not peft.PeftModelForCausalLM
    with FastpromptOps() as ops:
        lora(**tiny_models.batch())
        prefix(**tiny_models.batch())
    assert ops.names == []


def test_our_config_accepted_by_get_peft_model():
    import fastprompt

    config = fastprompt.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2)
    model = fastprompt.get_peft_model(tiny_models.build("roberta", "SEQ_CLS"), config)
    assert isinstance(model, peft.PeftModelForSequenceClassification)
    assert isinstance(model.peft_config["default"], peft.PromptTuningConfig)
    with FastpromptOps() as ops:
        model(**tiny_models.batch())
    assert ops.forward == 1


def _other_config(name: str):
    """(config, task) of one of ``tiny_models.OTHER_FAMILIES``."""
    return tiny_models.config(name), tiny_models.OTHER_FAMILIES[name]


@pytest.mark.parametrize("name", ["gemma2", "mistral", "qwen2", "mbart", "deberta-v2"])
def test_more_model_families(name):
    import copy

    import transformers

    import fastprompt

    config, task = _other_config(name)
    auto = {
        "CAUSAL_LM": transformers.AutoModelForCausalLM,
        "SEQ_CLS": transformers.AutoModelForSequenceClassification,
        "TOKEN_CLS": transformers.AutoModelForTokenClassification,
        "SEQ_2_SEQ_LM": transformers.AutoModelForSeq2SeqLM,
    }[task]
    torch.manual_seed(0)
    base = auto.from_config(config).eval()
    torch.manual_seed(1)
    reference = peft.get_peft_model(copy.deepcopy(base), peft_config(task)).eval()
    torch.manual_seed(1)
    fast = fastprompt.get_peft_model(copy.deepcopy(base), peft_config(task)).eval()
    fast.load_state_dict(reference.state_dict())
    inputs = tiny_models.batch(left_pad=task != "SEQ_CLS")
    if task == "SEQ_2_SEQ_LM":
        inputs["decoder_input_ids"] = torch.randint(4, 100, (3, 4))
    with FastpromptOps() as ops:
        out = main_output(fast(**inputs))
    assert ops.forward == 1
    assert torch.equal(out, main_output(reference(**inputs)))
