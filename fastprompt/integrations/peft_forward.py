"""The prompt-tuning branch of each PEFT task model's ``forward``, with ``prompt_concat``.

Each function here re-states what ``PeftModelForXxx.forward`` of PEFT 0.21 does when the active adapter is
PROMPT_TUNING and ``input_ids`` (not ``inputs_embeds``) is given, the only difference being that
``inputs_embeds`` comes from :func:`model_inputs_embeds`. Everything else is PEFT's: the attention mask
prefixed with float32 ones, the -100 label prefix (CAUSAL_LM only), token_type_ids prefixed with zeros
(SEQ_CLS, TOKEN_CLS), dropped with PEFT's warning (CAUSAL_LM, FEATURE_EXTRACTION) or silently
(QUESTION_ANS), position_ids dropped with PEFT's warning (PEFT's own ``_adjust_prompt_learning_kwargs``
is called), and the base model called with ``inputs_embeds`` only.

Signature: ``fn(peft_model, args, kwargs)`` where ``args`` holds the named parameters of PEFT's forward
(bound from the call) and ``kwargs`` its ``**kwargs``.
"""

from __future__ import annotations

import torch

from ..prompt_once import decoder_share, packed, packed_forward, shared_forward
from ..prompt_once import policy as shared_prefix
from ..prompt_once.sources import batch_sources
from ..prompted_embeds.prompt_rows import source_rows
from .adapter_batches import pop_adapter_names
from .peft_inputs_embeds import model_inputs_embeds
from .peft_prompt_methods import batch_rows


def _prefix_mask(attention_mask: torch.Tensor | None, batch_size: int, num_virtual_tokens: int):
    """PEFT's ``cat(ones(B, N), mask)``: the ones are float32, so the result is float32."""
    if attention_mask is None:
        return None
    prefix = torch.ones(batch_size, num_virtual_tokens).to(attention_mask.device)
    return torch.cat((prefix, attention_mask), dim=1)


def _return_dict(peft_model, return_dict):
    """PEFT's default for SEQ_CLS / TOKEN_CLS / QUESTION_ANS (``_get_return_dict_transformers_v4``)."""
    if return_dict is not None:
        return return_dict
    from peft import peft_model as peft_model_module

    helper = getattr(peft_model_module, "_get_return_dict_transformers_v4", None)
    return helper(peft_model.config) if helper is not None else peft_model.config.use_return_dict


def _prefixed_token_type_ids(peft_model, kwargs: dict, batch_size: int, num_virtual_tokens: int) -> None:
    if kwargs.get("token_type_ids", None) is not None:
        zeros = torch.zeros(batch_size, num_virtual_tokens).to(peft_model.word_embeddings.weight.device)
        kwargs["token_type_ids"] = torch.cat((zeros, kwargs["token_type_ids"]), dim=1).long()


def _prepare_kwargs(
    peft_model, args: dict, kwargs: dict, *, return_dict, remove_token_type_ids: bool, passed
):
    """What every prompt-tuning forward of PEFT does to the call before building the embeddings:
    the attention mask prefixed with ones, position ids (and token type ids where PEFT does) dropped
    with PEFT's warning, and the named arguments in ``passed`` handed on. ``adapter_names`` (a mixed
    batch, beyond PEFT) and ``share_prompt_prefix`` are taken out of ``kwargs``. Returns (input_ids, B, N,
    rows, share): ``rows`` says which adapter each batch row takes (None: the active adapter), ``share``
    the requested ``share_prompt_prefix`` (the call's, else the model's default)."""
    config = peft_model.active_peft_config
    input_ids = args["input_ids"]
    batch_size, n = input_ids.shape[0], config.num_virtual_tokens
    share = kwargs.pop(shared_prefix.SHARE_PROMPT_PREFIX, shared_prefix.model_default(peft_model))
    shared_prefix.check_request(share)
    adapter_names = pop_adapter_names(kwargs)
    rows = batch_rows(peft_model, adapter_names, args.get("task_ids"), batch_size)  # multitask: per task
    if rows is not None:
        n = rows.num_virtual_tokens
    packed_rows = _packed_rows(peft_model, input_ids, args, kwargs, rows)
    attention_mask = _prefix_mask(args["attention_mask"], batch_size, n)
    peft_model._adjust_prompt_learning_kwargs(
        config, kwargs=kwargs, remove_token_type_ids=remove_token_type_ids
    )
    kwargs.update(
        attention_mask=attention_mask,
        output_attentions=args["output_attentions"],
        output_hidden_states=args["output_hidden_states"],
        return_dict=return_dict,
        **{key: args[key] for key in passed},
    )
    return input_ids, batch_size, n, rows, share, packed_rows


