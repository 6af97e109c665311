"""Serving soft prompts measured: fastprompt on vLLM, the same engine with no soft prompt, and
fastprompt's transformers path.

The workload (one "serving batch"): R = 32 requests over K = 4 prompt-tuning adapters (N = 100 virtual
tokens each), L = 12 input tokens per request, 16 new tokens, greedy, on an fp32 Llama built from a
config (32k vocabulary; D = 512 / 6 layers and D = 128 / 2 layers). Providers, the same weights and
tables:

- ``vllm soft prompt``: ``fastprompt.vllm.LLM.generate(..., adapter_names=[...])``: each request is
  ``prompt_embeds`` of N + L rows; the steady state of a server, the adapters' full KV blocks already in
  vLLM's prefix cache (a warm-up batch puts them there). Fresh token ids in every timed batch.
- ``vllm no prompt``: the same engine, the same requests as plain token prompts, no soft prompt: the
  floor (``vs floor`` in the notes: soft prompt time / this time; the goal is at most 1.3).
- ``transformers``: fastprompt's own path, one ``generate`` of the 32 rows with
  ``adapter_names=[...]`` and ``reuse_prompt_kv=True`` on a PEFT model accelerated by fastprompt (needs
  PEFT), its prompt KV stored by a warm-up call.

The two vLLM providers run interleaved on one engine (a busy machine slows both alike); the transformers
path runs after the engine is shut down (vLLM's idle worker threads would slow it), on the same ids.
``Result.speedup`` is the transformers time over the row's. The vLLM engine runs in float32 with
``enforce_eager`` and ``block_size=32`` on the CPU (100 rows: 3 full blocks cached per adapter).

Entry points: :func:`serving_results` (the CLI's rows and ``bench/bench_vllm.py``); needs vLLM.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings

import torch

from .report import Result

REQUESTS, ADAPTERS, NUM_VIRTUAL_TOKENS, INPUT_TOKENS, NEW_TOKENS = 32, 4, 100, 12, 16
SIZES = ((512, 6), (128, 2))  # (hidden size, layers): where vLLM pays off, and the crossover
VOCAB = 32000
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=512, gpu_memory_utilization=0.05)


def vllm_available() -> bool:
    """True where vLLM can be imported (the serving rows are measured)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def llama_config(hidden: int, layers: int):
    """The fp32 Llama of the workload: head size 64 (32 at D = 128), 4:1 grouped KV heads, no EOS (every
    provider generates exactly ``NEW_TOKENS``)."""
    from transformers import LlamaConfig

    heads = max(hidden // 64, 4)
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 4, 1),
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
    )


