"""Sampling completions from a policy and scoring their tokens: what every online stage shares.

:func:`sample` generates ``n`` completions per prompt with ``model.generate``
(batched, KV cache, left-padded prompts) and returns token ids and masks as
trl's online trainers hold them: prompts left-padded, completions
right-padded, each completion's mask running up to and including its first
end-of-sequence token. :func:`completion_token_logps` recomputes the per-token
log-probabilities (and entropies) of those completions under any model, with
the position ids the generation used.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Sequence

import attrs
import torch

from molting.errors import DataError


@attrs.frozen
class Samples:
    """``len(prompts) * n`` sampled completions, grouped by prompt: ``[p0]*n + [p1]*n + ...``."""

    prompts: list[Any]  # each completion's prompt, as given (a string or a message list)
    rows: list[int]  # each completion's prompt's index in the given prompts
    texts: list[str]  # decoded completions, without special tokens
    prompt_ids: torch.Tensor  # (N, P), left-padded
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor  # (N, C), right-padded
    completion_mask: torch.Tensor  # 1 up to and including the first EOS
    truncated: torch.Tensor  # (N,) bool: no EOS within max_new_tokens
    model_mask: torch.Tensor | None = None
    """(N, C): 1 on the completion tokens the model wrote, 0 on those an environment wrote (tool results,
    observations) between its turns; ``None``: the model wrote every completion token."""
    episodes: list[Any] | None = None
    """Multi-turn rollouts (:func:`molting.environments.roll_out`): each completion's
    :class:`molting.environments.EpisodeRecord` (its messages, reward, turns, tool calls)."""

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens of each completion (of a multi-turn episode: the model's and the environment's)."""
        return self.completion_mask.sum(dim=1)

    @property
    def loss_mask(self) -> torch.Tensor:
        """The tokens the losses, the KL term and the entropy count: the model's own (``completion_mask`` without
        what an environment wrote)."""
        return self.completion_mask if self.model_mask is None else self.completion_mask * self.model_mask


def prompt_texts(prompts: Sequence[Any], tokenizer: Any) -> list[str]:
    """Prompts as text: strings as they are, message lists through the tokenizer's chat template."""
    texts = []
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise DataError(f"prompt {index} is empty: an online stage samples answers to prompts, so each needs text")
        if isinstance(prompt, str):
            texts.append(prompt)
        elif not getattr(tokenizer, "chat_template", None):
            raise DataError(f"prompt {index} is a message list, but the model's tokenizer has no chat template")
        else:
            texts.append(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
    return texts


def prompt_rows(rows: list[dict[str, Any]], tokenizer: Any, limit: int, overlong: str, source: str,
                stage: str) -> list[dict[str, Any]]:
    """An online stage's dataset: ``{"index": data row, "row": row}`` for each usable row.

    The rows are checked (:func:`molting.data.check_prompts`: a ``prompt``,
    a non-empty string or a message list, which needs the tokenizer's chat
    template). Prompts longer than ``limit`` tokens, counted as :func:`sample`
    counts them, are dropped (``overlong="drop"``) or kept to be cut to their
    last ``limit`` tokens when sampled, and counted either way.
    """
    import sys

    from molting.data import check_prompts, iter_rows, with_bos

    if check_prompts(rows, source, stage) and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source} is conversational (message lists) but the model's tokenizer has no chat template")
    rows = list(iter_rows(rows))
    texts = [with_bos(text, tokenizer) for text in prompt_texts([r["prompt"] for r in rows], tokenizer)]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    long = [i for i, n in enumerate(lengths) if n > limit]
    if long:
        action = "dropped" if overlong == "drop" else f"cut to their last {limit} tokens"
        print(f"molting: {len(long)} of {len(rows)} prompts (e.g. row {long[0]}) are longer than max_length - "
              f"max_new_tokens = {limit} tokens: {action}", file=sys.stderr)
    dropped = set(long) if overlong == "drop" else set()
    items = [{"index": i, "row": row} for i, row in enumerate(rows) if i not in dropped]
    if not items:
        raise DataError(f"every prompt of {source} is longer than {limit} tokens; raise --max-length")
    return items


