"""Multi-turn rollouts: episodes token for token as the chat template writes them, the environment's tokens masked,
tool calls run, limits kept, environments' failures named."""

from __future__ import annotations

import asyncio
import re

import pytest
import torch

import molting
from molting import demo
from molting.data import with_bos
from molting.discovery import load_plugins
from molting.environments import (EpisodeError, Episode, ModelTurn, RolloutSettings, Turn, episode_metrics,
                                  episode_values, evaluate_episodes, EpisodeRunner, observation_ids, roll_out)
from molting.models import load_causal_lm
from molting.sampling import SamplingRequest, sample, stop_token_ids

import families
from scripted import call, good_student, question, script_turn


@pytest.fixture(scope="module")
def host():
    return load_plugins()


@pytest.fixture(scope="module")
def demo_lm():
    model, tokenizer = load_causal_lm(demo.demo_model_dir())
    return model.eval(), tokenizer


def scripted(script):
    def draw(model, tokenizer, prompts, **options):
        return script_turn(script, SamplingRequest(model, tokenizer, prompts, **options))

    return draw


SETTINGS = RolloutSettings(max_turns=3, max_new_tokens=96, max_episode_tokens=448, temperature=0.0)


def rollout(host, demo_lm, script, rows=None, environment="calculator", settings=SETTINGS, params=None):
    model, tokenizer = demo_lm
    env = host.get("environment", environment) if isinstance(environment, str) else environment
    rows = rows or demo.tool_prompt_rows("test", 4)
    count = len(rows)
    return roll_out(scripted(script), model, tokenizer, env, params or env.params(), rows, list(range(count)),
                    list(range(count)), [0] * count, settings, host.get("tool_parser", "hermes"))


def test_an_episode_is_the_chat_templates_conversation_token_for_token(host, demo_lm):
    _, tokenizer = demo_lm
    samples = rollout(host, demo_lm, good_student)
    for position, record in enumerate(samples.episodes):
        rendered = tokenizer.apply_chat_template(record.prompt + record.messages, tools=record.tools, tokenize=False)
        expected = tokenizer(with_bos(rendered.removesuffix("\n"), tokenizer), add_special_tokens=False)["input_ids"]
        assert record.prompt_ids + record.ids == expected
        width = len(record.ids)
        assert samples.completion_ids[position, :width].tolist() == record.ids
        assert samples.completion_mask[position].sum() == width


def test_the_environment_writes_what_the_mask_leaves_out(host, demo_lm):
    _, tokenizer = demo_lm
    samples = rollout(host, demo_lm, good_student)
    record = samples.episodes[0]
    a, b = question(record.prompt[0]["content"])
    written = [token for token, own in zip(record.ids, record.model_mask) if not own]
    assert tokenizer.decode(written) == f"\nR: {a + b}\nA:"  # the tool's result, then the next turn's prompt
    model = [token for token, own in zip(record.ids, record.model_mask) if own]
    assert tokenizer.decode(model).endswith(f"The answer is {a + b}.</s>")
    assert torch.equal(samples.loss_mask[0, : len(record.ids)], torch.tensor(record.model_mask))


def test_a_right_answer_after_the_tool_is_rewarded(host, demo_lm):
    samples = rollout(host, demo_lm, good_student)
    for record in samples.episodes:
        assert (record.reward, record.turns, record.tool_calls, record.tool_errors, record.done, record.truncated) == \
            (1.0, 2, 1, 0, True, False)
        assert record.messages[1]["role"] == "tool" and record.messages[0]["tool_calls"][0]["function"]["name"] == \
            "calculator"


def test_a_wrong_answer_and_an_answer_without_the_tool_score_nothing(host, demo_lm):
    def guesser(text, turn):
        return " The answer is 1000."

    samples = rollout(host, demo_lm, guesser)
    assert [(r.reward, r.turns, r.tool_calls, r.written_calls) for r in samples.episodes] == [(0.0, 1, 0, 0)] * 4
    assert samples.model_mask.sum() == samples.completion_mask.sum()  # the model wrote every token


