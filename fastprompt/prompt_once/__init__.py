"""The prompt run once: fastprompt's prompt-once machinery, one subsystem in one place.

In a decoder-only model the N virtual tokens come first and attend only to each other, so their hidden
states, keys and values in every layer depend on nothing but the prompt rows and the base model. Everything
that exploits that fact lives here, and training, generation and packing all go through it:

- :mod:`.prompt_pass`: run the prompt, get its keys/values (and fill a cache with them).
- :mod:`.policy`: whether a forward shares the prompt (``share_prompt_prefix``: exact, and pays).
- :mod:`.shared_forward`: the stock causal-LM / classification forward with the prompt run once.
- :mod:`.decoder_share`: the same at the decoder, for any head that reads its hidden states (TRL's fused
  LM head, a user's own head).
- :mod:`.packed`: packed / padding-free rows (``position_ids`` restarting per document): what they hold,
  their layouts and masks; :mod:`.packed_forward`: their causal-LM forward, each document with its own
  soft prompt.
- :mod:`.kv_store`: generation's prompt-KV store (``reuse_prompt_kv``).
- :mod:`.sources`: which prompts a batch runs (adapters, multitask tasks) and where their rows come from
  (prompt tuning's table, P-tuning's encoder, multitask's task scaling).

The functions take the base model and a prompt-learning model (PEFT's ``PeftModel``: ``get_base_model()``,
``prompt_encoder``, ``word_embeddings``) as objects; nothing here imports PEFT. The PEFT integration
(:mod:`fastprompt.integrations`) routes its forwards and ``generate`` here.
"""
