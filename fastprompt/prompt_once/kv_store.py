"""The prompt-KV store: each prompt-tuning adapter's virtual-token keys/values, computed once.

Also P-tuning adapters (the rows compared are the encoder's output) and multitask adapters (one entry
per task, keyed ``(name, task)``).

In a causal LM the N virtual tokens come first and attend only to each other, so their keys and values in
every layer depend on nothing but the adapter's prompt table and the base model. :class:`PromptKVStore`
keeps them per adapter (``[1, H_kv, N, head_dim]`` keys and values per layer, in the model's dtype and
on its device) so that generation can start from a cache that already holds them.

Never stale: an entry is reused only while

- the adapter's prompt rows are equal, element for element, to the rows it was computed from (a copy is
  kept and compared: optimizer steps, in-place edits, ``.data`` assignments and edits, ``load_adapter``
  all change them), with the same dtype, device and shape;
- every parameter and buffer of the base model is the same tensor (same storage, same dtype and device)
  at the same version counter (``Tensor._version``: in-place updates bump it), and the attention
  implementation and the autocast state (``torch.autocast`` on the model's devices) are the same.

Anything else recomputes. At most ``max_adapters`` entries are kept (least recently used dropped first);
an entry is freed when its adapter's prompt module is freed (``delete_adapter``) and whenever the store
sees that its adapter is gone. Edits of base-model weights through ``.data`` (which bypass the version
counter) are not seen: call ``prompt_kv_store(model).clear()`` after such edits.
"""

from __future__ import annotations

import collections
import dataclasses
import weakref

import torch

from ..prompted_embeds.prompt_rows import TABLE, source_rows
from .prompt_pass import model_cache, run_prompt, starts_from_own_cache
from .sources import adapter_source

DEFAULT_MAX_ADAPTERS = 8

# Counts prompt-KV computations ("computed") and reuses ("reused"), for tests and diagnostics.
CALLS: collections.Counter = collections.Counter()

_STORES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class PromptKV:
    """One adapter's virtual-token keys/values.

    Attributes:
        keys, values: per decoder layer, ``[1, H_kv, N, head_dim]`` tensors in the model's dtype.
        prompt_rows: ``[N, D]`` copy of the prompt rows they were computed from (the table's dtype).
        base_key: the base-model fingerprint they were computed with.
        state: for a model whose cache has other than plain key/value layers (a hybrid, a state-space
            model, KV-shared placeholders), the model's own cache after the prompt (batch 1: keys/values,
            convolution and recurrent states), which generation starts from; else None.
    """

    keys: list
    values: list
    prompt_rows: torch.Tensor
    base_key: tuple
    state: object = None

    @property
    def num_tokens(self) -> int:
        return self.prompt_rows.shape[0]

    def nbytes(self) -> int:
        if self.state is not None:
            return sum(t.numel() * t.element_size() for t in cache_tensors(self.state))
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class PromptKVStore:
    """Per-model store of :class:`PromptKV` entries, keyed by adapter name (least recently used first out).

    ``max_adapters``: how many adapters' prompt KV are kept at most (default ``DEFAULT_MAX_ADAPTERS``);
    ``clear()`` frees them all; ``len(store)``, ``names()`` and ``nbytes()`` describe what is held.
    """

    def __init__(self, max_adapters: int = DEFAULT_MAX_ADAPTERS):
        self._entries: collections.OrderedDict[str, PromptKV] = collections.OrderedDict()
        self._finalizers: dict[str, weakref.finalize] = {}
        self.max_adapters = max_adapters

    @property
    def max_adapters(self) -> int:
        return self._max_adapters

    @max_adapters.setter
    def max_adapters(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"max_adapters must be an int >= 0 (0 keeps nothing), got {value!r}.")
        self._max_adapters = value
        self._evict()

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def nbytes(self) -> int:
        return sum(entry.nbytes() for entry in self._entries.values())

    def clear(self) -> None:
        for name in list(self._entries):
            self.drop(name)

    def drop(self, name: str) -> None:
        self._entries.pop(name, None)
        finalizer = self._finalizers.pop(name, None)
        if finalizer is not None:
            finalizer.detach()

    def _evict(self) -> None:
        while len(self._entries) > self._max_adapters:
            self.drop(next(iter(self._entries)))

    def get(self, peft_model, name: str, task: int | None = None) -> PromptKV:
        """The prompt KV of adapter ``name`` (multitask: of its task ``task``, kept per task): the stored
        entry if still valid, else computed (and stored)."""
        self._prune(peft_model)
        module = peft_model.prompt_encoder[name]
        key = name if task is None else (name, task)
        rows = _prompt_rows(peft_model, name, task)
        base_key = base_fingerprint(peft_model.get_base_model())
        entry = self._entries.get(key)
        if entry is not None and _same_rows(entry.prompt_rows, rows) and entry.base_key == base_key:
            self._entries.move_to_end(key)
            CALLS["reused"] += 1
            return entry
        self.drop(key)
        keys, values, state = compute_prompt_kv(peft_model, rows)
        entry = PromptKV(keys, values, rows.detach().clone(), base_key, state)
        CALLS["computed"] += 1
        if self._max_adapters:
            self._entries[key] = entry
            # delete_adapter frees the prompt module: free its entry with it
            self._finalizers[key] = weakref.finalize(module, _drop_if_alive, weakref.ref(self), key)
            self._evict()
        return entry

    def _prune(self, peft_model) -> None:
        present = getattr(peft_model, "prompt_encoder", {})
        for key in [k for k in self._entries if _adapter_of(k) not in present]:
            self.drop(key)


