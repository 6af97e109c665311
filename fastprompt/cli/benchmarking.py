"""What ``pytest bench``, ``python -m fastprompt bench`` and ``bench/gpu_check.py`` measure, defined once.

- ``Shape``: one op-level problem (B, T, L, D, V and the two table dtypes), with a label for tables.
- ``make_inputs``: random inputs for a shape (token ids, word table, prompt table, prompt tokens).
- The providers, all with the signature ``(input_ids, word_weight, prompt_weight, prompt_tokens)``:
  ``peft`` (PEFT's eager code path, op by op), ``compile`` (``torch.compile`` of that same function)
  and ``fastprompt`` (``fastprompt.prompt_concat``).
- ``bytes_moved``: the bytes the op must move (each input read once, the output written once), the
  numerator of every GB/s figure.
- ``peak_extra_bytes``: the peak of memory allocated during one call above what was allocated before
  it (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the allocator's own alloc/free events recorded by
  ``torch.profiler(profile_memory=True)``, summed in time order).
- ``median_seconds``: the median time of one call (``triton.testing.do_bench`` on CUDA, a timed loop
  on CPU); ``timings_each``: several calls timed side by side, each with its median and interquartile
  range (the spread that says whether a run's ratios can be trusted); ``copy_bandwidth``: a
  device-to-device copy's GB/s, the ceiling for a gather.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fastprompt

PROVIDERS = ("peft", "compile", "fastprompt")

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


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


@dataclass
class OpInputs:
    """Inputs of one call; ``grad_out`` is set for forward+backward runs."""

    input_ids: torch.Tensor
    word_weight: torch.Tensor
    prompt_weight: torch.Tensor
    prompt_tokens: torch.Tensor
    grad_out: torch.Tensor | None = None

    @property
    def args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The positional arguments every provider takes."""
        return self.input_ids, self.word_weight, self.prompt_weight, self.prompt_tokens


