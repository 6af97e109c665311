"""``python -m fastprompt serve``: vLLM's own OpenAI-compatible server, where ``"model": NAME`` picks a
soft prompt.

The server is vLLM's (its argument parser, engine, FastAPI app, routes and OpenAI serving classes); three
of its objects are given a fastprompt subclass that changes what a model name means:

- completions and chat completions: a request whose ``model`` is an adapter name is rendered by vLLM as
  usual (tokenizer, chat template, truncation), then each token prompt becomes ``prompt_embeds`` (the
  adapter's rows, then the token rows: ``PromptAdapters.embeds``), and the response says
  ``"model": NAME``. The base model's name serves no soft prompt (vLLM unchanged).
- ``/v1/models``: the base model, then one entry per adapter (``parent``: the base model; ``root``: its
  name, never a server path; vLLM's own cards too: ``root`` is their name, not the model's or a LoRA's
  path).
- with a directory of adapters (``--adapter-dir``: ``adapter_dir.AdapterDirectory``), a model name that
  is neither the base model's, nor vLLM's LoRA's, nor an ``--adapter`` one is looked up there, once per
  request and off the event loop: its table (loaded on demand) stays with the request to its end; a bad
  adapter is a 400 naming the model and the problem; ``/v1/models`` lists the directory's adapters too.
- an unknown model: vLLM's own 404 ``{"error": {"message", "type", "param", "code"}}`` (it names the
  base model's served names, never the adapters).
- the base model's served name is never a server path (``names.default_served_name``: its directory's
  name unless ``--served-model-name`` is given), so no body, chunk, error or ``/v1/models`` field shows
  one. An empty or missing ``model`` is served as ``--default-model`` names (an adapter or a LoRA on
  completions and chat only); without it, with ``--adapter-dir`` it is a 404 (a tenant that names nothing
  reaches nothing) on every endpoint but Anthropic's ``/v1/messages``, where vLLM's own validation makes
  it a 400; else vLLM's default, the base model.

``--allow-adapter-updates`` adds ``POST /v1/load_prompt_adapter`` (``{"adapter_name", "adapter_path"}``:
add or replace; its answer and errors repeat the path the client sent) and ``POST
/v1/unload_prompt_adapter`` (``{"adapter_name"}``); off by default, since it reads files from the server's
disk on request.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import signal
from http import HTTPStatus

from fastapi import Request  # a module global: FastAPI resolves the routes' annotations here
from fastapi.responses import JSONResponse
from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse, ModelCard, ModelPermission
from vllm.inputs.engine import embeds_input

from ..prompted_embeds.adapter_files import AdapterFileError
from .adapter_dir import UnknownAdapterError
from .adapter_events import vllm_listeners
from .names import check_served_names, default_served_name
from .prompts import PromptAdapters, check_adapter_dirs, task_of
from .settings import engine_defaults
from .word_table import read_word_table

# The adapter the request being handled asked for and the table it resolved, set for the request's whole
# handling: read when its prompt embeddings are built, and by the models object when vLLM's serving code
# asks it for the name to put in the response (it does so before returning, in the request's task).
_REQUESTED: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("fastprompt_adapter", default=None)


_NO_MODEL = 'The request names no model: set "model" to one of the ids of /v1/models.'


class _EmptyName:
    """Every serving object of the app: an empty or missing model name is supported only where it is
    served as the base model (``empty_model``: the name it is served as, None: a 404). Completions and chat
    serve it as ``empty_model`` whatever that names (``_PromptServing._answer``); on the other endpoints
    (``/tokenize``, ``/v1/responses``, ...) an ``empty_model`` that is an adapter or a LoRA is a 404 that
    says the request names no model (vLLM's would name the model ``None``)."""

    empty_model: str | None

    def _is_model_supported(self, model_name) -> bool:
        if not model_name:
            return self.empty_model is not None and self.models.is_base_model(self.empty_model)
        return super()._is_model_supported(model_name)

    async def _check_model(self, request):
        error = await super()._check_model(request)
        if isinstance(error, ErrorResponse) and error.error.code == 404 and not request.model:
            return self._no_model()
        return error

    def _no_model(self) -> ErrorResponse:
        return self.create_error_response(
            _NO_MODEL, err_type="NotFoundError", status_code=HTTPStatus.NOT_FOUND, param="model"
        )


class _PromptServing(_EmptyName):
    """What completions and chat completions share: adapter names are models, and their token prompts
    become prompt embeddings. Mixed in before vLLM's own serving class."""

    prompt_adapters: PromptAdapters

    def _adapter(self, request) -> str | None:
        resolved = _REQUESTED.get()
        return resolved[0] if resolved is not None and resolved[0] == request.model else None

    async def _resolve(self, request):
        """(name, table) when ``request.model`` names a soft prompt, None when it does not (the base model,
        a LoRA of vLLM's, or no such model: vLLM answers), an ``ErrorResponse`` (400) when its files are
        bad. A directory's adapter is loaded in a worker thread: the event loop serves on meanwhile."""
        name, adapters = request.model, self.prompt_adapters
        if not isinstance(name, str) or not name or self.models.is_base_model(name):
            return None
        task = task_of(name)
        if name in self.models.lora_requests or (task is not None and task[0] in self.models.lora_requests):
            return None  # a LoRA of vLLM's, or a task of a directory adapter that a LoRA's name hides
        try:
            if name in adapters:
                return name, adapters.resolve(name)
            if adapters.directory is None:
                return None
            return name, await asyncio.to_thread(adapters.resolve, name)
        except UnknownAdapterError:
            return None
        except AdapterFileError as err:
            return self.create_error_response(
                f"The prompt adapter of model {name!r} cannot be served: {err}", param="model"
            )

    async def _check_model(self, request):
        if self._adapter(request) is not None:
            if self.request_logger is not None:
                self.request_logger.log_request_body(request)
            return None
        return await super()._check_model(request)

    def _maybe_get_adapters(self, request, *args, **kwargs):
        if self._adapter(request) is not None:
            return None  # no LoRA: the soft prompt travels in the prompt embeddings
        return super()._maybe_get_adapters(request, *args, **kwargs)

    async def _answer(self, handler, request, raw_request):
        """``handler(request, raw_request)`` with the requested adapter and its table resolved once; a
        request naming no model is served as ``empty_model``, or is a 404."""
        if not request.model:  # None (absent) or ""
            if self.empty_model is None:
                return self._no_model()
            request.model = self.empty_model
        resolved = await self._resolve(request)
        if isinstance(resolved, ErrorResponse):
            return resolved
        token = _REQUESTED.set(resolved)
        try:
            return await handler(request, raw_request)
        finally:
            _REQUESTED.reset(token)

    def _unsupported(self, request) -> ErrorResponse | None:
        for field in ("echo", "prompt_logprobs", "prompt_embeds", "suffix"):
            value = getattr(request, field, None)
            if value not in (None, False):
                return self.create_error_response(
                    f"{field} is not supported with a soft prompt (model {request.model!r}): its prompt "
                    "reaches the engine as prompt embeddings",
                    param=field,
                )
        return None

    def _with_soft_prompt(self, name: str, engine_inputs):
        """vLLM's rendered token inputs -> embeds inputs carrying adapter ``name``'s rows first."""
        converted = []
        table = _REQUESTED.get()[1]  # the request's own: what the store does meanwhile cannot change it
        for engine_input in engine_inputs:
            if engine_input.get("type") != "token":
                return self.create_error_response(
                    f"model {name!r} serves a soft prompt: its prompts must be text or token ids, not "
                    f"{engine_input.get('type')} input",
                    param="prompt",
                )
            try:
                embeds = self.prompt_adapters.embeds(name, engine_input["prompt_token_ids"], table)
            except ValueError as err:  # ids outside the vocabulary
                return self.create_error_response(str(err), param="prompt")
            new = embeds_input(
                embeds, prompt=engine_input.get("prompt"), cache_salt=engine_input.get("cache_salt")
            )
            if "arrival_time" in engine_input:
                new["arrival_time"] = engine_input["arrival_time"]
            converted.append(new)
        return converted


class _PromptCompletion(_PromptServing):
    async def create_completion(self, request, raw_request=None):
        return await self._answer(super().create_completion, request, raw_request)

    async def render_completion_request(self, request):
        name = self._adapter(request)
        if name is not None and (error := self._unsupported(request)) is not None:
            return error
        result = await super().render_completion_request(request)
        if name is None or isinstance(result, ErrorResponse):
            return result
        return self._with_soft_prompt(name, result)


class _PromptChat(_PromptServing):
    async def create_chat_completion(self, request, raw_request=None):
        return await self._answer(super().create_chat_completion, request, raw_request)

    async def render_chat_request(self, request):
        name = self._adapter(request)
        if name is not None and (error := self._unsupported(request)) is not None:
            return error
        result = await super().render_chat_request(request)
        if name is None or isinstance(result, ErrorResponse):
            return result
        conversation, engine_inputs = result
        converted = self._with_soft_prompt(name, engine_inputs)
        return converted if isinstance(converted, ErrorResponse) else (conversation, converted)


class _PromptModels:
    """``/v1/models`` lists the adapters; responses name the adapter that served them."""

    prompt_adapters: PromptAdapters

    def model_name(self, lora_request=None) -> str:
        resolved = _REQUESTED.get()
        if lora_request is None and resolved is not None:
            return resolved[0]
        return super().model_name(lora_request)

    async def show_available_models(self):
        models = await super().show_available_models()
        for card in models.data:  # vLLM's root is the base model's path, a LoRA's its directory
            card.root = card.id
        base = self.base_model_paths[0].name
        shown = {card.id for card in models.data}
        names = self.prompt_adapters.names()
        names += await asyncio.to_thread(self.prompt_adapters.directory_names)  # reads the directory
        models.data.extend(
            ModelCard(
                id=name,
                root=name,  # no server path
                parent=base,
                max_model_len=self.model_config.max_model_len,
                permission=[ModelPermission()],
            )
            for name in names
            if name not in shown and (task_of(name) is None or task_of(name)[0] not in shown)
        )
        return models


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _adopt(obj, mixin: type, **attributes) -> None:
    """Give vLLM's serving object ``obj`` the fastprompt behaviour ``mixin`` (a subclass of its own class,
    so every setting vLLM built it with stays) and ``attributes``."""
    cls = type(obj)
    key = (mixin, cls)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"Prompt{cls.__name__}", (mixin, cls), {"__module__": __name__})
    obj.__class__ = _SUBCLASSES[key]
    for name, value in attributes.items():
        setattr(obj, name, value)


