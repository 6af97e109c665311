"""Triton kernels and their launchers (installed as ``fastprompt.kernels``).

Plain functions over tensors: no autograd, no nn.Module. Importing this package needs triton; set
``TRITON_INTERPRET=1`` before importing it to run the kernels on CPU tensors.
"""

from .prompt_concat_bwd import segment_rows_sum
from .prompt_concat_fwd import prompt_concat_forward

__all__ = ["prompt_concat_forward", "segment_rows_sum"]
