"""The model matrix: every decoder-only causal-LM type of transformers, on every prompt-once path.

For one model type (:func:`check_type`), on a tiny random config (:mod:`fastprompt.testing.causal_lms`),
PEFT 0.21's prompt tuning and fastprompt's are built on identical weights and compared path by path:

- ``train``: a training-mode forward and backward at (N, B, L) = (40, 4, 9) with left padding and ``-100``
  labels: loss, logits and the prompt table's gradient (under a random upstream gradient) equal PEFT's,
  and whether the prompt ran once (``share_prompt_prefix`` default);
- ``checkpointed``: the same with gradient checkpointing (non-reentrant), the path users train with;
- ``packed``: a padding-free row of three documents (TRL's labels) equals each document alone through PEFT
  (loss and prompt gradient), and which layout ran (shared: the prompt once per row);
- ``generate``: greedy ``generate`` of a left-padded batch equals a greedy loop through PEFT's forward
  that recomputes the whole sequence at every step without a cache, and whether the prompt's keys/values
  were reused;
- ``seq_cls`` (where the family has a sequence-classification head): logits and loss equal PEFT's, shared.

A path that does not share says why (:class:`PathResult.reason`). ``EXPECTED_DECLINES`` holds what is
expected not to share, each shown by ``tests/test_model_matrix.py``; the support page (``docs/models.md``)
is rendered from the same facts by :func:`support_page`:

    python -m fastprompt.testing.model_matrix --write docs/models.md
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import torch

from . import causal_lms

N, BATCH, LENGTH = 40, 4, 9
PACKED_N, PACKED_LENGTHS = 20, (5, 9, 3)
NEW_TOKENS = 4
GREEDY = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
PATHS = ("train", "checkpointed", "packed", "generate", "seq_cls")
# Tolerances (fp32): the shared pass sums the same terms in another order. In bf16 (``bench/gpu_check.py``)
# the rounding of bf16 activations: relative, of the compared tensor's scale.
ATOL, RTOL = 1e-5, 1e-4
BF16_TOLERANCE = 3e-2

# Declines that depend on the transformers release: model type -> (the paths, why): those paths may
# share on another release.
VERSION_DEPENDENT = {
    "mamba2": (
        ("train", "checkpointed", "generate"),
        "transformers 5.22's Mamba-2 takes its cache as cache_params (not a transformers cache argument); "
        "5.24's as cache, and shares",
    ),
}


def release_dependent(model_type: str, path: str) -> bool:
    """Whether ``model_type``'s decline on ``path`` depends on the transformers release."""
    return path in VERSION_DEPENDENT.get(model_type, ((), ""))[0]


_INDEXER = "keep a sparse-attention indexer"  # DSA's top-k ranks the keys one pass sees
_RECURRENT = "recurrent layers carry their state"  # from one document of a packed row to the next
_NO_POSITIONS = "takes no position_ids (its positions follow the mask)"
_NO_DYNAMIC_CACHE = "does not run on transformers' DynamicCache"
_TRAINING = ("train", "checkpointed")


def _denied(*paths: str, words: str) -> dict[str, str]:
    return dict.fromkeys(paths, words)


