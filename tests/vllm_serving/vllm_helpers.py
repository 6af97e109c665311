"""Constants and helpers of the vLLM serving tests (fixtures are in this folder's conftest.py)."""

from __future__ import annotations

import torch

HIDDEN = 64  # head_dim 32: the CPU attention backend takes no smaller head
BLOCK = 32
# Every engine of the tests: fp32 explicitly (vLLM's "auto" runs fp32 checkpoints in bf16 on the CPU), a
# small KV-cache reservation (its CPU share is a fraction of the machine's memory), no CUDA graphs.
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=512, gpu_memory_utilization=0.05)
ADAPTER_ROWS = {"alpha": 40, "beta": 36, "gamma": 40}
TENANTS = 60  # adapters in the served directory: t00 ... t59
API_KEY = "fastprompt-test-key"  # the shared server runs with vLLM's --api-key
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def tenant_rows(index: int) -> int:
    """Adapter t{index}'s number of virtual tokens: 8 to 40, some longer than a 32-row block."""
    return 8 + 8 * (index % 5)


def table(rows: int, seed: int) -> torch.Tensor:
    """A prompt table [rows, HIDDEN] fp32, values of the size of the word embeddings' (std 0.2)."""
    return 0.2 * torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(seed))


def task_factors(tasks: int, rows: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A multitask adapter's ``prefix_task_cols`` [tasks, rows, rank] and ``prefix_task_rows`` [tasks, rank,
    HIDDEN], fp32, whose products are of size 1 (each task's rows then of the size of the shared table's)."""
    generator = torch.Generator().manual_seed(seed)
    cols = torch.randn(tasks, rows, rank, generator=generator)
    task_rows = torch.randn(tasks, rank, HIDDEN, generator=generator) / rank**0.5
    return cols, task_rows
