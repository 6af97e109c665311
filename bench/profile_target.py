"""Where the forward time goes at B=8, T=20, L=512, D=1024, fp32 on the CPU.

    python bench/profile_target.py [--allocator keep|default] [--shape B,T,L,D]

1. PEFT's forward in its parts (word gather, prompt embedding + repeat, cat), the floor of a one-pass
   op (a single ``index_select`` of all B*(T+L) rows into a fresh output), ``compile`` and
   ``fastprompt``, timed side by side (the calls take turns, so a loaded machine slows all alike).
2. ``torch.profiler`` of ``fastprompt.prompt_concat``: which ATen ops it runs per call, and their time.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import fastprompt
from fastprompt.benchmarks import Shape, keep_freed_memory, make_inputs, median_seconds_each, op_call


def parts(shape: Shape) -> dict:
    """The calls to time, by name."""
    inputs = make_inputs(shape, "cpu")
    ids, word, prompt, tokens = inputs.args
    batch, num_prompt = shape.batch, shape.prompt
    embeds = F.embedding(ids, word)
    prompts = prompt.unsqueeze(0).repeat(batch, 1, 1)
    rows = ids.new_zeros(batch, num_prompt + shape.seq)
    rows[:, num_prompt:] = ids
    return {
        "peft": op_call("peft", inputs),
        "  peft: word gather [B, L, D]": lambda: F.embedding(ids, word),
        "  peft: prompt embedding + repeat": lambda: F.embedding(tokens[None], prompt).repeat(batch, 1, 1),
        "  peft: cat (copies B*(T+L) rows)": lambda: torch.cat((prompts, embeds), 1),
        "one-pass floor: 1 index_select of B*(T+L) rows": lambda: torch.index_select(word, 0, rows.view(-1)),
        "compile": op_call("compile", inputs),
        "fastprompt": op_call("fastprompt", inputs),
    }


def main() -> None:
    """Print the side-by-side times, then the profiler's table for fastprompt."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allocator", choices=("keep", "default"), default="keep")
    parser.add_argument("--shape", default="8,20,512,1024", help="B,T,L,D (fp32)")
    parser.add_argument("--budget", type=float, default=2.0)
    args = parser.parse_args()
    if args.allocator == "keep":
        keep_freed_memory()
    shape = Shape(*(int(x) for x in args.shape.split(",")))
    print(f"{shape.title}, {torch.get_num_threads()} threads, allocator {args.allocator}\n")
    medians = median_seconds_each(parts(shape), "cpu", budget_s=args.budget)
    for name, seconds in medians.items():
        print(f"{name:50s} {seconds * 1e6:9.1f} us   peft / this = {medians['peft'] / seconds:5.2f}x")

    inputs = make_inputs(shape, "cpu")
    ids, word, prompt, _ = inputs.args
    for _ in range(3):
        fastprompt.prompt_concat(ids, word, prompt)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            fastprompt.prompt_concat(ids, word, prompt)
    print("\ntorch.profiler, 20 calls of fastprompt.prompt_concat:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
