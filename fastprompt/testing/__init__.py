"""What the tests, ``python -m fastprompt check`` and the benchmark suite check against, defined once.

- ``tolerances``: the per-dtype tolerance table (``TOLERANCES``, ``tolerance(*dtypes)``), the dtypes
  checked (``FLOAT_DTYPES``, ``DTYPE_NAMES``) and ``max_error`` (a tolerance test that reports instead
  of raising).
- ``reference``: the float64 reference of ``prompt_concat`` (forward and both gradients), PEFT's own
  eager code path op by op (``peft_concat``, the ``peft`` provider of the benchmarks), strided
  tables, ``assert_close_to_reference`` and ``poisoned_empty`` (NaN-filled outputs).
- ``tiny_models``: tiny transformers models built from configs (no hub): the test families (GPT-2,
  Llama, OPT, Gemma3, T5, BART, BERT, RoBERTa; vocabulary 128) and the built-in 32k-vocabulary
  ``tiny-gpt2`` / ``tiny-llama`` of the command line and the benchmarks; prompt-tuned PEFT/fastprompt
  pairs; a locally trained tokenizer.
- ``parity``: the checks of ``python -m fastprompt check`` (and of ``bench/gpu_check.py``).

Installed with fastprompt; nothing here is imported by the library itself. ``tiny_models`` and
``parity`` need transformers (and PEFT for the prompt-tuned pairs), imported when used.
"""

from .tolerances import DTYPE_NAMES, FLOAT_DTYPES, TOLERANCES, max_error, tolerance

__all__ = ["DTYPE_NAMES", "FLOAT_DTYPES", "TOLERANCES", "max_error", "tolerance"]