def test_a_malformed_call_becomes_an_error_the_model_reads(host, demo_lm):
    def clumsy(text, turn):
        a, b = question(text)
        if turn == 0:
            return ' <tool_call>{"name": "calculator", "arguments": {"expression": ' + f'"{a} + {b}"' + '</tool_call>'
        return good_student(text, 0) if turn == 1 else f" The answer is {re.findall(r'R: (-?[0-9]+)', text)[-1]}."

    samples = rollout(host, demo_lm, clumsy)
    record = samples.episodes[0]
    assert record.messages[1]["content"].startswith("Error: the tool call could not be read: not valid JSON")
    assert (record.malformed, record.written_calls, record.tool_calls, record.tool_errors) == (1, 2, 2, 1)
    assert (record.reward, record.turns) == (1.0, 3)


@pytest.mark.parametrize("call_text, error", [
    ('{"name": "abacus", "arguments": {"expression": "1 + 1"}}', "Error: unknown tool 'abacus'; the tools are calculator"),
    ('{"name": "calculator", "arguments": {"formula": "1 + 1"}}', "Error: bad arguments for 'calculator'"),
    ('{"name": "calculator", "arguments": {"expression": "1 / 0"}}', "Error: 'calculator' raised ZeroDivisionError"),
])
def test_a_wrong_call_is_an_observation_not_an_exception(host, demo_lm, call_text, error):
    def wrong(text, turn):
        return f" <tool_call>\n{call_text}\n</tool_call>" if turn == 0 else " The answer is 2."

    record = rollout(host, demo_lm, wrong).episodes[0]
    assert record.messages[1]["content"].startswith(error)
    assert (record.tool_calls, record.tool_errors) == (1, 1)


def test_an_episode_that_keeps_calling_ends_at_the_turn_limit(host, demo_lm):
    samples = rollout(host, demo_lm, lambda text, turn: call("1 + 1"))
    assert all((r.turns, r.truncated, r.done, r.tool_calls) == (3, True, False, 3) for r in samples.episodes)
    assert samples.truncated.all()


def test_an_episode_that_would_pass_its_token_budget_ends_without_the_observation(host, demo_lm):
    _, tokenizer = demo_lm
    first = len(tokenizer(call("525 + 328"), add_special_tokens=False)["input_ids"]) + 1
    settings = RolloutSettings(max_turns=3, max_new_tokens=96, max_episode_tokens=first + 3, temperature=0.0)
    record = rollout(host, demo_lm, good_student, settings=settings).episodes[0]
    assert record.truncated and record.turns == 1 and len(record.ids) == first
    assert all(record.model_mask)  # the observation that did not fit was not appended


def test_a_turn_cut_at_max_new_tokens_ends_the_episode(host, demo_lm):
    settings = RolloutSettings(max_turns=3, max_new_tokens=10, max_episode_tokens=448, temperature=0.0)
    record = rollout(host, demo_lm, good_student, settings=settings).episodes[0]
    assert (record.turns, record.truncated, record.done, record.tool_calls, len(record.ids)) == (1, True, False, 0, 10)


class Guess(Episode):
    """A guessing game with no tools: the user says higher or lower; async start and step."""

    def __init__(self, secret: int) -> None:
        super().__init__("Guess my number between 1 and 9.")
        self.secret = secret

    async def step(self, turn: ModelTurn) -> Turn:
        await asyncio.sleep(0)
        guesses = re.findall(r"\d+", turn.content)
        if not guesses:
            return Turn([{"role": "user", "content": "Say a number."}])
        guess = int(guesses[-1])
        if guess == self.secret:
            return Turn(reward=1.0, done=True)
        return Turn([{"role": "user", "content": "higher" if guess < self.secret else "lower"}], reward=-0.1)


async def start_guess(row, seed, params):
    await asyncio.sleep(0)
    return Guess(secret=1 + seed % 9)


GUESS = molting.Environment(name="guess", start=start_guess, description="Guess a number.", max_turns=6)


