"""``share_prompt_prefix`` (beyond PEFT), the forward: the prompt run once per adapter per batch.

The prompt runs once per adapter (:func:`fastprompt.prompt_once.prompt_pass.run_prompt`, batch K, with
grad) and the B rows' L tokens run on top of its keys/values, with the mask ``[ones(N), attention_mask]``
and positions left to the model (so they are PEFT's: N.. for most models, derived from the mask for OPT).
Every row's gradient flows back through the one prompt pass. :mod:`fastprompt.prompt_once.policy`
decides when this runs.

What the caller gets is PEFT's: CausalLM ``logits`` ``[B, N+L, V]`` (the prompt positions' logits computed
once, then given to every row of the adapter), the cache of N+L positions, and the ``loss`` of the model's
own loss function (``num_items_in_batch`` included) computed from the last virtual position's logits (the
one that predicts the first label) and the token logits: the other N-1 prompt positions predict only
``-100`` labels. Sequence classification pools the last position, which is a token position; token
classification returns every position's logits.

Gradient checkpointing: the prompt pass runs without checkpointing (batch K, N positions: small); the
token pass runs checkpointed with a cache that the layers only read (a recomputed layer must see the same
keys/values and must not append to the cache again). With ``use_reentrant=True`` the checkpointed layers
see the prompt keys/values as leaves, and :class:`.prompt_pass.LeafGradients` hands their gradients to the
prompt pass
once every layer's backward has run.
"""

from __future__ import annotations

import contextlib

import torch

from ..prompted_embeds.prompt_rows import source_rows
from . import prompt_pass, router_loss
from .policy import (
    CACHE_KEYWORDS,
    CALLS,
    LOSS_KEYWORDS,
    PROMPT_PASS_ERRORS,
    TOKEN_PASS_ERRORS,
    RuntimeDecline,
    checkpoint_flagged,
    checkpointed_layers,
    checkpointing_mode,
    record_decline,
    text_config,
)
from .prompt_pass import cache_argument, run_prompt
from .sources import batch_sources


@contextlib.contextmanager
def _instance_attributes(modules, name: str, value):
    """Set ``name`` on each module instance for the duration (the class attribute comes back after)."""
    saved = [(m, m.__dict__.get(name, _MISSING)) for m in modules]
    for module in modules:
        object.__setattr__(module, name, value)
    try:
        yield
    finally:
        for module, old in saved:
            if old is _MISSING:
                module.__dict__.pop(name, None)
            else:
                object.__setattr__(module, name, old)


_MISSING = object()


