"""Inputs that once slipped through: each one now gets the right data or a clear error."""

from __future__ import annotations

import json

import attrs
import pytest

import molting
from conftest import run_molting
from molting.data import read_rows
from molting.discovery import load_plugins
from molting.errors import ConfigError, DataError
from molting.models import load_causal_lm
from molting.pairs import tokenize_pairs
from molting.resolve import resolve_config


def test_every_public_name_exists():
    for name in molting.__all__:
        assert hasattr(molting, name), name
    assert issubclass(molting.DataError, molting.MoltingError)


def test_a_byte_order_mark_does_not_hide_the_prompt_column(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffprompt,chosen,rejected\nQ: hi\nA:, yes, no\n".encode("utf-8").replace(b"\nA:", b"A:"))
    assert list(read_rows(path)[0]) == ["prompt", "chosen", "rejected"]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode() + b"\n")
    assert read_rows(jsonl)[0]["prompt"] == "p"


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_text_that_is_not_utf8_is_a_data_error(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 text"):
        read_rows(path)


def test_a_misspelt_prompt_column_is_reported(capsys):
    from molting.data import check_columns
    from molting.pairs import SCHEMAS

    check_columns([{"promt": "p", "chosen": "a", "rejected": "b"}], SCHEMAS, "pairs.jsonl", "preference")
    assert "ignoring the column(s) promt" in capsys.readouterr().err


@pytest.mark.parametrize("max_length", [2, 3, 5, 8])
def test_truncation_never_exceeds_max_length(demo_model, max_length):
    _, tokenizer = load_causal_lm(demo_model)
    pairs = [{"prompt": "Q: What is 12 + 30?\nA:", "chosen": " Arr! 12 plus 30 be 42, matey.", "rejected": " No."}]
    for example in tokenize_pairs(pairs, tokenizer, max_length, "truncate"):
        for key in ("chosen_ids", "rejected_ids"):
            assert 1 <= len(example[key]) and len(example["prompt_ids"]) + len(example[key]) <= max_length


@pytest.fixture(scope="module")
def host():
    return load_plugins(disabled=[])


def test_numbers_written_as_yaml_strings_are_numbers(host):
    config, _ = resolve_config(host, ["dpo"], recipe={"learning_rate": "1e-5", "max_steps": "3"})
    assert (config.learning_rate, config.max_steps) == (1e-5, 3)


@pytest.mark.parametrize(
    "recipe, message",
    [
        ({"plugin": 3}, "`plugin` in the recipe must be a name or a list of names"),
        ({"max_steps": 0}, "max_steps must be -1 (train for --epochs) or > 0"),
        ({"seed": "abc"}, "expected a number, got 'abc'"),
        ({"report_to": "bogus"}, "'report_to' must be in"),
        ({"lr_scheduler_type": "bogus"}, "'lr_scheduler_type' must be in"),
        ({"max_length": 1}, "'max_length' must be >= 2"),
    ],
)
def test_bad_run_settings_are_config_errors(host, recipe, message):
    with pytest.raises(ConfigError) as err:
        resolve_config(host, [] if "plugin" in recipe else ["dpo"], recipe=recipe)
    assert message in str(err.value)


class SetsSeed:
    @molting.hookimpl
    def molting_configure(self, config):
        return attrs.evolve(config, seed=1)


class SetsLogging:
    @molting.hookimpl
    def molting_configure(self, config):
        assert config.seed == 1  # sees the earlier hook's result
        return attrs.evolve(config, logging_steps=7)


def test_configure_hooks_chain():
    host = load_plugins(disabled=[])
    host.register(SetsLogging(), "second")  # pluggy calls the later-registered implementation first
    host.register(SetsSeed(), "first")
    config, _ = resolve_config(host, ["dpo"])
    assert (config.seed, config.logging_steps) == (1, 7)


def test_eval_rejects_a_bad_count(tmp_path):
    result = run_molting("eval", "--model", str(tmp_path), "--n", "0")
    assert result.returncode == 2 and "0 is not in the range x>=1" in result.stderr


def test_a_failed_run_says_so_in_its_record(tmp_path):
    bad = tmp_path / "null.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": None, "rejected": "r"}) + "\n")
    out = tmp_path / "out"
    result = run_molting("run", "--plugin", "dpo", "--data", str(bad), "--max-steps", "1", "--eval", "off",
                         "--output-dir", str(out))
    assert result.returncode == 1 and "row 0, field 'chosen'" in result.stderr
    record = json.loads((out / "molting_run.json").read_text())
    assert record["status"] == "failed" and "DataError" in record["error"]


