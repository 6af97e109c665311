"""Serving soft prompts on vLLM (the serving layer: the module layer and vLLM, no PEFT).

- ``word_table``: the base model's word embeddings read from its checkpoint files.
- ``prompts``: ``PromptAdapters``, named prompt tables from PEFT's files, and each request's
  ``prompt_embeds`` (adapter rows then token rows) built with ``fastprompt.prompt_concat``.
- ``adapter_dir``: ``AdapterDirectory``, a directory of adapters served by name on demand (the name rule,
  the LRU bound, reloads when files change); ``confined_files``: its files opened only inside the
  directory (the security boundary); ``adapter_events``: its loads, reloads and evictions as log lines in
  vLLM's format and Prometheus metrics (needs vLLM).
- ``settings``: the engine settings soft prompts need (prompt embeddings on, prefix caching, block size).
- ``names``: the server's names, checked before its engine starts: the base model's default served name
  (its directory's name, never a path), no clash with an adapter's, ``--default-model``.
- ``offline``: ``LLM`` (also ``fastprompt.vllm.LLM``), vLLM's offline engine with ``adapter_names``.
- ``server``: the OpenAI-compatible server of ``python -m fastprompt serve``: vLLM's own OpenAI serving,
  where ``"model": NAME`` picks a soft prompt.

Importing ``offline``, ``server`` or ``adapter_events`` imports vLLM; ``word_table``, ``prompts``,
``adapter_dir``, ``confined_files`` and ``names`` do not.
"""