def shared_forward(peft_model, task: str, input_ids, n: int, rows, kwargs: dict, requested=None):
    """The base model's output for ``cat(prompts, tokens)`` per row, with the prompt run once per adapter.

    Args:
        task: the PEFT task type (one of ``shared_prefix.TASKS``).
        input_ids: [B, L] token ids.
        n: N, the virtual tokens of the adapter(s).
        rows: ``RowAdapters`` of a mixed batch, or None (the active adapter).
        kwargs: what PEFT's path would pass to the base model besides ``inputs_embeds`` (the mask already
            prefixed to [B, N+L]; CausalLM ``labels`` NOT prefixed).
        requested: the call's ``share_prompt_prefix`` (True: a decline found at run time raises).

    Returns:
        What the base model returns on PEFT's path (a ModelOutput, or a tuple with ``return_dict=False``),
        or None where the model turned out not to read the prompt's cache (:class:`policy.RuntimeDecline`;
        the caller takes PEFT's path, counted "not shared").
    """
    base_model = peft_model.get_base_model()
    batch = input_ids.shape[0]
    sources, index = batch_sources(peft_model, rows, input_ids.device)  # P-tuning: the encoder's rows
    word_embeddings = peft_model.word_embeddings
    token_embeds = word_embeddings(input_ids)  # [B, L, D], exactly PEFT's call
    prompt_embeds = source_rows(sources, n, token_embeds.dtype).to(token_embeds.device)  # [K, N, D]

    call = dict(kwargs)
    labels = call.pop("labels", None) if task == "CAUSAL_LM" else call.get("labels")
    loss_kwargs = {k: call.pop(k) for k in LOSS_KEYWORDS if k in call}
    use_cache = call.pop("use_cache", None)
    return_dict = call.pop("return_dict", None)
    router = (
        _RouterLoss(base_model, task, labels, loss_kwargs, index, batch, n)
        if router_loss.asked(base_model, call)
        else None
    )
    try:
        try:
            prompt, output, mode = prompt_then_tokens(
                base_model,
                base_model,
                prompt_embeds,
                token_embeds,
                index,
                call,
                all_logits=task != "SEQ_CLS",
                around_tokens=router,
            )
        except TOKEN_PASS_ERRORS as error:  # an auxiliary loss of the token pass alone meets the N+L mask
            if router is None or router.hook.logits is not None or isinstance(error, torch.OutOfMemoryError):
                raise
            reason = (
                f"its auxiliary loss failed on the tokens' router logits ({type(error).__name__}: {error})"
            )
            raise RuntimeDecline(f"output_router_logits=True: {reason}") from error
        if router is not None and router.hook.logits is None:
            router.without_aux_loss(prompt, output)
    except RuntimeDecline as decline:
        if requested:
            raise ValueError(f"share_prompt_prefix=True cannot apply: {decline}.") from None
        CALLS["not shared"] += 1
        return None

    fields = dict(output.items())
    if router is not None:
        fields["router_logits"] = router.hook.logits  # PEFT's: every row's prompt positions too
    if task != "SEQ_CLS":
        prompt_logits = prompt.output.logits  # [K, N, V]
        token_logits = output.logits  # [B, L, V]
        if labels is not None and router is not None and router.loss is not None:
            pass  # the model's own loss: PEFT's causal-LM loss plus its router's auxiliary loss
        elif labels is not None:  # the last virtual position predicts the first label; the rest only -100
            last = to_rows(prompt_logits[:, -1:], index, batch)  # [B, 1, V]: no gradient buffer of [B, N, V]
            fields["loss"] = _causal_lm_loss(
                base_model.loss_function, last, token_logits, labels, loss_kwargs
            )
        fields["logits"] = torch.cat((to_rows(prompt_logits, index, batch), token_logits), dim=1)
    if not uses_cache(base_model, use_cache, mode):
        for key in CACHE_KEYWORDS:
            fields.pop(key, None)
    output = type(output)(**fields)  # the fields in the model output's own order
    CALLS["shared"] += 1
    return output if return_dict is not False else output.to_tuple()


class _RouterLoss:
    """The token pass of a call that asks for router logits (:mod:`.router_loss`): the family's auxiliary
    loss gets the prompt's router logits once per row, and, with causal-LM labels, the model computes its
    loss itself (PEFT's causal-LM loss, :func:`_causal_lm_loss`, through its ``loss_function``) and adds
    its auxiliary loss as on PEFT's path.

    Called with the prompt pass, it returns ``(context, keywords)``: what the token pass runs inside, and
    the keywords it adds to the token pass's call.
    """

    def __init__(self, base_model, task, labels, loss_kwargs, index, batch, n):
        self.base_model, self.task, self.labels, self.loss_kwargs = base_model, task, labels, loss_kwargs
        self.index, self.batch, self.n = index, batch, n
        self.hook = router_loss.RouterHook()
        self.loss = None

    def without_aux_loss(self, prompt, output) -> None:
        """After a token pass whose forward called no auxiliary-loss function: the router logits PEFT's
        path returns (each row's prompt positions, then its tokens) are joined here; an auxiliary loss
        the model computed some other way (from the token pass's logits alone) declines."""
        if self.hook.error or getattr(output, "aux_loss", None) is not None:
            reason = (
                self.hook.error
                or "its forward computed an auxiliary loss without a function it could be given"
            )
            raise RuntimeDecline(f"output_router_logits=True: {reason}")
        joined = router_loss.join(
            getattr(prompt.output, "router_logits", None),
            getattr(output, "router_logits", None) or (),
            self.index,
            self.batch,
            self.n,
        )
        if not joined:
            raise RuntimeDecline("output_router_logits=True: the passes' router logits do not match")
        self.hook.logits = joined

    def __call__(self, prompt):
        stack = contextlib.ExitStack()
        router_logits = getattr(prompt.output, "router_logits", None)
        self.hook = stack.enter_context(
            router_loss.prompt_router_logits(self.base_model, router_logits, self.index, self.batch, self.n)
        )
        if self.task != "CAUSAL_LM" or self.labels is None:
            return stack, {}
        original = self.base_model.loss_function
        last = to_rows(prompt.output.logits[:, -1:], self.index, self.batch)  # [B, 1, V]

        def loss_function(logits, *args, **kwargs):
            self.loss = _causal_lm_loss(original, last, logits, self.labels, self.loss_kwargs)
            return self.loss

        stack.enter_context(_instance_attributes([self.base_model], "_loss_function", loss_function))
        return stack, {"labels": self.labels}