def save_base_model(directory: str, hidden: int, layers: int, *, seed: int = 0) -> tuple[str, float]:
    """Save the workload's base model (with a small local tokenizer) into ``directory``; (its directory,
    the std its weights were initialized with: the size adapters' rows are drawn at)."""
    from transformers import AutoModelForCausalLM

    from ..testing import tiny_models

    base = os.path.join(directory, f"llama-{hidden}x{layers}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(llama_config(hidden, layers))
    model.generation_config.eos_token_id = None
    model.save_pretrained(base)
    tiny_models.save_tokenizer(base)
    return base, model.config.initializer_range


def save_workload(directory: str, hidden: int, layers: int, *, seed: int = 0) -> tuple[str, dict[str, str]]:
    """Save the base model (with a small local tokenizer) and ``ADAPTERS`` PEFT adapters into
    ``directory``; (base model directory, {adapter name: directory})."""
    from ..testing.adapter_files import save_prompt_adapter

    base, std = save_base_model(directory, hidden, layers, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    adapters = {}
    for k in range(ADAPTERS):
        path = os.path.join(directory, f"task{k}")
        save_prompt_adapter(path, std * torch.randn(NUM_VIRTUAL_TOKENS, hidden, generator=generator))
        adapters[f"task{k}"] = path
    return base, adapters


def request_ids(seed: int) -> list[list[int]]:
    """``REQUESTS`` rows of ``INPUT_TOKENS`` random token ids (fresh per seed: no token blocks reused)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (REQUESTS, INPUT_TOKENS), generator=generator).tolist()


def median_and_spread(times: list[float]) -> tuple[float, float | None]:
    """(median, interquartile range / median; the full range below 4 values; None for one value)."""
    median = statistics.median(times)
    if len(times) < 2:
        return median, None
    if len(times) >= 4:
        q = statistics.quantiles(times, n=4)
        return median, (q[2] - q[0]) / median
    return median, (max(times) - min(times)) / median


def _transformers_model(base: str, adapters: dict, device):
    """The base model prompt-tuned with ``adapters`` by PEFT, accelerated by fastprompt (fp32, eval), on
    ``device``."""
    import peft
    from transformers import AutoModelForCausalLM

    from ..integrations import accelerate

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first, *rest = adapters.items()
        model = peft.PeftModel.from_pretrained(model, first[1], adapter_name=first[0])
        for name, path in rest:
            model.load_adapter(path, adapter_name=name)
    return accelerate(model).eval()


def _interleaved(calls: dict, repeats: int) -> tuple[dict, dict]:
    """({name: times}, {name: last output}): a warm-up call each, then ``repeats`` rounds calling each
    provider in turn on the same fresh ids, so a busy machine slows them alike."""
    for call in calls.values():
        call(10_000)  # warm-up: the adapters' blocks enter vLLM's cache, their KV transformers' store
    times = {name: [] for name in calls}
    outputs = {}
    for repetition in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            outputs[name] = call(repetition)
            times[name].append(time.perf_counter() - start)
    return times, outputs


def _measure(base: str, adapters: dict, repeats: int, engine: dict, with_transformers: bool, device) -> dict:
    """Each provider's batch times (vLLM with and without soft prompts interleaved on one engine; then,
    with the engine shut down, the transformers path on the same ids); the last outputs and the cached
    rows per request."""
    from vllm import SamplingParams

    from ..serving.offline import LLM

    names = [list(adapters)[i % len(adapters)] for i in range(REQUESTS)]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    llm = LLM(base, prompt_adapters=adapters, **engine)
    model = None

    def on_vllm(seed, with_prompt):
        prompts = [{"prompt_token_ids": ids} for ids in request_ids(seed)]
        return llm.generate(prompts, params, adapter_names=names if with_prompt else None, use_tqdm=False)

    def on_transformers(seed):
        ids = torch.tensor(request_ids(seed), device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                adapter_names=names,
                reuse_prompt_kv=True,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=0,
            )
        return out[:, -NEW_TOKENS:].tolist()  # .tolist() waits for the device

    calls = {
        "vllm soft prompt": lambda seed: on_vllm(seed, True),
        "vllm no prompt": lambda seed: on_vllm(seed, False),
    }
    try:
        times, outputs = _interleaved(calls, repeats)
    finally:
        llm.shutdown()
    if with_transformers:
        # after the engine is gone: its idle worker threads would slow the transformers path down
        model = _transformers_model(base, adapters, device)
        more_times, more_outputs = _interleaved({"transformers": on_transformers}, repeats)
        times.update(more_times)
        outputs.update(more_outputs)
    soft = outputs["vllm soft prompt"]
    return {
        "times": times,
        "cached": [o.num_cached_tokens for o in soft],
        "vllm_tokens": [list(o.outputs[0].token_ids) for o in soft],
        "transformers_tokens": outputs.get("transformers"),
    }


def serving_results(
    sizes=SIZES,
    *,
    repeats: int = 5,
    with_transformers: bool = True,
    engine: dict | None = None,
    device="cpu",
    progress=print,
    notes=None,
) -> list[Result]:
    """The serving rows for each (hidden size, layers) in ``sizes`` (see the module docstring).

    ``notes`` (a list) gets one line per size: soft prompt over floor, the cached rows per request, and how
    many requests' tokens the transformers path matched. ``engine``: vLLM arguments over ``ENGINE``;
    ``device``: where the transformers path runs (vLLM runs on its platform's device).
    """
    engine = {**ENGINE, **(engine or {})}
    # vLLM's CPU backend keeps one core to itself unless told otherwise; the benchmark gives it all of
    # them, as the transformers path has them (variables already set are left alone)
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")
    results = []
    workload = f"serve {REQUESTS} req/{ADAPTERS} adapters"
    for hidden, layers in sizes:
        shape = f"D={hidden} x{layers} N={NUM_VIRTUAL_TOKENS} L={INPUT_TOKENS}+{NEW_TOKENS}"
        with tempfile.TemporaryDirectory() as directory:
            progress(f"serving: saving a D={hidden} {layers}-layer Llama and {ADAPTERS} adapters")
            base, adapters = save_workload(directory, hidden, layers)
            progress(f"serving: {repeats} batches per provider, interleaved")
            measured = _measure(base, adapters, repeats, engine, with_transformers, device)
        summaries = {name: median_and_spread(times) for name, times in measured["times"].items()}
        reference = summaries.get("transformers", (None,))[0]
        for name, (median, spread) in summaries.items():
            speedup = None if reference is None else reference / median
            results.append(Result(workload, shape, name, median, spread=spread, speedup=speedup))
        soft, floor = summaries["vllm soft prompt"][0], summaries["vllm no prompt"][0]
        cached = measured["cached"]
        line = (
            f"serving {shape}: soft prompt / no prompt on vLLM = {soft / floor:.2f}x; cached rows per "
            f"request {min(cached)}-{max(cached)} of {NUM_VIRTUAL_TOKENS + INPUT_TOKENS}"
        )
        if reference is not None:
            pairs = zip(measured["vllm_tokens"], measured["transformers_tokens"], strict=True)
            same = sum(a == b for a, b in pairs)
            line += f"; vLLM is {reference / soft:.2f}x the transformers path"
            line += f"; same tokens in {same}/{REQUESTS} requests"
        progress(line)
        if notes is not None:
            notes.append(line)
    return results
