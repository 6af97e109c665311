"""``python -m fastprompt serve`` started as a subprocess on 127.0.0.1 (conftest.py's shared server) and
answered over HTTP by a real client (httpx): completions (tokens equal transformers'), streaming, chat,
/v1/models, the 404 of an unknown model, and adapters loaded and unloaded while it runs."""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (the serving tests run in the vLLM venv)")
httpx = pytest.importorskip("httpx")

from vllm_helpers import table, task_factors  # noqa: E402

from fastprompt.prompted_embeds.adapter_files import load_prompt_adapter  # noqa: E402
from fastprompt.testing.adapter_files import (  # noqa: E402
    corrupt_adapter,
    save_multitask_adapter,
    save_prompt_adapter,
    save_ptuning_adapter,
)

NEW = 6


def _completion(client, model, prompt, **extra):
    body = {"model": model, "prompt": prompt, "max_tokens": NEW, "temperature": 0.0, "ignore_eos": True}
    body["return_token_ids"] = True
    return client.post("/v1/completions", json={**body, **extra})


def _table(adapter_dirs, name):
    return load_prompt_adapter(adapter_dirs[name]).table


def test_models_lists_the_base_model_and_the_adapters(client, base_dir):
    base = os.path.basename(base_dir)  # the base model's served name: its directory's, not its path
    reply = client.get("/v1/models")
    assert reply.status_code == 200
    cards = {card["id"]: card for card in reply.json()["data"]}
    assert list(cards)[:3] == [base, "alpha", "beta"]
    assert cards["alpha"]["parent"] == base and cards["alpha"]["root"] == "alpha"  # no server path


@pytest.mark.parametrize("name", ["alpha", "beta", None])
def test_completion_tokens_equal_transformers(client, base_dir, adapter_dirs, reference, tokenize, name):
    text = "the movie was great and the actors were good"
    model = name or os.path.basename(base_dir)
    reply = _completion(client, model, text)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == model and body["object"] == "text_completion"
    prompt_table = None if name is None else _table(adapter_dirs, name)
    assert body["choices"][0]["token_ids"] == reference(prompt_table, tokenize(text), NEW)
    rows = 0 if name is None else prompt_table.shape[0]
    assert body["usage"]["prompt_tokens"] == rows + len(tokenize(text))


def _stream(client, path, body):
    """(token ids, the models named, whether [DONE] came) of a streamed request."""
    tokens, models, done = [], set(), False
    with client.stream("POST", path, json={**body, "stream": True, "return_token_ids": True}) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        for line in reply.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[len("data: ") :])
            models.add(chunk["model"])
            if chunk["choices"]:
                tokens += chunk["choices"][0].get("token_ids") or []
    return tokens, models, done


def test_streaming(client, adapter_dirs, reference, tokenize):
    text = "the food was bad"
    body = {"model": "beta", "prompt": text, "max_tokens": NEW, "temperature": 0.0, "ignore_eos": True}
    tokens, models, done = _stream(client, "/v1/completions", body)
    assert done and models == {"beta"}
    assert tokens == reference(_table(adapter_dirs, "beta"), tokenize(text), NEW)


def test_chat_completion_uses_the_template_and_the_soft_prompt(client, base_dir, adapter_dirs, reference):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "answer the question about the text"}]
    body = {"model": "alpha", "messages": messages, "max_tokens": NEW, "temperature": 0.0, "ignore_eos": True}
    reply = client.post("/v1/chat/completions", json={**body, "return_token_ids": True})
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["model"] == "alpha" and answer["object"] == "chat.completion"
    rendered = AutoTokenizer.from_pretrained(base_dir)(
        "answer the question about the text ", add_special_tokens=False
    )["input_ids"]
    expected = reference(_table(adapter_dirs, "alpha"), rendered, NEW)
    assert answer["choices"][0]["token_ids"] == expected
    tokens, models, done = _stream(client, "/v1/chat/completions", body)
    assert done and models == {"alpha"} and tokens == expected


def test_unknown_model_is_an_openai_404(client):
    reply = _completion(client, "nope", "the movie")
    assert reply.status_code == 404
    error = reply.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["type"] == "NotFoundError" and error["param"] == "model" and error["code"] == 404
    assert "`nope` does not exist" in error["message"] and "alpha" not in error["message"]


def test_options_a_soft_prompt_cannot_take_are_a_400(client):
    reply = _completion(client, "alpha", "the movie", echo=True)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "echo"