def prompt_then_tokens(
    base_model, model, prompt_embeds, token_embeds, index, call: dict, *, all_logits=True, around_tokens=None
):
    """Run the prompt once per adapter, then every row's tokens on its keys/values.

    Args:
        base_model: the base model (its layers' gradient checkpointing is read and adjusted).
        model: what runs both passes: ``base_model`` itself (called as a module), or its decoder's own
            forward function (:mod:`fastprompt.prompt_once.decoder_share`: the decoder is being called).
        prompt_embeds: ``[K, N, D]`` prompt rows in the model's dtype.
        token_embeds: ``[B, L, D]`` token rows.
        index: ``[B]`` int64, the prompt of each row; None: K = 1, every row takes it.
        call: the token pass's keywords (the mask ``[B, N + L]``, ...), without cache, ``use_cache`` and
            ``return_dict``.
        all_logits: keep the prompt pass's logits of all N positions (else the last, where it can).
        around_tokens: None, or a callable that takes the :class:`PromptPass` and returns ``(context,
            keywords)``: the token pass runs inside ``context`` with ``keywords`` added (:class:`_RouterLoss`;
            the prompt pass then also asks for router logits).

    Returns:
        ``(prompt, output, mode)``: the :class:`PromptPass`, the token pass's output (``[B, L, ...]``) and
        the layers' checkpointing mode (None when they are not checkpointed).

    Gradient checkpointing: the prompt pass runs without it (batch K, N positions: small); the token pass
    runs checkpointed with a cache the layers only read (a recomputed layer must see the same keys/values
    and must not append to the cache again); with ``use_reentrant=True`` the layers see the prompt
    keys/values as leaves and :class:`.prompt_pass.LeafGradients` hands their gradients on.
    """
    layers = checkpointed_layers(base_model) if torch.is_grad_enabled() else []
    mode = checkpointing_mode(layers)[0] if layers else None
    flagged = checkpoint_flagged(base_model) if layers else []
    cache = prompt_pass.model_cache(base_model)  # the model's own layers: full, sliding, chunked, ...
    with _instance_attributes(flagged, "gradient_checkpointing", False):
        try:  # batch K, N positions
            extra = {} if around_tokens is None else {router_loss.ROUTER_LOGITS: True}
            prompt = run_prompt(model, prompt_embeds, all_logits=all_logits, cache=cache, **extra)
        except PROMPT_PASS_ERRORS as error:  # a model of its own making that takes no DynamicCache
            reason = f"its prompt pass failed ({type(error).__name__}: {error})"
            raise record_decline(base_model, mode, reason) from None
    if not any(prompt_pass.holds_prompt(layer) for layer in cache.layers):
        name = getattr(model, "__qualname__", None) or type(model).__name__
        raise record_decline(base_model, mode, f"{name} did not fill the cache it was given with the prompt")

    if mode == "reentrant":  # the recomputed layers see the cache's tensors as leaves
        leaves, originals = prompt_pass.prefix_leaves(cache)
        if leaves:
            what = ("share_prompt_prefix", "pass share_prompt_prefix=False")
            token_embeds = prompt_pass.LeafGradients.apply(token_embeds, leaves, what, *originals)
    prompt_pass.expand_prefix(cache, index, token_embeds.shape[0])  # batch B, by the layers' own methods
    # a recomputed (checkpointed) layer must see the same cache and not append to it again
    reads = prompt_pass.PrefixReads(cache, read_only=mode is not None)
    call = {**call, cache_argument(model): cache, "use_cache": True, "return_dict": True}
    readable = _instance_attributes(layers, "_can_checkpoint_with_cache", True)
    around, added = (contextlib.nullcontext(), {}) if around_tokens is None else around_tokens(prompt)
    try:
        with readable if mode else contextlib.nullcontext(), around:
            output = model(inputs_embeds=token_embeds, **call, **added)
    except TOKEN_PASS_ERRORS as error:  # a layer without the cache meets the N + L mask, say: if it did
        if isinstance(error, torch.OutOfMemoryError) or reads.complete():
            raise
        reason = f"{reads.unread_reason(model)} ({type(error).__name__}: {error})"
        raise record_decline(base_model, mode, reason) from error
    if not reads.complete():
        raise record_decline(base_model, mode, reads.unread_reason(model))
    return prompt, output, mode


