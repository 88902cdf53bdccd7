"""A client of OpenAI-compatible HTTP servers, for judges and samplers that call a served model.

vLLM, Ollama, llama.cpp's server, TGI, ``molting serve`` and the hosted APIs
all answer ``POST {base_url}/chat/completions``. :class:`Client` sends many
such requests at once (at most ``concurrency`` in flight, over one httpx
connection pool), gives each ``timeout`` seconds in all, and retries what
is worth retrying: connection errors, dropped connections, timeouts and the
statuses OpenAI's own client retries (408, 409, 429, 5xx), waiting
``backoff · 2^attempt`` seconds (±50 % jitter, at most ``MAX_BACKOFF``; a
``Retry-After`` header wins). A request that still fails, or whose reply is
not an OpenAI chat completion, becomes a :class:`CallFailed` in the results
rather than an exception, so the caller decides what a failure means.

The retry loop is molting's own, a dozen lines, rather than tenacity's or
httpx's transport retries: those retry connection errors only, and the
policy here (which statuses, ``Retry-After``, the counts reported as
metrics) is the one OpenAI's client documents.

The API key is read from the environment variable named by ``api_key_env``
when the client is made; settings hold the variable's name only, so the key
never reaches a recipe, ``molting_run.json``, a model card or a log.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any, Mapping, Sequence

import attrs

from molting.errors import ConfigError

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_BACKOFF = 30.0
"""Longest wait between two attempts, in seconds (also the cap on a server's Retry-After)."""


def _text_or_none(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"setting {attribute.name} must be a non-empty string, got {value!r}")


def _at_least(minimum: float, strict: bool = False, integer: bool = False):
    def validate(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        number = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
        if not number or not (value > minimum if strict else value >= minimum):
            kind = "an integer" if integer else "a number"
            raise ValueError(f"setting {attribute.name} must be {kind} {'>' if strict else '≥'} {minimum:g}, "
                             f"got {value!r}")
    return validate


@attrs.frozen
class Endpoint:
    """Where and how to call: an OpenAI-compatible server's ``base_url`` (ending in ``/v1``) and ``model``.

    The settings every HTTP component shares: the ``openai`` judges' and the
    ``openai`` sampler's settings classes extend this one.
    """

    base_url: str | None = attrs.field(default=None, validator=_text_or_none)
    """The server's API root, e.g. ``http://127.0.0.1:8000/v1``; required."""
    model: str | None = attrs.field(default=None, validator=_text_or_none)
    """The model name the server knows (``molting serve --model-name``, ``GET /v1/models``); required."""
    api_key_env: str | None = attrs.field(default=None, validator=_text_or_none)
    """The environment variable holding the API key (sent as ``Authorization: Bearer``); None: no key."""
    timeout: float = attrs.field(default=60.0, validator=_at_least(0, strict=True))
    """Seconds one attempt may take in all (connecting, waiting, reading)."""
    max_retries: int = attrs.field(default=4, validator=_at_least(0, integer=True))
    """Retries of a request after the first attempt."""
    backoff: float = attrs.field(default=0.5, validator=_at_least(0))
    """Seconds before the first retry; doubled at each next one."""
    concurrency: int = attrs.field(default=8, validator=_at_least(1, integer=True))
    """Requests in flight at once."""

    @classmethod
    def of(cls, settings: Any) -> "Endpoint":
        """The endpoint part of a component's settings (a subclass instance)."""
        return cls(**{field.name: getattr(settings, field.name) for field in attrs.fields(cls)})


@attrs.frozen
class CallFailed:
    """A request that did not yield an answer: why, after how many attempts."""

    reason: str
    attempts: int


@attrs.frozen
class Reply:
    """The texts of a completion's choices, why each ended (``stop`` or ``length``), and what they took."""

    texts: list[str]
    finish_reasons: list[str | None]
    latency: float
    attempts: int


@attrs.define
class CallStats:
    """Counters over a client's life: the metrics a judge reports."""

    requests: int = 0
    attempts: int = 0
    retries: int = 0
    failed: int = 0
    latency: float = 0.0  # summed over answered requests

    def as_metrics(self) -> dict[str, float]:
        answered = self.requests - self.failed
        return {"requests": self.requests, "retries": self.retries, "failed_calls": self.failed,
                "latency_mean": self.latency / answered if answered else 0.0}


def key_from_env(variable: str, who: str, setting: str = "api_key_env") -> str:
    """The API key in environment variable ``variable``; a :class:`ConfigError` naming ``who`` and the ``setting``
    that names the variable when it is unset or empty. Settings hold the name, never the key."""
    key = os.environ.get(variable)
    if not key:
        raise ConfigError(f"{who}: {setting} names the environment variable {variable}, which is not set; export "
                          f"{variable}=YOUR_KEY (the key itself is never written to settings)")
    return key


def api_key(endpoint: Endpoint, who: str) -> str | None:
    """The key from ``endpoint.api_key_env`` (None when it names no variable)."""
    return key_from_env(endpoint.api_key_env, who) if endpoint.api_key_env else None


_CLIENTS: dict[tuple[Endpoint, str], "Client"] = {}


def client_for(endpoint: Endpoint, who: str) -> "Client":
    """The process's one :class:`Client` of ``endpoint`` for component ``who``: its counters are that
    component's, over the whole run."""
    if (endpoint, who) not in _CLIENTS:
        _CLIENTS[endpoint, who] = Client(endpoint, who)
    return _CLIENTS[endpoint, who]


class Client:
    """Chat completions from one endpoint, many at a time, with retries (see the module's doc)."""

    def __init__(self, endpoint: Endpoint, who: str = "the OpenAI client") -> None:
        for setting in ("base_url", "model"):
            if getattr(endpoint, setting) is None:
                raise ConfigError(
                    f"{who} needs {setting} (base_url: http://HOST:PORT/v1, model: NAME): any OpenAI-compatible "
                    "server, e.g. molting serve, vLLM, Ollama, llama.cpp's server or a hosted API")
        self.endpoint = endpoint
        self.root = endpoint.base_url.rstrip("/")
        key = api_key(endpoint, who)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.stats = CallStats()

    def chat_many(self, bodies: Sequence[Mapping[str, Any]]) -> list[Reply | CallFailed]:
        """One reply (or failure) per request body (``messages`` and sampling fields; ``model`` is filled in)."""
        from molting.judging import run_coroutine

        return run_coroutine(self._all("/chat/completions", bodies))

    def complete_many(self, bodies: Sequence[Mapping[str, Any]]) -> list[Reply | CallFailed]:
        """As :meth:`chat_many`, for plain-text prompts (``prompt``): ``POST /completions``."""
        from molting.judging import run_coroutine

        return run_coroutine(self._all("/completions", bodies))

    async def _all(self, path: str, bodies: Sequence[Mapping[str, Any]]) -> list[Reply | CallFailed]:
        import httpx

        gate = asyncio.Semaphore(self.endpoint.concurrency)
        limits = httpx.Limits(max_connections=self.endpoint.concurrency)
        async with httpx.AsyncClient(headers=self.headers, limits=limits, timeout=self.endpoint.timeout) as http:
            async def one(body: Mapping[str, Any]) -> Reply | CallFailed:
                async with gate:
                    return await self._with_retries(http, self.root + path, {"model": self.endpoint.model, **body})

            return list(await asyncio.gather(*(one(body) for body in bodies)))

    async def _with_retries(self, http: Any, url: str, body: Mapping[str, Any]) -> Reply | CallFailed:
        self.stats.requests += 1
        started = time.monotonic()
        for attempt in range(self.endpoint.max_retries + 1):
            self.stats.attempts += 1
            self.stats.retries += attempt > 0
            outcome, wait = await self._attempt(http, url, body)
            if isinstance(outcome, list):
                self.stats.latency += time.monotonic() - started
                texts, reasons = [text for text, _ in outcome], [reason for _, reason in outcome]
                return Reply(texts, reasons, time.monotonic() - started, attempt + 1)
            if wait is None or attempt == self.endpoint.max_retries:
                self.stats.failed += 1
                tries = f" after {attempt + 1} attempts" if attempt else ""
                return CallFailed(f"{outcome}{tries}", attempt + 1)
            await asyncio.sleep(wait if wait > 0 else self._backoff(attempt))
        raise AssertionError("unreachable")

    async def _attempt(self, http: Any, url: str, body: Mapping[str, Any]) -> tuple[list[tuple] | str, float | None]:
        """``([(text, finish reason)], None)``, or ``(why it failed, seconds to wait before retrying: 0 for the
        backoff; None: don't retry)``."""
        import httpx

        try:
            response = await asyncio.wait_for(http.post(url, json=body), self.endpoint.timeout)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            return f"no answer from {url} within {self.endpoint.timeout:g} s", 0.0
        except httpx.TransportError as exc:  # refused, reset, dropped mid-answer
            return f"{type(exc).__name__} calling {url}: {exc or 'connection lost'}", 0.0
        if response.status_code != 200:
            retry = response.status_code in RETRY_STATUSES
            return f"HTTP {response.status_code} from {url}: {_server_message(response)}", (
                _retry_after(response) if retry else None)
        choices = _choices(response)
        if choices is None:
            return f"the reply from {url} is not an OpenAI completion: {response.text[:120]!r}", None
        return choices, None

    def _backoff(self, attempt: int) -> float:
        return min(MAX_BACKOFF, self.endpoint.backoff * 2 ** attempt) * random.uniform(0.5, 1.5)


def _choices(response: Any) -> list[tuple[str, str | None]] | None:
    """Each choice's text (a chat message's content or a completion's text) and finish reason; None: not OpenAI's."""
    try:
        choices = sorted(response.json()["choices"], key=lambda c: c.get("index", 0))
        read = [(c["message"]["content"] if "message" in c else c["text"], c.get("finish_reason")) for c in choices]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return [(t or "", r) for t, r in read] if read and all(isinstance(t, (str, type(None))) for t, _ in read) else None


def _server_message(response: Any) -> str:
    try:
        error = response.json()["error"]
        return str(error.get("message", error) if isinstance(error, Mapping) else error)[:200]
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase


def _retry_after(response: Any) -> float:
    """The server's ``Retry-After`` in seconds (capped), or 0: use the backoff."""
    try:
        return min(MAX_BACKOFF, max(0.0, float(response.headers.get("retry-after", 0))))
    except ValueError:
        return 0.0