# model type -> {path: words of the reason it does not share there}. Each entry is shown by
# tests/test_model_matrix.py (the path declines with that reason, and stays exact).
EXPECTED_DECLINES: dict[str, dict[str, str]] = {
    # Sparse attention (DeepSeek-V3.2's DSA and its kin): a prompt run apart, or padding, changes the
    # indexer's top-k. Training takes PEFT's path; packed documents run one by one, unpadded; generation
    # runs without prompt-KV reuse.
    **{
        model_type: _denied(*_TRAINING, "packed", "seq_cls", "generate", words=_INDEXER)
        for model_type in ("axk2", "deepseek_v32", "dots3_note_text", "glm_moe_dsa", "hy_v4")
    },
    # ... and beside linear-attention layers (their recurrent layers decline packed rows first).
    **{
        model_type: {**_denied(*_TRAINING, "generate", words=_INDEXER), "packed": _RECURRENT}
        for model_type in ("qwen4_exp", "qwen4_exp_text")
    },
    # ALiBi (positions follow the mask): packed documents run unpacked, one per row of a padded batch.
    "bloom": {"packed": _NO_POSITIONS},
    "mpt": {"packed": _NO_POSITIONS},
    # BLT: its byte-level encoder's attention is not causal (is_causal=False), and transformers cannot
    # build its cache from its config (its generate fails with a cache too).
    "blt": {
        **_denied(*_TRAINING, "packed", words="bidirectional (is_causal=False)"),
        "generate": "cache cannot be built from its config",
    },
    # Inkling 2: bidirectional attention modules (is_causal=False).
    **{
        model_type: _denied(*_TRAINING, "packed", words="bidirectional (is_causal=False)")
        for model_type in ("inkling2_text", "inkling2_loop_text")
    },
    # DeepSeek-V4's compressed caches: state beyond keys/values.
    "deepseek_v4": _denied(
        *_TRAINING,
        "packed",
        "generate",
        words="are the model's own (state beyond transformers' key/value layers)",
    ),
    # GPT-2 (and GPT-SW3, its model) hands its blocks no cache under gradient checkpointing: found at run
    # time, PEFT's path.
    "gpt2": {"checkpointed": "did not read the prompt's cache"},
    "gpt-sw3": {"checkpointed": "did not read the prompt's cache"},
    # policy.DENIED: windows or scales by the slot in the row, outside the mask functions.
    "gpt_neo": {"packed": "local attention layers apply their window from a causal buffer"},
    "llama4_text": {"packed": "attention temperature tuning scales the queries by the slot in the row"},
    "llama4": {"packed": "attention temperature tuning scales the queries by the slot in the row"},
    # GPT-1: its forward takes no cache at all; it builds its own mask.
    "openai-gpt": {
        "train": "takes no cache",
        "seq_cls": "takes no cache",
        "generate": "takes no transformers cache",
        "packed": "builds its attention mask without transformers' mask functions",
    },
    # Multimodal wrappers whose masks come from create_masks_for_generate: packed rows run unpacked.
    **{
        model_type: {"packed": "create_masks_for_generate"}
        for model_type in ("gemma3", "gemma4", "gemma4_unified")
    },
    # Hybrids: a recurrent layer carries its state across the documents of a packed row (they run
    # unpacked); training and generation share the prompt's whole state.
    **{
        model_type: {"packed": _RECURRENT}
        for model_type in (
            "bailing_hybrid",
            "falcon_h1",
            "granitemoehybrid",
            "inkling_text",
            "kimi_linear",
            "lara_mini",
            "lfm2",
            "lfm2_moe",
            "lfm3",
            "nemotron_h",
            "olmo_hybrid",
            "qwen3_5",
            "qwen3_5_moe",
            "qwen3_5_moe_text",
            "qwen3_5_text",
            "qwen3_next",
            "zamba",
            "zamba2",
            "zaya",
        )
    },
    # policy.DENIED: state-space mixers that cannot continue a cached state over several tokens, or not
    # exactly (measured); Moshi likewise.
    "bamba": {**_denied(*_TRAINING, "generate", words="Mamba-2 chunked scan"), "packed": _RECURRENT},
    "jamba": {
        **_denied(
            *_TRAINING, "generate", "seq_cls", words="scan over several tokens starts from a zero state"
        ),
        "packed": _RECURRENT,
    },
    **{
        model_type: {
            **_denied(*_TRAINING, "generate", words="treats a cached forward as one decoding step"),
            "packed": _NO_POSITIONS,
        }
        for model_type in ("mamba", "falcon_mamba")
    },
    "recurrent_gemma": _denied(
        *_TRAINING, "packed", "generate", words="its recurrent blocks run from a cached state"
    ),
    "moshi": _denied(*_TRAINING, "generate", words="differs from one pass (logits 3e-1 relative, measured)"),
    # Mamba-2 (pure state space): shares on 5.24; takes its state as cache_params on 5.22.
    "mamba2": {**_denied(*_TRAINING, "generate", words="forward takes no"), "packed": _NO_POSITIONS},
    # MiniMax keeps a cache of its own (lightning attention's state).
    "minimax": {
        **_denied(*_TRAINING, "generate", words=_NO_DYNAMIC_CACHE),
        "seq_cls": "its prompt pass failed",
        "packed": _RECURRENT,
    },
    # RWKV keeps its state outside transformers' caches; its positions follow the sequence.
    "rwkv": {
        **_denied(*_TRAINING, words="takes no cache"),
        "generate": _NO_DYNAMIC_CACHE,
        "packed": _NO_POSITIONS,
    },
}