def _causal_lm_loss(loss_function, last, token_logits, labels, loss_kwargs: dict) -> torch.Tensor:
    """The model's causal-LM loss over the positions ``[last virtual, tokens]`` of every row.

    Args:
        loss_function: the base model's ``loss_function``.
        last: ``[B, 1, V]`` logits of each row's last virtual position (it predicts ``labels[:, 0]``).
        token_logits: ``[B, L, V]`` logits of the token positions (the model's dtype).
        labels: ``[B, L]`` int64, ``-100`` where ignored.
        loss_kwargs: ``num_items_in_batch`` when the caller (``Trainer``) passed it.

    Any loss function gets ``cat(last, token_logits)`` with the labels ``[-100, labels]``. transformers'
    own ``ForCausalLMLoss`` (the default of causal LMs) is computed as it would on that input without the
    ``[B, L+1, V]`` copy: the summed cross-entropy of the token positions and of the last virtual
    positions (logits upcast to fp32 as it does), over ``num_items_in_batch`` or the number of labels
    that are not ``-100`` (``reduction="mean"``'s count; 0/0 gives its NaN).
    """
    if not is_transformers_causal_lm_loss(loss_function):
        first = torch.full((labels.shape[0], 1), -100, dtype=labels.dtype, device=labels.device)
        return loss_function(
            logits=torch.cat((last, token_logits), dim=1),
            labels=torch.cat((first, labels), dim=1),
            vocab_size=token_logits.shape[-1],
            **loss_kwargs,
        )
    labels = labels.to(token_logits.device)
    next_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # token i predicts label i+1
    return two_part_causal_lm_loss(
        token_logits, next_labels, last[:, 0], labels[:, 0], labels, loss_kwargs.get("num_items_in_batch")
    )


def two_part_causal_lm_loss(
    token_logits, next_labels, first_logits, first_labels, labels, num_items_in_batch
):
    """transformers' ``ForCausalLMLoss`` summed in two parts, without a ``[B, N+L, V]`` copy.

    Args:
        token_logits: ``[B, L, V]`` logits of the token positions; next_labels: ``[B, L]`` int64, what each
            predicts (``-100``: nothing).
        first_logits: ``[R, V]`` logits that predict a sequence's first label (the last virtual position);
            first_labels: ``[R]`` int64, those labels.
        labels: ``[B, L]`` int64, every label (the divisor counts those that are not ``-100``).
        num_items_in_batch: the divisor ``Trainer`` passes, or None.

    Summed cross-entropy of both parts (logits upcast to fp32, as ``ForCausalLMLoss`` does) over
    ``num_items_in_batch`` or the labels' count (``reduction="mean"``'s; 0/0 gives its NaN).
    """
    vocab = token_logits.shape[-1]
    total = torch.nn.functional.cross_entropy(
        token_logits.float().reshape(-1, vocab), next_labels.reshape(-1), ignore_index=-100, reduction="sum"
    ) + torch.nn.functional.cross_entropy(
        first_logits.float(), first_labels, ignore_index=-100, reduction="sum"
    )
    if num_items_in_batch is None:
        num_items_in_batch = (labels != -100).sum()
    elif torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def is_transformers_causal_lm_loss(loss_function) -> bool:
    """Whether a model's ``loss_function`` is transformers' own ``ForCausalLMLoss``."""
    return loss_function is _transformers_causal_lm_loss()


def _transformers_causal_lm_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss


def to_rows(per_prompt: torch.Tensor, index: torch.Tensor | None, batch: int) -> torch.Tensor:
    """[K, ...] per prompt -> [B, ...] per batch row (``index``: the prompt of each row; None: K = 1)."""
    return (
        per_prompt.expand(batch, *per_prompt.shape[1:])
        if index is None
        else per_prompt.index_select(0, index)
    )


def uses_cache(base_model, use_cache, mode) -> bool:
    """Whether PEFT's path would return a cache: ``use_cache`` or the config's, and no checkpointing
    (``mode``: the layers' checkpointing mode, None when they are not checkpointed)."""
    if mode is not None:
        return False
    if use_cache is None:
        use_cache = getattr(text_config(base_model), "use_cache", False)
    return bool(use_cache)
