"""The built-in samplers: how grpo, ppo and sample-pairs draw completions (``--sampler NAME``).

``hf``        transformers' batched ``generate`` with a KV cache, left-padded prompts, molting's
              ``InverseCdfSampler`` (``molting.sampling.sample``): each completion can draw from a random
              stream of its own, so several processes follow one. The default.
``hf-paged``  transformers' continuous batching (``generate_batch``: a paged KV cache, requests scheduled
              as slots free up, no padding), where the installed transformers has it (5.x). Greedy
              completions equal ``hf``'s; sampled ones use transformers' own sampling (the global random
              state, not per-completion streams). The manager (its paged cache) is kept on the model
              between calls (``persistent_manager``): building one takes seconds, and an online stage
              samples every step.
"""

from __future__ import annotations

import logging
from typing import Any

import molting
from molting.components import Sampler

PAGE = 256  # tokens per page of the paged cache (transformers' default)


def _paged_available() -> str | None:
    from transformers import GenerationMixin

    if not hasattr(GenerationMixin, "generate_batch"):
        import transformers

        return f"transformers {transformers.__version__} has no continuous batching (generate_batch); use --sampler hf"
    return None


def hf_sample(request: Any) -> Any:
    from molting.sampling import hf_sample

    return hf_sample(request)


def paged_sample(request: Any) -> Any:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from molting.sampling import pad_token_id, prompt_token_ids, samples_from_ids, stop_token_ids

    model, tokenizer = request.model, request.tokenizer
    repeated, prompts = prompt_token_ids(request)
    pad = pad_token_id(tokenizer)
    sampled = request.temperature > 0
    config = GenerationConfig(
        max_new_tokens=request.max_new_tokens, do_sample=sampled, eos_token_id=stop_token_ids(model, tokenizer),
        pad_token_id=pad, **({"temperature": request.temperature, "top_p": request.top_p,
                              "top_k": request.top_k or None} if sampled else {}))
    # the cache sized to this request (by default it takes most of the free memory, on CPU of the machine's RAM,
    # and a kept one would hold it through the training step): a page per PAGE tokens of each completion
    blocks = sum(-(-(len(p) + request.max_new_tokens) // PAGE) for p in prompts) + 1
    batch_tokens = max(4096, max(map(len, prompts)) + 1)
    sizes = ContinuousBatchingConfig(page_size=PAGE, num_blocks=blocks, max_batch_tokens=batch_tokens)
    settings = (config.to_json_string(), blocks, batch_tokens)
    if getattr(model, "_molting_paged_settings", None) != settings:  # a kept manager decodes with ITS first config
        model.destroy_cached_continuous_batching_manager()
        model._molting_paged_settings = settings
    was_training = model.training
    model.eval()
    quiet = logging.getLogger("ContinuousBatchingLogger")  # says that a kept manager was sized for this workload
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        outputs = model.generate_batch(prompts, generation_config=config, continuous_batching_config=sizes,
                                       progress_bar=False, persistent_manager=True)
    finally:
        quiet.setLevel(level)
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