@torch.no_grad()
def sample(model: Any, tokenizer: Any, prompts: Sequence[Any], n: int = 1, max_new_tokens: int = 32,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, batch_size: int = 64,
           max_prompt_length: int | None = None, seeds: Sequence[int] | None = None,
           prompt_ids: Sequence[Sequence[int]] | None = None, session: GenerationSession | None = None,
           keys: Sequence[Any] | None = None) -> Samples:
    """``n`` completions for each prompt (temperature 0: greedy), each ending at the first of :func:`stop_token_ids`.

    Generation follows exactly the settings given, as trl's online trainers
    do: nothing of the model's own ``generation_config`` (a hub model's
    ``repetition_penalty``, ``top_k``, ...) applies, so the completions are
    drawn from the distribution the stages' log-probs describe. Tokens are
    drawn by :class:`InverseCdfSampler`. ``max_prompt_length`` keeps the last
    tokens of a longer prompt (its end, where the answer starts), as trl
    truncated prompts. ``prompt_ids`` (one token list per prompt) continues
    those tokens as they are instead of rendering ``prompts``: how a
    multi-turn episode goes on from what the model and its environment wrote.

    ``seeds`` (one per completion, in the order returned) gives each
    completion a random stream of its own instead of the global one: its
    tokens then do not depend on which other completions share its batch or
    process, so one process sampling 16 completions and two sampling 8 each
    draw the same ones (what a multi-process online stage needs to follow the
    one-process run).

    ``session`` (a :class:`GenerationSession`) with ``keys`` (one per prompt:
    which episode it continues) keeps the KV cache of each call for the
    next: a multi-turn rollout's next turn then computes only the tokens
    added since (the observation), not the whole conversation again.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = encode_prompts(prompts, tokenizer, max_prompt_length, prompt_ids)
    repeated = [i for i in range(len(encoded)) for _ in range(n)]
    stops = stop_token_ids(model, tokenizer)
    pad = pad_token_id(tokenizer)
    if seeds is not None and len(seeds) != len(repeated):
        raise ValueError(f"{len(seeds)} seeds for {len(repeated)} completions")
    cached = session is not None and keys is not None and n == 1 and len(encoded) <= batch_size
    prompt_chunks, completion_chunks = [], []
    try:
        for start in range(0, len(repeated), batch_size):
            rows = [encoded[i] for i in repeated[start : start + batch_size]]
            continued = session.inputs(keys, rows, pad, device) if cached else None
            ids, mask = continued[:2] if continued else left_padded(rows, pad, device)
            streams = None if seeds is None else [torch.Generator().manual_seed(int(s))
                                                  for s in seeds[start : start + batch_size]]
            generation, processors = generation_settings(max_new_tokens, temperature, top_p, top_k, stops, pad,
                                                         streams)
            generation.return_dict_in_generate = cached
            with _generation_config(model, generation):
                output = model.generate(input_ids=ids, attention_mask=mask, generation_config=generation,
                                        logits_processor=processors, **({cache_name(): continued[2]} if continued else {}))
            if cached:
                output = session.keep(keys, rows, output, mask, stops)
            prompt_chunks.append((ids, mask))
            completion_chunks.append(output[:, ids.shape[1] :])
    finally:
        model.train(was_training)
    prompt_ids_padded = _pad_left([ids for ids, _ in prompt_chunks], pad)
    prompt_mask = _pad_left([mask for _, mask in prompt_chunks], 0)
    return finish_samples(prompts, repeated, prompt_ids_padded, prompt_mask, _pad_right(completion_chunks, pad), stops,
                          pad, tokenizer)


@functools.cache
def cache_name() -> str:
    """What ``generate`` calls a KV cache, in its arguments and its output: ``cache`` (transformers 5.2x),
    ``past_key_values`` before."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"