def empty_name_model(served: tuple[str, ...], default_model: str | None, adapter_dir) -> str | None:
    """What a request with an empty or missing ``model`` is served as: ``--default-model``, else the base
    model (vLLM's default) unless the server has a directory of adapters (None: a 404)."""
    if default_model is not None:
        return default_model
    return None if adapter_dir is not None else served[0]


def install(state, adapters: PromptAdapters, empty_model: str | None = None) -> None:
    """Make the vLLM app whose ``app.state`` is ``state`` serve ``adapters`` by model name, and a request
    naming no model as ``empty_model`` (None: a 404 on every endpoint that checks its model)."""
    from vllm.entrypoints.serve.engine.serving import BaseServing

    _adopt(state.openai_serving_models, _PromptModels, prompt_adapters=adapters)
    if getattr(state, "openai_serving_completion", None) is not None:
        _adopt(state.openai_serving_completion, _PromptCompletion, prompt_adapters=adapters)
    if getattr(state, "openai_serving_chat", None) is not None:
        _adopt(state.openai_serving_chat, _PromptChat, prompt_adapters=adapters)
    for obj in state._state.values():  # every endpoint: responses, tokenize, Anthropic's, pooling, ...
        if isinstance(obj, BaseServing):
            if not isinstance(obj, _EmptyName):
                _adopt(obj, _EmptyName)
            obj.empty_model = empty_model


