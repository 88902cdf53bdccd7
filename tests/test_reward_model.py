"""The reward-model stage and the bradley-terry loss: trl's RewardTrainer as the oracle, the saved model, the demo result."""

from __future__ import annotations

import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from molting import demo
from molting.components import Loss, RewardInputs
from molting.config import RunConfig
from molting.discovery import load_plugins
from molting.errors import ConfigError, DataError
from molting.plugins.reward import (
    METRICS,
    BradleyTerryParams,
    RewardCollator,
    bradley_terry_loss,
    build_trainer,
    format_reward_pairs,
    load_reward_model,
    score_pairs,
    tokenize_reward_pairs,
)
from molting.pipeline import run
from molting.resolve import resolve_config

BRADLEY_TERRY = Loss(name="bradley-terry", compute=bradley_terry_loss, params=BradleyTerryParams, stage="reward-model",
                     description="Bradley-Terry", needs_reference=False)
TRL_METRICS = ("accuracy", "margin", "min_reward", "mean_reward", "max_reward", "num_tokens")


class FixedRewards(torch.nn.Module):
    """A 'reward model' whose forward returns the given rewards as its logits, shape (2B, 1)."""

    def __init__(self, rewards: torch.Tensor) -> None:
        super().__init__()
        self.rewards = rewards

    def forward(self, **kwargs):
        return SimpleNamespace(logits=self.rewards[:, None])


def trl_stand_in(center_rewards_coefficient):
    """The least of a trl ``RewardTrainer`` that its ``compute_loss`` needs, on one CPU process."""
    accelerator = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    return SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator,
                           args=SimpleNamespace(center_rewards_coefficient=center_rewards_coefficient),
                           _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0,
                           _tp_size=1)


@pytest.fixture(scope="module")
def reward_model(demo_model):
    context = SimpleNamespace(config=RunConfig(plugins=["reward-model"]), model_path=demo_model)
    return load_reward_model(context)


@pytest.fixture(scope="module")
def ours(reward_model, tmp_path_factory):
    model, tokenizer = reward_model
    out = tmp_path_factory.mktemp("ours")
    examples = tokenize_reward_pairs(format_reward_pairs(demo.preference_rows("test", 2), tokenizer, "demo"), tokenizer, 512, "drop")
    trainer = build_trainer(model, tokenizer, examples, RunConfig(plugins=["reward-model"], output_dir=str(out)),
                            BRADLEY_TERRY, BradleyTerryParams(), out)
    trainer.model.train()
    return trainer


def _rewards(seed: int, n: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    chosen, rejected = 4 * torch.randn(2, n, generator=g)
    chosen[0], rejected[0] = 25.0, -30.0  # far in the tails of the sigmoid
    return chosen, rejected, torch.rand(n, generator=g) * 2


@pytest.mark.parametrize("use_margin", [False, True], ids=["no-margin", "margin"])
@pytest.mark.parametrize("center", [None, 0.01], ids=["uncentered", "centered"])
def test_loss_and_metrics_equal_trl_reward_trainer_on_given_rewards(use_margin, center, ours):
    """trl's own RewardTrainer.compute_loss and the stage's, on the same rewards (a model that returns them)."""
    from trl import RewardTrainer

    chosen, rejected, margin = _rewards(seed=int(use_margin) + 2 * (center is not None))
    inputs = {"input_ids": torch.zeros(14, 5, dtype=torch.long), "attention_mask": torch.ones(14, 5, dtype=torch.long)}
    if use_margin:
        inputs["margin"] = margin
    model = FixedRewards(torch.cat([chosen, rejected]))
    trl = trl_stand_in(center)
    trl_loss = RewardTrainer.compute_loss(trl, model, dict(inputs)).item()

    ours.loss_params = BradleyTerryParams(center_rewards_coefficient=center)
    ours._metrics["train"].clear()
    ours.total_tokens = 0
    our_loss = ours.compute_loss(model, dict(inputs)).item()
    direct = bradley_terry_loss(RewardInputs(chosen, rejected, margin if use_margin else None), ours.loss_params)

    assert abs(our_loss - trl_loss) < 1e-6
    assert abs(direct.losses.mean().item() - trl_loss) < 1e-6
    for name in TRL_METRICS:
        assert ours._metrics["train"][name][-1] == pytest.approx(trl._metrics["train"][name][-1], abs=1e-6), name


def test_the_loss_is_per_pair_and_its_gradient_ranks_the_pairs():
    chosen = torch.zeros(3, requires_grad=True)
    rejected = torch.zeros(3, requires_grad=True)
    out = bradley_terry_loss(RewardInputs(chosen, rejected, torch.tensor([0.0, 1.0, -1.0])), BradleyTerryParams())
    assert out.losses.shape == (3,)
    assert out.losses[1] > out.losses[0] > out.losses[2]  # a required margin makes a tie worse
    out.losses.sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    centered = bradley_terry_loss(RewardInputs(torch.tensor([3.0]), torch.tensor([1.0])), BradleyTerryParams(0.5))
    assert centered.losses.item() == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(2.0)).item() + 0.5 * 16)


