"""Many soft prompts by name from a directory (``python -m fastprompt serve --adapter-dir``), over real HTTP
on conftest.py's shared server: 60 adapters under 16 concurrent clients (streaming and not, every response
its own adapter's tokens), loading once, reloading (never stale; a running request keeps its rows; a
half-written file is a 400 until whole), bad adapters staying with their tenant, adapters added and
deleted while serving, ``--adapter`` winning over the directory, every escaping name a 404, vLLM's
``--api-key``, and the log lines and metrics of loads, reloads and evictions."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (the serving tests run in the vLLM venv)")
httpx = pytest.importorskip("httpx")

from vllm_helpers import API_KEY, TENANTS, table  # noqa: E402

from fastprompt.prompted_embeds.adapter_files import load_prompt_adapter  # noqa: E402
from fastprompt.testing.adapter_files import (  # noqa: E402
    ESCAPING_NAMES,
    SERVING_BAD_FILES,
    corrupt_adapter,
    save_prompt_adapter,
)

NEW = 6
CLIENTS = 16
TEXTS = [
    "the movie was great",
    "the food was bad but the service was fine",
    "answer the question about the text",
    "classify the sentiment of this review",
    "the actors were good",
    "translate english to german : hello world",
]
# what a client is told for each bad adapter (the model is named before it)
PROBLEMS = {
    "truncated": "adapter_model.safetensors is not a readable safetensors file",
    "garbage": "adapter_model.safetensors is not a readable safetensors file",
    "missing_key": "has no 'prompt_embeddings' tensor",
    "wrong_shape": "'prompt_embeddings' has shape [2, 64]",
    "wrong_dim": "has token_dim=128, but the model's word embeddings have dimension 64",
    "no_weights": "No adapter weights in",
    "nan": "values that are not finite",
    "inf": "values that are not finite",
    "nan_bin": "values that are not finite",
    "lora_config": "peft_type='LORA'",
    "broken_config": "adapter_config.json",
}
assert set(PROBLEMS) == set(SERVING_BAD_FILES) - {"no_config"}


def _body(model, text, new=NEW, **extra):
    return {
        "model": model,
        "prompt": text,
        "max_tokens": new,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_token_ids": True,
        **extra,
    }


def _answer(client, model, text, *, stream=False, new=NEW):
    """(status, token ids, the models the response named, its error or None) of one completion."""
    if not stream:
        reply = client.post("/v1/completions", json=_body(model, text, new))
        if reply.status_code != 200:
            return reply.status_code, None, None, reply.json()["error"]
        body = reply.json()
        return 200, body["choices"][0]["token_ids"], {body["model"]}, None
    tokens, models = [], set()
    with client.stream("POST", "/v1/completions", json=_body(model, text, new, stream=True)) as reply:
        if reply.status_code != 200:
            reply.read()
            return reply.status_code, None, None, reply.json()["error"]
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[len("data: ") :])
                models.add(chunk["model"])
                tokens += chunk["choices"][0].get("token_ids") or [] if chunk["choices"] else []
    return 200, tokens, models, None


def _table(tenant_dir, name):
    return load_prompt_adapter(os.path.join(tenant_dir, name)).table


def _metric(client, name) -> float:
    text = client.get("/metrics").text
    match = re.search(rf"^fastprompt:prompt_adapter_{name}_total (\S+)$", text, re.M)
    return float(match.group(1))


def _clients(server):
    """One httpx client per worker thread (with the API key)."""
    local = threading.local()

    def get():
        if not hasattr(local, "client"):
            local.client = httpx.Client(
                base_url=server, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300
            )
        return local.client

    return get


def test_models_lists_the_directory_and_no_paths(client, tenant_dir, base_dir):
    reply = client.get("/v1/models")
    assert reply.status_code == 200
    ids = [card["id"] for card in reply.json()["data"]]
    tenants = [f"t{i:02d}" for i in range(TENANTS)]
    assert ids[:3] == [os.path.basename(base_dir), "alpha", "beta"] and set(tenants) <= set(ids)
    assert ids.count("alpha") == 1  # --adapter alpha hides the directory's alpha
    assert not {".hidden", "link_out", "file_link_out"} & set(ids)
    assert os.path.dirname(tenant_dir) not in reply.text


def test_many_adapters_under_concurrent_load(server, client, tenant_dir, reference, tokenize):
    """60 adapters, each asked twice (once streaming), shuffled, 16 clients at once, at most 8 tables held:
    every response is its own adapter's (tokens equal the reference), nothing dropped."""
    evictions = _metric(client, "evictions")
    jobs = [(f"t{i:02d}", TEXTS[i % len(TEXTS)], stream) for i in range(TENANTS) for stream in (False, True)]
    random.Random(0).shuffle(jobs)
    http = _clients(server)
    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(lambda job: _answer(http(), job[0], job[1], stream=job[2]), jobs))
    for (name, text, stream), (status, tokens, models, error) in zip(jobs, answers, strict=True):
        assert status == 200, (name, stream, error)
        assert models == {name}
        assert tokens == reference(_table(tenant_dir, name), tokenize(text), NEW), (name, stream)
    assert _metric(client, "evictions") > evictions  # 60 adapters through 8 slots


