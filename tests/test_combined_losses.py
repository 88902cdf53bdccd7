"""Weighted sums of losses (the MPO recipe: sigmoid 0.8 + bco_pair 0.2 + sft 1.0), against trl's loss_weights."""

from __future__ import annotations

import pytest
import torch

import molting
from molting.discovery import load_plugins
from molting.errors import ConfigError
from molting.resolve import make_loss_params, resolve_config
from trl_oracle import make_dpo_trainer, molting_inputs, spread


@pytest.fixture(scope="module")
def host():
    return load_plugins(disabled=[])


def trl_weighted(trainer, loss_types, weights, batch, beta):
    chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len = batch
    width = int(max(chosen_len.max(), rejected_len.max()))
    token_logps, mask = spread(torch.cat([chosen, rejected]), torch.cat([chosen_len, rejected_len]), width)
    completion_mask = torch.cat([torch.zeros(mask.size(0), 1), mask], dim=1).long()
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    from trl_oracle import FixedLogps

    trainer.precompute_ref_logps = True
    trainer.loss_types, trainer.loss_weights, trainer.beta = loss_types, weights, beta
    trainer.model.train()
    return trainer._compute_loss(FixedLogps(token_logps), inputs, return_outputs=False)


@pytest.mark.parametrize("seed", [0, 1])
def test_mpo_recipe_matches_trl_loss_weights(host, demo_model, tmp_path, seed):
    g = torch.Generator().manual_seed(seed)
    logps = -30 * torch.rand(4, 12, generator=g)
    lengths = torch.randint(1, 30, (2, 12), generator=g).float()
    batch = (*logps, *lengths)
    config, [step] = resolve_config(host, [], flags={"losses": {"dpo": 0.8, "bco_pair": 0.2, "sft": 1.0}, "beta": 0.2})
    assert step.loss.name == "dpo_bco_pair_sft" and step.stage.name == "preference"
    params = make_loss_params(step, config)
    out = step.loss.compute(molting_inputs(*batch), params)
    expected = trl_weighted(make_dpo_trainer(demo_model, tmp_path), ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], batch, 0.2)
    assert abs(out.losses.mean().item() - expected.item()) < 1e-6
    assert set(out.metrics) == {"loss/dpo", "loss/bco_pair", "loss/sft"}


def test_shared_hyperparameters_and_reference_need(host):
    config, [step] = resolve_config(host, ["dpo"], flags={"losses": {"dpo": 1.0, "sft": 0.5}, "label_smoothing": 0.1})
    params = make_loss_params(step, config)
    assert (params.beta, params.label_smoothing) == (0.3, 0.1)  # beta: the demo default, shared by both
    assert step.loss.needs_reference  # dpo needs one, so the sum does
    _, [alone] = resolve_config(host, [], flags={"losses": {"sft": 1.0}})
    assert not alone.loss.needs_reference


class OtherStage:
    @molting.hookimpl
    def molting_register_losses(self, register):
        register(molting.Loss(name="elsewhere", compute=lambda i, p: None, stage="other", description="Another stage."))


def test_losses_of_different_stages_cannot_be_combined():
    host = load_plugins(disabled=[])
    host.register(OtherStage(), "other")
    with pytest.raises(ConfigError, match=r"must run in the same stage; got dpo \(stage preference\), elsewhere \(stage other\)"):
        resolve_config(host, [], flags={"losses": {"dpo": 1.0, "elsewhere": 1.0}})


@pytest.mark.parametrize("value", [["dpo", "sft"], {"dpo": "heavy"}, {"dpo": True}])
def test_weights_must_be_numbers(host, value):
    with pytest.raises(ConfigError, match="must map loss names to finite numeric weights"):
        resolve_config(host, ["dpo"], recipe={"losses": value})


def test_one_stage_at_a_time(host):
    with pytest.raises(ConfigError, match="give a single --plugin"):
        resolve_config(host, ["dpo", "ipo"], flags={"losses": {"dpo": 1.0}})


def test_cli_flags_and_recipe(tmp_path):
    from conftest import run_molting

    recipe = tmp_path / "mpo.yaml"
    recipe.write_text("losses: {dpo: 0.8, bco_pair: 0.2}\nmax_steps: 2\nlogging_steps: 1\neval: off\n")
    out = tmp_path / "out"
    result = run_molting("run", "--config", str(recipe), "--loss", "dpo=0.8", "--loss", "bco_pair=0.2", "--loss",
                         "sft=1.0", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    import json

    record = json.loads((out / "molting_run.json").read_text())
    assert record["loss"] == "dpo_bco_pair_sft" and record["config"]["losses"] == {"dpo": 0.8, "bco_pair": 0.2, "sft": 1.0}
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.8 * first["loss/dpo"] + 0.2 * first["loss/bco_pair"] + first["loss/sft"], abs=1e-6)