@dataclasses.dataclass
class PathResult:
    """One path of one model type.

    Attributes:
        exact: the results equal the reference (PEFT, or the no-cache greedy loop).
        shared: the prompt ran once (train / checkpointed / seq_cls: the shared forward; packed: the shared
            layout; generate: the prompt's keys/values reused).
        detail: what ran (packed: the layout) or the largest difference where not exact.
        reason: why it did not share (the ``ValueError`` of ``share_prompt_prefix=True``), or None.
    """

    exact: bool
    shared: bool
    detail: str = ""
    reason: str | None = None


def _pair(model_type: str, task: str, n: int, *, device=None, dtype=torch.float32):
    import peft

    import fastprompt

    if task == "SEQ_CLS":
        base = tiny_sequence_classifier(model_type)
    else:
        base = causal_lms.tiny_causal_lm(model_type, dtype=dtype)
    base = base.to(device) if device is not None else base
    config = _peft_config(base, task, n)
    torch.manual_seed(1)
    reference = peft.get_peft_model(copy.deepcopy(base), config)
    if reference.word_embeddings is None:  # PEFT 0.21.2 finds none where the table's rows are not the
        # config's vocab_size (Mllama): the definition runs the model's own input embeddings, as
        # fastprompt.accelerate sets them
        reference.word_embeddings = reference.get_base_model().get_input_embeddings()
    torch.manual_seed(1)
    fast = fastprompt.get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def _peft_config(base, task: str, n: int):
    """PEFT's prompt-tuning config for ``base``, told what PEFT cannot read from the model's config (it
    asks users the same: "Please specify `num_attention_heads` in `peft_config`"; prompt tuning itself
    does not use those fields): the model's own values, or the tiny configs' for head counts."""
    import re

    import peft

    known = {
        "token_dim": base.get_input_embeddings().embedding_dim,
        "num_layers": causal_lms.LAYERS,
        "num_attention_heads": causal_lms.HEADS,
    }
    fields: dict = {}
    while True:
        config = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=n, **fields)
        try:
            peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
            return config
        except ValueError as error:
            asked = re.search(r"Please specify `(\w+)` in `peft_config`", str(error))
            if asked is None or asked.group(1) not in known or asked.group(1) in fields:
                raise
            fields[asked.group(1)] = known[asked.group(1)]


def has_sequence_classifier(model_type: str) -> bool:
    """Whether the family has a sequence-classification head in the installed transformers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    return model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES


def tiny_sequence_classifier(model_type: str):
    """The family's sequence classifier (2 labels) on the causal LM's tiny config, eval mode."""
    from transformers import AutoModelForSequenceClassification

    config = causal_lms.tiny_config(model_type)
    config.num_labels = 2
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config).eval()


def _batch(seed: int = 0, device=None):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, causal_lms.VOCAB, (BATCH, LENGTH), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[2, :1] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 2] = -100
    return ids.to(device), mask.to(device), labels.to(device)


def _limits(dtype: torch.dtype) -> tuple[float, float]:
    """(loss and logits, gradient) tolerances of ``dtype``."""
    return (ATOL, RTOL) if dtype == torch.float32 else (BF16_TOLERANCE, BF16_TOLERANCE)


def _prompt_grad(model) -> torch.Tensor:
    return model.prompt_encoder["default"].embedding.weight.grad


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference of ``a`` from ``b``, relative to ``b``'s scale (0 for equal tensors)."""
    scale = max(float(b.abs().max()), 1e-6)
    return float((a.float() - b.float()).abs().max()) / scale


def _calls():
    from ..prompt_once import policy

    return policy.CALLS


def _why_not(fast, call: dict) -> str | None:
    """The reason ``share_prompt_prefix=True`` gives for not sharing ``call`` (a forward with grad, as in
    training: gradient checkpointing acts only then), or None."""
    try:
        fast(**call, share_prompt_prefix=True)
    except ValueError as error:
        return str(error)
    return None


