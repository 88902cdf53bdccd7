"""Deliberately broken stages: each one must fail the conformance check named beside it.

They are small real stages built on the toolkit the built-ins use: the sft stage's data functions and Trainer
(``molting.plugins.supervised``) and ``molting.training``. Each gets one thing wrong.
"""

from __future__ import annotations

import json

import attrs

import molting
from molting.plugins.supervised import (METRICS, SCHEMAS, build_trainer, check_sft_rows, format_sft, run_sft,
                                        tokenize_sft)

# molting.training (torch, transformers' Trainer) is imported when a stage runs, as the built-in stages do


def _sft(context, *, check_rows=True, callbacks=None, save=None):
    """The sft stage's run, with the parts a broken stage replaces as arguments."""
    from molting.training import load_policy, stage_callbacks, train_and_save

    checked = check_sft_rows(context.rows, context.data_source) if check_rows else (SCHEMAS[0], False)
    model, tokenizer = load_policy(context)
    formatted, conversational = format_sft(context.rows, tokenizer, context.data_source, checked)
    examples = tokenize_sft(formatted, tokenizer, context.config.max_length, context.config.overlong,
                            context.data_source, conversational)
    trainer = build_trainer(model, tokenizer, examples, context.config, context.output_dir,
                            stage_callbacks(context) if callbacks is None else callbacks(context))
    return train_and_save(trainer, tokenizer, context, save=save)


def unchecked_rows(context):  # formats row 2's missing completion (None) without checking: a TypeError, not a DataError
    return _sft(context, check_rows=False)


def trusting_rows(context):  # drops the rows that lack a column, turns numbers into text, and trains on the rest
    rows = [{column: str(row[column]) for column in SCHEMAS[0]} for row in context.rows
            if all(column in row for column in SCHEMAS[0])]
    return _sft(attrs.evolve(context, rows=rows))


def writes_nothing(context):  # trains, then saves neither model nor tokenizer
    return _sft(context, save=lambda: None)


def no_callbacks(context):  # builds its Trainer with its own callbacks only: plugins' callbacks never see it
    from molting.training import MetricsFile

    return _sft(context, callbacks=lambda c: [MetricsFile(c.output_dir / "metrics.jsonl", c.host.hook)])


def silent_log(context):  # writes metrics.jsonl itself, without calling molting_on_log
    from transformers import TrainerCallback

    class MetricsWithoutHook(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                with (context.output_dir / "metrics.jsonl").open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    return _sft(context, callbacks=lambda c: [MetricsWithoutHook(), *c.callbacks()])


def stage(name, run, **overrides):
    settings = {"columns": SCHEMAS[0], "default_data": "demo-sft", "metrics": METRICS, "produces": "policy",
                **overrides}
    return molting.Stage(name=name, run=run, description=f"Broken on purpose: {name}.", **settings)


BROKEN = {
    # stage → the check it must fail, and a phrase of the message
    "unchecked-rows": (stage("unchecked-rows", unchecked_rows), "refuses-bad-rows",
                       "without column 'completion' raised TypeError: can only concatenate str (not \"NoneType\") to "
                       "str rather than a molting.DataError"),
    "trusting-rows": (stage("trusting-rows", trusting_rows), "refuses-bad-rows",
                      "a run on row 2 without column 'completion' completed without complaint and trained on it"),
    "writes-nothing": (stage("writes-nothing", writes_nothing), "writes-what-it-produces",
                       "produces a policy but OUTPUT has no config.json"),
    "wrong-product": (stage("wrong-product", run_sft, produces="reward-model"),
                      "writes-what-it-produces", "not a *ForSequenceClassification model"),
    "missing-metric": (stage("missing-metric", run_sft, metrics=(*METRICS, "accuracy")),
                       "writes-what-it-produces", "metrics.jsonl lacks the declared metrics ['accuracy']"),
    "no-callbacks": (stage("no-callbacks", no_callbacks), "calls-the-hooks",
                     "never called the molting_trainer_callbacks hook"),
    "silent-log": (stage("silent-log", silent_log), "calls-the-hooks", "molting_on_log was never called"),
}