class GenerationSession:
    """What :func:`sample` keeps between the turns of one multi-turn rollout: the last call's KV cache, the token
    rows it covers (left padding, each row's turns, the padding between them) and their attention mask.

    A turn continues an episode when the episode's tokens start with what
    its row covers: the new tokens (the observation) are appended after
    padding that the attention mask hides, the cache keeps the rows of the
    episodes still going, and ``generate`` computes the new tokens only.
    Positions follow the attention mask, so every token sits where a fresh
    prefill of the conversation would put it.
    """

    def __init__(self) -> None:
        self.keys: list[Any] = []
        self.covered: list[list[int]] = []
        self.ids: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.cache: Any = None
        self.reused = 0  # calls that continued from the cache (for tests and benchmarks)

    def inputs(self, keys: Sequence[Any], rows: Sequence[Sequence[int]], pad: int,
               device: Any) -> tuple[torch.Tensor, torch.Tensor, Any] | None:
        """Input ids, attention mask and cache that continue ``rows`` (each episode's whole conversation so far),
        or ``None`` when some row does not continue what the cache covers."""
        if self.cache is None or not set(keys) <= set(self.keys):
            return None
        index = [self.keys.index(key) for key in keys]
        added = []
        for position, row in zip(index, rows):
            covered = self.covered[position]
            if list(row[: len(covered)]) != covered or len(row) == len(covered):
                return None
            added.append(list(row[len(covered) :]))
        segment, segment_mask = left_padded(added, pad, device)
        chosen = torch.tensor(index, device=device)
        if len(index) != len(self.keys) or index != sorted(index):
            self.cache.batch_select_indices(chosen)
        self.reused += 1
        return (torch.cat([self.ids[chosen], segment], dim=1), torch.cat([self.mask[chosen], segment_mask], dim=1),
                self.cache)

    def keep(self, keys: Sequence[Any], rows: Sequence[Sequence[int]], output: Any, mask: torch.Tensor,
             stops: Sequence[int]) -> torch.Tensor:
        """Remember ``generate``'s ``output`` (its sequences and cache) for the next turn; its sequences."""
        sequences = output.sequences
        completions = sequences[:, mask.size(1) :]
        is_stop = torch.isin(completions, torch.tensor(list(stops), device=completions.device))
        first = torch.where(is_stop.any(dim=1), is_stop.int().argmax(dim=1), completions.size(1))
        positions = torch.arange(completions.size(1), device=completions.device)
        kept = (positions[None, :] <= first[:, None]).to(mask.dtype)  # up to the stop token; the padding after it hidden
        self.keys, self.ids, self.mask, self.cache = list(keys), sequences, torch.cat([mask, kept], dim=1), \
            getattr(output, cache_name())
        self.covered = [list(row) + completion[: int(length)].tolist()
                        for row, completion, length in zip(rows, completions, kept.sum(dim=1))]
        return sequences


def encode_prompts(prompts: Sequence[Any], tokenizer: Any, max_prompt_length: int | None = None,
                   prompt_ids: Sequence[Sequence[int]] | None = None) -> list[list[int]]:
    """Each prompt's token ids as :func:`sample` feeds them to the model: rendered (a message list through the chat
    template), with the BOS its model was trained with, no other special tokens added, cut to its last
    ``max_prompt_length`` tokens; or ``prompt_ids`` as given (cut the same way)."""
    if prompt_ids is None:
        from molting.data import with_bos

        texts = [with_bos(text, tokenizer) for text in prompt_texts(prompts, tokenizer)]
        prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    elif len(prompt_ids) != len(prompts):
        raise ValueError(f"{len(prompt_ids)} prompt_ids for {len(prompts)} prompts")
    if max_prompt_length is None:
        return [list(ids) for ids in prompt_ids]
    return [list(ids)[-max_prompt_length:] for ids in prompt_ids]


