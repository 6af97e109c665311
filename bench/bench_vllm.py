"""Serving soft prompts on vLLM against the same engine with no soft prompt and against fastprompt's
transformers path (``fastprompt.benchmarks.serving``): 32 requests over 4 adapters, N = 100, 12 input
tokens, 16 new tokens, fp32 Llama at D = 512 / 6 layers and D = 128 / 2 layers. Then many tenants through
``python -m fastprompt serve --adapter-dir`` (``fastprompt.benchmarks.multi_tenant``, D = 512 / 6
layers): 60 adapters each used 3 times, shuffled, 16 clients, against the same requests on one adapter,
and the first-request latency of an adapter not yet loaded.

    python bench/bench_vllm.py [--repeats 5] [--sizes 512x6,128x2] [--tenant-rounds 3] [--json PATH]

Needs vLLM (and PEFT for the transformers row) in the environment: see README, "Serving with vLLM".
Figures of this machine are in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per provider (median)")
    parser.add_argument(
        "--sizes", default="512x6,128x2", help='hidden x layers, comma-separated ("": none of these rows)'
    )
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers path")
    parser.add_argument(
        "--compile", action="store_true", help="let vLLM compile the model (default: enforce_eager=True)"
    )
    parser.add_argument(
        "--tenant-rounds",
        type=int,
        default=3,
        help="timed rounds of the multi-tenant server rows, each way (0: none)",
    )
    parser.add_argument("--json", help="also write the rows as JSON")
    args = parser.parse_args()
    from fastprompt.benchmarks.multi_tenant import multi_tenant_results
    from fastprompt.benchmarks.report import text_table
    from fastprompt.benchmarks.serving import serving_results

    sizes = [tuple(int(x) for x in size.split("x")) for size in args.sizes.split(",") if size]
    notes: list[str] = []
    results = serving_results(
        sizes,
        repeats=args.repeats,
        with_transformers=not args.no_transformers,
        engine={"enforce_eager": False} if args.compile else None,
        notes=notes,
    )
    if args.tenant_rounds > 0:
        results += multi_tenant_results((512, 6), repeats=args.tenant_rounds, notes=notes)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n{when}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(text_table(results))
    print("\n".join(notes))
    if args.json:
        rows = [r.__dict__ for r in results]
        with open(args.json, "w") as file:
            json.dump({"date": when, "results": rows, "notes": notes}, file, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
