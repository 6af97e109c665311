"""``python -m fastprompt serve`` as a subprocess on 127.0.0.1, for the serving tests and benchmarks.

``served(model, args, log_path)`` starts the server on a free port, waits until ``/v1/models`` answers
(the engine is up and the adapters are installed), yields its base URL and stops it on exit; a server
that exits or does not answer in time raises ``RuntimeError`` with the end of its log. Needs vLLM in the
environment the subprocess runs in (this interpreter's).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

START_TIMEOUT_S = 300


def vllm_arguments(engine: dict) -> list[str]:
    """vLLM engine keyword arguments as its command-line arguments (``True``: a bare flag)."""
    args = [f"--{key.replace('_', '-')}={value}" for key, value in engine.items() if value is not True]
    return args + [f"--{key.replace('_', '-')}" for key, value in engine.items() if value is True]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str, api_key: str | None) -> bool:
    request = urllib.request.Request(f"{url}/v1/models")
    if api_key is not None:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=2) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def served(
    model: str,
    args: list[str],
    log_path,
    *,
    api_key: str | None = None,
    timeout_s: float = START_TIMEOUT_S,
    env: dict | None = None,
) -> Iterator[str]:
    """The base URL of ``python -m fastprompt serve MODEL *args --port P [--api-key KEY]`` while it runs;
    its output goes to ``log_path``."""
    port = free_port()
    command = [sys.executable, "-m", "fastprompt", "serve", model, *args, f"--port={port}"]
    if api_key is not None:
        command.append(f"--api-key={api_key}")
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ if env is None else env)
        )
    url = f"http://127.0.0.1:{port}"

    def log_tail() -> str:
        with open(log_path) as file:
            return file.read()[-4000:]

    try:
        deadline = time.monotonic() + timeout_s
        while not _answers(url, api_key):
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer in {timeout_s:.0f} s:\n{log_tail()}")
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