def test_load_and_unload_while_running(client, tmp_path, reference, tokenize):
    new = table(33, seed=42)
    save_prompt_adapter(tmp_path / "delta", new)
    load = {"adapter_name": "delta", "adapter_path": str(tmp_path / "delta")}
    loaded = client.post("/v1/load_prompt_adapter", json=load)
    assert loaded.status_code == 200, loaded.text
    assert "delta" in [card["id"] for card in client.get("/v1/models").json()["data"]]
    reply = _completion(client, "delta", "the movie")
    assert reply.json()["choices"][0]["token_ids"] == reference(new, tokenize("the movie"), NEW)
    # a bad file: a 400 naming it, and delta keeps serving its table
    shutil.copytree(tmp_path / "delta", tmp_path / "bad")
    corrupt_adapter(tmp_path / "bad", "nan")
    bad = client.post(
        "/v1/load_prompt_adapter", json={"adapter_name": "delta", "adapter_path": str(tmp_path / "bad")}
    )
    assert bad.status_code == 400 and "not finite" in bad.json()["error"]["message"]
    assert bad.json()["error"]["param"] == "adapter_path"
    assert str(tmp_path / "bad") in bad.json()["error"]["message"]
    again = _completion(client, "delta", "the movie")
    assert again.json()["choices"][0]["token_ids"] == reply.json()["choices"][0]["token_ids"]
    unload = client.post("/v1/unload_prompt_adapter", json={"adapter_name": "delta"})
    assert unload.status_code == 200
    assert _completion(client, "delta", "the movie").status_code == 404
    missing = client.post("/v1/unload_prompt_adapter", json={"adapter_name": "delta"})
    assert missing.status_code == 404


def test_loading_the_base_models_name_is_a_400_on_adapter_name(client, base_dir, adapter_dirs):
    """The base model's served name serves no soft prompt: loading an adapter as it is refused, the error's
    param the name (the path is fine)."""
    name = os.path.basename(base_dir)
    load = {"adapter_name": name, "adapter_path": adapter_dirs["alpha"]}
    reply = client.post("/v1/load_prompt_adapter", json=load)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "adapter_name" and "base model's name" in error["message"], error
    assert name not in [card["id"] for card in client.get("/v1/models").json()["data"]][1:]


def test_ptuning_and_multitask_adapters_over_http(client, tmp_path, tenant_dir, reference, tokenize):
    """Loaded while running: a P-tuning adapter serves its stored rows, a multitask adapter "mt" serves
    each task as model "mt.taskT" (listed in /v1/models), streaming too; unloading "mt" removes its tasks.
    A multitask adapter put into the served directory serves its tasks the same way."""
    import torch

    dir_shared = table(20, seed=74)
    dir_cols, dir_rows = task_factors(3, 20, 2, seed=75)
    save_multitask_adapter(f"{tenant_dir}/mtd", dir_shared, dir_cols, dir_rows)
    try:
        text = "the food was bad"
        reply = _completion(client, "mtd.task2", text)
        assert reply.status_code == 200, reply.text
        expected = reference(dir_shared * torch.matmul(dir_cols[2], dir_rows[2]), tokenize(text), NEW)
        assert reply.json()["choices"][0]["token_ids"] == expected
        assert _completion(client, "mtd", text).status_code == 404  # its tasks are the models
        assert _completion(client, "mtd.task3", text).status_code == 404
        models = [card["id"] for card in client.get("/v1/models").json()["data"]]
        assert {"mtd.task0", "mtd.task1", "mtd.task2"} <= set(models) and "mtd" not in models
    finally:
        shutil.rmtree(f"{tenant_dir}/mtd")

    ptuned = table(28, seed=71)
    save_ptuning_adapter(tmp_path / "pt", ptuned)
    shared = table(12, seed=72)
    cols, task_rows = task_factors(2, 12, 2, seed=73)
    save_multitask_adapter(tmp_path / "mt", shared, cols, task_rows)
    for name in ("pt", "mt"):
        load = {"adapter_name": name, "adapter_path": str(tmp_path / name)}
        reply = client.post("/v1/load_prompt_adapter", json=load)
        assert reply.status_code == 200, reply.text
    models = [card["id"] for card in client.get("/v1/models").json()["data"]]
    assert {"pt", "mt.task0", "mt.task1"} <= set(models) and "mt" not in models
    tasks = shared[None] * torch.matmul(cols, task_rows)
    text = "the movie was great"
    for name, rows in (("pt", ptuned), ("mt.task0", tasks[0]), ("mt.task1", tasks[1])):
        reply = _completion(client, name, text)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["token_ids"] == reference(rows, tokenize(text), NEW), name
        assert reply.json()["usage"]["prompt_tokens"] == rows.shape[0] + len(tokenize(text))
    body = {"model": "mt.task1", "prompt": text, "max_tokens": NEW, "temperature": 0.0, "ignore_eos": True}
    tokens, _, done = _stream(client, "/v1/completions", body)
    assert done and tokens == reference(tasks[1], tokenize(text), NEW)
    assert client.post("/v1/unload_prompt_adapter", json={"adapter_name": "mt"}).status_code == 200
    assert _completion(client, "mt.task0", text).status_code == 404
    assert client.post("/v1/unload_prompt_adapter", json={"adapter_name": "pt"}).status_code == 200
