"""``molting serve``: a model behind an OpenAI-compatible HTTP API.

``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``, served by
FastAPI on uvicorn (the stack vLLM's and TGI's OpenAI front ends use), so any
OpenAI client can talk to a trained model, and a served model can be the
judge of another run (the ``openai`` judges).

Requests are batched: every request waiting when the model is free joins
the next ``generate`` call (:class:`Engine`), up to ``max_batch_size``
completions; a request's ``n`` completions are separate rows. Generation is
molting's own (:func:`molting.sampling.sample`): chat prompts go through the
model's chat template, decoding follows the request's settings and nothing
of the model's ``generation_config``, and each completion draws from a
random stream of its own (from the request's ``seed`` when given), so what a
request gets does not depend on which others share its batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import secrets
import sys
import threading
import time
import uuid
from typing import Any, Literal

import attrs
from pydantic import BaseModel, ConfigDict, Field

FINISH = ("stop", "length")
"""OpenAI's finish reasons that molting returns: a stop token or string, or ``max_tokens``."""


# --------------------------------------------------------------------------- requests


class _Sampling(BaseModel):
    """The sampling fields shared by both endpoints (unknown OpenAI fields are accepted and ignored)."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class RequestError(Exception):
    """A request the server cannot answer: sent back as OpenAI's error object with ``status``."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


def message_content(content: Any) -> str:
    """A message's text: a string, or the text parts of OpenAI's list-of-parts form."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.get("text", "") for part in content if part.get("type", "text") == "text")


# --------------------------------------------------------------------------- the engine


@attrs.frozen
class Settings:
    """How ``molting serve`` batches and bounds generation."""

    max_batch_size: int = 16
    """Completions per ``generate`` call."""
    batch_wait: float = 0.005
    """Seconds the engine waits, after a request arrives at an idle model, for others to join its batch."""
    max_new_tokens: int = 256
    """``max_tokens`` of a request that gives none (cut to what the context leaves)."""


@attrs.frozen
class Job:
    """One completion to draw: its prompt, settings and where its result goes."""

    prompt: Any  # a string, or a message list for the chat template
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    future: concurrent.futures.Future

    @property
    def decoding(self) -> tuple[float, float, int]:
        return self.temperature, self.top_p, self.top_k


@attrs.frozen
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class Engine:
    """One thread that owns the model: it takes waiting jobs in batches and draws their completions."""

    def __init__(self, model: Any, tokenizer: Any, settings: Settings) -> None:
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.context = _context_length(model)
        self.batches = 0
        self.thread = threading.Thread(target=self._loop, name="molting-serve-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=60)

    def submit(self, prompt: Any, max_tokens: int, temperature: float, top_p: float, top_k: int,
               seed: int) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs.put(Job(prompt, max_tokens, temperature, top_p, top_k, seed, future))
        return future

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            for group in _by_decoding(batch):
                self._run(group)

    def _next_batch(self) -> list[Job] | None:
        first = self.jobs.get()
        if first is None:
            return None
        batch, deadline = [first], time.monotonic() + self.settings.batch_wait
        while len(batch) < self.settings.max_batch_size:
            try:
                job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self.jobs.put(None)  # stop once this batch is done
                break
            batch.append(job)
        return batch

    def _run(self, jobs: list[Job]) -> None:
        from molting.sampling import sample

        temperature, top_p, top_k = jobs[0].decoding
        try:
            samples = sample(self.model, self.tokenizer, [job.prompt for job in jobs], n=1,
                             max_new_tokens=max(job.max_tokens for job in jobs), temperature=temperature,
                             top_p=top_p, top_k=top_k, batch_size=len(jobs), seeds=[job.seed for job in jobs])
        except Exception as exc:  # the requests fail; the server goes on
            for job in jobs:
                job.future.set_exception(exc)
            return
        self.batches += 1
        prompt_tokens = samples.prompt_mask.sum(dim=1).tolist()
        for row, job in enumerate(jobs):
            job.future.set_result(self._completion(samples, row, job, prompt_tokens[row]))

    def _completion(self, samples: Any, row: int, job: Job, prompt_tokens: int) -> Completion:
        """Row ``row`` cut to the job's own ``max_tokens`` (its batch drew as many as the longest asked for)."""
        length = int(samples.completion_mask[row].sum())
        ended = not bool(samples.truncated[row]) and length <= job.max_tokens
        kept = min(length, job.max_tokens)
        text = self.tokenizer.decode(samples.completion_ids[row, :kept], skip_special_tokens=True)
        return Completion(text, "stop" if ended else "length", prompt_tokens, kept)