def test_concurrent_first_requests_load_once(server, client, tenant_dir, server_log, reference, tokenize):
    rows = table(24, seed=501)
    save_prompt_adapter(os.path.join(tenant_dir, "fresh_once"), rows)
    http = _clients(server)
    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(lambda _: _answer(http(), "fresh_once", TEXTS[0]), range(CLIENTS)))
    expected = reference(rows, tokenize(TEXTS[0]), NEW)
    assert all(status == 200 and tokens == expected for status, tokens, _, _ in answers)
    assert server_log.read_text().count("Loaded prompt adapter 'fresh_once'") == 1


def test_reload_is_never_stale_and_a_running_request_keeps_its_rows(client, tenant_dir, reference, tokenize):
    directory = os.path.join(tenant_dir, "fresh_reload")
    old, new = table(16, seed=601), table(16, seed=602)
    save_prompt_adapter(directory, old)
    ids = tokenize(TEXTS[1])
    assert _answer(client, "fresh_reload", TEXTS[1])[1] == reference(old, ids, NEW)
    reloads = _metric(client, "reloads")
    long = 40
    with client.stream(
        "POST", "/v1/completions", json=_body("fresh_reload", TEXTS[1], long, stream=True)
    ) as reply:
        lines = reply.iter_lines()
        tokens = []
        for line in lines:  # the request is running: its first tokens came
            if line.startswith("data: {"):
                tokens += json.loads(line[6:])["choices"][0]["token_ids"]
                break
        save_prompt_adapter(directory, new)  # in place, same size, within a timestamp tick of the last read
        # a request that starts after the change gets the new rows
        assert _answer(client, "fresh_reload", TEXTS[1])[1] == reference(new, ids, NEW)
        for line in lines:
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                tokens += chunk["choices"][0].get("token_ids") or [] if chunk["choices"] else []
    assert tokens == reference(old, ids, long)  # the running one kept the rows it started with
    assert _metric(client, "reloads") == reloads + 1
    # half-written: a 400 until the file is whole, then the new rows
    weights = os.path.join(directory, "adapter_model.safetensors")
    whole = open(weights, "rb").read()
    with open(weights, "wb") as file:
        file.write(whole[: len(whole) // 2])
    status, _, _, error = _answer(client, "fresh_reload", TEXTS[1])
    assert status == 400 and "'fresh_reload'" in error["message"] and "not a readable" in error["message"]
    with open(weights, "wb") as file:
        file.write(whole)
    assert _answer(client, "fresh_reload", TEXTS[1])[1] == reference(new, ids, NEW)


def test_bad_adapters_are_400s_for_their_tenant_only(server, client, tenant_dir, reference, tokenize):
    """Every kind of bad file: a 400 naming the model and the problem (no server path), while requests
    of other adapters, at the same time, are served as if nothing happened; fixed files serve again."""
    for how in PROBLEMS:
        shutil.copytree(os.path.join(tenant_dir, "t03"), os.path.join(tenant_dir, f"bad_{how}"))
        corrupt_adapter(os.path.join(tenant_dir, f"bad_{how}"), how)
    jobs = [(f"bad_{how}", how) for how in PROBLEMS] + [(f"t{i:02d}", None) for i in range(10, 26)]
    random.Random(1).shuffle(jobs)
    http = _clients(server)
    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(lambda job: _answer(http(), job[0], TEXTS[2], stream=job[1] is None), jobs))
    ids = tokenize(TEXTS[2])
    for (name, how), (status, tokens, _, error) in zip(jobs, answers, strict=True):
        if how is None:
            assert status == 200 and tokens == reference(_table(tenant_dir, name), ids, NEW), name
            continue
        assert status == 400, (how, error)
        assert error["type"] == "BadRequestError" and error["param"] == "model" and error["code"] == 400
        assert f"model '{name}'" in error["message"] and PROBLEMS[how] in error["message"], error
        assert os.path.dirname(tenant_dir) not in error["message"]
    shutil.rmtree(os.path.join(tenant_dir, "bad_nan"))
    shutil.copytree(os.path.join(tenant_dir, "t03"), os.path.join(tenant_dir, "bad_nan"))
    assert _answer(client, "bad_nan", TEXTS[2])[1] == reference(_table(tenant_dir, "t03"), ids, NEW)


def test_added_then_deleted_while_serving(client, tenant_dir, reference, tokenize):
    directory = os.path.join(tenant_dir, "fresh_added")
    assert _answer(client, "fresh_added", TEXTS[3])[0] == 404
    rows = table(8, seed=701)
    save_prompt_adapter(directory, rows)
    assert _answer(client, "fresh_added", TEXTS[3])[1] == reference(rows, tokenize(TEXTS[3]), NEW)
    assert "fresh_added" in [card["id"] for card in client.get("/v1/models").json()["data"]]
    shutil.rmtree(directory)
    status, _, _, error = _answer(client, "fresh_added", TEXTS[3])
    assert status == 404 and error["type"] == "NotFoundError"
    assert "fresh_added" not in [card["id"] for card in client.get("/v1/models").json()["data"]]


def test_the_adapter_flag_wins_over_the_directory(client, adapter_dirs, tenant_dir, reference, tokenize):
    ids = tokenize(TEXTS[4])
    expected = reference(load_prompt_adapter(adapter_dirs["alpha"]).table, ids, NEW)
    assert expected != reference(_table(tenant_dir, "alpha"), ids, NEW)  # the test can tell them apart
    assert _answer(client, "alpha", TEXTS[4])[1] == expected


@pytest.mark.parametrize("name", ESCAPING_NAMES, ids=repr)
def test_escaping_names_are_openai_404s(client, tenant_dir, base_dir, name):
    for stream in (False, True):
        status, _, _, error = _answer(client, name, TEXTS[0], stream=stream)
        assert status == 404, (name, error)
        assert set(error) >= {"message", "type", "param", "code"} and error["type"] == "NotFoundError"
        assert os.path.dirname(tenant_dir) not in error["message"] and "t00" not in error["message"]
    # the absolute path of an adapter that exists outside the directory
    outside = os.path.join(os.path.dirname(tenant_dir), "outside")
    assert _answer(client, outside, TEXTS[0])[0] == 404


def test_the_api_key_is_still_required(server, client):
    reply = httpx.post(f"{server}/v1/completions", json=_body("t00", TEXTS[0]), timeout=30)
    assert reply.status_code == 401
    assert _answer(client, "t00", TEXTS[0])[0] == 200


def test_loads_and_evictions_are_logged_in_vllms_format(server_log):
    lines = server_log.read_text().splitlines()
    for event in ("Loaded prompt adapter 't", "Evicted prompt adapter", "Reloaded (its files changed)"):
        line = next((line for line in lines if event in line), None)
        assert line is not None, event
        assert re.search(r"(INFO|WARNING) \d\d-\d\d \d\d:\d\d:\d\d \[adapter_dir\.py:\d+\]", line), line


def test_loading_does_not_block_the_event_loop():
    """A slow load runs in a worker thread: the event loop keeps serving meanwhile (the server's own
    resolution step, with a store that takes 0.5 s)."""
    from fastprompt.serving.server import _PromptCompletion

    class Store:
        directory = object()

        def __contains__(self, name):
            return False

        def resolve(self, name):
            time.sleep(0.5)
            return "table"

    class Models:
        lora_requests = {}

        def is_base_model(self, name):
            return False

    serving = _PromptCompletion.__new__(_PromptCompletion)
    serving.prompt_adapters, serving.models = Store(), Models()

    class Request:
        model = "slow"

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        resolved = await serving._resolve(Request())
        task.cancel()
        return resolved, ticks

    resolved, ticks = asyncio.run(main())
    assert resolved == ("slow", "table") and ticks >= 20