def test_an_async_environment_without_tools_talks_back(host, demo_lm):
    def counter(text, turn):
        return f" {turn + 1}"

    model, tokenizer = demo_lm
    samples = roll_out(scripted(counter), model, tokenizer, GUESS, molting.NoParams(), [{}, {}], [0, 1], [0, 1],
                       [2, 5], SETTINGS, None)
    first, second = samples.episodes
    assert (first.turns, first.done, round(first.reward, 2)) == (3, True, 0.8)  # 1, 2 too low, then 3
    assert [m["content"] for m in first.messages if m["role"] == "user"] == ["higher", "higher"]
    assert (second.turns, second.done) == (3, False) and second.truncated  # the secret 6 is past the turn limit
    assert first.written_calls == 0 and first.malformed == 0


def test_an_environment_that_raises_is_an_error_naming_it_and_the_row(host, demo_lm):
    class Broken(Episode):
        def step(self, turn):
            raise KeyError("state")

    env = molting.Environment(name="broken", start=lambda row, seed, params: Broken("hi"), description="Raises.")
    with pytest.raises(EpisodeError, match=r"environment 'broken' raised on turn 0 of the episode of data row 0: "
                                           r"KeyError"):
        rollout(host, demo_lm, lambda text, turn: " 42", rows=[{"prompt": "a"}, {"prompt": "b"}], environment=env)
    lazy = molting.Environment(name="lazy", start=lambda row, seed, params: "an episode", description="Not one.")
    with pytest.raises(EpisodeError, match="start\\(\\) returned str, not a molting.environments.Episode"):
        rollout(host, demo_lm, good_student, environment=lazy)


def test_the_observation_after_a_qwen_turn_is_what_its_template_writes():
    tokenizer = families.build_tokenizer(families.FAMILIES["qwen2.5"])
    stops = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    result = [{"role": "tool", "name": "add", "content": "42"}]
    ids = observation_ids(tokenizer, result, stops)
    assert tokenizer.decode(ids) == "\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n" \
                                    "<|im_start|>assistant\n"


def test_episode_metrics_sum_the_episodes(host, demo_lm):
    samples = rollout(host, demo_lm, good_student)
    metrics = episode_metrics(episode_values(samples))
    assert metrics["env/reward"] == 1.0 and metrics["env/turns"] == 2.0 and metrics["tools/call_frequency"] == 1.0
    assert metrics["env/truncated_ratio"] == 0.0 and metrics["tools/failure_frequency"] == 0.0
    assert metrics["env/episode_length"] == samples.completion_mask.sum(dim=1).float().mean().item()


def test_the_demo_model_rolls_out_the_calculator_for_real(host, demo_lm):
    """No script: the shipped model answers in its head (it never learnt the tool) and gets 3-4 digit sums wrong."""
    model, tokenizer = demo_lm
    env = host.get("environment", "calculator")
    runner = EpisodeRunner(env, env.params(), host.get("tool_parser", "hermes"), SETTINGS)
    metrics, samples = evaluate_episodes(model, tokenizer, runner, demo.tool_prompt_rows("test", 16))
    assert metrics["tool_call_rate"] == 0.0 and metrics["reward"] <= 0.2
    assert samples.completion_ids.shape[0] == 16 and bool((samples.loss_mask == samples.completion_mask).all())


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_rollout_reuses_the_kv_cache_and_draws_the_same_episodes(demo_lm, temperature):
    """Each turn after the first continues the last call's KV cache (only the observation is new), and the
    episodes are token for token those of a rollout that encodes the whole conversation every turn."""
    model, tokenizer = demo_lm
    sessions = []

    def cached(model, tokenizer, prompts, **options):
        sessions.append(options["session"])
        return sample(model, tokenizer, prompts, **options)

    def uncached(model, tokenizer, prompts, session=None, keys=None, **options):
        return sample(model, tokenizer, prompts, **options)

    settings = RolloutSettings(max_turns=4, max_new_tokens=24, max_episode_tokens=200, temperature=temperature)
    rows, seeds = [{}] * 6, [11, 12, 13, 14, 15, 16]
    runs = [roll_out(draw, model, tokenizer, GUESS, molting.NoParams(), rows, list(range(6)), seeds,
                     [3, 4, 5, 6, 7, 8], settings, None) for draw in (cached, uncached)]
    assert [r.ids for r in runs[0].episodes] == [r.ids for r in runs[1].episodes]
    assert max(r.turns for r in runs[0].episodes) >= 3
    assert sessions[0].reused == max(r.turns for r in runs[0].episodes) - 1  # every turn after the first
