"""The outside stage examples/molting-online-dpo: installed with pip into its own folder, run through the CLI.

It proves a stage ships like a loss: its own distribution, an entry point in
group ``molting``, only molting's public toolkit. The tests install it as a
user would, run it (with its default loss and with ``--loss ipo=1``), check
its ranking of sampled completions, and check that the loss on a fixed batch
of sampled pairs is trl's OnlineDPOTrainer loss on the same log-probs.
"""

from __future__ import annotations

import re
import copy
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import run_molting
from molting.judging import JudgeSpec, Scorer

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "molting-online-dpo"
QUICK = ("--batch-size", "8", "--logging-steps", "1", "--eval", "off", "--set", "max_new_tokens=12")
"""A short run: 8 prompts a step, completions of at most 12 tokens, no held-out evaluation."""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """pip-install examples/molting-online-dpo (no network: no deps, no build isolation) into its own folder."""
    site = tmp_path_factory.mktemp("online-dpo-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(EXAMPLE)],
        check=True, capture_output=True, text=True,
    )
    return site


@pytest.fixture(scope="module")
def env(site) -> dict[str, str]:
    """The CLI's environment: the installed package on the path, and torch on one thread (see one_thread)."""
    return {"PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are too small to share between threads, and on 2 busy cores two threads spin
    against each other: a 3-step run took 2 s on one thread and 42 s on two (molting.testing does the same)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def package(site):
    """The installed package, importable in this process for the tests of its pieces (off sys.path after)."""
    sys.path.insert(0, str(site))
    try:
        import molting_online_dpo

        yield molting_online_dpo
    finally:
        sys.path.remove(str(site))


# --------------------------------------------------------------------------- installed, listed, run, checked


def test_the_installed_stage_is_listed(env):
    result = run_molting("plugins", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "online-dpo  (molting-online-dpo 0.1.0)  ok" in result.stdout
    assert re.search(r"stage +online-dpo", result.stdout)


def test_a_short_run_logs_every_declared_metric_and_saves_a_loadable_model(env, package, tmp_path):
    import transformers

    out = tmp_path / "online-dpo"
    result = run_molting("run", "--plugin", "online-dpo", "--max-steps", "2", *QUICK, "--output-dir", str(out), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 samples each, 8 prompts per micro-step, judges demo-rule x1, loss dpo" in result.stderr
    assert "reference model: frozen copy" in result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    logged = set().union(*records)
    assert set(package.METRICS) <= logged, set(package.METRICS) - logged
    assert all(r["beta"] == 0.3 for r in records if "beta" in r)  # molting's demo β for its own losses
    run = json.loads((out / "molting_run.json").read_text())
    assert run["plugins"]["online-dpo"]["distribution"] == "molting-online-dpo"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.architectures == ["LlamaForCausalLM"]


def test_any_preference_loss_runs_in_the_stage(site, tmp_path, monkeypatch, capsys):
    """`--loss ipo=1`: a loss written for the preference stage runs here, because both hand it PreferenceInputs.

    In this process (resolved and run as the CLI does), which spares the test a second start of torch."""
    from molting.discovery import load_plugins
    from molting.pipeline import run
    from molting.resolve import resolve_config

    monkeypatch.syspath_prepend(str(site))
    host = load_plugins(disabled=[])
    out = tmp_path / "ipo"
    config, steps = resolve_config(host, ["online-dpo"], flags={
        "losses": {"ipo": 1.0}, "max_steps": 2, "batch_size": 8, "logging_steps": 1, "eval": "off",
        "max_new_tokens": 12, "output_dir": str(out)})
    assert [(step.stage.name, step.loss.name) for step in steps] == [("online-dpo", "ipo")]
    run(config, steps, host)
    assert "loss ipo" in capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss" in r]
    assert len(trained) == 2 and "rewards/margins" in set().union(*records)
    for record in trained:  # IPO's squared loss is (1/2β)² at the start; zero only where every pair tied
        assert (record["loss"] > 0) == (record["frac_ties"] < 1), record


def test_a_resumed_run_samples_afresh_what_the_uninterrupted_run_sampled(site, tmp_path, monkeypatch):
    """Resumption is the Trainer's: the checkpoint restores the weights, the optimizer and the random state and
    nothing sampled is stored, so the resumed run samples its completions again, and the same ones."""
    from molting.discovery import load_plugins
    from molting.pipeline import run
    from molting.resolve import resolve_config

    monkeypatch.syspath_prepend(str(site))
    host = load_plugins(disabled=[])

    def train(out, **flags):
        config, steps = resolve_config(host, ["online-dpo"], flags={
            "max_steps": 3, "batch_size": 4, "logging_steps": 1, "eval": "off", "max_new_tokens": 16,
            "output_dir": str(out), **flags})
        run(config, steps, host)
        return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}

    whole = train(tmp_path / "whole", save_steps=2)
    resumed = train(tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-2"))
    assert list(resumed) == [3]
    for name in ("loss", "objective/scores", "frac_ties", "completions/mean_length", "objective/entropy"):
        assert resumed[3].get(name) == pytest.approx(whole[3].get(name), abs=1e-6), name


def test_molting_check_passes_the_stage(env):
    result = run_molting("check", "online-dpo", "--skip-slow", env=env)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "stage:online-dpo" in result.stdout and "failed" not in result.stdout


# --------------------------------------------------------------------------- the loss on a fixed batch


@pytest.fixture(scope="module")
def fixed_batch(package):
    """Two sampled completions for each of 8 demo prompts, judged by demo-rule, and a reference that differs."""
    from molting import demo
    from molting.discovery import load_plugins
    from molting.models import load_causal_lm
    from molting.sampling import sample
    from molting.ranking import rank

    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(demo.demo_model_dir())
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for weight in reference.parameters():
            weight.add_(0.02 * torch.randn_like(weight))  # so that the log-ratios are not all zero
    model.eval(), reference.eval()
    rows = demo.prompt_rows("train", 8)
    samples = sample(model, tokenizer, [r["prompt"] for r in rows], n=2, max_new_tokens=16, temperature=1.0)
    host = load_plugins(disabled=[])
    judge = host.get("judge", "demo-rule")
    scorer = Scorer([JudgeSpec("demo-rule", judge, 1.0, judge.params())])
    ranking = rank(scorer, samples.prompts, samples.texts, samples.texts, 2, {}, samples.rows,
                   samples.truncated.tolist())
    assert any(p.tie for p in ranking.pairs) and not all(p.tie for p in ranking.pairs)  # both cases are tested
    return SimpleNamespace(model=model, reference=reference, tokenizer=tokenizer, samples=samples, ranking=ranking,
                           dpo=host.get("loss", "dpo"))


def _trl_online_dpo(fixed, beta: float) -> dict[str, torch.Tensor]:
    """trl's OnlineDPOTrainer.training_step on the same samples and judge scores, from its own _forward."""
    from trl.experimental.online_dpo import OnlineDPOTrainer

    s, scores = fixed.samples, torch.tensor(fixed.ranking.scores)
    assert bool(s.prompt_mask.all())  # demo prompts have one length: no left padding, so trl's positions are ours
    forward = lambda m: OnlineDPOTrainer._forward(SimpleNamespace(max_length=512), m, s.prompt_ids, s.prompt_mask,  # noqa: E731
                                                  s.completion_ids, s.completion_mask)
    with torch.no_grad():
        logprobs, ref_logprobs = forward(fixed.model), forward(fixed.reference)
    mask = s.completion_mask.float()
    first, second = torch.arange(0, len(scores), 2), torch.arange(1, len(scores), 2)  # trl's two halves
    pick = scores[first] >= scores[second]
    chosen, rejected = torch.where(pick, first, second), torch.where(pick, second, first)
    sums, ref_sums = (logprobs * mask).sum(1), (ref_logprobs * mask).sum(1)
    logits = (sums[chosen] - sums[rejected]) - (ref_sums[chosen] - ref_sums[rejected])
    both = torch.cat([chosen, rejected])
    return {"losses": -torch.nn.functional.logsigmoid(beta * logits),
            "rewards/chosen": beta * (sums[chosen] - ref_sums[chosen]),
            "rewards/rejected": beta * (sums[rejected] - ref_sums[rejected]),
            # trl sums KL and entropy over the padding after EOS too; the stage counts completion tokens only
            "objective/kl": (sums - ref_sums)[both], "objective/entropy": -sums[both]}


@pytest.mark.parametrize("skip_ties", [False, True], ids=["ties-kept-as-trl", "ties-skipped"])
def test_the_loss_on_a_fixed_batch_is_trls_online_dpo_loss(fixed_batch, skip_ties):
    from molting_online_dpo.trainer import online_dpo_loss, pair_batch

    fixed, beta = fixed_batch, 0.3
    batch = pair_batch(fixed.samples, fixed.ranking, list(range(8)), 2, skip_ties, fixed.tokenizer.pad_token_id)
    under_reference = lambda model, compute: compute(fixed.reference)  # noqa: E731
    with torch.no_grad():
        loss, losses, per_completion, per_pair = online_dpo_loss(fixed.model, batch, fixed.dpo,
                                                                 fixed.dpo.params(beta=beta), under_reference)
    trl = _trl_online_dpo(fixed, beta)
    keep = torch.tensor([not (p.tie and skip_ties) for p in fixed.ranking.pairs])
    assert torch.allclose(losses, trl["losses"], atol=1e-5)
    assert loss.item() == pytest.approx(trl["losses"][keep].mean().item(), abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected"):
        assert torch.allclose(per_pair[name], trl[name], atol=1e-5), name
    for name in ("objective/kl", "objective/entropy"):
        assert torch.allclose(per_completion[name], trl[name], atol=1e-4), name
    assert per_completion["beta"] == beta
    # the reward of each completion, less β·KL (trl's objective/rlhf_reward)
    scores = torch.tensor(fixed.ranking.scores)
    expected = torch.cat([batch["chosen_scores"], batch["rejected_scores"]]) - beta * trl["objective/kl"]
    assert torch.allclose(per_completion["objective/rlhf_reward"], expected, atol=1e-5)
    assert sorted(batch["chosen_scores"].tolist() + batch["rejected_scores"].tolist()) == sorted(scores.tolist())


def test_a_batch_of_ties_gives_a_zero_loss_that_still_reaches_every_weight(fixed_batch):
    from molting.ranking import Pair, Ranking
    from molting_online_dpo.trainer import online_dpo_loss, pair_batch

    fixed = fixed_batch
    ties = Ranking([Pair(0, 1, tie=True)] * 8, fixed.ranking.scores)
    batch = pair_batch(fixed.samples, ties, list(range(8)), 2, True, fixed.tokenizer.pad_token_id)
    under_reference = lambda model, compute: compute(fixed.reference)  # noqa: E731
    loss, _, _, _ = online_dpo_loss(fixed.model, batch, fixed.dpo, fixed.dpo.params(beta=0.3), under_reference)
    loss.backward()
    assert loss.item() == 0.0 and loss.requires_grad
    grads = [w.grad for w in fixed.model.parameters()]
    assert all(g is not None and not g.any() for g in grads)
    fixed.model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- refusals, before anything loads


def test_bad_rows_and_a_missing_judge_are_refused_naming_the_problem(package, site, tmp_path, monkeypatch):
    from molting.discovery import load_plugins
    from molting.errors import ConfigError, DataError
    from molting.pipeline import run
    from molting.resolve import resolve_config

    monkeypatch.syspath_prepend(str(site))
    host = load_plugins(disabled=[])

    def attempt(rows, **flags):
        data = tmp_path / "prompts.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        config, steps = resolve_config(host, ["online-dpo"], flags={"data": str(data), "max_steps": 1,
                                                                    "output_dir": str(tmp_path / "out"), **flags})
        run(config, steps, host)

    good = {"prompt": "Q: What is 11 + 12?\nA:"}
    with pytest.raises(ConfigError, match="name one: --judge rule"):  # demo-rule grades only the demo task
        attempt([good])
    with pytest.raises(DataError, match="row 1, field 'prompt': expected a non-empty string"):
        attempt([good, {"prompt": ""}], judges={"demo-rule": 1.0})
    with pytest.raises(DataError, match="row 1: missing column"):
        attempt([good, {"question": "?"}], judges={"demo-rule": 1.0})
    with pytest.raises(ValueError, match="num_samples must be a whole number >= 2"):
        package.OnlineDPOParams(num_samples=1)
