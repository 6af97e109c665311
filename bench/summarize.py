"""Turn a ``pytest bench --benchmark-json PATH`` file into the markdown table of bench/RESULTS.md.

    python bench/summarize.py PATH.json [--stat median|min|mean|do_bench]

One row per result: workload, shape, provider, time, its interquartile range over the median, GB/s,
speedup over ``peft`` of the same group, peak memory and its ratio to ``peft``'s, from the ``extra_info``
the suite records; then a warning when the run's timings were too noisy to compare.
"""

from __future__ import annotations

import argparse
import json

from fastprompt.benchmarks.report import Result, noise_warnings, text_table, with_speedups


def results_from_json(path: str, stat: str = "median") -> list[Result]:
    """The ``Result`` rows of a pytest-benchmark JSON file: op level, then model level, as they ran."""
    with open(path) as f:
        data = json.load(f)
    rows = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        group = bench.get("group") or bench["name"]
        workload, _, shape = group.partition(" B=")
        rows.append(
            Result(
                workload=workload.strip(),
                shape=("B=" + shape) if shape else "",
                provider=info.get("provider", bench["param"]),
                seconds=info["do_bench_median_s"] if stat == "do_bench" else bench["stats"][stat],
                bytes_moved=info.get("bytes_moved"),
                peak_bytes=info.get("peak_extra_bytes"),
                copy_gbps=info.get("copy_GB/s"),
                spread=bench["stats"]["iqr"] / bench["stats"]["median"] if bench["stats"]["median"] else None,
            )
        )
    rows.sort(key=lambda r: r.bytes_moved is None)  # op level first, then model level; stable
    return with_speedups(rows)


def main(argv: list[str] | None = None) -> None:
    """Print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_path")
    parser.add_argument(
        "--stat",
        default="median",
        choices=("median", "min", "mean", "do_bench"),
        help="do_bench: CUDA runs only, the triton.testing.do_bench median (L2 cleared, like the copy)",
    )
    args = parser.parse_args(argv)
    results = results_from_json(args.json_path, args.stat)
    print(text_table(results, markdown=True))
    for line in noise_warnings(results):
        print(f"\nWARNING (noisy run, ratios unreliable): {line}")


if __name__ == "__main__":
    main()
