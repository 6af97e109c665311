"""The causal-LM forward of packed rows: each document with its own soft prompt, as if run alone.

:mod:`fastprompt.prompt_once.packed` says what the rows hold and builds the layouts and masks; this module
makes the call. The base model is called as PEFT calls it (``inputs_embeds`` = PEFT's ``[B, N + L, D]``
rows, labels prefixed with -100), so whatever head the model has (its own loss, TRL's fused LM head, a
user's head) sees PEFT's shapes:

- shared layout (default): the call carries the positions ``0..N-1, N + p`` and the model's mask
  functions return the prompt-visible, block-causal mask of each kind of layer (:mod:`.packed_masks`);
  one model call, the prompt once per row.
- inserted layout (``share_prompt_prefix=False``, dropout, flash attention): the decoder runs
  ``[P d1 P d2 ...]`` (:func:`inserted_plan`) and its hidden states are read back into PEFT's layout.
- unpacked layout (a model the masks cannot reach, see :func:`why_not_masked`): the decoder runs each
  document as a row of a padded batch (:func:`unpacked_plan`), read back the same way. A shared or
  inserted call whose model turned out not to take the masks (it never called a mask function) is run
  again this way, and the model's class is remembered (``UNPACKED``).

Which layout ran is counted in ``policy.CALLS`` under ``"packed shared"``, ``"packed inserted"`` and
``"packed unpacked"``.

Labels: a document's first label is predicted by the last virtual position when it runs alone. In a
packed row the token before it belongs to another document, so its label must be -100 there (TRL's
collators set it so) for the head's shifted loss to be exact. Where a later document's first label is not
-100, the stock head's loss is computed here from the logits (:func:`packed_causal_lm_loss`); a head of
its own (TRL's ``fused_lm_head``, ...) or a loss function other than transformers' cannot be told, and
such labels raise ``ValueError``.

Dropout active in training: one shared prompt pass would give every document of a row one dropout mask,
so the default inserts the prompt before each document (each its own pass, as alone);
``share_prompt_prefix=True`` raises.
"""

from __future__ import annotations

import inspect

import torch

from . import packed, packed_masks
from .decoder_share import decoder_plan
from .policy import (
    CACHE_KEYWORDS,
    CALLS,
    LOSS_KEYWORDS,
    active_dropout,
    bidirectional,
    cache_reason,
    decoder_of,
    denied_reason,
    other_keywords,
    padding_sensitive,
    rope_length_reason,
    stock_head,
    text_config,
)
from .prompt_pass import has_recurrent_layers
from .shared_forward import is_transformers_causal_lm_loss, two_part_causal_lm_loss

_PACKED = "packed rows (position_ids that restart inside a row, no attention_mask)"


def attention_implementation(base_model) -> str | None:
    return getattr(text_config(base_model), "_attn_implementation", None)


# Model classes whose packed call ran without taking the layout's masks: class -> why (run unpacked since).
UNPACKED: dict = {}


def why_not_exact(base_model, kwargs: dict) -> str | None:
    """Why packed rows cannot run exact on this call (a ``ValueError``), or None."""
    for key in CACHE_KEYWORDS:
        if kwargs.get(key) is not None:
            return f"a cache was passed in ({key}=...)"
    return None


def why_not_masked(base_model, *, varlen: bool = False) -> str | None:
    """Why the layout's masks (or, ``varlen``, flash attention's segments) cannot reach this model (it
    runs unpacked), or None: its attention implementation takes a dense mask, it builds its masks with
    transformers' mask functions, its decoder takes ``position_ids``, its attention is causal, and no
    layer carries state from one document to the next."""
    implementation = attention_implementation(base_model)
    if implementation not in packed.MASK_FORMS and not varlen:
        return f"attn_implementation={implementation!r} takes no dense mask"
    if bidirectional(base_model):
        return "its attention is bidirectional (is_causal=False)"
    if type(base_model) in UNPACKED:
        return UNPACKED[type(base_model)]
    denied = denied_reason(base_model, "packed")
    if denied is not None:
        return denied
    decoder = decoder_of(base_model)
    if decoder is None:
        return f"{type(base_model).__name__} has no separate decoder to run the documents"
    if "position_ids" not in inspect.signature(decoder.forward).parameters:
        return f"{type(decoder).__name__} takes no position_ids (its positions follow the mask)"
    if has_recurrent_layers(base_model):
        return "its recurrent layers carry their state from one document of a row to the next"
    if not varlen and not packed_masks.can_hand_masks(base_model, decoder):
        return f"{type(decoder).__name__} builds its attention mask without transformers' mask functions"
    reason = cache_reason(base_model)
    if reason is not None:  # recurrent state runs on from one document to the next; an indexer ranks all
        return reason
    return None


