"""Compile every Triton kernel variant the launchers choose for the benchmark shapes, without a GPU.

    python bench/kernel_report.py --arch sm_80,sm_90 [--json PATH] [--quick] [--jobs N]

Triton's compiler and the ``ptxas`` bundled in its wheel run on a CPU-only machine, so this is GPU
truth available on every commit: does each kernel compile for the target, how many registers does it
use, does it spill, how much shared memory, and how wide are its global loads and stores (128 bits
means a row moves as ``ld.global.v4.b32``; 16 or 32 means scalar accesses).

Nothing here restates a launcher's choices: for each benchmark shape (``SUITE_SHAPES["cuda"]``), each
dtype pair, prompt-index mode and scale mode, the report asks the launchers' own planning functions
(``forward_launch``, ``batch_rows_launch``, ``segment_launches``) for the ``Launch`` they would make,
on meta tensors (no memory), and compiles it with the specialization Triton's own binder applies at
launch (integers divisible by 16 and 16-byte-aligned pointers get ``tt.divisibility`` 16, integers
equal to 1 become constants). A change of block sizes in a launcher changes what is compiled here.
Launches that specialize alike are one variant (listed once, with the shapes that use it).

Columns: ``regs`` registers per thread and ``spills`` bytes of spill stores (from ``ptxas -v``);
``smem`` shared memory in bytes; ``ld``/``st`` the widest global load/store in the PTX, in bits.
Exit status 1 if any variant fails to compile or spills, 2 if the kernels are interpreted here.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

os.environ["TRITON_INTERPRET"] = "0"  # the GPU kernels, not the interpreter's
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
# A fresh cache: a cached kernel skips ptxas, whose log is where registers and spills come from.
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="kernel_report_")

import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
PROMPT_MODES = ("all", "shared", "per_batch")
SCALE_MODES = ("none", "float", "tensor")


@dataclass
class Record:
    """One compiled variant on one architecture (the ``--json`` records)."""

    kernel: str
    variant: str
    spec: str
    arch: str
    compiled: bool
    error: str | None
    registers: int | None
    spills: int | None
    shared: int | None
    ld_bits: int | None
    st_bits: int | None
    shapes: list[str]
    seconds: float


def _meta(*size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(size, dtype=dtype, device="meta")


def bench_shapes(quick: bool) -> list:
    """The GPU benchmark shapes (``--quick``: the CPU target shape only)."""
    from fastprompt.cli.benchmarking import SUITE_SHAPES, TARGET_SHAPE

    return [TARGET_SHAPE] if quick else list(dict.fromkeys(SUITE_SHAPES["cuda"]))


def _scale(mode: str, dtype: torch.dtype):
    return {"none": None, "float": 2.0, "tensor": _meta(dtype=dtype)}[mode]


def forward_launches(shape, word: str, prompt: str, mode: str, scale: str):
    """The forward launch ``prompt_concat_forward`` makes for ``shape`` with these choices."""
    from fastprompt.kernels.prompt_concat_fwd import forward_launch

    batch, num_prompt, seq, dim = shape.batch, shape.prompt, shape.seq, shape.dim
    ids = _meta(batch, seq, dtype=torch.int64)
    word_weight = _meta(shape.vocab, dim, dtype=DTYPES[word])
    prompt_weight = _meta(num_prompt if mode == "all" else 2 * num_prompt, dim, dtype=DTYPES[prompt])
    indices = {
        "all": None,
        "shared": _meta(num_prompt, dtype=torch.int64),
        "per_batch": _meta(batch, num_prompt, dtype=torch.int64),
    }[mode]
    out = _meta(batch, num_prompt + seq, dim, dtype=DTYPES[word])
    launch = forward_launch(
        ids, word_weight, prompt_weight, indices, _scale(scale, DTYPES[word]), out, interpret=False
    )
    return [(f"word={word} prompt={prompt} indices={mode} scale={scale}", launch)]


def backward_launches(shape, word: str, prompt: str, mode: str, scale: str):
    """The launches of the prompt gradient (index ``mode``) and of the word gradient (``scale``)."""
    from fastprompt.kernels.prompt_concat_bwd import batch_rows_launch, segment_launches

    batch, num_prompt, seq, dim = shape.batch, shape.prompt, shape.seq, shape.dim
    grad = _meta(batch, num_prompt + seq, dim, dtype=DTYPES[word])
    launches = []

    def segmented(label, cols, col_start, num_rows, out_dtype, scale_value, zero_row):
        entries = batch * cols
        index = [_meta(entries, dtype=torch.int64) for _ in range(2)]
        seg = _meta(num_rows + 1, dtype=torch.int64)
        out = _meta(num_rows, dim, dtype=out_dtype)
        pair = segment_launches(
            grad, col_start, cols, *index, seg, out, scale_value, zero_row, interpret=False
        )
        launches.extend((label, launch) for launch in pair)

    if scale == "none":  # the prompt gradient takes no scale: once per index mode
        label = f"grad={word} out={prompt} indices={mode}"
        if mode == "all":
            out = _meta(num_prompt, dim, dtype=DTYPES[prompt])
            launches.append((label, batch_rows_launch(grad, out, interpret=False)))
        else:
            segmented(label, num_prompt, 0, 2 * num_prompt, DTYPES[prompt], None, None)
    if mode == "all" and prompt == word:  # the word gradient: once per word dtype and scale mode
        label = f"grad={word} out={word} word-grad scale={scale}"
        segmented(label, seq, num_prompt, shape.vocab, DTYPES[word], _scale(scale, DTYPES[word]), 0)
    return launches


MAKERS = {"forward": forward_launches, "backward": backward_launches}


def plans(quick: bool):
    """(kernel, variant label, shape title, Launch, recipe) for every choice over the benchmark
    shapes; ``launch_of(recipe)`` rebuilds the Launch (in a worker process)."""
    dtypes = ("fp32", "bf16") if quick else tuple(DTYPES)
    scales = ("none", "float") if quick else SCALE_MODES
    for shape in bench_shapes(quick):
        for word, prompt, mode, scale in itertools.product(dtypes, dtypes, PROMPT_MODES, scales):
            for maker, make in MAKERS.items():
                for i, (label, launch) in enumerate(make(shape, word, prompt, mode, scale)):
                    yield (
                        launch.name,
                        label,
                        shape.title,
                        launch,
                        (maker, shape, word, prompt, mode, scale, i),
                    )


def launch_of(recipe):
    """The Launch a ``plans`` recipe names."""
    maker, *choices, i = recipe
    return MAKERS[maker](*choices)[i][1]


def specialize(launch, target):
    """(signature, constexprs, attrs, options) exactly as Triton's launch binder makes them.

    Tensors become ``MockTensor``s (data_ptr 0: aligned, as fresh CUDA allocations are)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    args = [MockTensor(a.dtype) if isinstance(a, torch.Tensor) else a for a in launch.args]
    bound, specialization, options = binder(*args, **launch.meta)
    return kernel._pack_args(backend, launch.meta, bound, specialization, options)