def left_padded(sequences: Sequence[Sequence[int]], pad: int, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one left-padded batch: ``(ids, attention mask)``."""
    width = max(1, max(map(len, sequences)))
    ids = torch.tensor([[pad] * (width - len(s)) + list(s) for s in sequences], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=device)
    return ids, mask


def finish_samples(prompts: Sequence[Any], repeated: list[int], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                   completion_ids: torch.Tensor, stops: list[int], pad: int, tokenizer: Any) -> Samples:
    """:class:`Samples` from left-padded prompts and right-padded raw completions: each completion's mask runs up
    to and including its first stop token, the rest becomes padding, and the texts are decoded (for a sampler)."""
    is_eos = torch.isin(completion_ids, torch.tensor(stops, device=completion_ids.device))
    first_eos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), completion_ids.size(1))
    positions = torch.arange(completion_ids.size(1), device=completion_ids.device)
    completion_mask = (positions[None, :] <= first_eos[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad)
    decoded = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Samples(
        prompts=[prompts[i] for i in repeated],
        rows=repeated,
        texts=decoded,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        truncated=~is_eos.any(dim=1),
    )


@attrs.frozen
class SamplingRequest:
    """What a :class:`molting.Sampler` is asked for: ``n`` completions of each prompt from ``model``, decoded with
    these settings (the arguments of :func:`sample`; temperature 0 is greedy decoding)."""

    model: Any
    tokenizer: Any
    prompts: Sequence[Any]
    n: int = 1
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 64
    max_prompt_length: int | None = None
    seeds: Sequence[int] | None = None
    session: GenerationSession | None = None
    """Kept by a multi-turn rollout from turn to turn (with ``keys``, one per prompt): a sampler that can reuses
    its KV cache through it; one that cannot ignores it."""
    keys: Sequence[Any] | None = None
    """Each prompt's episode (``session``'s key)."""
    prompt_ids: Sequence[Sequence[int]] | None = None
    """Each prompt's token ids, to continue as they are (a multi-turn episode's conversation so far); ``None``:
    render ``prompts`` (a sampler that reads text gets the conversation's text in ``prompts`` either way)."""
    settings: Any = None
    """The sampler's own settings (an instance of its ``params``, from ``sampler_args``)."""


def hf_sample(request: SamplingRequest) -> Samples:
    """The ``hf`` sampler: :func:`sample` (batched ``generate``, KV cache)."""
    return sample(**{f.name: getattr(request, f.name) for f in attrs.fields(SamplingRequest) if f.name != "settings"})


def prompt_token_ids(request: SamplingRequest) -> tuple[list[int], list[list[int]]]:
    """Each completion's prompt index and prompt token ids (as :func:`sample` feeds them: BOS as it adds it, cut to
    the last ``max_prompt_length`` tokens, or ``request.prompt_ids``): what a sampler that takes token ids feeds its
    engine."""
    encoded = encode_prompts(request.prompts, request.tokenizer, request.max_prompt_length, request.prompt_ids)
    repeated = [i for i in range(len(encoded)) for _ in range(request.n)]
    return repeated, [list(encoded[i]) for i in repeated]


def samples_from_ids(request: SamplingRequest, repeated: list[int], prompts: list[list[int]],
                     completions: list[list[int]]) -> Samples:
    """:class:`Samples` from each completion's prompt ids and generated ids (ragged lists), padded as
    :func:`sample` pads them."""
    tokenizer = request.tokenizer
    stops = stop_token_ids(request.model, tokenizer)
    pad = pad_token_id(tokenizer)
    device = next(request.model.parameters()).device
    width, length = max(map(len, prompts)), max(1, max(map(len, completions)))
    prompt_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    completion_ids = torch.tensor([c + [pad] * (length - len(c)) for c in completions], device=device)
    return finish_samples(request.prompts, repeated, prompt_ids, prompt_mask, completion_ids, stops, pad, tokenizer)


def sampler_for(host: Any, name: str, args: Any = None, stage: str | None = None, trains: bool = True) -> Any:
    """A function with :func:`sample`'s arguments that draws through the registered sampler ``name`` with its
    settings ``args`` (``sampler_args``); a :class:`~molting.errors.ConfigError` when it cannot run here, its
    settings are wrong, or ``stage`` ``trains`` on its samples but it does not draw from the model it is handed."""
    from molting.errors import ConfigError

    sampler = host.get("sampler", name)
    problem = sampler.available()
    if problem:
        raise ConfigError(f"sampler {name!r} cannot run here: {problem}")
    if trains and not sampler.follows_policy:
        raise ConfigError(
            f"sampler {name!r} draws from a served model, not from the policy {stage or 'this stage'} trains, so its "
            "samples would not follow training; use it for one-shot sampling (--plugin sample-pairs), and "
            "--sampler hf or hf-paged here")
    settings = sampler_settings(sampler, args or {})

    def draw(model: Any, tokenizer: Any, prompts: Sequence[Any], **options: Any) -> Samples:
        return sampler.sample(SamplingRequest(model, tokenizer, prompts, **options, settings=settings))

    return draw


def sampler_settings(sampler: Any, args: Any) -> Any:
    """The sampler's ``params`` built from ``args``, with an error naming the sampler and its settings."""
    from molting.errors import ConfigError

    if not isinstance(args, dict):
        raise ConfigError(f"sampler_args must be a mapping of settings, got {args!r}")
    try:
        return sampler.params(**{str(k).replace("-", "_"): v for k, v in args.items()})
    except (TypeError, ValueError) as exc:
        valid = ", ".join(f.name for f in attrs.fields(sampler.params)) or "none"
        raise ConfigError(f"invalid sampler_args for sampler {sampler.name!r}: {exc} (its settings: {valid})") from exc


def completion_seeds(seed: int, draw: int, first: int, count: int) -> list[int]:
    """Seeds for the completions ``first .. first + count - 1`` of generation batch ``draw`` of a run seeded
    ``seed``: the same on every process, so a completion's random stream depends on its place in the global
    batch only (for :func:`sample`'s ``seeds``)."""
    import hashlib

    def one(index: int) -> int:
        digest = hashlib.blake2b(f"{seed}:{draw}:{index}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1

    return [one(index) for index in range(first, first + count)]


def generation_settings(max_new_tokens: int, temperature: float, top_p: float, top_k: int, stops: list[int],
                        pad: int, streams: list[torch.Generator] | None = None) -> tuple[Any, Any]:
    """The ``GenerationConfig`` and logits processors :func:`sample` generates with.

    Sampling runs as greedy decoding over processed scores: transformers'
    own temperature, top-k and top-p warpers, then :class:`InverseCdfSampler`,
    which leaves only the drawn token (from each row's own ``streams``
    generator when given). Temperature 0 is plain greedy decoding.
    """
    from transformers import (GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    generation = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                  eos_token_id=stops, use_cache=True)
    processors = LogitsProcessorList()
    if temperature > 0:
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
        processors.append(InverseCdfSampler(streams))
    return generation, processors


class InverseCdfSampler:
    """A logits processor that draws each row's next token from ``softmax(scores)`` and leaves only it.

    One uniform number per row, found in the cumulative distribution (in
    float64, so no token's share is lost to rounding); the scores it returns
    are ``-inf`` but at the drawn token, so greedy decoding emits it. It is
    what ``torch.multinomial`` does in distribution, without its random
    number per vocabulary entry: with a 151,936-token vocabulary that draw
    took ~22 ms of each ~35 ms decoding step on two CPU cores
    (``benchmarks/real_shapes.py``, grpo); this one takes ~2 ms. With
    ``streams`` (one CPU generator per row) row r's numbers come from
    ``streams[r]``, one per decoding step, whatever the other rows are.
    """

    def __init__(self, streams: list[torch.Generator] | None = None) -> None:
        self.streams = streams

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cdf = scores.softmax(dim=-1, dtype=torch.float64).cumsum_(dim=-1)
        if self.streams is None:
            uniform = torch.rand(scores.size(0), 1, dtype=torch.float64, device=scores.device)
        else:
            uniform = torch.cat([torch.rand(1, 1, dtype=torch.float64, generator=g) for g in self.streams])
            uniform = uniform.to(scores.device)
        draw = uniform * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, draw, right=True).clamp_(max=scores.size(-1) - 1)
        return scores.fill_(float("-inf")).scatter_(1, tokens, 0.0)


@contextlib.contextmanager
def _generation_config(model: Any, config: Any):
    """Within it, ``model``'s own generation config is ``config``: transformers fills a given config's unset
    fields from the model's (a hub model's ``repetition_penalty`` would apply), as trl also guards against."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = getattr(target, "generation_config", None)
    target.generation_config = config
    try:
        yield
    finally:
        target.generation_config = saved


def pad_token_id(tokenizer: Any) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS (what ``generate`` falls back to)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokens that end an answer: the tokenizer's EOS and every EOS of the model's generation config (Gemma's
    ``<end_of_turn>``, Phi-3's ``<|end|>``, Llama 3's ``<|eom_id|>``), as ``generate`` stops at them."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    own = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return list(dict.fromkeys(own + configured))


def _pad_left(chunks: list[torch.Tensor], value: int) -> torch.Tensor:
    width = max(c.size(1) for c in chunks)
    return torch.cat([torch.nn.functional.pad(c, (width - c.size(1), 0), value=value) for c in chunks])


def _pad_right(chunks: list[torch.Tensor], value: int) -> torch.Tensor:
    width = max(c.size(1) for c in chunks)
    return torch.cat([torch.nn.functional.pad(c, (0, width - c.size(1)), value=value) for c in chunks])


def sequence_inputs(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                    completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ids, attention mask and position ids of left-padded prompts followed by their completions.

    Position ids follow the attention mask, as in generation with left padding.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    return input_ids, attention_mask, (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
