"""Prefix tuning's training step measured: PEFT against fastprompt.

The model: the 4-layer Llama of :mod:`.shared_prefix` (hidden 256, vocabulary 8000), random weights. The
workload: one training step (forward with labels, backward, AdamW step on the prefix encoder) at (N, L, B)
= ``SHAPES``, without and with ``prefix_projection`` (MLP hidden 256), on the same base weights and encoder.

Providers:

- ``peft``: PEFT's own model (the encoder runs for every row, ``get_prompt`` builds a ``DynamicCache``);
- ``fastprompt``: fastprompt's (the encoder runs once per batch, its keys/values go into the model's own
  cache, expanded over the rows).

Before timing, the first step's loss and encoder gradient of fastprompt are checked against PEFT's (fp32
rounding). Entry points: :func:`prefix_results` (the CLI's rows), :func:`train_steps`
(``bench/test_bench_prefix_tuning.py``); ``python -m fastprompt.benchmarks.prefix_tuning`` prints a table.
"""

from __future__ import annotations

import copy
import warnings

import torch

from .models import TrainStep
from .report import Result
from .shared_prefix import MODEL_LABEL, base_model, first_step_matches, results_table, timed_rows

SHAPES = ((30, 64, 8),)  # (N, L, B)
PROVIDERS = ("peft", "fastprompt")
PROJECTION_HIDDEN = 256


def prefix_config(num_virtual_tokens: int, projection: bool):
    import peft

    return peft.PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_virtual_tokens,
        prefix_projection=projection,
        encoder_hidden_size=PROJECTION_HIDDEN,
    )


def train_steps(base, shape: tuple[int, int, int], *, projection: bool = False, seed: int = 0) -> dict:
    """{provider: step} for one (N, L, B), both on the same batch and prefix encoder."""
    import peft

    import fastprompt

    n, length, batch = shape
    config = prefix_config(n, projection)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(copy.deepcopy(base), config)
        fast = fastprompt.get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
        fast.load_state_dict(reference.state_dict())
    models = {"peft": reference, "fastprompt": fast}
    return {name: TrainStep(model, batch, length, seed=seed) for name, model in models.items()}


def prefix_results(device, *, budget_s: float = 0.4, shapes=SHAPES, progress=print, seed=0) -> list[Result]:
    """One row per (shape, projection, provider): time of one training step, peak memory, speedup and
    memory ratio against ``peft``, and whether the first step matched PEFT's."""
    base = base_model(seed=seed).to(device)
    results = []
    for shape in shapes:
        for projection in (False, True):
            n, length, batch = shape
            workload = f"prefix tuning{' mlp' if projection else ''} train step N={n} L={length} B={batch}"
            steps = train_steps(base, shape, projection=projection, seed=seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                matches = first_step_matches(steps)
                progress(f"model {MODEL_LABEL}: {workload}")
                results += timed_rows(workload, steps, matches, device, budget_s=budget_s)
    return results


def main(argv=None) -> int:
    import argparse
    import sys

    from .measure import keep_freed_memory
    from .shapes import bench_device

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=1.0, help="timing seconds per provider and shape")
    parser.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in SHAPES), help="N,L,B;...")
    args = parser.parse_args(argv)
    device = bench_device()
    if device.type == "cpu":
        keep_freed_memory()
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    say = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    results = prefix_results(device, budget_s=args.budget, shapes=shapes, progress=say)
    print(results_table(results), flush=True)
    return 0 if all(r.matches_peft for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
