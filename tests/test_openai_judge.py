"""The openai judges and their HTTP client against real servers: a scripted unreliable one, and molting serve.

The scripted server (tests/judge_server.py) answers by a rule the tests
predict (the longer answer wins; a score is the answer's word count) and
fails on demand: 500s, 429s, slow answers, garbage bodies, dropped
connections. What the judge does with each — retry, give up, and what the
run's ``judge_on_error`` makes of it — is checked against its counters.
"""

from __future__ import annotations

import json
import math
import re
import time

import pytest

from molting.discovery import load_plugins
from molting.errors import ConfigError, JudgeError
from molting.judging import Failed, JudgeSpec, Scorer
from molting.openai_api import CallFailed, Client, Endpoint
from molting.plugins.openai_judge import OpenAIJudgeParams, OpenAIPairwiseParams

from conftest import run_molting
from judge_server import ScriptedServer, rule_score

PROMPTS = ["What is 2 + 2?", "Name a colour.", "Say hello."]
ANSWERS = ["It is four, as two and two make four.", "Blue.", "Hello there, friend!"]


@pytest.fixture(scope="module")
def host():
    return load_plugins()


@pytest.fixture
def prompts_file(tmp_path):
    """Six demo-style prompts: a short sample-pairs run."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q: What is {a} + {b}?\nA:"}) + "\n"
                            for a, b in [(2, 3), (11, 4), (7, 9), (20, 15), (1, 1), (30, 12)]))
    return path


@pytest.fixture
def server():
    with ScriptedServer() as running:
        yield running


def pointwise(host, server, on_error="fail", **settings) -> tuple[Scorer, JudgeSpec]:
    settings = {"base_url": server.url, "model": "judge", "backoff": 0.01, **settings}
    spec = JudgeSpec("openai", host.get("judge", "openai"), 1.0, OpenAIJudgeParams(**settings))
    return Scorer([spec], on_error=on_error), spec


def pairwise(host, server, **settings) -> tuple[Scorer, JudgeSpec]:
    settings = {"base_url": server.url, "model": "judge", "backoff": 0.01, **settings}
    spec = JudgeSpec("openai-pairwise", host.get("judge", "openai-pairwise"), 1.0, OpenAIPairwiseParams(**settings))
    return Scorer([spec], pairwise=True), spec


def test_scores_parsed_from_the_rubric_reply(host, server):
    scorer, _ = pointwise(host, server)
    totals, per_judge = scorer(PROMPTS, ANSWERS)
    assert totals == [rule_score(a) for a in ANSWERS] == per_judge["openai"]
    prompt = next(b["messages"][-1]["content"] for b in server.bodies if PROMPTS[0] in b["messages"][-1]["content"])
    assert ANSWERS[0] in prompt and "Score: N" in prompt
    assert server.bodies[0]["temperature"] == 0 and server.bodies[0]["model"] == "judge"


def test_cache_makes_one_call_per_distinct_answer(host, server):
    scorer, _ = pointwise(host, server)
    scorer(PROMPTS * 2, ANSWERS * 2)
    scorer(PROMPTS, ANSWERS)
    assert len(server.bodies) == 3 and scorer.hits == 6
    uncached, _ = pointwise(host, server, cache=False)
    uncached(PROMPTS, ANSWERS)
    uncached(PROMPTS, ANSWERS)
    assert len(server.bodies) == 3 + 6


def test_pairwise_asks_both_orders_and_finds_position_bias(host, server):
    scorer, spec = pairwise(host, server)
    pairs = [(ANSWERS[0], ANSWERS[1]), (ANSWERS[1], ANSWERS[0])]
    assert scorer.score(spec, PROMPTS[:2], pairs) == [0, 1]  # the longer answer, wherever it stands
    assert len(server.bodies) == 4
    server.reply = lambda prompt: "A"  # a judge that always picks the first answer shown
    biased, spec = pairwise(host, server, cache=False)
    assert biased.score(spec, PROMPTS[:2], pairs) == [-1, -1]


def test_reference_column_fills_the_reference_guided_prompt(host, server):
    scorer, _ = pointwise(host, server, reference_column="reply")
    scorer(PROMPTS[:1], ANSWERS[:1], {"reply": ["Four, mate."]})
    prompt = server.bodies[0]["messages"][-1]["content"]
    assert "The person's reply: Four, mate." in prompt and "how this person answered" in prompt
    missing, _ = pointwise(host, server, reference_column="gold")
    with pytest.raises(ConfigError, match="reference_column 'gold' is not a column of the data"):
        missing(PROMPTS[:1], ANSWERS[:1], {"reply": ["x"]})


@pytest.mark.parametrize("fault", ["500", "503", "429", "drop"])
def test_retries_transient_faults(host, server, fault):
    server.fault, server.fail_first = fault, 2
    scorer, spec = pointwise(host, server)
    totals, _ = scorer(PROMPTS, ANSWERS)
    assert totals == [rule_score(a) for a in ANSWERS]
    stats = spec.judge.stats(spec.params)
    assert stats["retries"] >= 6 and stats["failed_calls"] == 0 and len(server.bodies) == 9


def test_slow_server_times_out_and_on_error_decides(host, server):
    server.fault, server.fail_first, server.slow_seconds = "slow", -1, 1.5
    fast = {"timeout": 0.3, "max_retries": 1}
    scorer, spec = pointwise(host, server, **fast)
    started = time.monotonic()
    with pytest.raises(JudgeError, match=r"judge 'openai' could not judge .* data row 0 .*within 0.3 s after 2 "
                                         r"attempts.*--judge-on-error"):
        scorer(PROMPTS[:1], ANSWERS[:1])
    assert time.monotonic() - started < 1.4  # gave up on its own timeout, not the server's pace
    zero, _ = pointwise(host, server, on_error="zero", **fast)
    assert zero(PROMPTS[:2], ANSWERS[:2])[0] == [0.0, 0.0]
    skip, _ = pointwise(host, server, on_error="skip", **fast)
    assert all(math.isnan(t) for t in skip(PROMPTS[:2], ANSWERS[:2])[0])
    assert skip.metrics()["judge/openai/failed"] == 2


def test_garbage_and_client_errors_are_not_retried(host, server):
    server.fault, server.fail_first = "garbage", -1
    scorer, spec = pointwise(host, server, on_error="zero")
    assert scorer(PROMPTS[:1], ANSWERS[:1])[0] == [0.0]
    assert len(server.bodies) == 1
    client = Client(Endpoint(server.url, "judge", max_retries=3))
    server.fault = "404"
    [failed] = client.chat_many([{"messages": [{"role": "user", "content": "hi"}]}])
    assert isinstance(failed, CallFailed) and "HTTP 404" in failed.reason and "scripted 404" in failed.reason
    assert client.stats.attempts == 1


def test_unreadable_reply_is_a_failed_judgement_never_cached(host, server):
    server.reply = lambda prompt: "What a lovely answer."
    scorer, spec = pointwise(host, server, on_error="skip")
    assert math.isnan(scorer(PROMPTS[:1], ANSWERS[:1])[0][0])
    assert spec.judge.stats(spec.params)["parse_failures"] == 1
    scorer(PROMPTS[:1], ANSWERS[:1])
    assert len(server.bodies) == 2  # asked again: a failure is not cached
    raw = host.get("judge", "openai").score(PROMPTS[:1], ANSWERS[:1], spec.params)
    assert isinstance(raw[0], Failed) and "holds no score from 1 to 10" in raw[0].reason


def test_concurrency_limit_holds(host, server):
    server.fault, server.fail_first, server.slow_seconds = "slow", 1, 0.2
    scorer, _ = pointwise(host, server, concurrency=3)
    prompts = [f"Question {i}?" for i in range(12)]
    scorer(prompts, ["An answer."] * 12)
    assert 1 < server.max_in_flight <= 3


def test_api_key_from_the_named_variable_only(host, server, monkeypatch):
    monkeypatch.delenv("JUDGE_KEY", raising=False)
    scorer, _ = pointwise(host, server, api_key_env="JUDGE_KEY")
    with pytest.raises(ConfigError, match="api_key_env names the environment variable JUDGE_KEY, which is not set"):
        scorer(PROMPTS[:1], ANSWERS[:1])
    monkeypatch.setenv("JUDGE_KEY", "sk-test-secret")
    Client(Endpoint(server.url, "judge", api_key_env="JUDGE_KEY")).chat_many([{"messages": [{"role": "user",
                                                                                             "content": "hi"}]}])
    assert server.authorizations[-1] == "Bearer sk-test-secret"


def test_settings_are_checked(host):
    judge = host.get("judge", "openai")
    with pytest.raises(ValueError, match="timeout must be a number > 0"):
        judge.params(timeout=0)
    with pytest.raises(ValueError, match="min_score 5 must be below max_score 1"):
        judge.params(min_score=5, max_score=1)
    with pytest.raises(ValueError, match="exactly one group"):
        judge.params(score_pattern=r"\d+")
    spec = JudgeSpec("openai", judge, 1.0, judge.params())
    with pytest.raises(ConfigError, match="needs base_url"):
        Scorer([spec])(PROMPTS[:1], ANSWERS[:1])


def test_sample_pairs_run_with_a_served_judge_keeps_the_key_secret(tmp_path, server, prompts_file):
    """A whole run ranked by the HTTP judge: the key reaches the server, never the output directory."""
    secret = "sk-never-written-7f3a"
    out = tmp_path / "pairs"
    result = run_molting(
        "run", "--plugin", "sample-pairs", "--judge", "openai", "--judge-arg", f"openai.base_url={server.url}",
        "--judge-arg", "openai.model=judge", "--judge-arg", "openai.api_key_env=JUDGE_KEY", "--data", str(prompts_file),
        "--set", "num_samples=3", "--output-dir", str(out), env={"JUDGE_KEY": secret}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert server.authorizations and set(server.authorizations) == {f"Bearer {secret}"}
    written = "".join(p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())
    assert secret not in written and "JUDGE_KEY" in (out / "molting_run.json").read_text()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = metrics[-1]
    assert final["judge/openai/requests"] == len(server.bodies) > 0 and final["judge/openai/failed"] == 0
    assert secret not in result.stderr + result.stdout


def test_failed_judgements_stop_a_run_unless_it_says_otherwise(tmp_path, server, prompts_file):
    server.fault, server.fail_first = "500", -1
    common = ["run", "--plugin", "sample-pairs", "--judge", "openai", "--judge-arg", f"openai.base_url={server.url}",
              "--judge-arg", "openai.model=judge", "--judge-arg", "openai.max_retries=1", "--judge-arg",
              "openai.backoff=0", "--data", str(prompts_file), "--set", "num_samples=2"]
    failed = run_molting(*common, "--output-dir", str(tmp_path / "a"), timeout=300)
    assert failed.returncode != 0
    assert re.search(r"judge 'openai' could not judge .*HTTP 500 .*after 2 attempts", failed.stderr)
    skipped = run_molting(*common, "--judge-on-error", "skip", "--output-dir", str(tmp_path / "b"), timeout=300)
    assert skipped.returncode != 0  # every answer skipped: nothing to rank, and the error says why
    assert "wrote no pairs" in skipped.stderr and re.search(r"\d+ judgements could not be made", skipped.stderr)