def _spec_text(kernel, signature, constexprs, attrs) -> str:
    """Which integer/pointer arguments were specialized: ``/16`` divisible by 16, ``=v`` constants."""
    names = kernel.arg_names
    div = [names[i] for (i,), a in attrs.items() if a and signature[names[i]] != "constexpr"]
    const = [f"{names[i]}={v}" for (i,), v in constexprs.items() if not names[i].isupper()]
    return f"/16: {','.join(div) or '-'}; const: {','.join(const) or '-'}"


_BITS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")


def widest_access(ptx: str) -> tuple[int, int]:
    """(widest global load, widest global store) in bits, from the PTX."""
    widest = {"ld": 0, "st": 0}
    for op, suffix in _BITS.findall(ptx):
        parts = suffix.split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bfsu]\d+", p)), 0)
        widest[op] = max(widest[op], vec * bits)
    return widest["ld"], widest["st"]


def _ptxas_numbers(log: str) -> tuple[int | None, int | None]:
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores", log)
    return (int(regs[-1]) if regs else None, int(spills[-1]) if spills else None)


def compile_one(job) -> Record:
    """Compile one (kernel, variant, spec, arch, recipe, shapes) job: a ``Record``."""
    kernel_name, variant, spec, arch, recipe, shapes = job
    launch = launch_of(recipe)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    target = GPUTarget("cuda", int(arch.removeprefix("sm_")), 32)
    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v output on stdout: registers and spills
    log = io.StringIO()
    try:
        options, signature, constexprs, attrs = specialize(launch, target)
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(launch.kernel, signature, constexprs, attrs),
                target=target,
                options=options.__dict__,
            )
    except Exception as err:  # a compile failure is a result, with its reason
        message = f"{type(err).__name__}: {err}".strip().splitlines()
        return Record(kernel_name, variant, spec, arch, False, " ".join(message[:3])[:500], None, None,
                      None, None, None, shapes, time.perf_counter() - start)  # fmt: skip
    registers, spills = _ptxas_numbers(log.getvalue())
    ld_bits, st_bits = widest_access(compiled.asm["ptx"])
    shared = getattr(compiled.metadata, "shared", None)
    return Record(kernel_name, variant, spec, arch, True, None, registers, spills, shared, ld_bits, st_bits,
                  shapes, time.perf_counter() - start)  # fmt: skip