def check_train(
    model_type: str, *, checkpointing: bool = False, device=None, dtype=torch.float32
) -> PathResult | None:
    """``train`` / ``checkpointed``: see the module docstring (``device`` / ``dtype``: of the base model)."""
    reference, fast = _pair(model_type, "CAUSAL_LM", N, device=device, dtype=dtype)
    if checkpointing and not reference.get_base_model().supports_gradient_checkpointing:
        return None  # the family has no gradient checkpointing: nothing to check
    ids, mask, labels = _batch(device=device)
    outs = []
    before = dict(_calls())
    for model in (reference, fast):
        model.train()
        if checkpointing:
            model.get_base_model().gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        weights = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(3))
        (out.loss + (out.logits.float() * weights.to(out.logits.device)).sum() * 1e-3).backward()
        outs.append((out.loss.detach(), out.logits.detach(), _prompt_grad(model).clone()))
    shared = _calls()["shared"] - before.get("shared", 0) == 1
    (loss0, logits0, grad0), (loss1, logits1, grad1) = outs
    keep = torch.cat((torch.ones(BATCH, N, dtype=torch.bool, device=mask.device), mask.bool()), dim=1)
    diffs = (_close(loss1, loss0), _close(logits1[keep], logits0[keep]), _close(grad1, grad0))
    atol, rtol = _limits(dtype)
    exact = diffs[0] < atol and diffs[1] < atol and diffs[2] < rtol
    reason = None if shared else _why_not(fast, dict(input_ids=ids, attention_mask=mask, labels=labels))
    detail = "loss {:.1e} logits {:.1e} grad {:.1e}".format(*diffs)
    return PathResult(exact, shared, detail, reason)


def check_packed(model_type: str, *, device=None, dtype=torch.float32) -> PathResult:
    """``packed``: see the module docstring (``device`` / ``dtype``: of the base model)."""
    reference, fast = _pair(model_type, "CAUSAL_LM", PACKED_N, device=device, dtype=dtype)
    for model in (reference, fast):  # a training batch (RWKV updates its state in place in eval mode)
        model.train()
    generator = torch.Generator().manual_seed(0)
    docs = [torch.randint(4, causal_lms.VOCAB, (n,), generator=generator).to(device) for n in PACKED_LENGTHS]
    labels = [doc.clone() for doc in docs]
    for label in labels:
        label[0] = -100  # TRL's collators: no document's first token is predicted across documents
    total, count = 0.0, 0
    for doc, label in zip(docs, labels, strict=True):
        out = reference(input_ids=doc[None], labels=label[None])
        k = int((label != -100).sum())
        total, count = total + out.loss * k, count + k
    expected = total / count
    expected.backward()
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(doc), device=ids.device) for doc in docs])[None]
    before = dict(_calls())
    out = fast(input_ids=ids, position_ids=positions, labels=torch.cat(labels)[None])
    out.loss.backward()
    layouts = ("packed shared", "packed inserted", "packed unpacked")
    ran = [key for key in layouts if _calls()[key] != before.get(key, 0)]
    diffs = (
        _close(out.loss.detach(), expected.detach()),
        _close(_prompt_grad(fast), _prompt_grad(reference)),
    )
    atol, rtol = _limits(dtype)
    exact = diffs[0] < atol and diffs[1] < rtol and len(ran) == 1
    shared = ran == ["packed shared"]
    reason = None
    if not shared:
        reason = _why_not(fast, dict(input_ids=ids, position_ids=positions))
    detail = f"{', '.join(ran)}; loss {diffs[0]:.1e} grad {diffs[1]:.1e}"
    return PathResult(exact, shared, detail, reason)