def _by_decoding(jobs: list[Job]) -> list[list[Job]]:
    """Jobs grouped by temperature, top-p and top-k: one ``generate`` call decodes with one setting."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.decoding, []).append(job)
    return list(groups.values())


def _context_length(model: Any) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


# --------------------------------------------------------------------------- answering a request


async def complete(engine: Engine, request: _Sampling, prompts: list[Any]) -> list[list[Completion]]:
    """``request.n`` completions of each prompt, each ending at a stop token, ``max_tokens`` or a stop string."""
    limit = _max_tokens(engine, request, prompts)
    seeds = _seeds(request.seed, len(prompts) * request.n)
    futures = [engine.submit(prompt, limit, request.temperature, request.top_p, request.top_k, seeds[i * request.n + k])
               for i, prompt in enumerate(prompts) for k in range(request.n)]
    results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    results = [_cut_at_stop(c, stops) for c in results]
    return [results[i * request.n : (i + 1) * request.n] for i in range(len(prompts))]


def _max_tokens(engine: Engine, request: _Sampling, prompts: list[Any]) -> int:
    """The request's ``max_tokens``, or the server's default cut to what the context leaves; refused when the
    prompt and ``max_tokens`` do not fit the model's context."""
    from molting.data import with_bos
    from molting.sampling import prompt_texts

    asked = request.max_completion_tokens or request.max_tokens
    if engine.context is None:
        return asked or engine.settings.max_new_tokens
    try:
        texts = [with_bos(t, engine.tokenizer) for t in prompt_texts(prompts, engine.tokenizer)]
    except Exception as exc:  # an empty prompt, a chat prompt for a model without a chat template
        raise RequestError(str(exc), param="messages" if isinstance(prompts[0], list) else "prompt") from exc
    longest = max(len(ids) for ids in engine.tokenizer(texts, add_special_tokens=False)["input_ids"])
    room = engine.context - longest
    if room < 1 or (asked is not None and asked > room):
        raise RequestError(
            f"This model's maximum context length is {engine.context} tokens. However, you requested "
            f"{longest + (asked or 0)} tokens ({longest} in the prompt, {asked or 0} for the completion). Please "
            "reduce the prompt or max_tokens.", param="max_tokens")
    return asked or min(engine.settings.max_new_tokens, room)


def _seeds(seed: int | None, count: int) -> list[int]:
    from molting.sampling import completion_seeds

    return completion_seeds(secrets.randbits(62) if seed is None else seed, 0, 0, count)


def _cut_at_stop(completion: Completion, stops: list[str]) -> Completion:
    cuts = [completion.text.find(s) for s in stops if s and s in completion.text]
    if not cuts:
        return completion
    return attrs.evolve(completion, text=completion.text[: min(cuts)], finish_reason="stop")


def _usage(choices: list[list[Completion]]) -> dict[str, int]:
    prompt = sum(group[0].prompt_tokens for group in choices)
    completion = sum(c.completion_tokens for group in choices for c in group)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_response(name: str, choices: list[Completion], usage: dict[str, int]) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": name,
        "choices": [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                     "logprobs": None} for i, c in enumerate(choices)],
        "usage": usage,
    }


def completion_response(name: str, choices: list[list[Completion]], usage: dict[str, int]) -> dict[str, Any]:
    flat = [c for group in choices for c in group]
    return {
        "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": name,
        "choices": [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                    for i, c in enumerate(flat)],
        "usage": usage,
    }


