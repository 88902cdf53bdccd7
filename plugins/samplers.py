"""The built-in samplers: how grpo, ppo and sample-pairs draw completions (``--sampler NAME``).

``hf``        transformers' batched ``generate`` with a KV cache, left-padded prompts, molting's
              ``InverseCdfSampler`` (``molting.sampling.sample``): each completion can draw from a random
              stream of its own, so several processes follow one. The default.
``hf-paged``  transformers' continuous batching (``generate_batch``: a paged KV cache, requests scheduled
              as slots free up, no padding), where the installed transformers has it (5.x). Greedy
              completions equal ``hf``'s; sampled ones use transformers' own sampling (the global random
              state, not per-completion streams).
"""

from __future__ import annotations

from typing import Any

import molting
from molting.components import Sampler
from molting.sampling import SamplingRequest, hf_sample, prompt_token_ids, samples_from_ids, stop_token_ids


def _paged_available() -> str | None:
    from transformers import GenerationMixin

    if not hasattr(GenerationMixin, "generate_batch"):
        import transformers

        return f"transformers {transformers.__version__} has no continuous batching (generate_batch); use --sampler hf"
    return None


def paged_sample(request: SamplingRequest) -> Any:
    from transformers import GenerationConfig

    model, tokenizer = request.model, request.tokenizer
    repeated, prompts = prompt_token_ids(request)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampled = request.temperature > 0
    config = GenerationConfig(
        max_new_tokens=request.max_new_tokens, do_sample=sampled, eos_token_id=stop_token_ids(model, tokenizer),
        pad_token_id=pad, **({"temperature": request.temperature, "top_p": request.top_p,
                              "top_k": request.top_k or None} if sampled else {}))
    was_training = model.training
    model.eval()
    try:
        outputs = model.generate_batch(prompts, generation_config=config, progress_bar=False)
    finally:
        model.train(was_training)
    by_prompt = list(outputs.values())
    completions = [list(output.generated_tokens) for output in sorted(by_prompt, key=lambda o: _order(o.request_id))]
    return samples_from_ids(request, repeated, prompts, completions)


def _order(request_id: str) -> int:
    """``req_12`` → 12: generate_batch names its requests by their place in the input."""
    return int(request_id.rsplit("_", 1)[-1])


@molting.hookimpl
def molting_register_samplers(register):
    register(Sampler(name="hf", sample=hf_sample, per_completion_seeds=True,
                     description="Batched generate with a KV cache; per-completion random streams (the default)."))
    register(Sampler(name="hf-paged", sample=paged_sample, available=_paged_available,
                     description="Transformers' continuous batching with a paged KV cache (generate_batch)."))
