"""Generation with prompt-KV reuse measured: reuse on, reuse off, ``peft``, and the no-prompt floor.

One workload per (model, N): a batch of B = 8 rows of L = 16 tokens, greedy, 8 new tokens (total time)
and 1 new token (time to the first token: the prefill plus one token), on

- ``tiny-llama`` (the built-in 2-layer D = 256 Llama, 32k vocabulary) and
- ``mid-llama`` (built here from a config: 4 layers, D = 1024, 16 heads / 4 KV heads, 32k vocabulary).

Providers, the same base weights and prompt table:

- ``reuse``: fastprompt, ``generate(..., reuse_prompt_kv=True)``, its prompt KV already stored (the
  steady state of serving an adapter: computed once by the warm-up call);
- ``no reuse``: fastprompt, ``reuse_prompt_kv=False`` (the prompts in the prefill, as PEFT);
- ``peft``: PEFT's own ``generate`` (0.21.2 is wrong after the first token on transformers >= 5.24:
  ``matches`` says so; its time is still what a PEFT user waits);
- ``no prompt``: the base model (frozen, as PEFT leaves it) generating the same ids without any prompt:
  the floor.

``reuse`` is checked to give ``no reuse``'s tokens before timing. ``Result.speedup`` is the ``no reuse``
time over the row's; ``memory_ratio`` the row's peak over ``no reuse``'s.

Entry points: :func:`prompt_kv_results` (the CLI's rows), :func:`base_model`, :func:`workload_models`,
:func:`input_batch` and :func:`generate_calls` (``bench/test_bench_prompt_kv.py``);
``python -m fastprompt.benchmarks.prompt_kv`` prints a table.
"""

from __future__ import annotations

import collections
import copy
import warnings
from collections.abc import Callable

import torch

from .measure import peak_extra_bytes, timings_each
from .report import Result

BATCH, SEQ_LEN, NEW_TOKENS = 8, 16, 8
NUM_VIRTUAL_TOKENS = (20, 100)
PROVIDERS = ("reuse", "no reuse", "peft", "no prompt")

MID_LLAMA = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=4,
    max_position_embeddings=512,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)


def base_model(name: str, *, seed: int = 0):
    """``tiny-llama`` / ``tiny-gpt2`` (the built-in tiny models) or ``mid-llama``, random weights, eval."""
    if name != "mid-llama":
        from ..testing.tiny_models import load_base_model

        return load_base_model(name, seed=seed)
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(**MID_LLAMA)).eval()


def _prompt_tuned(base, num_virtual_tokens: int, seed: int):
    """(PEFT model, fastprompt model) on copies of ``base`` with the same prompt table."""
    import peft

    import fastprompt

    config = dict(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    torch.manual_seed(seed)
    reference = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(**config)).eval()
    fast = fastprompt.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(**config)).eval()
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def workload_models(base, num_virtual_tokens: int, *, seed: int = 0) -> dict:
    """{provider: model} for one N: fastprompt's model serves ``reuse`` and ``no reuse``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model, fast = _prompt_tuned(base, num_virtual_tokens, seed)
    return {"reuse": fast, "no reuse": fast, "peft": peft_model, "no prompt": base}


def input_batch(base, *, seed: int = 0) -> torch.Tensor:
    """[BATCH, SEQ_LEN] random token ids on ``base``'s device."""
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randint(2, base.config.vocab_size, (BATCH, SEQ_LEN), generator=gen).to(base.device)


def generate_calls(
    models: dict, input_ids: torch.Tensor, new_tokens: int
) -> dict[str, Callable[[], torch.Tensor]]:
    """{provider: call}: greedy generation of exactly ``new_tokens`` tokens after ``input_ids``."""
    mask = torch.ones_like(input_ids)
    common = dict(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=models["no prompt"].config.eos_token_id,
    )
    extra = {"reuse": dict(reuse_prompt_kv=True), "no reuse": dict(reuse_prompt_kv=False)}

    def run(name):
        def call():
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return models[name].generate(**common, **extra.get(name, {}))

        return call

    return {name: run(name) for name in PROVIDERS}


