"""The names ``python -m fastprompt serve`` answers to, over real HTTP, in each of its modes: no server path
in ``/v1/models``, a response, a streamed chunk or an error; an empty or missing ``model`` a 404 with
``--adapter-dir`` (unless ``--default-model`` names one), vLLM's default (the base model) otherwise; a
whitespace name a 404 everywhere; the base model's default served name its directory's name, and a server
whose default name is an adapter's refusing to start.

The modes (one server each; "both" is conftest.py's shared server):

- neither: no adapter flags;
- adapter: ``--adapter`` alpha and beta, ``--default-model alpha`` (an empty name serves alpha);
- dir: ``--adapter-dir`` (t00, t05) and ``--served-model-name t05``: the operator's name for the base
  model wins over the directory's t05 (the README's precedence; only a default name that clashes fails),
  so "t05" serves the base model and is listed once;
- both: ``--adapter`` alpha and beta and ``--adapter-dir`` the 60 tenants.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (the serving tests run in the vLLM venv)")
httpx = pytest.importorskip("httpx")

from vllm_helpers import API_KEY, CHAT_TEMPLATE, ENGINE, table, task_factors  # noqa: E402

from fastprompt.prompted_embeds.adapter_files import load_prompt_adapter  # noqa: E402
from fastprompt.testing.adapter_files import save_multitask_adapter, save_prompt_adapter  # noqa: E402

NEW = 4
TEXT = "the movie was great"
MISSING = object()  # a request body without "model"
WHITESPACE = [" ", "\t", " \n "]


@dataclass
class Mode:
    url: str
    name: str  # the base model's served name
    empty: str | None  # what an empty or missing name serves (None: a 404)
    adapters: dict[str, str] = field(default_factory=dict)  # a few served adapters: name -> directory


@pytest.fixture(scope="module")
def names_dir(tmp_path_factory) -> str:
    """The adapter directory of the "dir" mode: t00 and t05."""
    directory = tmp_path_factory.mktemp("names") / "adapters"
    for index in (0, 5):
        save_prompt_adapter(directory / f"t{index:02d}", table(8 + 8 * index, 2000 + index))
    return str(directory)


@pytest.fixture(scope="module", params=["neither", "adapter", "dir", "both"])
def mode(request, base_dir, adapter_dirs, tenant_dir, names_dir, tmp_path_factory):
    base_name = os.path.basename(base_dir)
    named = {name: adapter_dirs[name] for name in ("alpha", "beta")}
    if request.param == "both":
        url = request.getfixturevalue("server")
        yield Mode(url, base_name, None, {"alpha": named["alpha"], "t00": os.path.join(tenant_dir, "t00")})
        return
    from fastprompt.testing.server_process import served, vllm_arguments

    args, expected = [f"--chat-template={CHAT_TEMPLATE}", *vllm_arguments(ENGINE)], {}
    if request.param == "neither":
        expected = Mode("", base_name, base_name)
    elif request.param == "adapter":
        args += [f"--adapter={name}={path}" for name, path in named.items()] + ["--default-model=alpha"]
        expected = Mode("", base_name, "alpha", named)
    else:
        args += [f"--adapter-dir={names_dir}", "--served-model-name=t05"]
        expected = Mode("", "t05", None, {"t00": os.path.join(names_dir, "t00")})
    cores = os.cpu_count() or 1
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=f"0-{cores - 2}" if cores > 1 else "0")
    log = tmp_path_factory.mktemp(f"server_{request.param}") / "server.log"
    try:
        with served(base_dir, [*args], log, api_key=API_KEY, env=env) as url:
            expected.url = url
            yield expected
    except RuntimeError as err:
        pytest.fail(str(err))


@pytest.fixture
def http(mode):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=mode.url, headers=headers, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def server_paths(tmp_path_factory) -> list[str]:
    """Every path the servers were given lies below pytest's base temporary directory."""
    root = str(tmp_path_factory.getbasetemp())
    return sorted({root, os.path.realpath(root)})


def _strings(value):
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _no_path(text: str, server_paths) -> None:
    for path in server_paths:
        assert path not in text, (path, text[:2000])