def make_inputs(
    shape: Shape,
    device: torch.device | str,
    *,
    backward: bool = False,
    seed: int = 0,
    word_weight: torch.Tensor | None = None,
) -> OpInputs:
    """Random inputs for ``shape`` on ``device``, as prompt tuning has them.

    The word table is frozen (``word_weight``, e.g. a real model's, or a random one); with ``backward``
    the prompt table requires grad and a random upstream gradient ``grad_out`` [B, T+L, D] is drawn
    (never all-ones: a real loss gives varied gradients).
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: fast for big tables

    def randn(*size: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(size, generator=gen, device=device).to(dtype)

    if word_weight is None:
        word = randn(shape.vocab, shape.dim, dtype=shape.word_dtype)
    else:
        word = word_weight.detach().to(device)
    prompt = randn(shape.prompt, shape.dim, dtype=shape.prompt_dtype)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen, device=device)
    grad_out = None
    if backward:
        prompt.requires_grad_(True)
        grad_out = randn(shape.batch, shape.prompt + shape.seq, shape.dim, dtype=shape.word_dtype)
    return OpInputs(ids, word, prompt, torch.arange(shape.prompt, device=device), grad_out)


# ------------------------------------------------------------------------------------------ providers


def peft_concat(
    input_ids: torch.Tensor,
    word_weight: torch.Tensor,
    prompt_weight: torch.Tensor,
    prompt_tokens: torch.Tensor,
) -> torch.Tensor:
    """PEFT's eager code path for prompt tuning (peft 0.21 ``PeftModelForCausalLM.forward``), op by op.

    ``word_embeddings(input_ids)``; ``get_prompt``: prompt tokens expanded to the batch, the first row
    taken, ``prompt_encoder(...)`` (an ``nn.Embedding``), ``.repeat(batch, 1, 1)``; then
    ``prompts.to(inputs_embeds.dtype)`` and ``torch.cat((prompts, inputs_embeds), dim=1)``.
    """
    batch = input_ids.shape[0]
    inputs_embeds = F.embedding(input_ids, word_weight)
    tokens = prompt_tokens.unsqueeze(0).expand(batch, -1)[:1]
    prompts = F.embedding(tokens, prompt_weight)
    prompts = prompts.repeat(batch, 1, 1)
    prompts = prompts.to(inputs_embeds.dtype)
    return torch.cat((prompts, inputs_embeds), dim=1)


def fastprompt_concat(
    input_ids: torch.Tensor,
    word_weight: torch.Tensor,
    prompt_weight: torch.Tensor,
    prompt_tokens: torch.Tensor,
) -> torch.Tensor:
    """The fused op; ``prompt_tokens`` is all prompt rows in order, which is ``prompt_indices=None``."""
    del prompt_tokens
    return fastprompt.prompt_concat(input_ids, word_weight, prompt_weight)


_COMPILED: dict[str, Callable] = {}


def compiled_peft_concat() -> Callable:
    """``torch.compile(peft_concat, fullgraph=True, dynamic=False)``, one specialised graph per shape.

    The recompile limit is raised so that a grid of shapes never falls back to eager silently.
    """
    if "peft" not in _COMPILED:
        dynamo_config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))
        _COMPILED["peft"] = torch.compile(peft_concat, fullgraph=True, dynamic=False)
    return _COMPILED["peft"]


def provider_fn(name: str) -> Callable:
    """The function behind a provider name (``peft``, ``compile`` or ``fastprompt``)."""
    if name == "peft":
        return peft_concat
    if name == "compile":
        return compiled_peft_concat()
    if name == "fastprompt":
        return fastprompt_concat
    raise ValueError(f"unknown provider {name!r}: expected one of {', '.join(PROVIDERS)}")


def op_call(name: str, inputs: OpInputs, *, backward: bool = False) -> Callable[[], object]:
    """A no-argument call of provider ``name``: the forward, or forward+backward into the prompt grad."""
    fn = provider_fn(name)
    if not backward:

        def forward():
            with torch.no_grad():
                return fn(*inputs.args)

        return forward
    if inputs.grad_out is None:
        raise ValueError("make_inputs(..., backward=True) gives the upstream gradient a backward run needs")

    def forward_backward():
        inputs.prompt_weight.grad = None
        out = fn(*inputs.args)
        out.backward(inputs.grad_out)
        return inputs.prompt_weight.grad

    return forward_backward


def assert_matches_peft(name: str, inputs: OpInputs, *, backward: bool = False) -> None:
    """Raise AssertionError unless provider ``name`` gives ``peft``'s result on ``inputs``.

    Forward: bit for bit (a gather and a cast round the same way). Forward+backward: the prompt
    gradient within ``torch.testing.assert_close``'s tolerance for its dtype (a sum over the batch,
    which may add in another order).
    """
    expected = op_call("peft", inputs, backward=backward)()
    expected = expected.detach().clone()
    actual = op_call(name, inputs, backward=backward)()
    tolerance = {} if backward else {"atol": 0.0, "rtol": 0.0}
    torch.testing.assert_close(actual, expected, **tolerance, msg=lambda m: f"{name} vs peft: {m}")


# ---------------------------------------------------------------------------------------- bytes moved


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


# ----------------------------------------------------------------------------------------- peak memory


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence C-level stderr (the profiler's kineto start/stop lines) while the block runs."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak of bytes allocated on the CPU during ``fn()`` above the level before it.

    ``torch.profiler`` with ``profile_memory=True`` records every allocation and free of PyTorch's CPU
    allocator (sizes, +/-); summing them in time order gives the live bytes at each moment. What
    ``fn`` returns is dropped inside the profiled region, so a result counts while it is alive.
    """
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        extra = getattr(node, "extra_fields", None)
        if type(extra).__name__.startswith("_ExtraFields_Allocation") and str(extra.device).startswith("cpu"):
            events.append((node.start_time_ns, extra.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        live += size
        peak = max(peak, live)
    return peak


def peak_extra_bytes(
    fn: Callable[[], object], device: torch.device | str, *, warmup: bool = True
) -> int | None:
    """Peak memory one call of ``fn`` allocates above what was allocated before it, or None if unknown.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: the allocator's
    events (see ``_cpu_peak_extra_bytes``). With ``warmup`` (the default) ``fn`` is called once first,
    unmeasured, so one-time set-up (compilation, autotuning, an optimizer's state on its first step,
    lazily built buffers) is not counted: the figure is a steady-state call's.
    """
    device = torch.device(device)
    if warmup:
        result = fn()
        del result
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        del result
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type == "cpu":
        try:
            return _cpu_peak_extra_bytes(fn)
        except Exception:  # the profiler API is private: a torch without it gives "unknown", not a crash
            return None
    return None


# --------------------------------------------------------------------------------------------- timing


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process instead of returning it to the OS (CPU timing).

    PyTorch's CPU allocator takes every buffer from ``malloc``; glibc serves buffers of megabytes by
    ``mmap`` and gives them back on free, so each call of an op would fault in its output's pages
    again. On a virtual machine those faults dominate the time and vary tenfold from call to call.
    Raising ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to 1 GiB keeps the pages, as PyTorch's CUDA
    caching allocator does on GPU. It is the conservative choice for fastprompt: PEFT's extra
    [B, L, D] buffer then costs its bandwidth but no page faults. Returns False where it cannot apply
    (no glibc).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device | str, *, budget_s: float = 0.5) -> float:
    """The median time of one call of ``fn``, spending about ``budget_s`` seconds measuring.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls), median. Elsewhere: a
    warm-up call, then calls timed one by one until the budget is spent (at least 7).
    """
    return timings_each({"fn": fn}, device, budget_s=budget_s)["fn"].median


@dataclass(frozen=True)
class Timing:
    """The times of one call: median and interquartile range (seconds), and how many calls were timed."""

    median: float
    q1: float
    q3: float
    samples: int

    @property
    def spread(self) -> float:
        """Interquartile range over the median: 0.05 is a steady measurement, 0.25 or more a noisy one."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else 0.0


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def _do_bench_timing(fn: Callable[[], object], budget_s: float) -> Timing:
    """``triton.testing.do_bench`` (CUDA events, L2 cleared before each call): its quartiles."""
    from triton.testing import do_bench

    warmup, rep = max(1, int(budget_s * 250)), max(1, int(budget_s * 750))
    q1, median, q3 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.25, 0.5, 0.75])
    return Timing(median / 1e3, q1 / 1e3, q3 / 1e3, 0)


def timings_each(
    calls: dict[str, Callable[[], object]], device: torch.device | str, *, budget_s: float = 0.5
) -> dict[str, Timing]:
    """Several calls timed side by side, about ``budget_s`` seconds each: median and quartiles of each.

    On CPU the calls take turns, one call of each per round, the order rotated from round to round
    (none always runs right after the same one): load from elsewhere then slows them all alike, and
    their ratios hold even where the absolute times drift. The spread (``Timing.spread``) says when
    they do not: a busy machine descheduling the process mid-call shows as a wide interquartile range.
    On CUDA each is timed by ``do_bench`` in turn.
    """
    if torch.device(device).type == "cuda":
        return {name: _do_bench_timing(fn, budget_s) for name, fn in calls.items()}
    names = list(calls)
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    deadline = time.perf_counter() + budget_s * len(calls)
    rounds = 0
    while rounds < 7 or (time.perf_counter() < deadline and rounds < 10_000):
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            fn = calls[name]
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        rounds += 1
    out = {}
    for name, values in times.items():
        q1, median, q3 = _quartiles(values)
        out[name] = Timing(median, q1, q3, len(values))
    return out


def median_seconds_each(
    calls: dict[str, Callable[[], object]], device: torch.device | str, *, budget_s: float = 0.5
) -> dict[str, float]:
    """The medians of ``timings_each``: several calls, about ``budget_s`` each, measured side by side."""
    return {name: t.median for name, t in timings_each(calls, device, budget_s=budget_s).items()}


def copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30, *, budget_s: float = 0.5) -> float:
    """GB/s of a device-to-device copy of ``nbytes`` (read once, written once: 2 * nbytes moved)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, budget_s=budget_s)
    return 2 * nbytes / seconds / 1e9


def gbps(nbytes: int, seconds: float) -> float:
    """Throughput in GB/s (1e9 bytes per second)."""
    return nbytes / seconds / 1e9


# ------------------------------------------------------------------------------------------- shape sets

TARGET_SHAPE = Shape(8, 20, 512, 1024, source="issue 4 CPU target")

# Where the shapes come from: GPT-2 small / BERT-base (D=768), the CPU target (D=1024), Llama-2-7B
# (D=4096, bf16 model, fp32 prompt as PEFT keeps it), Llama-2-70B long context (D=8192).
SUITE_SHAPES = {
    "cpu": (
        Shape(1, 10, 128, 768, source="GPT-2 small, one short request"),
        TARGET_SHAPE,
        Shape(8, 20, 512, 1024, torch.bfloat16, torch.float32, source="the target in bf16"),
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