def _greedy_without_cache(reference, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Greedy decoding of a left-padded batch ``[B, L]`` through PEFT's forward, the whole sequence
    recomputed at every step without a cache (PEFT's positions: the prompt's, then the tokens' after it,
    padding counted, as its generate has them): the ``[B, NEW_TOKENS]`` new ids."""
    sequence = ids
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = reference(input_ids=sequence, attention_mask=mask, use_cache=False).logits
            sequence = torch.cat((sequence, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
    return sequence[:, ids.shape[1] :]


def check_generate(model_type: str) -> PathResult:
    """``generate``: see the module docstring."""
    from ..prompt_once import kv_store, prompt_pass

    reference, fast = _pair(model_type, "CAUSAL_LM", N)
    reference.eval(), fast.eval()  # prompt-KV reuse is for inference (training mode: dropout)
    ids, mask, _ = _batch()
    ids, mask = ids[:2], mask[:2]
    try:  # some configs default to no cache (MPT): generation with one is what is checked, where it builds
        prompt_pass.cache_layer_kinds(fast.get_base_model())
        use_cache, no_cache = True, None
    except prompt_pass.CACHE_BUILD_ERRORS as error:  # transformers' own generate fails with a cache (BLT)
        use_cache, no_cache = False, f"the model's cache cannot be built from its config ({error})"
    before = dict(kv_store.CALLS)
    with torch.no_grad():
        generated = fast.generate(input_ids=ids, attention_mask=mask, use_cache=use_cache, **GREEDY)
        generated = generated[:, -NEW_TOKENS:]
    reused = kv_store.CALLS["computed"] + kv_store.CALLS["reused"] > sum(
        before.get(key, 0) for key in ("computed", "reused")
    )
    expected = _greedy_without_cache(reference, ids, mask)
    exact = torch.equal(generated, expected)
    detail = "" if exact else f"generated {generated.tolist()} expected {expected.tolist()}"
    if not exact:  # each row as transformers' own cached decoding of the base model has it, where that
        cached = _cached_base_generate(fast, ids, mask)  # differs from recomputing (LFM3's conv layers)
        rows = zip(generated, expected, cached, strict=True)
        if all(torch.equal(g, e) or torch.equal(g, c) for g, e, c in rows):
            exact, detail = True, "transformers' cached decoding of the base model differs from recomputing"
    reason = no_cache
    if not reused and no_cache is None:
        try:
            with torch.no_grad():
                fast.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=1, use_cache=True, reuse_prompt_kv=True
                )
        except ValueError as error:
            reason = str(error)
    return PathResult(exact, reused, detail, reason)


def _cached_base_generate(fast, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The base model's own cached greedy decoding over the prompted rows (``inputs_embeds`` = the prompt
    then the tokens, the mask prefixed), no prompt tuning code involved: where it differs from recomputing
    the whole sequence, the difference is transformers' (a model whose cached decoding is not exact),
    and fastprompt's generation must equal this instead."""
    base = fast.get_base_model()
    prompt = fast.prompt_encoder["default"].embedding.weight.detach()[None].expand(ids.shape[0], -1, -1)
    embeds = torch.cat((prompt.to(base.dtype), base.get_input_embeddings()(ids)), dim=1)
    full_mask = torch.cat((torch.ones(ids.shape[0], prompt.shape[1], dtype=mask.dtype), mask), dim=1)
    with torch.no_grad():
        return base.generate(inputs_embeds=embeds, attention_mask=full_mask, **GREEDY)[:, -NEW_TOKENS:]


def check_seq_cls(model_type: str) -> PathResult | None:
    """``seq_cls`` where the family has a sequence-classification head (else None)."""
    if not has_sequence_classifier(model_type):
        return None
    reference, fast = _pair(model_type, "SEQ_CLS", N)
    ids, mask, _ = _batch()
    labels = torch.tensor([0, 1, 1, 0])
    before = dict(_calls())
    outs = []
    for model in (reference, fast):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        outs.append((out.loss.detach(), out.logits.detach()))
    shared = _calls()["shared"] - before.get("shared", 0) == 1
    diffs = (_close(outs[1][0], outs[0][0]), _close(outs[1][1], outs[0][1]))
    exact = diffs[0] < ATOL and diffs[1] < ATOL
    reason = None if shared else _why_not(fast, dict(input_ids=ids, attention_mask=mask, labels=labels))
    return PathResult(exact, shared, "loss {:.1e} logits {:.1e}".format(*diffs), reason)


def check_type(model_type: str, paths=PATHS) -> dict:
    """``{path: PathResult}`` for one model type (``seq_cls`` only where the family has the head)."""
    checks = {
        "train": check_train,
        "checkpointed": lambda t: check_train(t, checkpointing=True),
        "packed": check_packed,
        "generate": check_generate,
        "seq_cls": check_seq_cls,
    }
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in paths:
            result = checks[path](model_type)
            if result is not None:
                results[path] = result
    return results


def support_page(declines: dict | None = None) -> str:
    """The support page of the installed transformers: the matrix's types and their paths, the expected
    declines, the skipped types."""
    import transformers

    rows = {t: [p for p in PATHS if _applies(t, p)] for t in causal_lms.matrix_types()}
    declines = EXPECTED_DECLINES if declines is None else declines
    return render_support_page(rows, declines, causal_lms.SKIPPED, transformers.__version__)


def _applies(model_type: str, path: str) -> bool:
    """Whether ``path`` exists for the family: a sequence-classification head, gradient checkpointing."""
    if path == "seq_cls":
        return has_sequence_classifier(model_type)
    if path == "checkpointed":
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        model_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], None)
        return bool(getattr(model_class, "supports_gradient_checkpointing", True))
    return True