def add_adapter_routes(app, adapters: PromptAdapters) -> None:
    """``POST /v1/load_prompt_adapter`` and ``POST /v1/unload_prompt_adapter``."""

    def error(message: str, status: HTTPStatus, param: str) -> JSONResponse:
        # vLLM's create_error_response would mask paths; here the client gave the path, so it is named
        err_type = "NotFoundError" if status == HTTPStatus.NOT_FOUND else "BadRequestError"
        info = ErrorInfo(message=message, type=err_type, param=param, code=status.value)
        return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status.value)

    async def fields(raw: Request, *names):
        try:
            body = await raw.json()
        except ValueError:
            body = None
        values = [body.get(n) if isinstance(body, dict) else None for n in names]
        missing = [n for n, v in zip(names, values, strict=True) if not isinstance(v, str) or not v]
        return values, missing

    @app.post("/v1/load_prompt_adapter")
    async def load_prompt_adapter(raw: Request):
        (name, path), missing = await fields(raw, "adapter_name", "adapter_path")
        if missing:
            return error(f"expected a JSON body with strings {missing}", HTTPStatus.BAD_REQUEST, missing[0])
        try:
            adapters.load(path, name)
        except (AdapterFileError, ValueError) as err:  # a ValueError alone: the name (the base model's)
            param = "adapter_path" if isinstance(err, AdapterFileError) else "adapter_name"
            return error(str(err), HTTPStatus.BAD_REQUEST, param)
        return JSONResponse({"adapter_name": name, "adapter_path": path})

    @app.post("/v1/unload_prompt_adapter")
    async def unload_prompt_adapter(raw: Request):
        (name,), missing = await fields(raw, "adapter_name")
        if missing:
            return error(
                "expected a JSON body with the string 'adapter_name'", HTTPStatus.BAD_REQUEST, "adapter_name"
            )
        try:
            adapters.delete(name)
        except ValueError as err:
            return error(str(err), HTTPStatus.NOT_FOUND, "adapter_name")
        return JSONResponse({"adapter_name": name})