def prompt_kv_results(
    model_name: str,
    device,
    *,
    budget_s: float = 0.4,
    num_virtual_tokens=NUM_VIRTUAL_TOKENS,
    progress=print,
    seed: int = 0,
    providers=PROVIDERS,
) -> list[Result]:
    """Rows for every N in ``num_virtual_tokens`` and each of ``providers`` (``no reuse`` always runs):
    total generation time and time to the first token, peak memory, speedup and memory ratio against
    ``no reuse``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # frozen as PEFT freezes it: the floor runs the same kernels (a frozen lm_head over the sliced
        # last position goes through bmm instead of mm in torch 2.13, several times slower on CPU)
        base = base_model(model_name, seed=seed).to(device).requires_grad_(False)
    input_ids = input_batch(base, seed=seed)
    results = []
    for n in num_virtual_tokens:
        models = workload_models(base, n, seed=seed)
        for workload, new_tokens in (("generate", NEW_TOKENS), ("first token", 1)):
            label = f"{workload} {new_tokens} tok B={BATCH} L={SEQ_LEN} T={n}"
            progress(f"model {model_name}: {label}")
            calls = generate_calls(models, input_ids, new_tokens)
            calls = {name: call for name, call in calls.items() if name in providers or name == "no reuse"}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                outs = {name: calls[name]() for name in calls}  # warm-up: the prompt KV is stored
                same = bool(torch.equal(outs.get("reuse", outs["no reuse"]), outs["no reuse"]))
                if not same:
                    progress(f"MISMATCH model {model_name}: {label}: reuse differs from no reuse")
                peaks = {name: peak_extra_bytes(call, device) for name, call in calls.items()}
                timings = timings_each(calls, device, budget_s=budget_s)
            off = timings["no reuse"].median
            for name in calls:
                matches = {
                    n: bool(torch.equal(outs[n], outs["no reuse"])) for n in ("reuse", "peft") if n in outs
                }
                results.append(
                    Result(
                        label,
                        model_name,
                        name,
                        timings[name].median,
                        None,
                        peaks[name],
                        speedup=off / timings[name].median,
                        memory_ratio=peaks[name] / peaks["no reuse"]
                        if peaks[name] and peaks["no reuse"]
                        else None,
                        matches_peft=matches.get(name, True),
                        spread=timings[name].spread,
                    )
                )
    return results


def _table(results: list[Result]) -> str:
    lines = [
        "| model | workload | provider | median ms | IQR/med | vs no reuse | vs no prompt | peak MB | same |"
    ]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    floor = {(r.shape, r.workload): r.seconds for r in results if r.provider == "no prompt"}
    floor = collections.defaultdict(lambda: float("nan"), floor)
    for r in results:
        peak = "" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.1f}"
        lines.append(
            f"| {r.shape} | {r.workload} | {r.provider} | {r.seconds * 1e3:.1f} | {r.spread:.0%} | "
            f"{r.speedup:.2f}x | {r.seconds / floor[(r.shape, r.workload)]:.2f} | {peak} | "
            f"{'yes' if r.matches_peft else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import sys

    from .measure import keep_freed_memory
    from .shapes import bench_device

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-llama,mid-llama")
    parser.add_argument("--budget", type=float, default=0.4)
    parser.add_argument("--tokens", default=",".join(map(str, NUM_VIRTUAL_TOKENS)))
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="(no reuse always runs)")
    args = parser.parse_args(argv)
    device = bench_device()
    if device.type == "cpu":
        keep_freed_memory()
    for name in args.models.split(","):
        results = prompt_kv_results(
            name,
            device,
            budget_s=args.budget,
            num_virtual_tokens=[int(t) for t in args.tokens.split(",")],
            progress=lambda msg: print(msg, file=sys.stderr),
            providers=args.providers.split(","),
        )
        print(_table(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