def packed_forward(base_model, base_call, inputs_embeds, n: int, rows, kwargs: dict, labels, requested):
    """The base model's output for packed rows, each document run as if alone.

    Args:
        base_model: the causal LM.
        base_call: ``base_call(inputs_embeds, keywords)`` makes PEFT's base-model call.
        inputs_embeds: PEFT's ``[B, N + L, D]`` rows (prompt first).
        n: N.
        rows: :class:`packed.PackedRows` of the ``[B, L]`` ids.
        kwargs: the call's other keywords (no attention mask: packed rows have none; labels not here).
        labels: ``[B, L]`` int64 or None, as the caller gave them (not prefixed).
        requested: ``share_prompt_prefix`` (None / True: the shared layout where the attention kernel
            allows; False: the prompt inserted before each document).

    Raises:
        ValueError: where this cannot be exact (model, attention implementation, a cache passed in,
            ``share_prompt_prefix=True`` under flash attention, labels a head of its own cannot take).
    """
    reason = why_not_exact(base_model, kwargs)
    if reason is not None:
        raise ValueError(f"{_PACKED} cannot run exact: {reason}.")
    implementation = attention_implementation(base_model)
    varlen = packed.is_varlen(implementation)
    sizes = packed.document_lengths(rows)  # a rope scaling by length: documents alone, one by one
    rope_reason = rope_length_reason(base_model, n + min(sizes), n + max(sizes))
    unmasked = rope_reason if rope_reason is not None else why_not_masked(base_model, varlen=varlen)
    dropout = active_dropout(base_model)
    if requested:
        if varlen:
            raise ValueError(
                f"share_prompt_prefix=True cannot apply to {_PACKED} under {implementation}: its varlen "
                "kernels need each document's keys contiguous, so the prompt is inserted before each "
                "document."
            )
        if dropout is not None:
            raise ValueError(
                f"share_prompt_prefix=True cannot apply to {_PACKED}: active dropout in training mode "
                f"({dropout}): the documents would share one dropout mask."
            )
        if unmasked is not None:
            raise ValueError(
                f"share_prompt_prefix=True cannot apply to {_PACKED} on {type(base_model).__name__}: "
                f"{unmasked} (without True, the documents run unpacked, exact)."
            )
    call = {k: v for k, v in kwargs.items() if k not in packed.FLASH_KWARGS}  # rewritten below if used
    call["use_cache"] = False  # packed rows are not continued: no cache comes back
    return_dict = call.pop("return_dict", None)
    call["return_dict"] = True
    own_loss = labels is not None and packed.doc_start_labels_matter(rows, labels)
    loss_kwargs = {}
    if own_loss:
        heads = other_keywords(call)
        own_head = not stock_head(base_model) or not is_transformers_causal_lm_loss(base_model.loss_function)
        if heads or own_head:
            head = f"keyword {heads[0]!r}" if heads else f"{type(base_model).__name__}'s forward or loss"
            raise ValueError(
                f"{_PACKED}: a document after the first in a row has a label on its first token, which the "
                f"head of this call ({head}) would have the previous document's last token predict; set "
                "the first label of each document to -100 (TRL's collators do)."
            )
        loss_kwargs = {k: call.pop(k) for k in LOSS_KEYWORDS if k in call}
    elif labels is not None:
        prefix = torch.full((labels.shape[0], n), -100, dtype=labels.dtype, device=labels.device)
        call["labels"] = torch.cat((prefix, labels), dim=1)

    output = None
    if unmasked is None and (requested is False or varlen or dropout is not None):
        plan = inserted_plan(base_model, rows, n, implementation)
        with decoder_plan(base_model, inputs_embeds, plan) as state:
            output = base_call(inputs_embeds, call)
        _check_ran(state, "with the prompt inserted before each document")
        CALLS["packed unpacked" if state.fallback else "packed inserted"] += 1
    elif unmasked is None:
        call["position_ids"] = packed.shared_positions(rows, n)
        layout = packed.shared_layout(rows, n)
        models = (base_model, decoder_of(base_model))
        with packed_masks.hand_masks(models, layout, implementation, inputs_embeds.dtype) as hook:
            output = base_call(inputs_embeds, call)
        if hook.reason is None:
            CALLS["packed shared"] += 1
        else:
            if requested:
                raise ValueError(f"share_prompt_prefix=True cannot apply to {_PACKED}: {hook.reason}.")
            output = None
            UNPACKED[type(base_model)] = hook.reason
        call.pop("position_ids")
    if output is None:  # the exact layout of any model PEFT runs: one document per row
        one_by_one = padding_sensitive(base_model) or rope_reason is not None
        plan = unpacked_plan(packed.unpacked_layout(rows, n), one_by_one=one_by_one)
        with decoder_plan(base_model, inputs_embeds, plan) as state:
            output = base_call(inputs_embeds, call)
        _check_ran(state, "unpacked into one document per row")
        CALLS["packed unpacked"] += 1
    if own_loss:
        loss = packed_causal_lm_loss(output.logits, labels, rows, n, loss_kwargs.get("num_items_in_batch"))
        output = type(output)(**{"loss": loss, **{k: v for k, v in output.items() if k != "loss"}})
    return output if return_dict is not False else output.to_tuple()


