"""Faults in a run: non-finite losses and weights, losses of the wrong shape, hyperparameters that cannot be finite.

Broken losses (``broken_losses.py``) are registered the way a third-party
plugin registers its own and trained on the demo model.
"""

from __future__ import annotations

import json
import math

import pytest

import molting
from broken_losses import BROKEN
from molting.errors import ConfigError, MoltingError, PluginError


class Broken:
    @molting.hookimpl
    def molting_register_losses(self, register):
        for name in ("nan", "reduced"):
            register(BROKEN[name][0])


def run_dpo(tmp_path, plugin="dpo", **flags):
    from molting.discovery import load_plugins
    from molting.pipeline import run
    from molting.resolve import resolve_config

    host = load_plugins()
    host.register(Broken(), "broken")
    out = tmp_path / "out"
    settings = {"output_dir": str(out), "max_steps": 2, "logging_steps": 1, "eval": "off", "batch_size": 4,
                "precision": "fp32", **flags}
    config, steps = resolve_config(host, [plugin], flags=settings)
    run(config, steps, host)
    return out


def test_a_loss_nan_for_some_examples_skips_the_step_names_them_and_logs_nan(tmp_path, capsys):
    """The loss is NaN for the first example of each batch only: its gradients are finite, the step is not."""
    with pytest.raises(MoltingError, match=r"2 optimizer steps in a row were skipped \(the last: non-finite loss on "
                                           r"the examples \[\d+\]\)"):
        run_dpo(tmp_path, "nan", max_skipped_steps=2, max_steps=4)
    err = capsys.readouterr().err
    assert "step 1: non-finite loss on the examples [" in err and "optimizer step skipped (1 in a row, at most 2)" in err
    logged = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert math.isnan(logged[0]["loss"])  # not hidden as 0.0
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_skipped_step_leaves_the_weights_alone(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from molting.demo import demo_model_dir

    out = run_dpo(tmp_path, "nan", max_skipped_steps=9, max_steps=2)
    start = AutoModelForCausalLM.from_pretrained(demo_model_dir()).state_dict()
    end = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(start[name], end[name]) for name in start)


def test_a_loss_that_reduces_the_batch_is_refused_in_the_run(tmp_path):
    with pytest.raises(PluginError, match=r"loss 'reduced': losses has shape \(\) for a batch of 4; expected \(4,\)\. "
                                          r"Return one loss per example"):
        run_dpo(tmp_path, "reduced")


def test_weights_that_turn_non_finite_stop_the_run_before_anything_is_saved(tmp_path):
    """1e39 is a finite float64 but not a float32: the first AdamW step writes inf into the weights."""
    with pytest.raises(MoltingError, match="step 1 left non-finite weights .* stopping without saving them"):
        run_dpo(tmp_path, learning_rate=1e39)
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_a_learning_rate_that_is_not_finite_is_refused(tmp_path, value):
    from molting.discovery import load_plugins
    from molting.resolve import resolve_config

    with pytest.raises(ConfigError, match=f"learning_rate.*expected a finite number, got {value!r}"):
        resolve_config(load_plugins(), ["dpo"], flags={"learning_rate": value})


@pytest.mark.parametrize("flags, message", [
    ({"beta": float("inf")}, "loss 'dpo': beta must be a finite number, got inf"),
    ({"losses": {"dpo": 1.0, "sft": float("nan")}}, "must map loss names to finite numeric weights"),
    ({"judges": {"rule": float("inf")}}, "the weight of 'rule' must be a finite number"),
])
def test_loss_settings_and_weights_that_are_not_finite_are_refused(flags, message):
    from molting.discovery import load_plugins
    from molting.resolve import make_loss_params, resolve_config

    with pytest.raises(ConfigError, match=message):
        config, steps = resolve_config(load_plugins(), ["dpo"], flags=flags)
        make_loss_params(steps[0], config)