def test_plain_string_prompts_get_the_bos_token_a_tokenizer_adds_by_default(demo_model):
    """As trl's trainers tokenize them: Llama-style tokenizers put BOS first; chat templates write their own."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    from molting.data import with_bos
    from molting.tokenization import tokenize_completions
    from molting.sampling import sample

    plain = AutoTokenizer.from_pretrained(demo_model)  # adds no BOS: prompts stay as they are
    assert with_bos("Q: hi", plain) == "Q: hi"
    llama_like = AutoTokenizer.from_pretrained(demo_model)
    llama_like._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", llama_like.bos_token_id)])
    assert with_bos("Q: hi", llama_like) == "<s>Q: hi" and with_bos("<s>Q: hi", llama_like) == "<s>Q: hi"
    [example] = tokenize_completions([{"prompt": "Q: hi", "chosen": " yes", "rejected": " no"}], ("chosen", "rejected"),
                                     llama_like, 64, "truncate")
    assert example["prompt_ids"][0] == llama_like.bos_token_id and example["prompt_ids"][1] != llama_like.bos_token_id
    assert llama_like.bos_token_id not in example["chosen_ids"]

    from molting.models import load_causal_lm

    model, _ = load_causal_lm(demo_model)
    samples = sample(model, llama_like, ["Q: What is 12 + 30?\nA:"], max_new_tokens=2)
    assert samples.prompt_ids[0, 0].item() == llama_like.bos_token_id


def test_a_completion_ending_with_the_eos_text_gets_one_eos(demo_model):
    from transformers import AutoTokenizer

    from molting.tokenization import tokenize_completions

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    eos = tokenizer.eos_token
    [example] = tokenize_completions([{"prompt": "Q:", "chosen": " yes" + eos, "rejected": " no"}], ("chosen", "rejected"),
                                     tokenizer, 64, "truncate")
    assert example["chosen_ids"].count(tokenizer.eos_token_id) == 1 and example["chosen_ids"][-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("plugin", ["grpo", "ppo", "sample-pairs"])
def test_an_online_stage_refuses_an_empty_prompt_before_loading_a_model(tmp_path, plugin):
    from molting.demo import prompt_rows
    from molting.discovery import load_plugins
    from molting.errors import DataError
    from molting.pipeline import run

    rows = prompt_rows("train", 5)
    rows[3]["prompt"] = ""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    host = load_plugins(disabled=[])
    config, steps = resolve_config(host, [plugin], flags={"data": str(data), "output_dir": str(tmp_path / "o"),
                                                          "judges": {"demo-rule": 1.0}})
    with pytest.raises(DataError, match=r"prompts.jsonl, row 3, field 'prompt': expected a non-empty string"):
        run(config, steps, host)
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_a_row_with_a_column_row_0_lacks_is_refused(tmp_path):
    """Row 0 without a prompt would otherwise make every row's prompt the common prefix, silently."""
    from molting.data import check_columns
    from molting.errors import DataError
    from molting.pairs import SCHEMAS

    rows = [{"chosen": "a b", "rejected": "a c"}, {"prompt": "p", "chosen": "b", "rejected": "c"}]
    with pytest.raises(DataError, match=r"pairs, row 1: has the column\(s\) prompt that row 0 lacks"):
        check_columns(rows, SCHEMAS, "pairs", "preference")