def parse_engine_args(model: str, host: str, port: int, engine_args: list[str]):
    """vLLM's server arguments (its own parser) for ``model`` and ``engine_args``, with the settings soft
    prompts need (``engine_defaults``) where the caller did not set them."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="python -m fastprompt serve MODEL [vLLM arguments]"))
    args = parser.parse_args([*engine_args, "--host", host, "--port", str(port)])
    args.model = model
    args.model_tag = model
    given = {"block_size": args.block_size, "enable_prefix_caching": args.enable_prefix_caching}
    for key, value in engine_defaults({k: v for k, v in given.items() if v is not None}).items():
        setattr(args, key, value)
    validate_parsed_serve_args(args)
    return args


async def run_server(
    args,
    adapter_dirs: dict[str, str],
    *,
    allow_adapter_updates: bool = False,
    adapter_dir: str | None = None,
    max_loaded_adapters: int | None = None,
    default_model: str | None = None,
) -> None:
    """Start vLLM's engine and OpenAI app for ``args``, load the adapters, serve until stopped; the base
    model's served name is ``--served-model-name``'s or ``default_served_name``'s, never a path."""
    import vllm.envs as envs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server
    from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config

    def interrupt(*_) -> None:
        raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, interrupt)
    served_adapters = check_adapter_dirs(adapter_dirs)  # before the engine's start-up, not after it
    if adapter_dir is not None and not os.path.isdir(adapter_dir):
        raise ValueError(f"--adapter-dir {adapter_dir!r} is not a directory")
    named = args.served_model_name is not None
    if not named:  # vLLM's default is the model path: it would reach every client
        args.served_model_name = [default_served_name(args.model)]
    served = tuple(args.served_model_name)
    check_served_names(
        served,
        named=named,
        adapters=tuple(served_adapters),
        adapter_names=tuple(adapter_dirs),  # a multitask adapter's NAME too, which only its tasks serve
        adapter_dir=adapter_dir,
        default_model=default_model,
        other_models=tuple(lora.name for lora in args.lora_modules or ()),
    )
    listen_address, sock = setup_server(args, reuse_port=False)
    async with build_async_engine_client(args) as engine_client:
        supported_tasks = await engine_client.get_supported_tasks()
        app = build_app(args, supported_tasks, engine_client.model_config)
        await init_app_state(engine_client, app.state, args, supported_tasks)
        word_table = read_word_table(
            args.model,
            engine_client.model_config.dtype,
            revision=args.revision,
            trust_remote_code=args.trust_remote_code,
        )
        adapters = PromptAdapters(
            word_table,
            reserved=served,
            adapter_dir=adapter_dir,
            max_loaded=max_loaded_adapters,
            listeners=vllm_listeners(),
        )
        for name, path in adapter_dirs.items():
            adapters.load(path, name)
        install(app.state, adapters, empty_name_model(served, default_model, adapter_dir))
        if allow_adapter_updates:
            add_adapter_routes(app, adapters)
        uvicorn_kwargs = {}
        log_config = get_uvicorn_log_config(args)
        if log_config is not None:
            uvicorn_kwargs["log_config"] = log_config
        shutdown_task = await serve_http(
            app,
            sock=sock,
            enable_ssl_refresh=args.enable_ssl_refresh,
            host=args.host,
            port=args.port,
            log_level=args.uvicorn_log_level,
            access_log=not args.disable_uvicorn_access_log,
            timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
            ssl_keyfile=args.ssl_keyfile,
            ssl_certfile=args.ssl_certfile,
            ssl_ca_certs=args.ssl_ca_certs,
            ssl_cert_reqs=args.ssl_cert_reqs,
            ssl_ciphers=args.ssl_ciphers,
            h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
            h11_max_header_count=args.h11_max_header_count,
            **uvicorn_kwargs,
        )
    try:
        await shutdown_task
    finally:
        sock.close()


def serve(
    model: str,
    adapter_dirs: dict[str, str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    engine_args: list[str] = (),
    allow_adapter_updates: bool = False,
    adapter_dir: str | None = None,
    max_loaded_adapters: int | None = None,
    default_model: str | None = None,
) -> None:
    """``python -m fastprompt serve``: serve ``model`` and the adapters {name: directory} over HTTP, and
    with ``adapter_dir`` every adapter of that directory by its name, on demand (at most
    ``max_loaded_adapters`` tables held); a request naming no model as ``default_model`` (None: the base
    model, or a 404 with ``adapter_dir``). ``names.ServeArgumentError`` before the engine starts if the
    names clash."""
    import uvloop
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    cli_env_setup()
    args = parse_engine_args(model, host, port, list(engine_args))
    configure_logging_from_args(args)
    uvloop.run(
        run_server(
            args,
            adapter_dirs,
            allow_adapter_updates=allow_adapter_updates,
            adapter_dir=adapter_dir,
            max_loaded_adapters=max_loaded_adapters,
            default_model=default_model,
        )
    )
