"""Configuration: defaults < recipe < flags, unknown keys, safe YAML."""

from __future__ import annotations

import pytest

from molting.config import read_recipe
from molting.discovery import load_plugins
from molting.errors import ConfigError, PluginError
from molting.resolve import make_loss_params, resolve_config


@pytest.fixture(scope="module")
def host():
    return load_plugins()


def test_flags_override_the_recipe_which_overrides_defaults(host, tmp_path):
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text("plugin: dpo\nbeta: 0.3\nlearning-rate: 2.0e-5\nmax_steps: 7\nmodel: /some/model\n")
    config, steps = resolve_config(host, [], read_recipe(recipe_path), {"max_steps": 3, "seed": None})
    assert [s.name for s in steps] == ["dpo"] and steps[0].stage.name == "preference"
    assert config.max_steps == 3  # flag wins
    assert config.learning_rate == 2e-5  # recipe wins over the default
    assert config.batch_size == 8 and config.seed == 42  # defaults; a flag left unset (None) changes nothing
    params = make_loss_params(steps[0], config)
    assert (params.beta, params.label_smoothing) == (0.3, 0.0)


def test_demo_defaults_apply_only_without_a_model(host):
    demo_config, _ = resolve_config(host, ["dpo"])
    real_config, _ = resolve_config(host, ["dpo"], flags={"model": "/m"})
    assert demo_config.learning_rate == 5e-5 and real_config.learning_rate == 5e-6
    assert demo_config.loss_params["beta"] == 0.3 and "beta" not in real_config.loss_params


def test_unknown_key_lists_the_valid_keys(host, tmp_path):
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text("plugin: dpo\nbetta: 0.3\n")
    with pytest.raises(ConfigError) as err:
        resolve_config(host, [], read_recipe(recipe_path), recipe_source=str(recipe_path))
    message = str(err.value)
    assert f"unknown config key 'betta' in {recipe_path}" in message
    for key in ("beta", "label_smoothing", "learning_rate", "max_steps", "output_dir"):
        assert key in message


def test_bad_values_are_config_errors(host):
    with pytest.raises(ConfigError, match="learning_rate must be > 0"):
        resolve_config(host, ["dpo"], flags={"learning_rate": -1.0})
    config, steps = resolve_config(host, ["dpo"], flags={"beta": -0.5})
    with pytest.raises(ConfigError, match="invalid hyperparameters for loss 'dpo'.*beta"):
        make_loss_params(steps[0], config)


def test_yaml_is_read_with_the_safe_loader(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("plugin: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_recipe(path)


def test_recipe_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- dpo\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        read_recipe(path)


def test_unknown_plugin_lists_what_is_available(host):
    with pytest.raises(PluginError) as err:
        resolve_config(host, ["dpoo"])
    message = str(err.value)
    assert "no loss or stage named 'dpoo'" in message
    assert "dpo (from molting 0.1.0)" in message and "preference (from molting 0.1.0)" in message


def test_no_plugin_at_all(host):
    with pytest.raises(ConfigError, match="no plugin given"):
        resolve_config(host, [])


@pytest.mark.parametrize("flags, rates", [
    (["--lr-scheduler-type", "linear", "--warmup-steps", "2"], [0, 2.5e-5, 5e-5, 2.5e-5]),
    (["--lr-scheduler-type", "constant"], [5e-5] * 4),
])
def test_the_scheduler_and_warmup_flags_shape_the_learning_rate(tmp_path, flags, rates):
    import json

    from conftest import run_molting

    result = run_molting("run", "--plugin", "dpo", "--max-steps", "4", "--eval", "off", "--logging-steps", "1",
                         "--output-dir", str(tmp_path), *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["learning_rate"] for row in logged if "learning_rate" in row] == pytest.approx(rates)
