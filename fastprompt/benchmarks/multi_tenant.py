"""Many tenants' soft prompts through one server, measured: ``python -m fastprompt serve BASE --adapter-dir
DIR`` over HTTP on 127.0.0.1.

The workload: the serving benchmark's model (``fastprompt.benchmarks.serving``: an fp32 Llama, 32k
vocabulary, N = 100 virtual tokens per adapter, 12 input tokens of fresh random ids, 16 new tokens,
greedy), 180 requests sent by 16 concurrent clients (each sends its next request when its last one is
answered, non-streaming):

- ``60 adapters``: 60 adapters of the directory, each used 3 times, in a shuffled order;
- ``1 adapter``: the same 180 requests (same ids, same order), all on one adapter of the directory.

Two states, each compared on the same requests:

- ``cold``: adapters no request has used before (new names, new rows): neither loaded nor in vLLM's
  prefix cache, as a tenant's first traffic is. The 60 adapters pay 60 loads and 60 first prefills of
  their 100 rows (more where a second use arrives before the first's blocks are cached); one adapter pays
  one.
- ``warm``: the same adapters again, with new token ids: loaded, their rows' KV blocks in the prefix
  cache (the steady state of a server whose tenants come back, and what ``fastprompt.benchmarks.serving``
  measures).

Rounds alternate (60 cold, 1 cold, 60 warm, 1 warm, then the next repeat with new adapters), so load from
elsewhere slows all alike; an untimed warm-up round comes first. ``speedup`` of a ``60 adapters`` row: its
throughput over the ``1 adapter`` row's of the same state (the goal: >= 0.8).

First-request latency: one request (1 new token) of an adapter not loaded yet (its files read and
checked, its 100 rows' prefill computed) against the same request again (loaded, its rows cached); and
the load itself, as the server's log line reports it.

Entry point: :func:`multi_tenant_results` (``bench/bench_vllm.py`` and the CLI's serving rows); needs vLLM
and httpx in the environment.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import statistics
import tempfile
import time

import torch

from .report import Result
from .serving import (
    ENGINE,
    INPUT_TOKENS,
    NEW_TOKENS,
    NUM_VIRTUAL_TOKENS,
    VOCAB,
    median_and_spread,
    save_base_model,
)

TENANTS, USES, CLIENTS = 60, 3, 16
PROVIDERS = ("60 adapters", "1 adapter")
LATENCY_SAMPLES = 5


def _save_adapters(directory: str, names: list[str], hidden: int, std: float, seed: int) -> None:
    from ..testing.adapter_files import save_prompt_adapter

    generator = torch.Generator().manual_seed(seed)
    for name in names:
        rows = std * torch.randn(NUM_VIRTUAL_TOKENS, hidden, generator=generator)
        save_prompt_adapter(os.path.join(directory, name), rows)


async def _round(url: str, jobs: list[tuple[str, list[int]]], new_tokens: int = NEW_TOKENS) -> float:
    """Seconds for ``CLIENTS`` clients to get every (model, ids) job of ``jobs`` answered."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def client(http):
        while not queue.empty():
            model, ids = queue.get_nowait()
            body = {"model": model, "prompt": ids, "max_tokens": new_tokens, "temperature": 0.0}
            reply = await http.post("/v1/completions", json={**body, "ignore_eos": True})
            if reply.status_code != 200:
                raise RuntimeError(f"{model}: {reply.status_code} {reply.text[:300]}")

    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(CLIENTS)))
        return time.perf_counter() - start


def _ids(seed: int, count: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (count, INPUT_TOKENS), generator=generator).tolist()


def _load_ms(log_path, name: str) -> float | None:
    with open(log_path) as file:
        match = re.search(rf"Loaded prompt adapter '{re.escape(name)}': \d+ rows in ([\d.]+) ms", file.read())
    return float(match.group(1)) if match else None


