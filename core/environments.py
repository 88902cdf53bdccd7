"""Multi-turn episodes: the environment contract, rolling episodes out, and what they are measured by.

An environment (:class:`molting.Environment`) starts an :class:`Episode`
from a data row and a seed: the messages the model sees first and the tools
it may call. Each model turn is handed to ``episode.step`` as a
:class:`ModelTurn` (its text, and the tool calls the run's
:class:`molting.ToolParser` found in it); the episode answers with a
:class:`Turn`: the next observation (messages), a reward, and whether it is
done. :class:`ToolEpisode` is the common case: it runs the model's tool
calls (:func:`molting.tools.run_calls`) until the model answers without
one, and scores that answer.

:func:`roll_out` plays a generation batch of episodes a turn at a time,
every unfinished episode's next turn in one sampler call. The conversation
is kept as token ids, never re-tokenized: the model's tokens as it sampled
them, then the observation's tokens as the chat template writes them after
a turn (:func:`observation_ids`), then the model's next turn, sampled from
those very ids. The result is a :class:`molting.sampling.Samples` whose
``model_mask`` is 0 on what the environment wrote, so the stages leave
those tokens out of the loss, the KL term and the entropy, while the model
attends to them. An episode ends when the environment says it is done,
after ``max_turns`` model turns, when its tokens would pass
``max_episode_tokens``, or when the model's turn runs to ``max_new_tokens``
without ending (the last three mark it truncated).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import threading
from typing import Any, Awaitable, Callable, Mapping, Sequence

import attrs

from molting.errors import ConfigError, DataError, MoltingError
from molting.tools import ParsedTurn, ToolCall, run_calls, tool_schemas


class EpisodeError(MoltingError):
    """An environment raised while starting or stepping an episode (a bug in the environment, not the model's)."""


# --------------------------------------------------------------------------- the contract


@attrs.frozen
class ModelTurn:
    """What the model said in one turn of an episode.

    ``text`` is the turn as decoded (special tokens dropped); ``content`` the
    text with the tool calls taken out; ``tool_calls`` the calls the run's
    tool parser read and ``malformed`` a reason for each call written
    wrongly; ``truncated``: the turn ran to ``max_new_tokens`` without ending.
    ``index`` counts the model's turns from 0.
    """

    text: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    malformed: tuple[str, ...] = ()
    truncated: bool = False
    index: int = 0

    def message(self) -> dict[str, Any]:
        """The turn as an assistant message (with ``tool_calls`` when it made any), as a chat template reads it."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [call.message() for call in self.tool_calls]
        return message


def _messages(value: Any) -> tuple[dict[str, Any], ...]:
    return tuple(dict(message) for message in value)


@attrs.frozen
class Turn:
    """An environment's answer to a model turn: the ``observation`` (messages the model reads next, e.g. ``tool``
    results or a ``user`` reply), the ``reward`` of this turn (an episode's reward is the sum over its turns),
    whether the episode is ``done``, and the tool calls it ran and how many of them ended in an error."""

    observation: Sequence[Mapping[str, Any]] = attrs.field(default=(), converter=_messages)
    reward: float = attrs.field(default=0.0, converter=float)
    done: bool = False
    tool_calls: int = 0
    tool_errors: int = 0


class Episode:
    """One episode: ``prompt`` (the first messages), ``tools`` (plain functions the model may call) and ``step``.

    Subclass it and override :meth:`step` (it may be ``async``). ``prompt``
    ``None`` means the data row's ``prompt``; a string is one user message.
    """

    def __init__(self, prompt: Any = None, tools: Sequence[Callable[..., Any]] = ()) -> None:
        self.prompt = prompt
        self.tools = list(tools)

    def step(self, turn: ModelTurn) -> Turn | Awaitable[Turn]:
        """Answer the model's ``turn``: the next observation, a reward and whether the episode is done."""
        raise NotImplementedError(f"{type(self).__name__} must define step(turn)")


class ToolEpisode(Episode):
    """An episode in which the model calls tools until it answers without one.

    A turn with tool calls (or calls written wrongly) gets their results as
    ``tool`` messages, errors included (:func:`molting.tools.run_calls`, each
    call under ``tool_timeout`` seconds); the first turn without a call ends
    the episode, with :meth:`reward` of that turn as its reward.
    """

    def __init__(self, prompt: Any = None, tools: Sequence[Callable[..., Any]] = (), tool_timeout: float = 10.0) -> None:
        super().__init__(prompt, tools)
        self.tool_timeout = tool_timeout

    async def step(self, turn: ModelTurn) -> Turn:
        if turn.tool_calls or turn.malformed:
            results, counts = await run_calls(ParsedTurn(turn.content, turn.tool_calls, turn.malformed), self.tools,
                                              self.tool_timeout)
            return Turn([result.message() for result in results], tool_calls=counts.calls, tool_errors=counts.errors)
        return Turn(reward=self.reward(turn), done=True)

    def reward(self, turn: ModelTurn) -> float:
        """The reward of the model's final answer (``turn.content``); 0 unless overridden."""
        return 0.0


# --------------------------------------------------------------------------- one rollout


@attrs.frozen
class RolloutSettings:
    """The limits and decoding settings of a rollout."""

    max_turns: int
    max_new_tokens: int
    """Longest model turn, in tokens."""
    max_episode_tokens: int
    """Longest episode after its prompt: the model's turns and the environment's observations together."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_prompt_length: int | None = None
    batch_size: int = 64


@attrs.define(eq=False)
class EpisodeRecord:
    """One episode as it went: its prompt, what followed (messages and token ids), reward, turns and tool use."""

    row: int
    """The data row it started from."""
    prompt: list[dict[str, Any]]
    prompt_ids: list[int]
    tools: list[dict[str, Any]] = attrs.field(factory=list)
    """The JSON schemas of the episode's tools, as the chat template received them."""
    messages: list[dict[str, Any]] = attrs.field(factory=list)
    ids: list[int] = attrs.field(factory=list)
    model_mask: list[int] = attrs.field(factory=list)
    reward: float = 0.0
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    written_calls: int = 0
    """Tool calls the model wrote, read or not."""
    malformed: int = 0
    """Of them, calls the tool parser could not read."""
    done: bool = False
    """The environment ended it."""
    truncated: bool = False
    """A limit ended it: the turn limit, the token budget, or a model turn that ran to max_new_tokens."""
    episode: Episode | None = attrs.field(default=None, repr=False)
    """The environment's episode object (while rolling out)."""

    @property
    def finished(self) -> bool:
        return self.done or self.truncated


def roll_out(draw: Callable[..., Any], model: Any, tokenizer: Any, environment: Any, params: Any,
             rows: Sequence[Mapping[str, Any]], indices: Sequence[int], seeds: Sequence[int],
             episode_seeds: Sequence[int], settings: RolloutSettings, parser: Any = None) -> Any:
    """Play one episode per row of ``rows`` to its end; the episodes as :class:`molting.sampling.Samples`.

    ``draw`` is the run's sampler (:func:`molting.sampling.sampler_for`);
    ``indices`` the data rows (for messages and records); ``seeds`` each
    episode's sampling stream (turn t draws from a stream derived from it);
    ``episode_seeds`` what ``environment.start`` gets (the same for a
    group's copies of a prompt, so they start alike); ``parser`` the
    :class:`molting.ToolParser` that reads tool calls (needed when an
    episode offers tools).
    """
    with _LoopThread() as loop:
        rollout = _Rollout(draw, model, tokenizer, environment, params, settings, parser, loop)
        records = rollout.start(rows, indices, episode_seeds)
        for turn in range(settings.max_turns):
            active = [position for position, record in enumerate(records) if not record.finished]
            if not active:
                break
            rollout.turn([records[p] for p in active], [turn_seed(seeds[p], turn) for p in active], turn)
        for record in records:
            if not record.finished:  # still going after max_turns
                record.truncated = True
    return rollout.samples(records)


def turn_seed(seed: int, turn: int) -> int:
    """The sampling seed of an episode's ``turn``: its own seed at turn 0, a stream derived from it after."""
    if turn == 0:
        return int(seed)
    digest = hashlib.blake2b(f"{seed}:turn:{turn}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def episode_seeds(seed: int, draw: int, groups: Sequence[int]) -> list[int]:
    """``environment.start``'s seed of each episode of generation batch ``draw``: one per group (a prompt's G
    copies start alike), the same on every process."""
    def one(group: int) -> int:
        digest = hashlib.blake2b(f"{seed}:{draw}:env:{group}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1

    return [one(group) for group in groups]


class _Rollout:
    """The state one :func:`roll_out` call shares between its steps."""

    def __init__(self, draw: Callable[..., Any], model: Any, tokenizer: Any, environment: Any, params: Any,
                 settings: RolloutSettings, parser: Any, loop: _LoopThread) -> None:
        from molting.sampling import GenerationSession, pad_token_id, stop_token_ids

        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"environment {environment.name!r}: episodes are conversations, and the model's tokenizer "
                              "has no chat template to write them with")
        self.draw, self.model, self.tokenizer, self.environment, self.params = draw, model, tokenizer, environment, params
        self.settings, self.parser, self.loop = settings, parser, loop
        self.stops, self.pad = stop_token_ids(model, tokenizer), pad_token_id(tokenizer)
        self.session = GenerationSession()  # the KV cache from turn to turn, for a sampler that keeps one

    # -- starting

    def start(self, rows: Sequence[Mapping[str, Any]], indices: Sequence[int],
              seeds: Sequence[int]) -> list[EpisodeRecord]:
        started = self.loop.gather([self._start(row, index, seed) for row, index, seed in zip(rows, indices, seeds)])
        return [self._record(episode, row, index) for episode, row, index in zip(started, rows, indices)]

    async def _start(self, row: Mapping[str, Any], index: int, seed: int) -> Episode:
        name = self.environment.name
        try:
            episode = await _maybe_await(self.environment.start(row, seed, self.params))
        except Exception as exc:
            raise EpisodeError(f"environment {name!r} failed to start an episode from data row {index}: "
                               f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(episode, Episode):
            raise EpisodeError(f"environment {name!r}: start() returned {type(episode).__name__}, not a "
                               "molting.environments.Episode")
        return episode

    def _record(self, episode: Episode, row: Mapping[str, Any], index: int) -> EpisodeRecord:
        prompt = episode.prompt if episode.prompt is not None else row.get("prompt")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not prompt or not isinstance(prompt, list):
            raise DataError(f"environment {self.environment.name!r}, data row {index}: the episode has no prompt "
                            "messages (the episode's prompt, else the row's `prompt`)")
        if episode.tools and self.parser is None:
            raise ConfigError(f"environment {self.environment.name!r} offers tools, but no tool parser recognises the "
                              "model's chat template, so the calls it writes cannot be read: name the format with "
                              "--tool-parser NAME (`molting plugins` lists the tool_parser kind)")
        schemas = tool_schemas(episode.tools, f"environment {self.environment.name!r}") if episode.tools else []
        ids = self._prompt_ids(prompt, schemas, index)
        return EpisodeRecord(row=index, prompt=list(prompt), prompt_ids=ids, tools=schemas, episode=episode)

    def _prompt_ids(self, prompt: list[dict[str, Any]], schemas: list[dict[str, Any]], index: int) -> list[int]:
        from molting.data import with_bos

        try:
            text = self.tokenizer.apply_chat_template(prompt, tools=schemas or None, add_generation_prompt=True,
                                                      tokenize=False)
        except Exception as exc:  # jinja2's TemplateError, raised by the template's raise_exception
            raise DataError(f"environment {self.environment.name!r}, data row {index}: the model's chat template "
                            f"refuses the episode's prompt: {exc}") from exc
        ids = self.tokenizer(with_bos(text, self.tokenizer), add_special_tokens=False)["input_ids"]
        limit = self.settings.max_prompt_length
        return list(ids)[-limit:] if limit else list(ids)

    # -- one turn of every unfinished episode

    def turn(self, active: list[EpisodeRecord], seeds: list[int], turn: int) -> None:
        budgets = [self.settings.max_episode_tokens - len(r.ids) for r in active]
        samples = self.draw(
            self.model, self.tokenizer, [self.tokenizer.decode(r.prompt_ids + r.ids) for r in active], n=1,
            max_new_tokens=max(1, min(self.settings.max_new_tokens, max(budgets))),
            temperature=self.settings.temperature, top_p=self.settings.top_p, top_k=self.settings.top_k,
            batch_size=self.settings.batch_size, seeds=seeds, prompt_ids=[r.prompt_ids + r.ids for r in active],
            session=self.session, keys=[id(r) for r in active])
        turns = []
        for position, (record, budget) in enumerate(zip(active, budgets)):
            tokens = samples.completion_ids[position][samples.completion_mask[position].bool()].tolist()
            cut = bool(samples.truncated[position]) or len(tokens) > min(budget, self.settings.max_new_tokens)
            tokens = tokens[: min(budget, self.settings.max_new_tokens)]
            turns.append(self._model_turn(record, tokens, cut, turn))
        answers = self.loop.gather([self._step(record, model_turn) for record, model_turn in zip(active, turns)])
        for record, model_turn, answer in zip(active, turns, answers):
            self._apply(record, model_turn, answer)

    def _model_turn(self, record: EpisodeRecord, tokens: list[int], cut: bool, turn: int) -> ModelTurn:
        record.ids += tokens
        record.model_mask += [1] * len(tokens)
        record.turns += 1
        spoken = tokens[:-1] if tokens and tokens[-1] in self.stops else tokens
        text = self.tokenizer.decode(spoken, skip_special_tokens=True)
        if record.tools:
            parsed = self.parser.parse(self.tokenizer.decode(spoken, skip_special_tokens=False))
        else:
            parsed = ParsedTurn(text.strip())
        record.malformed += len(parsed.malformed)
        record.written_calls += len(parsed.calls) + len(parsed.malformed)
        model_turn = ModelTurn(text, parsed.content, parsed.calls, parsed.malformed, truncated=cut, index=turn)
        record.messages.append(model_turn.message())
        if cut:  # the model did not end its turn: nothing to answer
            record.truncated = True
        return model_turn

    async def _step(self, record: EpisodeRecord, model_turn: ModelTurn) -> Turn | None:
        if record.truncated:
            return None
        name = self.environment.name
        try:
            answer = await _maybe_await(record.episode.step(model_turn))
        except Exception as exc:
            raise EpisodeError(f"environment {name!r} raised on turn {model_turn.index} of the episode of data row "
                               f"{record.row}: {type(exc).__name__}: {exc} (the model said {model_turn.text[:80]!r})"
                               ) from exc
        if not isinstance(answer, Turn):
            raise EpisodeError(f"environment {name!r}: step() returned {type(answer).__name__}, not a "
                               "molting.environments.Turn")
        return answer

    def _apply(self, record: EpisodeRecord, model_turn: ModelTurn, answer: Turn | None) -> None:
        if answer is None:
            return
        record.reward += answer.reward
        record.tool_calls += answer.tool_calls
        record.tool_errors += answer.tool_errors
        if answer.done:
            record.done = True
            return
        observation = observation_ids(self.tokenizer, list(answer.observation), self.stops, model_turn.tool_calls)
        if len(record.ids) + len(observation) + 1 > self.settings.max_episode_tokens:
            record.truncated = True  # no room for the observation and a model token after it
            return
        record.messages += [dict(message) for message in answer.observation]
        record.ids += observation
        record.model_mask += [0] * len(observation)

    # -- the result

    def samples(self, records: list[EpisodeRecord]) -> Any:
        import torch

        from molting.sampling import Samples, left_padded

        device = next(self.model.parameters()).device
        prompt_ids, prompt_mask = left_padded([r.prompt_ids for r in records], self.pad, device)
        width = max(len(r.ids) for r in records)
        completion_ids = torch.tensor([r.ids + [self.pad] * (width - len(r.ids)) for r in records], device=device)
        completion_mask = torch.tensor([[1] * len(r.ids) + [0] * (width - len(r.ids)) for r in records], device=device)
        model_mask = torch.tensor([r.model_mask + [0] * (width - len(r.ids)) for r in records], device=device)
        texts = self.tokenizer.batch_decode(completion_ids.masked_fill(completion_mask == 0, self.pad),
                                            skip_special_tokens=True)
        return Samples(prompts=[r.prompt for r in records], rows=list(range(len(records))), texts=texts,
                       prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                       completion_mask=completion_mask, truncated=torch.tensor([r.truncated for r in records],
                                                                               device=device),
                       model_mask=model_mask, episodes=records)


def observation_ids(tokenizer: Any, observation: list[dict[str, Any]], stops: Sequence[int],
                    calls: Sequence[ToolCall] = ()) -> list[int]:
    """The token ids the chat template writes for ``observation`` after a model turn that ended with a stop token,
    up to and including the next turn's generation prompt.

    Rendered after a stand-in conversation (a user message, an assistant
    turn making ``calls``), as trl renders tool results: the template's text
    from the end of the assistant's turn (its last stop token) on. A
    template that writes the conversation before differently once the
    observation follows cannot be continued this way: a :class:`ConfigError`.
    """
    names = [call.name for call in calls] or [m.get("name") or "tool" for m in observation if m.get("role") == "tool"]
    assistant: dict[str, Any] = {"role": "assistant", "content": ""}
    if names:
        assistant["tool_calls"] = [{"type": "function", "function": {"name": name, "arguments": {}}} for name in names]
    before = [{"role": "user", "content": "dummy"}, assistant]
    prefix = _template_ids(tokenizer, before, add_generation_prompt=False)
    ends = [position for position, token in enumerate(prefix) if token in stops]
    if ends:
        prefix = prefix[: ends[-1] + 1]
    full = _template_ids(tokenizer, before + observation, add_generation_prompt=True)
    if full[: len(prefix)] != prefix:
        raise ConfigError("the model's chat template writes a conversation differently once an observation follows "
                          "it, so an episode cannot be continued token by token; multi-turn rollouts need a "
                          "prefix-preserving template")
    return full[len(prefix):]


def _template_ids(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class _LoopThread:
    """An event loop on a thread of its own for one rollout: async environments and tools run on it, whether or
    not the caller is inside an event loop already (a notebook), and their episodes share it from turn to turn."""

    def __enter__(self) -> _LoopThread:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="molting-environment", daemon=True)
        self.thread.start()
        return self

    def gather(self, coroutines: list[Awaitable[Any]]) -> list[Any]:
        """The results of ``coroutines``, run concurrently on this loop."""
        async def every() -> list[Any]:
            return list(await asyncio.gather(*coroutines))

        return asyncio.run_coroutine_threadsafe(every(), self.loop).result()

    def __exit__(self, *exc: Any) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


# --------------------------------------------------------------------------- what episodes are measured by


EPISODE_VALUES = ("reward", "turns", "tool_calls", "tool_errors", "malformed", "length", "truncated")


def episode_values(samples: Any) -> dict[str, Any]:
    """Each episode's figures as ``(N,)`` float tensors (to gather across processes, then :func:`episode_metrics`)."""
    import torch

    records = samples.episodes
    device = samples.completion_ids.device
    values = {name: [float(getattr(r, name)) for r in records]
              for name in ("reward", "turns", "tool_calls", "tool_errors", "malformed", "truncated")}
    values["length"] = [float(len(r.ids)) for r in records]
    return {name: torch.tensor(values[name], dtype=torch.float32, device=device) for name in EPISODE_VALUES}


ENV_METRICS = ("env/reward", "env/turns", "env/tool_calls", "env/tool_errors", "env/malformed_calls",
               "env/episode_length", "env/truncated_ratio", "tools/call_frequency", "tools/failure_frequency")
"""What an online stage logs of its episodes: the environment's reward, turns, tool calls, tool errors and calls
that did not parse (per episode), tokens per episode (the model's and the environment's), the share of episodes a
limit cut; and trl's ``tools/call_frequency`` (calls per episode) and ``tools/failure_frequency`` (errors per call)."""


def episode_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    """:data:`ENV_METRICS` from :func:`episode_values` (gathered from every process)."""
    calls = float(values["tool_calls"].sum())
    return {
        "env/reward": values["reward"].mean().item(),
        "env/turns": values["turns"].mean().item(),
        "env/tool_calls": values["tool_calls"].mean().item(),
        "env/tool_errors": values["tool_errors"].mean().item(),
        "env/malformed_calls": values["malformed"].mean().item(),
        "env/episode_length": values["length"].mean().item(),
        "env/truncated_ratio": values["truncated"].mean().item(),
        "tools/call_frequency": values["tool_calls"].mean().item(),
        "tools/failure_frequency": float(values["tool_errors"].sum()) / calls if calls else 0.0,
    }


def judged_completions(samples: Any, plain_text: bool = False) -> list[Any]:
    """What the run's judges score of each completion: an episode's messages after its prompt (its turns and
    observations, as trl hands a tool-using completion to its reward functions), else the completion's text: with
    ``plain_text`` as it is (ppo, sample-pairs), otherwise as an assistant message for a chat prompt and as text for
    a text prompt (grpo, as trl's GRPOTrainer)."""
    if samples.episodes is not None:
        return [list(record.messages) for record in samples.episodes]
    if plain_text:
        return samples.texts
    return [[{"role": "assistant", "content": text}] if not isinstance(prompt, str) else text
            for prompt, text in zip(samples.prompts, samples.texts)]


# --------------------------------------------------------------------------- what a stage rolls out with


@attrs.frozen
class EpisodeRunner:
    """An online stage's episodes: the environment, its settings, the tool parser, the limits and the weight of the
    environment's reward. Calling it rolls out one episode per row (:func:`roll_out`)."""

    environment: Any
    params: Any
    parser: Any
    settings: RolloutSettings
    weight: float = 1.0

    def __call__(self, draw: Callable[..., Any], model: Any, tokenizer: Any, rows: Sequence[Mapping[str, Any]],
                 indices: Sequence[int], seeds: Sequence[int], starts: Sequence[int], **overrides: Any) -> Any:
        settings = attrs.evolve(self.settings, **overrides) if overrides else self.settings
        return roll_out(draw, model, tokenizer, self.environment, self.params, rows, indices, seeds, starts, settings,
                        self.parser)

    def rewards(self, samples: Any) -> list[float]:
        """Each episode's environment reward times the run's ``env_weight``: summed with the judges' scores."""
        return [self.weight * record.reward for record in samples.episodes]


def episode_runner(context: Any, tokenizer: Any, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                   top_k: int = 0, batch_size: int = 64) -> EpisodeRunner | None:
    """The :class:`EpisodeRunner` of a step with an environment (``--env``), ``None`` without one.

    ``max_new_tokens`` bounds each model turn; the episode's own limits come
    from the config (``max_turns``, else the environment's; ``max_episode_tokens``,
    else ``max_new_tokens × max_turns``), and the prompt keeps what
    ``max_length`` leaves them.
    """
    from molting.tools import parser_for

    environment, config = context.environment, context.config
    if environment is None:
        return None
    turns = config.max_turns or environment.max_turns
    budget = config.max_episode_tokens or max_new_tokens * turns
    if config.max_length - budget < 1:
        raise ConfigError(f"max_length ({config.max_length}) must exceed max_episode_tokens ({budget}"
                          f"{'' if config.max_episode_tokens else f' = max_new_tokens x max_turns, {max_new_tokens} x {turns}'}"
                          "): it bounds the prompt and the episode together; raise --max-length or lower "
                          "--max-episode-tokens")
    parser = parser_for(context.host, config.tool_parser, tokenizer, str(context.model_path), required=False)
    settings = RolloutSettings(max_turns=turns, max_new_tokens=max_new_tokens, max_episode_tokens=budget,
                               temperature=temperature, top_p=top_p, top_k=top_k,
                               max_prompt_length=config.max_length - budget, batch_size=batch_size)
    return EpisodeRunner(environment, context.env_params, parser, settings, config.env_weight)


# --------------------------------------------------------------------------- held-out episodes


EVAL_METRICS = ("reward", "tool_call_rate", "malformed_rate", "tool_error_rate", "truncated_rate", "turns")
"""What :func:`evaluate_episodes` reports: the mean environment reward (for a task scored right or wrong, the
accuracy), the share of episodes with a tool call, the share of calls that did not parse, the share of run calls
that ended in an error, the share of episodes a limit cut, and model turns per episode."""


def evaluate_episodes(model: Any, tokenizer: Any, runner: EpisodeRunner, rows: Sequence[Mapping[str, Any]],
                      seed: int = 0) -> tuple[dict[str, float], Any]:
    """:data:`EVAL_METRICS` of greedy episodes of ``model`` from ``rows`` (the same ones for every model), and the
    episodes."""
    from molting.sampling import sample

    count = len(rows)
    samples = runner(sample, model, tokenizer, rows, list(range(count)), [seed] * count,
                     episode_seeds(seed, 0, list(range(count))), temperature=0.0)
    records = samples.episodes
    written = sum(r.written_calls for r in records)
    run = sum(r.tool_calls for r in records)
    metrics = {
        "reward": sum(r.reward for r in records) / count,
        "tool_call_rate": sum(r.written_calls > 0 for r in records) / count,
        "malformed_rate": sum(r.malformed for r in records) / written if written else 0.0,
        "tool_error_rate": sum(r.tool_errors for r in records) / run if run else 0.0,
        "truncated_rate": sum(r.truncated for r in records) / count,
        "turns": sum(r.turns for r in records) / count,
    }
    return metrics, samples


def format_episode_table(columns: Mapping[str, Mapping[str, float]]) -> str:
    """A plain-text table of :data:`EVAL_METRICS`: one row per metric, one column per model."""
    lines = [f"{'metric':<22}" + "".join(f"{label:>10}" for label in columns)]
    for name in EVAL_METRICS:
        if any(name in column for column in columns.values()):
            lines.append(f"{name:<22}" + "".join(f"{c[name]:>10.3f}" if name in c else f"{'-':>10}"
                                                 for c in columns.values()))
    return "\n".join(lines)


def transcript(record: EpisodeRecord) -> str:
    """An episode's messages after its prompt as readable lines (``assistant: ...``, ``tool: ...``)."""
    lines = []
    for message in record.messages:
        calls = "".join(f" [call {c['function']['name']}({c['function']['arguments']})]"
                        for c in message.get("tool_calls") or [])
        lines.append(f"{message.get('role')}: {message.get('content', '')}{calls}")
    return "\n".join(lines)