def packed_causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, rows: packed.PackedRows, n: int, num_items_in_batch=None
) -> torch.Tensor:
    """transformers' causal-LM loss of the documents run alone, from the logits of PEFT's layout.

    Args:
        logits: ``[B, N + L, V]`` (prompt positions first).
        labels: ``[B, L]`` int64, ``-100`` where ignored.
        rows: the packed rows; n: N.
        num_items_in_batch: the divisor ``Trainer`` passes, or None (the labels that are not -100).

    Each document's first label is predicted by the last virtual position (as when it runs alone), each
    other label by the token before it in its document; a document's last token predicts nothing.
    """
    labels = labels.to(logits.device)
    next_labels = torch.full_like(labels, -100)
    next_labels[:, :-1] = labels[:, 1:].masked_fill(rows.starts[:, 1:], -100)  # not across documents
    start_rows = rows.starts.nonzero()[:, 0]
    first_logits = logits[:, n - 1].index_select(0, start_rows)  # [documents, V]
    return two_part_causal_lm_loss(
        logits[:, n:], next_labels, first_logits, labels[rows.starts], labels, num_items_in_batch
    )


def inserted_plan(base_model, rows: packed.PackedRows, n: int, implementation: str):
    """The decoder plan of the inserted layout: the decoder runs ``[B, S]`` slots (the prompt before each
    document) with their masks (:mod:`.packed_masks`) or varlen keywords and positions; its hidden states
    (and per-layer hidden states) come back in PEFT's ``[B, N + L, D]`` layout. A decoder that does not
    take the masks runs the :func:`unpacked_plan` instead (``state.fallback`` says why)."""
    inserted = packed.inserted_layout(rows, n)

    def plan(forward, kwargs: dict, state):
        if kwargs.get("output_attentions"):
            raise ValueError(
                f"output_attentions with {_PACKED} and the prompt inserted before each document: the "
                "attention maps are of another layout than the rows."
            )
        call = dict(kwargs)
        rows_embeds = packed.inserted_inputs(call.pop("inputs_embeds"), inserted)  # [B, S, D]
        call["position_ids"] = inserted.layout.positions
        if packed.is_varlen(implementation):
            call["attention_mask"] = None
            call.update(inserted.varlen)
        else:
            call["attention_mask"] = None
            models = (base_model, decoder_of(base_model))
            with packed_masks.hand_masks(models, inserted.layout, implementation, rows_embeds.dtype) as hook:
                output = forward(inputs_embeds=rows_embeds, **call)
            if hook.reason is not None:  # the model did not take the masks: the rows run unpacked
                UNPACKED[type(base_model)] = state.fallback = hook.reason
                return unpacked_plan(packed.unpacked_layout(rows, n))(forward, kwargs, state)
            return _read_back(output, kwargs, state, lambda h: packed.gathered_back(h, inserted))
        output = forward(inputs_embeds=rows_embeds, **call)
        return _read_back(output, kwargs, state, lambda h: packed.gathered_back(h, inserted))

    return plan