def _packed_rows(peft_model, input_ids, args: dict, kwargs: dict, rows):
    """Packed rows (``position_ids`` restarting inside a row, no attention mask: beyond PEFT, each
    document with its own prompt), with their ``position_ids`` taken out of ``kwargs`` (no PEFT warning);
    None for an ordinary batch. Checks ``position_ids`` either way (``ValueError``)."""
    config = shared_prefix.text_config(peft_model.get_base_model())
    found = packed.find_packed_rows(
        input_ids,
        kwargs.get("position_ids"),
        args["attention_mask"],
        labels=args.get("labels"),
        pad_token_id=getattr(config, "pad_token_id", None),
    )
    if found is None:
        return None
    if peft_model.active_peft_config.task_type != "CAUSAL_LM":
        raise ValueError(
            "packed rows (position_ids that restart inside a row, no attention_mask) are supported for "
            f"CAUSAL_LM models, not {peft_model.active_peft_config.task_type}: pass an attention_mask, or "
            "one document per row."
        )
    if rows is not None and len(rows.names) > 1:
        if rows.tasks is not None and len(set(rows.names)) == 1:
            raise ValueError(
                f"packed rows with task_ids of {len(rows.tasks)} different tasks {list(rows.tasks)} in one "
                "batch: a packed batch takes one task (its rows share the prompt plan); batch each task's "
                "rows separately, with task_ids=torch.tensor([task])."
            )
        raise ValueError(
            f"packed rows with {len(rows.names)} different soft prompts in one batch (adapter_names "
            f"{list(dict.fromkeys(rows.names))}): a packed batch takes one soft prompt; batch each adapter's "
            "rows separately."
        )
    kwargs.pop("position_ids")
    return found


def _shares(peft_model, task: str, share, kwargs: dict, input_ids, n: int, rows):
    """None (PEFT's path), or where the prompt is shared (``policy.MODEL`` / ``policy.DECODER``)."""
    prompts = 1 if rows is None else len(rows.names)
    return shared_prefix.decide(peft_model, share, task, kwargs, input_ids, prompts, n)


def _decoder_shared(peft_model, inputs_embeds, n: int, rows, share, kwargs: dict):
    """PEFT's base-model call, with the prompt run once at the decoder (a head's own forward)."""
    sources, index = batch_sources(peft_model, rows, inputs_embeds.device)  # P-tuning: the encoder's rows
    prompt_embeds = source_rows(sources, n, inputs_embeds.dtype).to(inputs_embeds.device)
    return decoder_share.run_shared(
        peft_model,
        lambda embeds: peft_model.base_model(inputs_embeds=embeds, **kwargs),
        inputs_embeds,
        prompt_embeds,
        index,
        n,
        share,
    )


def causal_lm_forward(peft_model, args: dict, kwargs: dict):
    """``PeftModelForCausalLM.forward``, prompt tuning: labels prefixed with -100 (or the prompt shared)."""
    input_ids, batch_size, n, rows, share, packed_rows = _prepare_kwargs(
        peft_model,
        args,
        kwargs,
        return_dict=args["return_dict"],
        remove_token_type_ids=True,
        passed=("labels",),
    )
    if packed_rows is not None:
        labels = kwargs.pop("labels", None)
        return packed_forward.packed_forward(
            peft_model.get_base_model(),
            lambda embeds, call: peft_model.base_model(inputs_embeds=embeds, **call),
            model_inputs_embeds(peft_model, input_ids, n, rows),
            n,
            packed_rows,
            kwargs,
            labels,
            share,
        )
    where = _shares(peft_model, "CAUSAL_LM", share, kwargs, input_ids, n, rows)
    if where == shared_prefix.MODEL:
        output = shared_forward.shared_forward(peft_model, "CAUSAL_LM", input_ids, n, rows, kwargs, share)
        if output is not None:
            return output
        where = None  # the model did not read the prompt's cache: PEFT's path
    inputs_embeds = model_inputs_embeds(peft_model, input_ids, n, rows)
    labels = args["labels"]
    if labels is not None:
        prefix_labels = torch.full((batch_size, n), -100).to(labels.device)
        kwargs["labels"] = torch.cat((prefix_labels, labels), dim=1)
    if where == shared_prefix.DECODER:
        return _decoder_shared(peft_model, inputs_embeds, n, rows, share, kwargs)
    return peft_model.base_model(inputs_embeds=inputs_embeds, **kwargs)


