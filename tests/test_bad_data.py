"""Bad data never gives a traceback: generated rows through every file format and each stage's data preparation.

Hypothesis writes rows for each stage's schema — text from every Unicode
plane (lone surrogates too), empty and whitespace strings, huge and
non-finite numbers, wrong types, nested values, message lists with bad
roles, missing and extra columns, standard and conversational rows mixed —
into JSONL, JSON, CSV and Parquet files. Each file goes through what a run
does with it before training (reading, checking, formatting with the chat
template, tokenizing), which either yields examples or raises a
``MoltingError`` naming the file; anything else is a bug.
"""

from __future__ import annotations

import csv
import json
import math

import pytest

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from molting.errors import MoltingError

TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "\n\t", "\x00", "\ud800", "🦀" * 30, "a" * 3000]))
SCALARS = st.one_of(TEXT, st.integers(min_value=-(2**70), max_value=2**70), st.booleans(), st.none(),
                    st.floats(allow_nan=True, allow_infinity=True))
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "", "narrator"]),
                                 "content": st.one_of(TEXT, st.integers())})
VALUES = st.one_of(SCALARS, st.lists(MESSAGE, max_size=4), st.lists(SCALARS, max_size=3),
                   st.dictionaries(st.text(max_size=5), SCALARS, max_size=2))
SCHEMAS = {
    "preference": ("prompt", "chosen", "rejected"),
    "sft": ("prompt", "completion", "messages"),
    "unpaired": ("prompt", "completion", "label"),
    "online": ("prompt", "answer"),
}
FORMATS = ("jsonl", "json", "csv", "parquet")


CONVERSATION = st.lists(MESSAGE, min_size=1, max_size=3)
NEAR = {  # rows close to valid, so that formatting, chat templates and tokenizing see them too
    "prompt": st.one_of(TEXT, CONVERSATION), "chosen": st.one_of(TEXT, CONVERSATION),
    "rejected": st.one_of(TEXT, CONVERSATION), "completion": st.one_of(TEXT, CONVERSATION),
    "messages": CONVERSATION, "label": st.one_of(st.booleans(), st.sampled_from(["true", 1, None])),
    "answer": SCALARS,
}


def rows_for(columns: tuple[str, ...]):
    keys = st.sampled_from([*columns, "extra", "Prompt"])
    anything = st.dictionaries(keys, VALUES, min_size=0, max_size=len(columns) + 1)
    near = st.fixed_dictionaries({c: NEAR[c] for c in columns if c != "messages"},
                                 optional={"messages": NEAR["messages"]} if "messages" in columns else {})
    return st.lists(st.one_of(anything, near), min_size=0, max_size=5)


