"""The op-level problems the benchmarks measure, and the bytes each must move.

- ``Shape``: one problem (B, T, L, D, V and the two table dtypes), with labels for ids and tables.
- ``bytes_moved``: the bytes one call must move (each input read once, each output written once), the
  numerator of every GB/s figure.
- ``SUITE_SHAPES`` (``pytest bench``), ``QUICK_SHAPES`` (``python -m fastprompt bench``), by device kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..testing.tolerances import DTYPE_NAMES


@dataclass(frozen=True)
class Shape:
    """One op-level problem: ``B`` rows of ``L`` tokens after ``T`` prompt rows, embedding size ``D``.

    ``word_dtype`` is the model's embedding dtype (and the output's); ``prompt_dtype`` the prompt
    table's (PEFT keeps it in float32 by default, so bf16 models run the bf16/fp32 pair).
    """

    batch: int
    prompt: int
    seq: int
    dim: int
    word_dtype: torch.dtype = torch.float32
    prompt_dtype: torch.dtype = torch.float32
    vocab: int = 32000
    source: str = ""

    @property
    def dtype_label(self) -> str:
        """``fp32``, or ``bf16/fp32`` (word/prompt) when the two tables differ."""
        word, prompt = DTYPE_NAMES[self.word_dtype], DTYPE_NAMES[self.prompt_dtype]
        return word if word == prompt else f"{word}/{prompt}"

    @property
    def label(self) -> str:
        """A short, id-safe name: ``B8-T20-L512-D1024-fp32``."""
        return f"B{self.batch}-T{self.prompt}-L{self.seq}-D{self.dim}-{self.dtype_label.replace('/', '_')}"

    @property
    def title(self) -> str:
        """The label for tables: ``B=8 T=20 L=512 D=1024 fp32``."""
        return f"B={self.batch} T={self.prompt} L={self.seq} D={self.dim} {self.dtype_label}"


def bytes_moved(shape: Shape, *, backward: bool = False, index_bytes: int = 8) -> int:
    """Bytes one call must move at the least: each input read once, each output written once.

    Forward: the token ids, the B*L gathered word rows, the T prompt rows; the [B, T+L, D] output.
    Forward+backward adds the prompt part of the upstream gradient (B*T*D) read once and the [T, D]
    prompt gradient written once (the word table is frozen: no word gradient).
    """
    word_size = torch.empty(0, dtype=shape.word_dtype).element_size()
    prompt_size = torch.empty(0, dtype=shape.prompt_dtype).element_size()
    rows_out = shape.batch * (shape.prompt + shape.seq)
    total = shape.batch * shape.seq * index_bytes
    total += shape.batch * shape.seq * shape.dim * word_size + shape.prompt * shape.dim * prompt_size
    total += rows_out * shape.dim * word_size
    if backward:
        total += shape.batch * shape.prompt * shape.dim * word_size + shape.prompt * shape.dim * prompt_size
    return total


TARGET_SHAPE = Shape(8, 20, 512, 1024, source="GPT-2 medium / BERT-large, batch of 8")

# Where the shapes come from: GPT-2 small / BERT-base (D=768), GPT-2 medium / BERT-large (D=1024), Llama-2-7B
# (D=4096, bf16 model, fp32 prompt as PEFT keeps it), Llama-2-70B long context (D=8192).
SUITE_SHAPES = {
    "cpu": (
        Shape(1, 10, 128, 768, source="GPT-2 small, one short request"),
        TARGET_SHAPE,
        Shape(
            8, 20, 512, 1024, torch.bfloat16, torch.float32, source="GPT-2 medium / BERT-large, bf16 model"
        ),
        Shape(32, 100, 128, 768, source="BERT-base, classification batch"),
        Shape(4, 50, 1024, 4096, torch.bfloat16, torch.float32, source="Llama-2-7B"),
        Shape(
            1, 20, 4096, 8192, torch.bfloat16, torch.bfloat16, vocab=8192, source="Llama-2-70B, long context"
        ),
    ),
    "cuda": (
        Shape(1, 20, 128, 4096, torch.bfloat16, torch.float32, source="Llama-2-7B, one short request"),
        TARGET_SHAPE,
        Shape(8, 20, 512, 4096, torch.bfloat16, torch.float32, source="Llama-2-7B"),
        Shape(32, 20, 1024, 4096, source="Llama-2-7B, fp32, large batch (>= 256 MB)"),
        Shape(32, 100, 2048, 4096, torch.bfloat16, torch.float32, source="Llama-2-7B, long (>= 256 MB)"),
        Shape(16, 50, 4096, 8192, torch.bfloat16, torch.bfloat16, source="Llama-2-70B, long (>= 256 MB)"),
    ),
}

# The compact grid of ``python -m fastprompt bench``: (shape, with forward+backward too).
QUICK_SHAPES = {
    "cpu": (
        (Shape(1, 10, 128, 768, source="GPT-2 small, one short request"), False),
        (TARGET_SHAPE, True),
        (Shape(4, 50, 1024, 4096, torch.bfloat16, torch.float32, source="Llama-2-7B"), False),
    ),
    "cuda": (
        (
            Shape(1, 20, 128, 4096, torch.bfloat16, torch.float32, source="Llama-2-7B, one short request"),
            False,
        ),
        (TARGET_SHAPE, True),
        (Shape(32, 100, 2048, 4096, torch.bfloat16, torch.float32, source="Llama-2-7B, long"), True),
    ),
}


def device_kind(device: torch.device | str) -> str:
    """``cuda`` or ``cpu``: which shape set fits the device."""
    return "cuda" if torch.device(device).type == "cuda" else "cpu"


def bench_device() -> torch.device:
    """The device to measure: the current CUDA device when present, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