def _body(model, stream=False, chat=False):
    body = {"max_tokens": NEW, "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
    if chat:
        body["messages"] = [{"role": "user", "content": TEXT}]
    else:
        body["prompt"] = TEXT
    if model is not MISSING:
        body["model"] = model
    return {**body, "stream": True} if stream else body


def _ask(http, model, *, stream=False, chat=False):
    """(status, token ids, the models the response named, its error or None, the raw body text)."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if not stream:
        reply = http.post(path, json=_body(model, chat=chat))
        if reply.status_code != 200:
            return reply.status_code, None, None, reply.json()["error"], reply.text
        body = reply.json()
        return 200, body["choices"][0]["token_ids"], {body["model"]}, None, reply.text
    tokens, models = [], set()
    with http.stream("POST", path, json=_body(model, stream=True, chat=chat)) as reply:
        text = reply.read().decode()
        if reply.status_code != 200:
            return reply.status_code, None, None, json.loads(text)["error"], text
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[len("data: ") :])
            models.add(chunk["model"])
            tokens += chunk["choices"][0].get("token_ids") or [] if chunk["choices"] else []
    return 200, tokens, models, None, text


def _expected(mode, name, reference, tokenize):
    """The greedy tokens of a completion of TEXT by served model ``name``."""
    rows = load_prompt_adapter(mode.adapters[name]).table if name in mode.adapters else None
    return reference(rows, tokenize(TEXT), NEW)


def _assert_404(status, error, name):
    assert status == 404, (name, error)
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert error["type"] == "NotFoundError" and error["param"] == "model" and error["code"] == 404, error


def test_models_show_no_server_path(mode, http, server_paths):
    reply = http.get("/v1/models")
    assert reply.status_code == 200
    _no_path(reply.text, server_paths)
    strings = list(_strings(reply.json()))
    assert not [s for s in strings if "/" in s or "\\" in s]  # no field holds anything path-like
    cards = reply.json()["data"]
    assert cards[0]["id"] == mode.name and cards[0]["parent"] is None
    assert all(card["root"] == card["id"] for card in cards)
    assert all(card["parent"] == mode.name for card in cards[1:])
    assert set(mode.adapters) <= {card["id"] for card in cards}
    assert [card["id"] for card in cards].count(mode.name) == 1


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("name", ["", MISSING], ids=["empty", "missing"])
def test_empty_and_missing_names(mode, http, name, stream, chat, server_paths, reference, tokenize):
    status, tokens, models, error, text = _ask(http, name, stream=stream, chat=chat)
    _no_path(text, server_paths)
    if mode.empty is None:  # --adapter-dir without --default-model
        _assert_404(status, error, name)
        assert "names no model" in error["message"]
        return
    assert status == 200, error
    assert models == {mode.empty}
    if not chat:
        assert tokens == _expected(mode, mode.empty, reference, tokenize)


OTHER_ENDPOINTS = {  # vLLM's own, not fastprompt's: the base model only
    "/tokenize": {"prompt": TEXT},
    "/v1/responses": {"input": TEXT, "max_output_tokens": NEW, "temperature": 0.0},
}


@pytest.mark.parametrize("path", sorted(OTHER_ENDPOINTS))
@pytest.mark.parametrize("name", ["", MISSING], ids=["empty", "missing"])
def test_other_endpoints_serve_no_name_only_as_the_base_model(mode, http, name, path, server_paths):
    """vLLM's other endpoints answer a request naming no model only where it means the base model: a 404
    saying the request names no model with --adapter-dir, and where the default is an adapter (it serves
    no soft prompt there)."""
    body = dict(OTHER_ENDPOINTS[path]) if name is MISSING else {**OTHER_ENDPOINTS[path], "model": name}
    reply = http.post(path, json=body)
    _no_path(reply.text, server_paths)
    if mode.empty == mode.name:
        assert reply.status_code == 200, reply.text
    else:
        error = reply.json()["error"]
        _assert_404(reply.status_code, error, name)
        assert "names no model" in error["message"] and "None" not in error["message"], error


@pytest.mark.parametrize("name", ["", MISSING], ids=["empty", "missing"])
def test_anthropic_messages_require_a_model(mode, http, name):
    """/v1/messages (Anthropic's API, vLLM's validation): no model is a 400 in every mode, not a 404."""
    body = {"max_tokens": NEW, "messages": [{"role": "user", "content": TEXT}]}
    reply = http.post("/v1/messages", json=body if name is MISSING else {**body, "model": name})
    assert reply.status_code == 400, reply.text


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_whitespace_names_are_404s(mode, http, stream, server_paths):
    for name in WHITESPACE:
        status, _, _, error, text = _ask(http, name, stream=stream)
        _assert_404(status, error, name)
        _no_path(text, server_paths)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_responses_name_the_served_model(mode, http, stream, server_paths, reference, tokenize):
    for name in [mode.name, *mode.adapters]:
        status, tokens, models, error, text = _ask(http, name, stream=stream)
        assert status == 200, (name, error)
        assert models == {name}
        _no_path(text, server_paths)
        assert tokens == _expected(mode, name, reference, tokenize), name


def test_errors_and_other_pages_show_no_server_path(mode, http, base_dir, server_paths):
    for name in [base_dir, os.path.realpath(base_dir), *mode.adapters.values(), "nope", "../t00"]:
        for stream in (False, True):
            status, _, _, error, text = _ask(http, name, stream=stream)
            _assert_404(status, error, name)
            _no_path(text, server_paths)
    for page in ("/v1/models", "/version", "/health", "/ping", "/load", "/metrics"):
        reply = http.get(page)
        assert reply.status_code == 200, page
        _no_path(reply.text, server_paths)
    assert f'model_name="{mode.name}"' in http.get("/metrics").text


@pytest.mark.parametrize("flag", ["adapter-dir", "multitask-adapter"])
def test_a_default_name_that_is_an_adapters_refuses_to_start(base_dir, tmp_path, flag):
    """The base model's default served name is its directory's name: if an adapter of --adapter-dir has it,
    or a multitask --adapter is loaded as it (it serves its tasks, not that name), the server stops before
    its engine starts, saying which flag resolves it."""
    name = os.path.basename(base_dir)
    command = [sys.executable, "-m", "fastprompt", "serve", base_dir]
    if flag == "adapter-dir":
        save_prompt_adapter(tmp_path / name, table(8, 3000))
        command.append(f"--adapter-dir={tmp_path}")
    else:
        save_multitask_adapter(tmp_path / "mt", table(8, 3001), *task_factors(2, 8, 1, seed=3002))
        command.append(f"--adapter={name}={tmp_path / 'mt'}")
    done = subprocess.run(command + ["--dtype=float32"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"'{name}'" in done.stderr and "--served-model-name" in done.stderr
    assert "Traceback" not in done.stderr
