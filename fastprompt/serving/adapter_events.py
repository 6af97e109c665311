"""A directory's adapters loaded, reloaded, evicted or failing, as the server reports them: one log line each
through vLLM's own log handler (its format, its level), and Prometheus metrics on vLLM's ``/metrics``.

Metrics (no labels): ``fastprompt:prompt_adapter_loads_total``, ``fastprompt:prompt_adapter_reloads_total``,
``fastprompt:prompt_adapter_evictions_total``, ``fastprompt:prompt_adapter_load_failures_total``, and
``fastprompt:prompt_adapter_load_seconds`` (a histogram of load and reload times). Needs vLLM (its logger
configuration, and prometheus_client, which it depends on).
"""

from __future__ import annotations

import logging

from .adapter_dir import log_event

_METRICS: dict | None = None


def _metrics() -> dict:
    """The metrics, registered once per process (prometheus_client refuses a name twice)."""
    global _METRICS
    if _METRICS is None:
        from prometheus_client import Counter, Histogram

        def counter(name: str, what: str) -> Counter:
            return Counter(f"fastprompt:prompt_adapter_{name}", what)

        _METRICS = {
            "load": counter("loads", "Prompt adapters loaded from the adapter directory."),
            "reload": counter("reloads", "Prompt adapters reloaded because their files changed."),
            "evict": counter("evictions", "Prompt adapter tables dropped, least recently used first."),
            "error": counter("load_failures", "Prompt adapter loads that failed (bad files: a 400)."),
            "seconds": Histogram(
                "fastprompt:prompt_adapter_load_seconds",
                "Time to read and check a prompt adapter's files (loads and reloads).",
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            ),
        }
    return _METRICS


def count_event(event: str, name: str, details: dict) -> None:
    """A listener: counts ``event`` (and the load time of loads and reloads)."""
    metrics = _metrics()
    metrics[event].inc()
    if "seconds" in details:
        metrics["seconds"].observe(details["seconds"])


def vllm_listeners() -> tuple:
    """The server's listeners: a log line in vLLM's format (the ``fastprompt`` logger given vLLM's handlers
    and level, once vLLM has configured its own) and the metrics."""
    vllm_logger, ours = logging.getLogger("vllm"), logging.getLogger("fastprompt")
    if vllm_logger.handlers and not ours.handlers:
        for handler in vllm_logger.handlers:
            ours.addHandler(handler)
        ours.setLevel(vllm_logger.level)
        ours.propagate = False
    _metrics()  # registered now: /metrics shows them at 0 before the first load
    return (log_event, count_event)
