"""The model card (README.md) written into every output directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping


def model_card(record: Mapping[str, Any]) -> str:
    """Markdown for a run record (molting_run.json's content)."""
    from molting.evaluation import format_table

    config = record["config"]
    method = record["plugin"] + (f" (stage {record['stage']}, loss {record['loss']})" if record.get("loss") else f" (stage {record['stage']})")
    lines = [
        "---",
        "library_name: transformers",
        "tags: [molting, " + record["stage"] + (f", {record['loss']}" if record.get("loss") else "") + "]",
        "---",
        "",
        f"# {Path(config['output_dir']).name}",
        "",
        f"Trained with molting {record['molting_version']}: {method}.",
        "",
        "| | |",
        "| --- | --- |",
        f"| base model | `{record['model']}` |",
        f"| data | {record['data']} |",
        f"| status | {record['status']} |",
    ]
    metrics = record.get("metrics") or {}
    for key in ("train_loss", "train_runtime", "rewards/accuracies", "rewards/margins"):
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
    lines += ["", "## Plugins", "", "| plugin | distribution | version |", "| --- | --- | --- |"]
    for name, info in record["plugins"].items():
        lines.append(f"| {name} | {info['distribution']} | {info['version']} |")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{config["output_dir"]}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{config["output_dir"]}")',
        "```",
        "",
        f"Rerun: `molting run --config {config['output_dir']}/recipe.yaml`.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(output_dir: Path, record: Mapping[str, Any]) -> None:
    from molting.run import write_text_atomic

    write_text_atomic(Path(output_dir) / "README.md", model_card(record))
