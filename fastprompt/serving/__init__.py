"""Serving soft prompts on vLLM (the serving layer: the module layer and vLLM, no PEFT).

- ``word_table``: the base model's word embeddings read from its checkpoint files.
- ``prompts``: ``PromptAdapters``, named prompt tables from PEFT's files, and each request's
  ``prompt_embeds`` (adapter rows then token rows) built with ``fastprompt.prompt_concat``.
- ``settings``: the engine settings soft prompts need (prompt embeddings on, prefix caching, block size).
- ``offline``: ``LLM`` (also ``fastprompt.vllm.LLM``), vLLM's offline engine with ``adapter_names``.
- ``server``: the OpenAI-compatible server of ``python -m fastprompt serve``: vLLM's own OpenAI serving,
  where ``"model": NAME`` picks a soft prompt.

Importing ``offline`` or ``server`` imports vLLM; ``word_table`` and ``prompts`` do not.
"""