@pytest.fixture(scope="module")
def trl_reward(demo_model, tmp_path_factory):
    """A real trl RewardTrainer (centering 0.01) on the demo model, its data the demo pairs with margins."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    model = AutoModelForSequenceClassification.from_pretrained(demo_model, num_labels=1, dtype=torch.float32)
    args = RewardConfig(output_dir=str(tmp_path_factory.mktemp("trl-rm")), report_to=[], use_cpu=True, bf16=False,
                        center_rewards_coefficient=0.01, per_device_train_batch_size=6)
    return RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(_rows_with_margins()),
                         processing_class=AutoTokenizer.from_pretrained(demo_model))


def _rows_with_margins():
    return [{**row, "margin": 0.25 * i} for i, row in enumerate(demo.preference_rows("test", 6))]


def test_whole_model_loss_and_metrics_match_trl_reward_trainer(reward_model, trl_reward, tmp_path):
    """Same weights, same batch (margins, centering 0.01): the stage's loss and metrics are trl's; and the pairs are
    tokenized as trl tokenizes them."""
    model, tokenizer = reward_model
    examples = tokenize_reward_pairs(format_reward_pairs(_rows_with_margins(), tokenizer, "demo"), tokenizer, 512, "drop")
    for example, prepared in zip(examples, trl_reward.train_dataset, strict=True):
        assert prepared["chosen_ids"] == example["prompt_ids"] + example["chosen_ids"]
        assert prepared["rejected_ids"] == example["prompt_ids"] + example["rejected_ids"]
    batch = RewardCollator(tokenizer.pad_token_id)(examples)
    assert batch["margin"].tolist() == [0.25 * i for i in range(6)]
    trainer = build_trainer(model, tokenizer, examples, RunConfig(plugins=["reward-model"], output_dir=str(tmp_path)),
                            BRADLEY_TERRY, BradleyTerryParams(0.01), tmp_path)
    trl_reward.model.load_state_dict(model.state_dict())
    trainer.model.train()
    trl_reward.model.train()
    our_loss = trainer.compute_loss(trainer.model, dict(batch)).item()
    trl_loss = trl_reward.compute_loss(trl_reward.model, {k: v for k, v in batch.items() if k != "index"}).item()
    assert abs(our_loss - trl_loss) < 1e-5
    for name in TRL_METRICS:
        assert trainer._metrics["train"][name][-1] == pytest.approx(trl_reward._metrics["train"][name][-1], abs=1e-5), name


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(plugins, tmp_path, **flags):
    host = load_plugins()
    config, steps = resolve_config(host, plugins, {}, {"output_dir": str(tmp_path / "out"), "eval": "off", **flags})
    return run(config, steps, host)


def test_training_saves_a_reward_model_that_scores_batches(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = _jsonl(tmp_path / "pairs.jsonl", _rows_with_margins())
    [metrics] = _run(["reward-model"], tmp_path, data=str(data), max_steps=3, batch_size=6, logging_steps=1,
                     center_rewards_coefficient=0.01)
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(METRICS) <= set().union(*records)
    assert "eval_accuracy" not in metrics  # only on the demo data
    record = json.loads((out / "molting_run.json").read_text())
    assert record["loss"] == "bradley-terry" and record["loss_params"] == {"center_rewards_coefficient": 0.01}
    assert (out / "model.safetensors").exists() and not (out / "training_args.bin").exists()

    model = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    pairs = tokenize_reward_pairs(format_reward_pairs(demo.preference_rows("test", 5), tokenizer, "t"), tokenizer, 512, "drop")
    batched = score_pairs(model, pairs, tokenizer.pad_token_id, batch_size=5)
    alone = score_pairs(model, pairs, tokenizer.pad_token_id, batch_size=1)
    assert torch.allclose(batched[0], alone[0], atol=1e-5) and torch.allclose(batched[1], alone[1], atol=1e-5)


def test_lora_reward_model_is_saved_merged_with_its_adapter_beside(demo_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = _jsonl(tmp_path / "pairs.jsonl", demo.preference_rows("train", 4))
    _run(["reward-model"], tmp_path, data=str(data), max_steps=2, batch_size=4, lora_r=4, merge=True, learning_rate=1e-3)
    out = tmp_path / "out"
    assert not (out / "adapter_config.json").exists() and (out / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    base = AutoModelForSequenceClassification.from_pretrained(demo_model, num_labels=1)
    base.config.pad_token_id = merged.config.pad_token_id
    adapted = PeftModel.from_pretrained(base, out / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(out)
    pairs = tokenize_reward_pairs(format_reward_pairs(demo.preference_rows("test", 4), tokenizer, "t"), tokenizer, 512, "drop")
    merged_scores, adapted_scores = score_pairs(merged, pairs, tokenizer.pad_token_id), score_pairs(adapted, pairs, tokenizer.pad_token_id)
    # the adapter holds the trained score head (modules_to_save) and the LoRA weights; merged, they give the same rewards
    assert torch.allclose(merged_scores[0], adapted_scores[0], atol=1e-4)
    assert torch.allclose(merged_scores[1], adapted_scores[1], atol=1e-4)


@pytest.mark.slow
def test_demo_reward_model_ranks_held_out_pairs(tmp_path, capsys):
    """8 steps of the demo defaults (learning rate 1e-4) already rank > 75% of the held-out demo pairs right."""
    [metrics] = _run(["reward-model"], tmp_path, max_steps=8)
    assert metrics["eval_accuracy"] > 0.75
    assert "held-out pairwise accuracy" in capsys.readouterr().err
    record = json.loads((tmp_path / "out" / "molting_run.json").read_text())
    assert record["metrics"]["eval_accuracy"] == metrics["eval_accuracy"]
    assert record["config"]["learning_rate"] == 1e-4


@pytest.mark.parametrize(
    "margin, message",
    [("1.5", r"pairs\.jsonl, row 1, field 'margin': expected a finite number .*got '1\.5'"),
     (None, r"pairs\.jsonl, row 1, field 'margin': expected a finite number .*got None"),
     (True, r"pairs\.jsonl, row 1, field 'margin': expected a finite number .*got True")],
)
def test_a_bad_margin_names_file_row_and_field(margin, message, reward_model):
    _, tokenizer = reward_model
    rows = _rows_with_margins()[:2]
    rows[1]["margin"] = margin
    with pytest.raises(DataError, match=message):
        format_reward_pairs(rows, tokenizer, "pairs.jsonl")
    del rows[1]["margin"]
    with pytest.raises(DataError, match=r"pairs\.jsonl, row 1, field 'margin': .*missing"):
        format_reward_pairs(rows, tokenizer, "pairs.jsonl")


def test_centering_coefficient_is_validated():
    assert BradleyTerryParams().center_rewards_coefficient is None
    assert BradleyTerryParams("1e-2").center_rewards_coefficient == 0.01  # YAML reads 1e-2 as a string
    for bad in (-0.1, float("nan"), float("inf"), "often"):
        with pytest.raises(ValueError, match="center_rewards_coefficient|expected a number"):
            BradleyTerryParams(bad)
    with pytest.raises(TypeError):
        BradleyTerryParams(True)


def test_unsupported_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="--load-in-4bit"):
        _run(["reward-model"], tmp_path, max_steps=1, lora_r=4, load_in_4bit=True)
    with pytest.raises(ConfigError, match="--padding-free"):
        _run(["reward-model"], tmp_path, max_steps=1, padding_free=True)