def stream_events(response: dict[str, Any], kind: Literal["chat", "text"]) -> list[str]:
    """A finished response as server-sent events, as a streaming client reads them: one chunk with each
    choice's whole text, then ``[DONE]`` (molting does not stream token by token)."""
    import json

    chunk = {key: response[key] for key in ("id", "created", "model")}
    chunk["object"] = "chat.completion.chunk" if kind == "chat" else "text_completion"
    events = []
    for choice in response["choices"]:
        if kind == "chat":
            delta = {"index": choice["index"], "delta": {"role": "assistant", "content": choice["message"]["content"]},
                     "finish_reason": choice["finish_reason"]}
        else:
            delta = {key: choice[key] for key in ("index", "text", "finish_reason")}
        events.append(f"data: {json.dumps({**chunk, 'choices': [delta]})}\n\n")
    return events + ["data: [DONE]\n\n"]


# --------------------------------------------------------------------------- the app


def create_app(model: Any, tokenizer: Any, name: str, settings: Settings = Settings(),
               api_key: str | None = None) -> Any:
    """The FastAPI application serving ``model`` as ``name`` (its engine starts and stops with the app's lifespan).

    With ``api_key`` every request must carry ``Authorization: Bearer API_KEY``.
    """
    from fastapi import FastAPI

    engine = Engine(model, tokenizer, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="molting serve", lifespan=lifespan)
    app.state.engine, app.state.name = engine, name
    _add_error_handlers(app, api_key)
    _add_routes(app, engine, name)
    return app


def _add_routes(app: Any, engine: Engine, name: str) -> None:
    from fastapi.responses import StreamingResponse

    def check_model(request: _Sampling) -> None:
        if request.model != name:
            raise RequestError(f"The model `{request.model}` does not exist. This server serves `{name}`.", 404, "model")

    def answer(response: dict[str, Any], request: _Sampling, kind: Literal["chat", "text"]) -> Any:
        if not request.stream:
            return response
        return StreamingResponse(iter(stream_events(response, kind)), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "molting"}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "batches": engine.batches}

    @app.post("/v1/chat/completions")
    async def chat(request: ChatRequest) -> Any:
        check_model(request)
        messages = [{**m.model_dump(exclude_none=True), "content": message_content(m.content)}
                    for m in request.messages]
        choices = await complete(engine, request, [messages])
        return answer(chat_response(name, choices[0], _usage(choices)), request, "chat")

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest) -> Any:
        check_model(request)
        prompts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
        if not prompts:
            raise RequestError("prompt is empty", param="prompt")
        choices = await complete(engine, request, prompts)
        return answer(completion_response(name, choices, _usage(choices)), request, "text")


