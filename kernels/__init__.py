"""Triton kernels and their launchers (installed as ``fastprompt.kernels``).

Plain functions over tensors: no autograd, no nn.Module. Importing this package needs triton; set
``TRITON_INTERPRET=1`` before importing it to run the kernels on CPU tensors. ``INTERPRETED`` says
which of the two Triton chose (it reads the variable once, when the kernels are defined).
"""

from .address import INTERPRETED
from .prompt_concat_bwd import batch_rows_sum, segment_rows_sum
from .prompt_concat_fwd import prompt_concat_forward

__all__ = ["INTERPRETED", "batch_rows_sum", "prompt_concat_forward", "segment_rows_sum"]