def unpacked_plan(unpacked: packed.UnpackedLayout, *, one_by_one: bool = False):
    """The decoder plan of the unpacked layout: the decoder runs ``[R, S]`` rows (a document each, its
    prompt first, right-padded) with their padding mask and its own positions; its hidden states (and
    per-layer hidden states) come back in PEFT's ``[B, N + L, D]`` layout. ``one_by_one``: each row runs
    alone, unpadded (a model whose result depends on padding beyond the mask: a sparse-attention
    indexer's top-k counts the padded keys)."""

    def plan(forward, kwargs: dict, state):
        if kwargs.get("output_attentions"):
            raise ValueError(
                f"output_attentions with {_PACKED} unpacked into one document per row: the attention maps "
                "are of another layout than the rows."
            )
        dropped = {*packed.FLASH_KWARGS, "position_ids", "attention_mask"}
        call = {k: v for k, v in kwargs.items() if k not in dropped}
        rows_embeds = packed.unpacked_inputs(call.pop("inputs_embeds"), unpacked)  # [R, S, D]
        if one_by_one:
            output = _row_by_row(forward, rows_embeds, unpacked.attention_mask, call)
        else:
            output = forward(inputs_embeds=rows_embeds, attention_mask=unpacked.attention_mask, **call)
        return _read_back(output, kwargs, state, lambda h: packed.unpacked_back(h, unpacked))

    return plan


def _row_by_row(forward, rows_embeds: torch.Tensor, mask: torch.Tensor, call: dict):
    """The decoder over each of the ``[R, S, D]`` rows alone, cut to its length (``mask``: ``[R, S]``);
    the hidden states (and per-layer ones) padded back with zeros to ``[R, S, D]``."""
    outputs = []
    for row, length in enumerate(mask.sum(1).tolist()):
        outputs.append(
            forward(inputs_embeds=rows_embeds[row : row + 1, :length], **{**call, "return_dict": True})
        )
    size = rows_embeds.shape[1]

    def stacked(tensors):
        return torch.cat([torch.nn.functional.pad(t, (0, 0, 0, size - t.shape[1])) for t in tensors])

    fields = dict(outputs[0].items())
    fields["last_hidden_state"] = stacked([o.last_hidden_state for o in outputs])
    if fields.get("hidden_states") is not None:
        per_layer = zip(*(o.hidden_states for o in outputs), strict=True)
        fields["hidden_states"] = tuple(stacked(layer) for layer in per_layer)
    return type(outputs[0])(**fields)


def _check_ran(state, how: str) -> None:
    if not state.ran:
        raise ValueError(
            f"{_PACKED} {how}: the model's forward never called its decoder with the prompted rows."
        )


def _read_back(output, kwargs: dict, state, back):
    """The decoder's output with its hidden states read back into PEFT's layout by ``back``."""
    fields = dict(output.items())
    fields["last_hidden_state"] = back(output.last_hidden_state)
    if fields.get("hidden_states") is not None:
        fields["hidden_states"] = tuple(back(h) for h in fields["hidden_states"])
    state.ran += 1
    output = type(output)(**fields)
    return output if kwargs.get("return_dict") is not False else output.to_tuple()