def _add_error_handlers(app: Any, api_key: str | None) -> None:
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    def error(message: str, status: int, param: str | None = None, kind: str = "invalid_request_error") -> Any:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> Any:
        return error(str(exc), exc.status, exc.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Any:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        first = exc.errors()[0]["loc"][1:] if exc.errors() else ()
        return error(f"invalid request: {problems}", 400, ".".join(map(str, first)) or None)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> Any:
        return error(f"generation failed: {type(exc).__name__}: {exc}", 500, kind="server_error")

    if api_key is not None:
        @app.middleware("http")
        async def authorise(request: Request, call_next: Any) -> Any:
            if request.url.path.startswith("/v1/") and request.headers.get("authorization") != f"Bearer {api_key}":
                return error("Incorrect API key provided.", 401, kind="authentication_error")
            return await call_next(request)


# --------------------------------------------------------------------------- running it


def serve(model_id: str, host: str = "127.0.0.1", port: int = 8000, name: str | None = None,
          settings: Settings = Settings(), dtype: str = "auto", trust_remote_code: bool = False,
          api_key_env: str | None = None, log_level: str = "warning") -> None:
    """Load ``model_id`` (a directory or hub id) and serve it until SIGINT or SIGTERM.

    ``port`` 0 takes a free port; the address is printed once the socket is
    bound (``molting: serving NAME at http://HOST:PORT/v1``), so a script can
    wait for that line.
    """
    from molting.openai_api import key_from_env

    api_key = key_from_env(api_key_env, "molting serve", "--api-key-env") if api_key_env else None
    app = loaded_app(model_id, name or model_id, settings, dtype, trust_remote_code, api_key)
    server, sock = _bound(app, host, port, log_level, timeout_graceful_shutdown=30)
    print(f"molting: serving {name or model_id} at http://{host}:{sock.getsockname()[1]}/v1 (Ctrl-C stops it)",
          file=sys.stderr, flush=True)
    with _signals_end_quietly():
        server.run(sockets=[sock])  # uvicorn stops on SIGINT and SIGTERM: no new requests, in-flight ones end
    print("molting: server stopped", file=sys.stderr, flush=True)


def loaded_app(model_id: str | None, name: str, settings: Settings = Settings(), dtype: str = "auto",
               trust_remote_code: bool = False, api_key: str | None = None) -> Any:
    """:func:`create_app` for ``model_id`` (a directory or hub id; None: the demo model), loaded for inference
    (on the GPU when there is one)."""
    from molting.models import load_causal_lm, resolve_model_path

    path = resolve_model_path(model_id, trust_remote_code=trust_remote_code)
    model, tokenizer = load_causal_lm(path, dtype=_dtype(dtype), trust_remote_code=trust_remote_code)
    return create_app(_to_device(model).requires_grad_(False).eval(), tokenizer, name, settings, api_key)


def _bound(app: Any, host: str, port: int, log_level: str, **config: Any) -> tuple[Any, Any]:
    """A uvicorn server for ``app`` and the socket it will serve on, already bound (port 0: a free one)."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, **config)), sock


@contextlib.contextmanager
def _signals_end_quietly():
    """uvicorn raises the SIGINT or SIGTERM that stopped it again once it has shut down, which would end the
    process with a KeyboardInterrupt or the signal's status; here that second delivery does nothing, so a
    clean stop exits 0."""
    import signal

    saved = {sig: signal.signal(sig, lambda *args: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _dtype(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def _to_device(model: Any) -> Any:
    import torch

    return model.cuda() if torch.cuda.is_available() else model


@attrs.frozen
class Background:
    """A server running in a thread of this process: its ``url`` (``http://127.0.0.1:PORT/v1``) and ``stop``."""

    url: str
    name: str
    server: Any
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve_in_thread(model_id: str | None = None, name: str = "demo", settings: Settings = Settings()) -> Background:
    """Serve ``model_id`` (None: the built-in demo model) from a thread of this process, on a free port of
    127.0.0.1; returns once it answers. For the conformance checks' examples, notebooks and benchmarks."""
    server, sock = _bound(loaded_app(model_id, name, settings), "127.0.0.1", 0, "error")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="molting-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server for {model_id or 'the demo model'} did not start")
        time.sleep(0.02)
    return Background(f"http://127.0.0.1:{sock.getsockname()[1]}/v1", name, server, thread)


_DEMO: list[Background] = []


def demo_server() -> Background:
    """The built-in demo model served from a thread, started on first use and kept for the process (what the
    HTTP components' conformance examples call)."""
    if not _DEMO or not _DEMO[0].thread.is_alive():
        _DEMO[:] = [serve_in_thread(None, "demo")]
    return _DEMO[0]


def spawn(model_id: str, *options: str, log: Any = None, env: Any = None, timeout: float = 120) -> tuple[Any, str]:
    """``molting serve MODEL --port 0 OPTIONS`` in a subprocess, as a user starts it; returns the process and its
    URL once it listens (its address line). Its stderr goes to ``log`` (a path; a temporary file when None),
    kept as ``process.log_path``: a pipe nobody reads would stall the server once full."""
    import os
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    path = Path(log) if log else Path(tempfile.mkstemp(prefix="molting-serve-", suffix=".log")[1])
    with path.open("w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "molting", "serve", str(model_id), *options, "--port", "0"],
                                   stderr=handle, text=True, env={**os.environ, **(env or {})})
    process.log_path = path
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"serving \S+ at (http://\S+/v1)", path.read_text())
        if found:
            return process, found.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"molting serve {model_id} did not start: {path.read_text()[-2000:]}")