def _adapter_of(key) -> str:
    """The adapter name of a store key: the name, or (name, task) for a multitask adapter's task."""
    return key if isinstance(key, str) else key[0]


def _drop_if_alive(store_ref, name: str) -> None:
    store = store_ref()
    if store is not None:
        store._entries.pop(name, None)
        store._finalizers.pop(name, None)


def prompt_kv_store(peft_model) -> PromptKVStore:
    """The prompt-KV store of ``peft_model`` (created on first use; lives as long as the model)."""
    store = _STORES.get(peft_model)
    if store is None:
        store = _STORES[peft_model] = PromptKVStore()
    return store


def _same_rows(stored: torch.Tensor, rows: torch.Tensor) -> bool:
    return (
        stored.shape == rows.shape
        and stored.dtype == rows.dtype
        and stored.device == rows.device
        and bool(torch.equal(stored, rows))
    )


def _prompt_rows(peft_model, name: str, task: int | None = None) -> torch.Tensor:
    """[N, D] prompt rows of adapter ``name`` as PEFT's ``get_prompt`` gives them (CausalLM: N*S = N):
    prompt tuning's table rows; P-tuning's encoder output (so an optimizer step on any encoder
    parameter changes them), or its stored rows in inference mode; multitask's rows of task ``task``."""
    config = peft_model.peft_config[name]
    source = adapter_source(peft_model, name, task)
    if source.kind == TABLE:
        return source.module.embedding.weight[: config.num_virtual_tokens]
    with torch.no_grad():
        return source_rows([source], config.num_virtual_tokens)[0]


def base_fingerprint(base_model) -> tuple:
    """What the prompt KV depend on in the base model: every parameter and buffer (storage, version,
    dtype, device), the attention implementation, and the autocast state (``torch.autocast``: enabled and
    dtype) of the devices it is on."""
    tensors = tuple(
        (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))
        for t in (*base_model.parameters(), *base_model.buffers())
    )
    attn = getattr(base_model.config, "_attn_implementation", None)
    device_types = sorted({t[3].type for t in tensors})
    autocast = tuple(_autocast_state(kind) for kind in device_types)
    return (id(base_model), attn, autocast, tensors)


def _autocast_state(device_type: str) -> tuple:
    try:
        return (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    except RuntimeError:  # a device type without autocast (meta, ...)
        return (device_type, False, None)


def compute_prompt_kv(peft_model, rows: torch.Tensor) -> tuple[list, list, object]:
    """The prompt pass (:func:`fastprompt.prompt_once.prompt_pass.run_prompt`) over one adapter's N
    prompt rows, without grad.

    The rows are cast to the word embeddings' dtype exactly as the prefill's ``inputs_embeds`` would be
    (PEFT: ``prompts.to(inputs_embeds.dtype)``).

    Returns:
        (keys, values, state): per layer ``[1, H_kv, N, head_dim]`` tensors in the model's dtype (None
        for a layer without keys); ``state``: the model's own cache after the prompt where it has
        recurrent or placeholder layers (:func:`.prompt_pass.starts_from_own_cache`), else None.
    """
    word_embeddings = peft_model.word_embeddings
    dtype = word_embeddings.weight.dtype if hasattr(word_embeddings, "weight") else rows.dtype
    device = word_embeddings.weight.device if hasattr(word_embeddings, "weight") else rows.device
    inputs_embeds = rows.detach().to(device=device, dtype=dtype)[None]  # [1, N, D]
    base_model = peft_model.get_base_model()
    recurrent = starts_from_own_cache(base_model)
    with torch.no_grad():
        cache = model_cache(base_model) if recurrent else None
        prompt = run_prompt(base_model, inputs_embeds, all_logits=False, cache=cache)
    return prompt.keys, prompt.values, prompt.cache if recurrent else None


def cache_tensors(cache) -> list:
    """Every tensor a cache's layers hold (attributes, and values of per-state dicts)."""
    found = []
    for layer in cache.layers:
        for value in vars(layer).values():
            if torch.is_tensor(value):
                found.append(value)
            elif isinstance(value, dict):
                found += [v for v in value.values() if torch.is_tensor(v)]
    return found
