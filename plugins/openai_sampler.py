"""The ``openai`` sampler: completions drawn from a model behind any OpenAI-compatible endpoint.

For one-shot sampling before offline training (``--plugin sample-pairs``):
the served model (vLLM, ``molting serve``, a hosted API) answers each
prompt ``n`` times, and no weights need to follow training. Stages that
train on their samples (grpo, ppo) refuse it (``Sampler.follows_policy``).
Chat prompts (message lists) go to ``/chat/completions`` and the server's
chat template; text prompts to ``/completions``. The answers are tokenised
with the run's tokenizer, with the stop token after an answer the server
ended itself, so the stage sees what the ``hf`` sampler returns. With the
stage's per-completion seeds, each prompt's request carries the seed of its
first completion. ``max_prompt_length`` does not apply: the server sees the
whole prompt.
"""

from __future__ import annotations

from typing import Any

import attrs

import molting
from molting.components import Sampler
from molting.errors import ModelError
from molting.openai_api import Endpoint


@attrs.frozen
class OpenAISamplerParams(Endpoint):
    """Settings of the ``openai`` sampler (``sampler_args`` / ``--sampler-arg``): ``base_url`` and ``model`` are
    required (:class:`molting.openai_api.Endpoint` has the rest)."""


def openai_sample(request: Any) -> Any:
    from molting.openai_api import client_for
    from molting.sampling import prompt_token_ids, samples_from_ids, stop_token_ids

    endpoint = Endpoint.of(request.settings or OpenAISamplerParams())
    client = client_for(endpoint, "sampler 'openai'")
    replies = _ask(client, request)
    tokenizer, stop = request.tokenizer, stop_token_ids(request.model, request.tokenizer)
    completions = []
    for index, reply in enumerate(replies):
        if not hasattr(reply, "texts"):  # a CallFailed: the stage cannot go on without the prompt's samples
            raise ModelError(f"sampler 'openai': no completions of prompt {index} from {endpoint.base_url}: "
                             f"{reply.reason}")
        for text, reason in zip(reply.texts, reply.finish_reasons):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][: request.max_new_tokens]
            completions.append(ids + stop[:1] if reason == "stop" and len(ids) < request.max_new_tokens else ids)
    repeated, prompts = prompt_token_ids(attrs.evolve(request, max_prompt_length=None))
    return samples_from_ids(request, repeated, prompts, completions)


def _ask(client: Any, request: Any) -> list[Any]:
    """One request per prompt (``n`` choices each): chat prompts and text prompts to their endpoints."""
    def body(index: int, prompt: Any) -> dict[str, Any]:
        fields = {"n": request.n, "max_tokens": request.max_new_tokens, "temperature": request.temperature,
                  "top_p": request.top_p}
        if request.top_k:
            fields["top_k"] = request.top_k  # vLLM's and molting serve's extension
        if request.seeds is not None:
            fields["seed"] = int(request.seeds[index * request.n])
        return {**fields, ("prompt" if isinstance(prompt, str) else "messages"): prompt}

    chat = [i for i, p in enumerate(request.prompts) if not isinstance(p, str)]
    text = [i for i, p in enumerate(request.prompts) if isinstance(p, str)]
    replies: dict[int, Any] = {}
    for indices, call in ((chat, client.chat_many), (text, client.complete_many)):
        if indices:
            replies.update(zip(indices, call([body(i, request.prompts[i]) for i in indices])))
    return [replies[i] for i in range(len(request.prompts))]


def _example(workdir: Any) -> dict[str, Any]:
    """For the conformance checks: the built-in demo model, served from a thread of this process."""
    from molting.serve import demo_server

    server = demo_server()
    return {"base_url": server.url, "model": server.name}


@molting.hookimpl
def molting_register_samplers(register):
    register(Sampler(name="openai", sample=openai_sample, params=OpenAISamplerParams, follows_policy=False,
                     example=_example,
                     description="A served model (any OpenAI-compatible endpoint); one-shot sampling (sample-pairs)."))
