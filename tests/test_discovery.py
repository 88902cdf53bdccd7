"""Plugin discovery through entry points: built-ins, broken plugins, conflicts, blocking, listing."""

from __future__ import annotations

import re
import json
import sys

import pytest
from click.testing import CliRunner

from molting.cli import cli
from molting.discovery import load_plugins
from molting.errors import PluginError
from molting.resolve import resolve_config
from conftest import run_molting
from plugin_dists import HINGE_LOSS, make_distribution


def test_builtins_load_through_the_entry_point_group():
    host = load_plugins(disabled=[])
    dpo = host.plugins["dpo"]
    assert (dpo.distribution, dpo.status, dpo.module) == ("molting", "ok", "molting.plugins.dpo")
    assert dpo.components == ["loss:dpo"] and dpo.hooks == ["molting_register_losses"]
    assert host.get("stage", "preference").default_loss == "dpo"
    assert "demo-preference" in host.names("dataset")


def test_a_plugin_that_fails_to_import_is_reported_and_the_rest_work(tmp_path, monkeypatch, capsys):
    site = make_distribution(tmp_path / "site", "molting-broken", "0.3", {"simpo": "import no_such_module_xyz\n"})
    monkeypatch.syspath_prepend(str(site))
    host = load_plugins(disabled=[])
    info = host.plugins["simpo"]
    assert info.status == "broken" and "No module named 'no_such_module_xyz'" in info.error
    assert "plugin 'simpo' (molting-broken 0.3) is broken" in capsys.readouterr().err
    assert host.get("loss", "dpo")  # the others still work
    with pytest.raises(PluginError) as err:
        resolve_config(host, ["simpo"])
    message = str(err.value)
    assert "simpo from molting-broken 0.3 is broken: ModuleNotFoundError: No module named 'no_such_module_xyz'" in message


def test_same_component_name_from_two_distributions_is_an_error(tmp_path, monkeypatch, capsys):
    site = tmp_path / "site"
    make_distribution(site, "molting-hinge-a", "1.0", {"hinge-a": HINGE_LOSS.replace("{name}", "slic")})
    make_distribution(site, "molting-hinge-b", "2.0", {"hinge-b": HINGE_LOSS.replace("{name}", "slic")})
    monkeypatch.syspath_prepend(str(site))
    host = load_plugins(disabled=[])
    assert "loss 'slic' is registered by both molting-hinge-a 1.0 and molting-hinge-b 2.0" in capsys.readouterr().err
    with pytest.raises(PluginError, match="loss 'slic' is provided by both molting-hinge-a 1.0 and molting-hinge-b 2.0"):
        resolve_config(host, ["slic"])


def test_a_third_party_loss_resolves_to_its_stage(tmp_path, monkeypatch):
    site = make_distribution(tmp_path / "site", "molting-slic", "1.0", {"slic": HINGE_LOSS.replace("{name}", "slic")})
    monkeypatch.syspath_prepend(str(site))
    host = load_plugins(disabled=[])
    assert host.plugins["slic"].distribution == "molting-slic"
    config, [step] = resolve_config(host, ["slic"], flags={"beta": 0.7})
    assert (step.stage.name, step.loss.name, config.loss_params["beta"]) == ("preference", "slic", 0.7)


def test_disable_env_blocks_plugins(monkeypatch):
    monkeypatch.setenv("MOLTING_DISABLE_PLUGINS", "dpo, demo")
    host = load_plugins()
    assert host.plugins["dpo"].status == "disabled" and host.plugins["demo"].status == "disabled"
    assert "dpo" not in host.names("loss") and host.names("dataset") == []
    with pytest.raises(PluginError, match="dpo from molting 0.1.0 is disabled: blocked by MOLTING_DISABLE_PLUGINS"):
        resolve_config(host, ["dpo"])


BAD_REGISTER = """
    import molting

    @molting.hookimpl
    def molting_register_losses(register):
        register("not a loss")
"""

BAD_SIGNATURE = """
    import molting

    @molting.hookimpl
    def molting_register_losses(registrar):
        pass
"""

BAD_NAME = """
    import molting

    @molting.hookimpl
    def molting_register_losses(register):
        register(molting.Loss(name="Bad Name", compute=print, description="x"))
"""

MISSPELT_HOOK = """
    import molting

    @molting.hookimpl
    def molting_register_loss(register):  # the hook is molting_register_losses
        register(molting.Loss(name="never-registered", compute=print, description="x"))
"""

UNKNOWN_HOOK = """
    import molting

    @molting.hookimpl
    def molting_frobnicate_everything(config):
        pass
"""


@pytest.mark.parametrize(
    "source, expected",
    [
        (MISSPELT_HOOK, "it implements 'molting_register_loss', which is not a molting hook; did you mean "
                        "'molting_register_losses'?"),
        (UNKNOWN_HOOK, "it implements 'molting_frobnicate_everything', which is not a molting hook; the hooks are "
                       "listed in docs/hooks.md"),
        (BAD_REGISTER, "molting_register_losses got str; expected a molting.Loss"),
        (BAD_SIGNATURE, "registrar"),
        (BAD_NAME, "name 'Bad Name' is not well formed"),
    ],
)
def test_plugins_with_bad_hooks_are_marked_broken(tmp_path, monkeypatch, source, expected):
    site = make_distribution(tmp_path / "site", "molting-bad", "0.1", {"bad": source})
    monkeypatch.syspath_prepend(str(site))
    host = load_plugins(disabled=[])
    assert host.plugins["bad"].status == "broken"
    assert expected in host.plugins["bad"].error
    assert host.plugins["dpo"].status == "ok"


def test_plugins_command_lists_plugins_and_survives_a_broken_one(tmp_path, monkeypatch):
    site = make_distribution(tmp_path / "site", "molting-broken", "0.3", {"simpo": "raise RuntimeError('boom')\n"})
    monkeypatch.syspath_prepend(str(site))
    runner = CliRunner()
    result = runner.invoke(cli, ["plugins"], obj=load_plugins(disabled=[]))
    assert result.exit_code == 0, result.output
    assert "dpo  (molting 0.1.0)  ok" in result.output
    assert re.search(r"loss +dpo", result.output) and "hooks: molting_register_losses" in result.output
    assert "simpo  (molting-broken 0.3)  broken: RuntimeError: boom" in result.output

    result = runner.invoke(cli, ["plugins", "--json"], obj=load_plugins(disabled=[]))
    entries = {e["name"]: e for e in json.loads(result.stdout)}
    assert entries["dpo"]["components"] == [
        {"kind": "loss", "name": "dpo", "description": entries["dpo"]["components"][0]["description"]}
    ]
    assert entries["dpo"]["version"] == "0.1.0" and entries["simpo"]["status"] == "broken"


@pytest.mark.parametrize("args", [["--help"], ["plugins"], ["run", "--help"]])
def test_cli_answers_without_importing_torch(args):
    code = (
        "import sys\nfrom molting.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'datasets', 'trl') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_python_dash_m_molting_is_the_molting_command():
    result = run_molting("plugins")
    assert result.returncode == 0 and "dpo  (molting 0.1.0)  ok" in result.stdout