def write(rows: list[dict], path) -> bool:
    """``rows`` in ``path``'s format; False when that format cannot hold them at all (the test then skips them)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8", errors="surrogatepass")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif path.suffix == ".csv":
        columns = sorted({k for r in rows for k in r})
        if not columns:
            return False
        with path.open("w", newline="", encoding="utf-8", errors="surrogatepass") as handle:
            writer = csv.DictWriter(handle, columns)
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if not isinstance(v, str) else v for k, v in r.items()} for r in rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pq.write_table(pa.Table.from_pylist(rows), path)
        except (pa.ArrowException, TypeError, ValueError, OverflowError, UnicodeError):
            return False  # values pyarrow cannot store: no such parquet file exists to be read
    return True


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from molting.demo import demo_model_dir

    return AutoTokenizer.from_pretrained(demo_model_dir())


def prepare(stage: str, rows: list[dict], tokenizer, source: str) -> list:
    """What a run of ``stage`` does with its rows before training."""
    if stage == "preference":
        from molting.pairs import format_pairs, tokenize_pairs

        return tokenize_pairs(format_pairs(rows, tokenizer, source), tokenizer, 64, "truncate", source)
    if stage == "sft":
        from molting.plugins.supervised import format_sft, tokenize_sft

        formatted, conversational = format_sft(rows, tokenizer, source)
        return tokenize_sft(formatted, tokenizer, 64, "truncate", source, conversational=conversational)
    if stage == "unpaired":
        from molting.plugins.unpaired import format_unpaired, tokenize_unpaired

        return tokenize_unpaired(format_unpaired(rows, tokenizer, source), tokenizer, 64, "truncate", source)
    from molting.sampling import prompt_rows

    return prompt_rows(rows, tokenizer, 64, "truncate", source, "grpo")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("stage", sorted(SCHEMAS))
def test_generated_rows_train_or_fail_with_a_molting_error_naming_the_file(tmp_path_factory, tokenizer, stage, fmt):
    from molting.data import read_data

    directory = tmp_path_factory.mktemp(f"{stage}-{fmt}")

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(rows_for(SCHEMAS[stage]))
    def check(rows):
        path = directory / f"data.{fmt}"
        if not write(rows, path):
            return
        try:
            prepare(stage, read_data(path), tokenizer, str(path))  # as a run reads it: a dataset, or a list
        except MoltingError as exc:
            assert str(path) in str(exc), f"the error does not name the file: {exc}"

    check()


WHOLE_RUN = {"sft": {"prompt": "Q: 1 + 1?\nA:", "completion": " 2"},
             "dpo": {"prompt": "Q: 1 + 1?\nA:", "chosen": " 2", "rejected": " 3"}}
"""Each plugin taken through a whole run, with a valid row it must train on (beside the generated ones)."""


@pytest.mark.parametrize("plugin", sorted(WHOLE_RUN))
def test_generated_rows_near_the_schema_through_a_whole_run_train_or_fail_naming_the_file(tmp_path_factory, plugin):
    """Rows close to valid, taken through ``molting run`` itself (one step): the run completes and saves a model
    that loads, or ends with a ``MoltingError`` naming the file — never a traceback, never a broken model."""
    from transformers import AutoModelForCausalLM

    from molting.discovery import load_plugins
    from molting.pipeline import run
    from molting.resolve import resolve_config

    directory = tmp_path_factory.mktemp(plugin)
    valid = WHOLE_RUN[plugin]
    near = st.lists(st.fixed_dictionaries({c: NEAR[c] for c in valid}), min_size=1, max_size=4)
    outcomes = []

    @settings(max_examples=4, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(near)
    @example([valid, valid])
    def check(rows):
        path = directory / "data.jsonl"
        write(rows, path)
        out = directory / f"out-{len(outcomes)}"
        host = load_plugins()
        config, steps = resolve_config(host, [plugin], flags={
            "data": str(path), "output_dir": str(out), "max_steps": 1, "batch_size": 2, "eval": "off",
            "max_length": 64, "precision": "fp32"})
        try:
            run(config, steps, host)
        except MoltingError as exc:
            assert str(path) in str(exc), f"the error does not name the file: {exc}"
            outcomes.append("refused")
            return
        assert json.loads((out / "molting_run.json").read_text())["status"] == "completed"
        AutoModelForCausalLM.from_pretrained(out)
        outcomes.append("trained")

    check()
    assert "trained" in outcomes and len(outcomes) >= 2  # the valid rows trained; generated ones ran too


def test_non_finite_numbers_in_text_fields_are_refused_not_tokenized(tmp_path, tokenizer):
    from molting.data import read_rows
    from molting.errors import DataError

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": math.inf, "rejected": "r"}).replace("Infinity", "1e999") + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl, row 0, field 'chosen': expected a non-empty string"):
        prepare("preference", read_rows(path), tokenizer, str(path))


# --------------------------------------------------------------------------- recipes and --set

RECIPE_KEYS = st.sampled_from(["plugin", "plugins", "model", "data", "learning_rate", "epochs", "max_steps", "beta",
                               "batch_size", "max_length", "lora_r", "dtype", "judges", "judge_args", "losses",
                               "columns", "stages", "eval", "seed", "label_smoothing", "warmup_steps", "optim"])


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(RECIPE_KEYS, VALUES, max_size=5))
def test_generated_recipes_resolve_or_fail_with_a_config_error(tmp_path_factory, recipe):
    """A recipe of wrong types and shapes, written as YAML and read back as a run reads it."""
    import yaml

    from molting.config import read_recipe
    from molting.discovery import load_plugins
    from molting.resolve import make_loss_params, make_stage_params, resolve_config

    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    try:
        path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    except UnicodeEncodeError:
        return  # a lone surrogate cannot be written as YAML text: no such file
    try:
        config, steps = resolve_config(load_plugins(), [], read_recipe(path), recipe_source=str(path))
        for step in steps:
            make_loss_params(step, step.config or config)
            make_stage_params(step, step.config or config)
    except MoltingError:
        pass


@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(st.tuples(RECIPE_KEYS, st.text(max_size=12)), max_size=3))
def test_generated_set_flags_resolve_or_fail_with_a_config_error(pairs):
    """``--set KEY=VALUE`` as the CLI parses it (YAML values) into the flags."""
    import click

    from molting.cli import _parse_set
    from molting.discovery import load_plugins
    from molting.resolve import resolve_config

    try:
        flags = _parse_set(tuple(f"{key}={value}" for key, value in pairs))
        resolve_config(load_plugins(), ["dpo"], flags=flags)
    except (MoltingError, click.BadParameter):
        pass
