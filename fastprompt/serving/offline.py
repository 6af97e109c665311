"""``fastprompt.vllm.LLM``: vLLM's offline ``LLM`` serving PEFT prompt-tuning adapters by name.

Each request with an adapter reaches vLLM as ``{"prompt_embeds": [N + L, D]}``: the adapter's N rows,
then the L token rows of its prompt (tokenized by vLLM's own renderer, as ``vllm.LLM.generate`` would),
built by ``fastprompt.prompt_concat`` from the base model's word table in the model's dtype. Requests
with adapter None go to vLLM unchanged (token prompts, vLLM's usual prefix cache).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .prompts import PromptAdapters, check_adapter_dirs
from .settings import engine_defaults
from .word_table import read_word_table


class LLM:
    """vLLM's ``LLM`` with named soft prompts.

    Args:
        model: the base model (a local directory or a hub name), as for ``vllm.LLM``.
        prompt_adapters: {name: directory of a PEFT prompt-tuning adapter (``save_pretrained`` output)}.
        prompt_adapter_dir: a directory whose every subdirectory ``NAME`` holding a PEFT prompt-tuning
            adapter is the adapter ``NAME``, read on its first use and again when its files change (the
            names of ``prompt_adapters`` win over its names; README: "Many adapters from a directory").
        max_loaded_adapters: how many of ``prompt_adapter_dir``'s tables to keep in memory (least
            recently used dropped; default 256). It bounds memory, not how many adapters one
            ``generate`` call may name.
        **engine_kwargs: every other ``vllm.LLM`` argument, passed through (``dtype``,
            ``tensor_parallel_size``, ``max_model_len``, ...). Set by default: ``enable_prompt_embeds=True``
            (required), ``enable_prefix_caching=True``, and on the CPU backend ``block_size=32`` (its
            default 128 is longer than most soft prompts, and only full blocks are cached). Pass ``dtype``
            explicitly: vLLM's "auto" runs a float32 checkpoint in bfloat16 on the CPU.

    ``llm.engine`` is the ``vllm.LLM`` underneath.
    """

    def __init__(
        self,
        model: str,
        prompt_adapters: dict | None = None,
        *,
        prompt_adapter_dir=None,
        max_loaded_adapters: int | None = None,
        **engine_kwargs,
    ):
        import vllm

        if prompt_adapters is not None and not isinstance(prompt_adapters, dict):
            raise TypeError(
                "prompt_adapters must be a dict {name: PEFT adapter directory}, got "
                f"{type(prompt_adapters).__name__}"
            )
        check_adapter_dirs(prompt_adapters or {})
        if prompt_adapter_dir is not None and not os.path.isdir(prompt_adapter_dir):
            raise ValueError(f"prompt_adapter_dir {os.fspath(prompt_adapter_dir)!r} is not a directory")
        if max_loaded_adapters is not None and prompt_adapter_dir is None:
            raise ValueError("max_loaded_adapters bounds the adapters of prompt_adapter_dir: give it too")
        kwargs = engine_defaults(engine_kwargs)
        self.engine = vllm.LLM(model=model, **kwargs)
        try:
            model_config = self.engine.llm_engine.model_config
            word_table = read_word_table(
                model,
                model_config.dtype,
                revision=kwargs.get("revision"),
                trust_remote_code=bool(kwargs.get("trust_remote_code", False)),
            )
            self.adapters = PromptAdapters(
                word_table, adapter_dir=prompt_adapter_dir, max_loaded=max_loaded_adapters
            )
            for name, path in (prompt_adapters or {}).items():
                self.adapters.load(path, name)
        except BaseException:
            self.shutdown()  # no engine processes left behind by a failed start
            raise

    def load_adapter(self, path, adapter_name: str) -> None:
        """Add the PEFT prompt-tuning adapter in directory ``path`` as ``adapter_name``, or replace the
        adapter of that name. Requests built after this call use the new table; a bad file raises
        ``fastprompt.AdapterFileError`` (naming the file and the problem) and changes nothing."""
        self.adapters.load(path, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter ``adapter_name`` (ValueError naming the loaded ones if there is none)."""
        self.adapters.delete(adapter_name)

    @property
    def adapter_names(self) -> list[str]:
        """The names of the adapters: those loaded by name, then ``prompt_adapter_dir``'s (a listing of
        the directory now; they are read on first use)."""
        return self.adapters.names() + self.adapters.directory_names()

    def shutdown(self) -> None:
        """Stop vLLM's engine processes now (otherwise they stop when the interpreter exits)."""
        self.engine.llm_engine.engine_core.shutdown()

    def get_tokenizer(self):
        """vLLM's tokenizer of the base model."""
        return self.engine.get_tokenizer()

    def build_prompts(self, prompts, adapter_names=None, *, tokenization_kwargs: dict | None = None) -> list:
        """The vLLM prompts ``generate`` submits: ``{"prompt_embeds": [N + L, D]}`` for rows with an adapter
        (vLLM's renderer tokenizes string prompts first), the prompt itself for rows with None."""
        seq = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        if adapter_names is None:
            names = [None] * len(seq)
        elif isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise TypeError(
                "adapter_names must be a list with one adapter name (or None) per prompt, "
                f"got {type(adapter_names).__name__}"
            )
        else:
            names = list(adapter_names)
        if len(names) != len(seq):
            raise ValueError(
                f"adapter_names has {len(names)} entries but there are {len(seq)} prompts: give one name "
                "(or None for the base model) per prompt"
            )
        # each name's table taken once, for the whole call: unknown names and bad files fail before anything
        # is submitted, and the store's bound (or a reload meanwhile) cannot change a table mid-call
        tables = {name: self.adapters.resolve(name) for name in dict.fromkeys(names) if name is not None}
        built = []
        for prompt, name in zip(seq, names, strict=True):
            if name is None:
                built.append(prompt)
                continue
            if isinstance(prompt, dict) and ("prompt_embeds" in prompt or "multi_modal_data" in prompt):
                raise ValueError(
                    f"adapter {name!r}: a prompt with an adapter is a string or "
                    f"{{'prompt_token_ids': [...]}}; got a dict with {sorted(prompt)}"
                )
            (rendered,) = self.engine._preprocess_cmpl([prompt], tokenization_kwargs)
            embeds = {"prompt_embeds": self.adapters.embeds(name, rendered["prompt_token_ids"], tables[name])}
            if "cache_salt" in rendered:
                embeds["cache_salt"] = rendered["cache_salt"]
            built.append(embeds)
        return built

    def generate(self, prompts, sampling_params=None, adapter_names=None, **kwargs):
        """``vllm.LLM.generate`` with one soft prompt per request.

        Args:
            prompts: a string, ``{"prompt_token_ids": [...]}``, or a list of them.
            sampling_params: as for ``vllm.LLM.generate``.
            adapter_names: one adapter name per prompt (None: the base model, no soft prompt); None: all
                None. Unknown names raise ValueError, and a ``prompt_adapter_dir`` adapter with bad files
                ``fastprompt.AdapterFileError``, before any request is submitted.
            **kwargs: passed to ``vllm.LLM.generate`` (``use_tqdm``, ``tokenization_kwargs``, ...).

        Returns:
            vLLM's ``RequestOutput`` list, in prompt order. For rows with an adapter, ``prompt`` is the text
            given (if any) and ``num_cached_tokens`` counts the prompt rows (virtual and real) served
            from the prefix cache.
        """
        built = self.build_prompts(
            prompts, adapter_names, tokenization_kwargs=kwargs.get("tokenization_kwargs")
        )
        outputs = self.engine.generate(built, sampling_params, **kwargs)
        seq = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        for output, prompt, sent in zip(outputs, seq, built, strict=True):
            if sent is not prompt and isinstance(prompt, str):
                output.prompt = prompt
        return outputs