def render_support_page(rows: dict, declines: dict, skipped: dict, version: str) -> str:
    """The support page (``docs/models.md``) from the matrix's facts.

    Args:
        rows: ``{model_type: [path, ...]}``: the paths checked per matrix type.
        declines: ``{model_type: {path: reason}}``: the expected declines.
        skipped: ``{model_type: (category, reason)}``: the types outside the matrix.
        version: the transformers version the matrix ran on.
    """
    columns = ("train", "checkpointed", "packed", "generate", "seq_cls")
    names = {
        "train": "shared train",
        "checkpointed": "shared, checkpointed",
        "packed": "packed (shared layout)",
        "generate": "generation KV reuse",
        "seq_cls": "seq-cls shared",
    }
    lines = [
        "# Supported models",
        "",
        "<!-- Generated by `python -m fastprompt.testing.model_matrix --write docs/models.md` from the",
        "     matrix's checked-in declines (EXPECTED_DECLINES there); tests/test_model_matrix.py fails if",
        "     they drift apart. -->",
        "",
        f"Every decoder-only causal-LM type of transformers {version}, attention, hybrid with",
        "linear-attention or state-space layers, pure state-space, and the multimodal checkpoints",
        "`AutoModelForCausalLM` returns (run text-only), on tiny random configs",
        "(`fastprompt/testing/causal_lms.py`), checked by `tests/test_model_matrix.py` against PEFT 0.21.2",
        "on identical weights: training forward and backward (loss, logits, prompt gradient), the same",
        "under gradient checkpointing, packed rows against each document alone, greedy generation against",
        "a no-cache greedy loop (or, where transformers' own cached decoding of the base model differs from",
        "recomputing, against that), and sequence classification where the family has that head, with the",
        "eager attention implementation (SDPA spot-checked on a few families). Every cell is exact; the",
        "table says whether the prompt ran once there (yes) or why not (no: words of the reason",
        '`share_prompt_prefix=True` / `reuse_prompt_kv=True` give; "are ..." reads "its cache layers',
        'are ..."). The page is rendered from the checked-in list of expected declines; the matrix run',
        "(`FASTPROMPT_MATRIX=all`, in `.ci/run`) holds every type to it. Where it does not share, the exact",
        "fallback runs: PEFT's path in training, each document in a row of its own for packed rows (one by",
        "one where padding would change the result), generation without prompt-KV reuse. n/a: the family",
        "has no such head, or no gradient checkpointing.",
        "",
        "| model type | " + " | ".join(names[c] for c in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for model_type in sorted(rows):
        cells = []
        for column in columns:
            if column not in rows[model_type]:
                cells.append("n/a")
            elif column in declines.get(model_type, {}) and release_dependent(model_type, column):
                cells.append("by release (below): " + declines[model_type][column])
            elif column in declines.get(model_type, {}):
                cells.append("no: " + declines[model_type][column])
            else:
                cells.append("yes")
        lines.append(f"| `{model_type}` | " + " | ".join(cells) + " |")
    lines += ["", "## By release", "", "Where a type shares on one transformers release and not another:", ""]
    lines += [f"- `{t}` ({', '.join(paths)}): {why}" for t, (paths, why) in sorted(VERSION_DEPENDENT.items())]
    lines += ["", "## Outside the matrix", "", "| model type | why |", "|---|---|"]
    for model_type in sorted(skipped):
        category, reason = skipped[model_type]
        lines.append(f"| `{model_type}` | {category}: {reason} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    """``python -m fastprompt.testing.model_matrix [--write PATH] [TYPE ...]``: run the matrix (the given
    types, or all) and print each path's result; ``--write`` writes the support page."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--write", metavar="PATH", help="write the support page (docs/models.md) there")
    parser.add_argument("--run", action="store_true", help="run the matrix and print its results")
    parser.add_argument("types", nargs="*", help="model types to run (default: all of the matrix)")
    args = parser.parse_args(argv)
    if args.run or args.types:
        for model_type in args.types or causal_lms.matrix_types():
            try:
                results = check_type(model_type)
            except Exception as error:  # the run goes on: each type's outcome is printed
                print(f"{model_type:22s} ERROR {type(error).__name__}: {error}", flush=True)
                continue
            for path, result in results.items():
                print(f"{model_type:22s} {path:13s} exact={result.exact!s:5s} shared={result.shared!s:5s} "
                      f"{result.detail} {result.reason or ''}", flush=True)  # fmt: skip
    if args.write:
        with open(args.write, "w") as handle:
            handle.write(support_page())


if __name__ == "__main__":
    main()