def _encoder_task_forward(
    peft_model, args: dict, kwargs: dict, target_keys: tuple[str, ...], task: str | None = None
):
    """The prompt-tuning forward shared by PEFT's encoder task classes: token_type_ids prefixed with
    zeros (when passed through ``**kwargs``), the task's targets passed through unshifted. ``task``:
    the task type, where a decoder-only base may share the prompt (sequence / token classification)."""
    return_dict = _return_dict(peft_model, args["return_dict"])
    input_ids, batch_size, n, rows, share, _ = _prepare_kwargs(
        peft_model, args, kwargs, return_dict=return_dict, remove_token_type_ids=False, passed=target_keys
    )
    where = None
    if task is not None and kwargs.get("token_type_ids") is None:
        where = _shares(peft_model, task, share, kwargs, input_ids, n, rows)
        if where == shared_prefix.MODEL:
            output = shared_forward.shared_forward(peft_model, task, input_ids, n, rows, kwargs, share)
            if output is not None:
                return output
            where = None  # the model did not read the prompt's cache: PEFT's path
    elif share:
        raise ValueError(f"share_prompt_prefix=True cannot apply: {_why_task(task, kwargs)}.")
    _prefixed_token_type_ids(peft_model, kwargs, batch_size, n)
    inputs_embeds = model_inputs_embeds(peft_model, input_ids, n, rows)
    if where == shared_prefix.DECODER:
        return _decoder_shared(peft_model, inputs_embeds, n, rows, share, kwargs)
    return peft_model.base_model(inputs_embeds=inputs_embeds, **kwargs)


def _why_task(task: str | None, kwargs: dict) -> str:
    if task is None:
        return f"this task type (sharing applies to {', '.join(shared_prefix.TASKS)})"
    return "token_type_ids were given (the prompt positions take type 0)"


def seq_cls_forward(peft_model, args: dict, kwargs: dict):
    """``PeftModelForSequenceClassification.forward``, prompt tuning."""
    return _encoder_task_forward(peft_model, args, kwargs, ("labels",), "SEQ_CLS")


def token_cls_forward(peft_model, args: dict, kwargs: dict):
    """``PeftModelForTokenClassification.forward``, prompt tuning."""
    return _encoder_task_forward(peft_model, args, kwargs, ("labels",), "TOKEN_CLS")


def question_answering_forward(peft_model, args: dict, kwargs: dict):
    """``PeftModelForQuestionAnswering.forward``, prompt tuning: start/end positions not shifted."""
    return _encoder_task_forward(peft_model, args, kwargs, ("start_positions", "end_positions"))


def feature_extraction_forward(peft_model, args: dict, kwargs: dict):
    """``PeftModelForFeatureExtraction.forward``, prompt tuning."""
    input_ids, _, n, rows, share, _ = _prepare_kwargs(
        peft_model, args, kwargs, return_dict=args["return_dict"], remove_token_type_ids=True, passed=()
    )
    if share:
        raise ValueError(f"share_prompt_prefix=True cannot apply: {_why_task(None, kwargs)}.")
    inputs_embeds = model_inputs_embeds(peft_model, input_ids, n, rows)
    return peft_model.base_model(inputs_embeds=inputs_embeds, **kwargs)


def seq2seq_forward(peft_model, args: dict, kwargs: dict):
    """``PeftModelForSeq2SeqLM.forward``, prompt tuning: the encoder gets N of the 2N prompt rows."""
    input_ids, _, n, rows, share, _ = _prepare_kwargs(
        peft_model,
        args,
        kwargs,
        return_dict=args["return_dict"],
        remove_token_type_ids=True,
        passed=("decoder_attention_mask", "labels"),
    )
    if share:
        raise ValueError(f"share_prompt_prefix=True cannot apply: {_why_task(None, kwargs)}.")
    inputs_embeds = model_inputs_embeds(peft_model, input_ids, n, rows)
    return peft_model.base_model(
        inputs_embeds=inputs_embeds,
        decoder_input_ids=args["decoder_input_ids"],
        decoder_inputs_embeds=args["decoder_inputs_embeds"],
        **kwargs,
    )
