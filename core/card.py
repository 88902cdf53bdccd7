"""The model card (README.md) written into every output directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

# the final metrics `molting run` prints and the model card lists, when a stage reports them
HEADLINE_METRICS = ("train_loss", "train_runtime", "rewards/accuracies", "rewards/margins", "eval_accuracy", "pairs",
                    "objective/scores", "eval_reward_before", "eval_reward_after")


def model_card(record: Mapping[str, Any], output_dir: str | Path | None = None) -> str:
    """Markdown for a run record (molting_run.json's content) whose output is in ``output_dir``."""
    from molting.evaluation import format_table

    config = record["config"]
    where = str(output_dir or config["output_dir"])
    method = record["plugin"] + (f" (stage {record['stage']}, loss {record['loss']})" if record.get("loss") else f" (stage {record['stage']})")
    hub = record.get("model_hub")
    base = f"`{hub['id']}` (hub revision `{hub['revision']}`)" if hub else f"`{record['model']}`"
    lines = [
        "---",
        "library_name: transformers",
        *([f"base_model: {hub['id']}"] if hub else []),
        "tags: [molting, " + record["stage"] + (f", {record['loss']}" if record.get("loss") else "") + "]",
        "---",
        "",
        f"# {Path(where).name}",
        "",
        f"Trained with molting {record['molting_version']}: {method}.",
        "",
        "| | |",
        "| --- | --- |",
        f"| base model | {base} |",
        f"| data | {record['data']} |",
        f"| status | {record['status']} |",
    ]
    metrics = record.get("metrics") or {}
    for key in HEADLINE_METRICS:
        if key in metrics:
            lines.append(f"| {key} (last log) | {metrics[key]:.4g} |")
    lines += ["", "## Hyperparameters", "", "| key | value |", "| --- | --- |"]
    for key, value in {**{k: v for k, v in config.items() if k != "loss_params"}, **record.get("loss_params", {})}.items():
        if value is not None:
            lines.append(f"| {key} | `{value}` |")
    evaluation = record.get("eval")
    if evaluation:
        lines += [
            "",
            "## Held-out evaluation (demo task)",
            "",
            "Answers to the demo task's held-out prompts, sampled at temperature 1.0 with a fixed seed;",
            "`before` is the base model, `after` this one (preference accuracy and win rate are against the base).",
            "",
            "```",
            format_table(evaluation),
            "```",
        ]
    lines += _episodes_section(record)
    lines += _held_out_section(record)
    lines += ["", "## Plugins", "", "| plugin | distribution | version |", "| --- | --- | --- |"]
    for name, info in record["plugins"].items():
        lines.append(f"| {name} | {info['distribution']} | {info['version']} |")
    lines += ["", "## Use", ""] + _usage(record.get("produces", "policy"), where)
    lines += ["", f"Rerun: `molting run --config {where}/recipe.yaml`.", ""]
    return "\n".join(lines)


def _episodes_section(record: Mapping[str, Any]) -> list[str]:
    """Greedy held-out episodes of the environment the run trained with, before and after."""
    from molting.environments import format_episode_table

    episodes = record.get("eval_episodes")
    if not episodes:
        return []
    return ["", f"## Held-out episodes ({episodes['environment']})", "",
            f"{episodes['rows']} greedy episodes from {episodes['source']}; `before` is the model the run started "
            "from. `reward` is the environment's mean reward (for the calculator, the share of right answers).", "",
            "```", format_episode_table({"before": episodes["before"], "after": episodes["after"]}), "```"]


def _held_out_section(record: Mapping[str, Any]) -> list[str]:
    """Evaluation during training: the held-out data, the last figures, the best model kept, the watch's alarms."""
    held = record.get("eval_data")
    if not held:
        return []
    metrics = record.get("metrics") or {}
    lines = ["", "## Held-out evaluation during training", "", f"On {held['source']} ({held['rows']} rows).", ""]
    figures = {k: v for k, v in metrics.items() if k.startswith("eval_") and isinstance(v, (int, float))
               and not k.endswith(("_runtime", "_per_second", "_before", "_after"))}
    if figures:
        lines += ["| metric (last evaluation) | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" for k, v in figures.items()]
    best = record.get("best")
    if best:
        lines += ["", f"Best {best['metric']}: {best['value']:.4g} at step {best['step']}, kept in `{best['path']}`."]
    watch = record.get("watch")
    if watch:
        lines += ["", f"Reward-hacking watch: {len(watch['evaluations'])} evaluations, "
                      + (f"{len(watch['alarms'])} alarms." if watch["fired"] else "silent.")]
        seen: set[str] = set()
        for alarm in watch["alarms"]:
            if alarm["kind"] not in seen:
                seen.add(alarm["kind"])
                lines.append(f"- possible reward hacking at step {alarm['step']}: {alarm['message']}")
        if watch.get("stopped_at") is not None:
            lines.append(f"- the run stopped at step {watch['stopped_at']} (--stop-on-hacking)")
    return lines


def _usage(produces: str, where: str) -> list[str]:
    if produces == "dataset":
        return ["```python", "from datasets import load_dataset", "",
                f'pairs = load_dataset("json", data_files="{where}/data.jsonl", split="train")', "```"]
    model_class = "AutoModelForSequenceClassification" if produces == "reward-model" else "AutoModelForCausalLM"
    return [
        "```python",
        f"from transformers import {model_class}, AutoTokenizer",
        "",
        f'model = {model_class}.from_pretrained("{where}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        "```",
    ]


def write_model_card(output_dir: Path, record: Mapping[str, Any]) -> None:
    from molting.files import write_text_atomic

    write_text_atomic(Path(output_dir) / "README.md", model_card(record, output_dir))