def multi_tenant_results(size=(512, 6), *, repeats: int = 3, progress=print, notes=None) -> list[Result]:
    """The multi-tenant rows at (hidden size, layers) ``size``: ``repeats`` rounds each of 60 adapters and of
    1 adapter, cold and warm (medians), and the first-request latency rows (see the module docstring).
    ``notes`` (a list) gets one line with the throughputs and their ratios."""
    from ..testing.server_process import served, vllm_arguments

    hidden, layers = size
    shape = f"D={hidden} x{layers} N={NUM_VIRTUAL_TOKENS} L={INPUT_TOKENS}+{NEW_TOKENS}"
    requests = TENANTS * USES
    # vLLM's CPU worker binds one OpenMP thread per core it is given, and a parallel region waits for its
    # slowest thread: sharing every core with the API server, the engine loop and 16 clients stalls it at
    # every step. The worker gets all cores but the last; the rest of the server and the clients share it.
    cores = os.cpu_count() or 1
    env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{cores - 2}" if cores > 1 else "0"
    with tempfile.TemporaryDirectory() as directory:
        many = [[f"r{r}-t{k:02d}" for k in range(TENANTS)] for r in range(repeats)]
        single = [f"r{r}-single" for r in range(repeats)]
        warmup = [f"warmup{k:02d}" for k in range(CLIENTS)]
        cold = [f"cold{k}" for k in range(LATENCY_SAMPLES)]
        names = [n for group in many for n in group] + single + warmup + cold
        progress(f"multi-tenant: saving a D={hidden} {layers}-layer Llama and {len(names)} adapters")
        base, std = save_base_model(directory, hidden, layers)
        adapters = os.path.join(directory, "adapters")
        _save_adapters(adapters, names, hidden, std, seed=1)
        log_path = os.path.join(directory, "server.log")
        args = [f"--adapter-dir={adapters}", "--disable-uvicorn-access-log", *vllm_arguments(ENGINE)]
        times = {(state, provider): [] for state in ("cold", "warm") for provider in PROVIDERS}
        latency = {"not loaded": [], "loaded": []}
        loads = []
        progress(f"multi-tenant: starting the server, then {repeats} x 4 rounds of {requests} requests")
        with served(base, args, log_path, env=env) as url:
            asyncio.run(_round(url, list(zip(warmup * 2, _ids(0, 2 * CLIENTS), strict=True))))
            for r in range(repeats):
                for state, seed in (("cold", 1 + r), ("warm", 1001 + r)):
                    ids = _ids(seed, requests)
                    order = [name for name in many[r] for _ in range(USES)]
                    random.Random(seed).shuffle(order)
                    jobs = {
                        PROVIDERS[0]: list(zip(order, ids, strict=True)),
                        PROVIDERS[1]: [(single[r], i) for i in ids],
                    }
                    for provider, provider_jobs in jobs.items():
                        times[state, provider].append(asyncio.run(_round(url, provider_jobs)))
                    progress(
                        f"multi-tenant {state} round {r + 1}: "
                        + ", ".join(f"{p} {times[state, p][-1]:.2f} s" for p in PROVIDERS)
                    )
            for k, name in enumerate(cold):
                ids = _ids(100 + k, 1)[0]
                latency["not loaded"].append(asyncio.run(_round(url, [(name, ids)], 1)))
                latency["loaded"].append(asyncio.run(_round(url, [(name, ids)], 1)))
                loads.append(_load_ms(log_path, name))
    results, ratios = [], {}
    for state in ("cold", "warm"):
        one = statistics.median(times[state, PROVIDERS[1]])
        ratios[state] = one / statistics.median(times[state, PROVIDERS[0]])
        for provider in PROVIDERS:
            median, spread = median_and_spread(times[state, provider])
            workload = f"serve {requests} req, {CLIENTS} clients, {state}"
            results.append(Result(workload, shape, provider, median, spread=spread, speedup=one / median))
    for provider, values in latency.items():
        median, spread = median_and_spread(values)
        results.append(Result("first request (1 token)", shape, provider, median, spread=spread))
    found = [ms for ms in loads if ms is not None]
    rates = {key: requests / statistics.median(values) for key, values in times.items()}
    line = (
        f"multi-tenant {shape}: {requests} requests by {CLIENTS} clients, {TENANTS} adapters each used {USES}"
    )
    line += " times (shuffled) vs 1 adapter: " + "; ".join(
        f"{state} {rates[state, PROVIDERS[0]]:.1f} vs {rates[state, PROVIDERS[1]]:.1f} req/s = "
        f"{ratios[state]:.2f}x"
        for state in ("cold", "warm")
    )
    line += (
        f" (goal >= 0.8); first request of an adapter not loaded "
        f"{1e3 * statistics.median(latency['not loaded']):.0f} ms vs "
        f"{1e3 * statistics.median(latency['loaded']):.0f} ms loaded"
        + (f", its load {statistics.median(found):.1f} ms (server log)" if found else "")
    )
    progress(line)
    if notes is not None:
        notes.append(line)
    return results
