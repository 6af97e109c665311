"""Benchmark results as rows, and their three outputs: a text table, a JSON file and a PNG plot.

A ``Result`` is one (workload, shape, provider) measurement; ``with_speedups`` fills each row's
speedup over the ``peft`` row of the same workload and shape; ``noise_warnings`` says when a run's
timings are too noisy (or inconsistent) for its ratios to be trusted.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass
class Result:
    """One measurement. ``seconds`` is the median time of one call; ``spread`` the interquartile range
    of the timed calls over that median (None where unknown); ``peak_bytes`` the peak memory allocated
    during one call above what was allocated before it (None where unknown)."""

    workload: str
    shape: str
    provider: str
    seconds: float
    bytes_moved: int | None = None
    peak_bytes: int | None = None
    copy_gbps: float | None = None
    speedup: float | None = None
    memory_ratio: float | None = None
    matches_peft: bool = True
    spread: float | None = None

    @property
    def gbps(self) -> float | None:
        """GB/s from the bytes that must move, or None for model-level workloads."""
        return None if self.bytes_moved is None else self.bytes_moved / self.seconds / 1e9

    @property
    def copy_fraction(self) -> float | None:
        """This result's GB/s over a measured device-to-device copy's (GPU only)."""
        if self.gbps is None or not self.copy_gbps:
            return None
        return self.gbps / self.copy_gbps


def timed_result(
    workload: str, shape: str, provider: str, timing, peak_bytes: int | None, **fields
) -> Result:
    """A ``Result`` from a ``measure.Timing`` (its median and spread) and a peak; ``fields`` set the rest."""
    return Result(
        workload, shape, provider, timing.median, peak_bytes=peak_bytes, spread=timing.spread, **fields
    )


def with_speedups(results: Iterable[Result]) -> list[Result]:
    """Fill ``speedup`` (peft time / this time) and ``memory_ratio`` (this peak / peft's peak)."""
    results = list(results)
    peft = {(r.workload, r.shape): r for r in results if r.provider == "peft"}
    for r in results:
        base = peft.get((r.workload, r.shape))
        if base is None:
            continue
        r.speedup = base.seconds / r.seconds
        if base.peak_bytes and r.peak_bytes is not None:
            r.memory_ratio = r.peak_bytes / base.peak_bytes
    return results


def _time(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def _mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f} MiB"


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


COLUMNS = (
    "workload",
    "shape",
    "provider",
    "median",
    "IQR/med",
    "GB/s",
    "of copy",
    "vs peft",
    "peak mem",
    "mem vs peft",
)

# A row whose interquartile range exceeds this fraction of its median is too noisy to compare.
NOISY_SPREAD = 0.25


def noise_warnings(results: Sequence[Result], threshold: float = NOISY_SPREAD) -> list[str]:
    """Why this run's ratios should not be trusted, one line each; empty when the run looks steady.

    Two signs: a row whose interquartile range is more than ``threshold`` of its median (calls were
    descheduled or stalled mid-measurement), and a forward+backward ``peft`` median below the forward
    one of the same shape (impossible on a steady machine: the backward only adds work).
    """
    lines = []
    noisy = [r for r in results if r.spread is not None and r.spread > threshold]
    if noisy:
        worst = max(noisy, key=lambda r: r.spread)
        lines.append(
            f"{len(noisy)} of {len(results)} rows have an interquartile range above {threshold:.0%} of their "
            f"median (worst: {worst.workload} {worst.shape} {worst.provider}, {worst.spread:.0%})"
        )
    peft = {(r.workload, r.shape): r.seconds for r in results if r.provider == "peft"}
    for (workload, shape), seconds in peft.items():
        forward = peft.get(("forward", shape)) if workload == "forward+backward" else None
        if forward is not None and seconds < forward:
            lines.append(
                f"peft forward+backward ({_time(seconds)}) ran faster than peft forward ({_time(forward)}) "
                f"at {shape}"
            )
    return lines


def table_rows(results: Sequence[Result]) -> list[tuple[str, ...]]:
    """The cells of each result, in ``COLUMNS`` order."""
    rows = []
    for r in results:
        provider = r.provider if r.matches_peft else f"{r.provider} (MISMATCH)"
        rows.append(
            (
                r.workload,
                r.shape,
                provider,
                _time(r.seconds),
                _fmt(r.spread, "{:.0%}"),
                _fmt(r.gbps, "{:.1f}"),
                _fmt(r.copy_fraction, "{:.0%}"),
                _fmt(r.speedup, "{:.2f}x"),
                _mib(r.peak_bytes),
                _fmt(r.memory_ratio, "{:.2f}x"),
            )
        )
    return rows


def text_table(results: Sequence[Result], *, markdown: bool = False) -> str:
    """A plain aligned table (or a markdown one); the ``of copy`` and ``IQR/med`` columns only when some
    row has them."""
    optional = {
        "of copy": any(r.copy_fraction for r in results),
        "IQR/med": any(r.spread is not None for r in results),
    }
    keep = [i for i, c in enumerate(COLUMNS) if optional.get(c, True)]
    header = [COLUMNS[i] for i in keep]
    body = [[row[i] for i in keep] for row in table_rows(results)]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    widths = [max(len(str(x)) for x in column) for column in zip(header, *body, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    return "\n".join(line.rstrip() for line in lines)


def write_json(path: str, results: Sequence[Result], meta: dict) -> None:
    """``{"meta": ..., "results": [...]}`` with every field and the derived GB/s and copy fraction."""
    rows = [dict(dataclasses.asdict(r), gbps=r.gbps, copy_fraction=r.copy_fraction) for r in results]
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
        f.write("\n")


def plot_available() -> bool:
    """True when matplotlib (the ``plot`` extra) can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _two_lines(shape: str) -> str:
    words = shape.split()
    return " ".join(words[:2]) + "\n" + " ".join(words[2:])


def write_plot(path: str, results: Sequence[Result], title: str) -> None:
    """A bar chart of each provider's speedup over ``peft``, one group of bars per workload and shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r.workload, r.shape) for r in results))
    providers = list(dict.fromkeys(r.provider for r in results))
    speed = {(r.workload, r.shape, r.provider): r.speedup or 0.0 for r in results}
    width = 0.8 / max(1, len(providers))
    fig, ax = plt.subplots(figsize=(max(6.0, 2.0 * len(groups)), 4.5))
    for i, provider in enumerate(providers):
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, [speed.get((*grp, provider), 0.0) for grp in groups], width, label=provider)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks([g + width * (len(providers) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{w}\n{_two_lines(s)}" for w, s in groups], fontsize=7)
    ax.set_ylabel("speedup over peft (higher is faster)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