def jobs(archs: list[str], quick: bool) -> list[tuple]:
    """One job per distinct (kernel, variant, specialization) and architecture."""
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", 90, 32)  # the binder's specialization does not depend on the arch
    found: dict[str, list] = {}
    for kernel_name, label, shape, launch, recipe in plans(quick):
        _, signature, constexprs, attrs = specialize(launch, target)
        meta = " ".join(f"{k}={v}" for k, v in launch.meta.items())
        # One compiled program, however many choices lead to it: its labels are listed together.
        key = hashlib.sha1(f"{kernel_name}|{meta}|{signature}|{constexprs}|{attrs}".encode()).hexdigest()
        entry = found.setdefault(
            key, [kernel_name, [], meta, _spec_text(launch.kernel, signature, constexprs, attrs), recipe, []]
        )
        if label not in entry[1]:
            entry[1].append(label)
        if shape not in entry[5]:
            entry[5].append(shape)
    return [
        (kernel_name, f"{' / '.join(labels)} {meta}", spec, arch, recipe, shapes)
        for arch in archs
        for kernel_name, labels, meta, spec, recipe, shapes in found.values()
    ]


def table(records: list[Record]) -> str:
    """The text table, one line per record."""
    head = ("kernel", "variant", "arch", "compiled", "regs", "spills", "smem", "ld", "st")
    rows = [
        (
            r.kernel.strip("_").removesuffix("_kernel"),
            r.variant,
            r.arch,
            "yes" if r.compiled else "NO",
            *("-" if v is None else str(v) for v in (r.registers, r.spills, r.shared, r.ld_bits, r.st_bits)),
        )
        for r in records
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) for row in (head, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Compile, print the table (and failures), write ``--json``; the exit status says if all is well."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_80,sm_90", help="comma-separated, e.g. sm_80,sm_90")
    parser.add_argument("--json", metavar="PATH", help="write one record per variant and arch")
    parser.add_argument("--quick", action="store_true", help="the target shape, fp32/bf16, fewer modes")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    args = parser.parse_args(argv)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    bad = [a for a in archs if not re.fullmatch(r"sm_\d+", a)]
    if bad:
        parser.error(f"--arch takes names like sm_80,sm_90, got {', '.join(bad)}")
    from fastprompt.kernels import INTERPRETED

    if INTERPRETED:
        print("kernel_report: fastprompt.kernels were defined for Triton's interpreter; nothing to compile")
        return 2
    start = time.perf_counter()
    todo = jobs(archs, args.quick)
    print(f"{len(todo)} compiles ({len(todo) // max(len(archs), 1)} variants x {len(archs)} archs), "
          f"{args.jobs} at a time", file=sys.stderr, flush=True)  # fmt: skip
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            records = list(pool.map(compile_one, todo))
    else:
        records = [compile_one(job) for job in todo]
    print(table(records))
    failed = [r for r in records if not r.compiled]
    spilled = [r for r in records if r.spills]
    for r in failed:
        print(f"FAILED {r.kernel} [{r.variant}] {r.arch}: {r.error}")
    for r in spilled:
        print(f"SPILLS {r.kernel} [{r.variant}] {r.arch}: {r.spills} bytes")
    print(f"\n{len(records)} compiled variants: {len(failed)} failed, {len(spilled)} spill; "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in records], f, indent=1)
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
