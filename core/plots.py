"""Charts of a run: training curves and held-out evaluation curves from metrics.jsonl, the before/after evaluation
from molting_run.json. ``molting plot`` writes them as PNG files; ``molting report`` embeds them in its HTML."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from molting.errors import DataError

CURVES = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "reward", "kl",
          "objective/scores", "objective/kl", "completions/mean_length", "learning_rate")
EVAL_CURVES = ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies", "eval_reward", "eval_kl",
               "eval_completions/mean_length")
ENV_CURVES = ("env/reward", "env/turns", "env/tool_calls", "env/tool_errors", "env/malformed_calls",
              "env/truncated_ratio")
"""An online stage's episodes (``--env``): what ``env.png`` draws."""
_BOOKKEEPING = ("step", "epoch", "grad_norm")
_TIMING = ("_runtime", "_per_second")


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise DataError(f"{run_dir} has no metrics.jsonl: not a molting run directory")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {number}: malformed JSON ({exc.msg})") from exc
    return records


def read_record(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "molting_run.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _is_eval(record: Mapping[str, Any]) -> bool:
    return any(key.startswith("eval_") for key in record)


def _chosen(records: Sequence[Mapping[str, Any]], preferred: Sequence[str], limit: int = 6) -> list[str]:
    """The preferred curves the records have, then other numeric ones (alphabetically) up to ``limit``."""
    present = {k for r in records for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    present -= set(_BOOKKEEPING)
    present = {k for k in present if not k.endswith(_TIMING) and not k.startswith("train_")}
    names = [n for n in preferred if n in present]
    return names + sorted(present - set(names))[: max(0, limit - len(names))]


def curves_figure(records: Sequence[Mapping[str, Any]], names: Sequence[str], title: str) -> Any:
    """One small chart per metric against the step (a grid of three columns)."""
    import matplotlib.pyplot as plt

    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float))]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 40 else None)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def training_figure(records: Sequence[Mapping[str, Any]], title: str) -> Any:
    """The training curves (``None`` when the run logged none)."""
    records = [r for r in records if not _is_eval(r)]
    names = _chosen(records, CURVES)
    return curves_figure(records, names, title) if records and names else None


def env_figure(records: Sequence[Mapping[str, Any]], title: str) -> Any:
    """The episodes' curves: reward, turns, tool calls, errors, malformed calls, truncation (``None`` without)."""
    records = [r for r in records if not _is_eval(r)]
    names = [n for n in ENV_CURVES if any(isinstance(r.get(n), (int, float)) for r in records)]
    return curves_figure(records, names, title) if names else None


def eval_figure(records: Sequence[Mapping[str, Any]], title: str, alarms: Sequence[Mapping[str, Any]] = ()) -> Any:
    """The held-out evaluation curves during training, the watch's alarms marked (``None`` without evaluations)."""
    records = [r for r in records if _is_eval(r)]
    names = _chosen(records, EVAL_CURVES)
    names = [n for n in names if n.startswith("eval_")]
    if not records or not names:
        return None
    fig = curves_figure(records, names, title)
    for ax in fig.axes[: len(names)]:
        for step in _first_alarms(alarms):
            ax.axvline(step, color="tab:red", alpha=0.5, linestyle="--")
    return fig


def _first_alarms(alarms: Sequence[Mapping[str, Any]]) -> list[int]:
    """The step of each kind of alarm's first firing."""
    first: dict[str, int] = {}
    for alarm in alarms:
        first.setdefault(alarm["kind"], alarm["step"])
    return sorted(set(first.values()))


def watch_figure(watch: Mapping[str, Any], title: str) -> Any:
    """The reward-hacking watch's view: the training reward and the held-out judges' score at each evaluation, on
    their own axes, the first alarm of each kind marked."""
    import matplotlib.pyplot as plt

    evaluations = watch["evaluations"]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    trained = [(e["step"], e["train_reward"]) for e in evaluations if e["train_reward"] is not None]
    ax.plot([p[0] for p in trained], [p[1] for p in trained], color="tab:blue", marker="o", label="training reward")
    ax.set_xlabel("step")
    ax.set_ylabel("training reward", color="tab:blue")
    held = ax.twinx()
    held.plot([e["step"] for e in evaluations], [e["held_out"] for e in evaluations], color="tab:orange", marker="s",
              label="held-out judges")
    held.set_ylabel("held-out judges' score", color="tab:orange")
    for step in _first_alarms(watch["alarms"]):
        ax.axvline(step, color="tab:red", alpha=0.6, linestyle="--")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return fig


def before_after_figure(evaluation: Mapping[str, Mapping[str, float]], title: str) -> Any:
    """Bars of each held-out metric before and after training."""
    import matplotlib.pyplot as plt

    before, after = evaluation["before"], evaluation["after"]
    metrics = [m for m in after if m in before and isinstance(after[m], (int, float))]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    xs = range(len(metrics))
    ax.bar([x - 0.2 for x in xs], [before[m] for m in metrics], width=0.4, label="before")
    ax.bar([x + 0.2 for x in xs], [after[m] for m in metrics], width=0.4, label="after")
    for x, m in zip(xs, metrics):
        ax.text(x + 0.2, after[m] + 0.02, f"{after[m]:.2f}", ha="center", fontsize=8)
        ax.text(x - 0.2, before[m] + 0.02, f"{before[m]:.2f}", ha="center", fontsize=8)
    ax.set_xticks(list(xs), metrics, rotation=20 if len(metrics) > 5 else 0, fontsize=8 if len(metrics) > 5 else None)
    ax.set_ylim(0, max([1.0] + [before[m] for m in metrics] + [after[m] for m in metrics]) * 1.1)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def run_figures(run_dir: Path, records: Sequence[Mapping[str, Any]] | None = None,
                record: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"training": fig, "eval_curves": fig, "eval": fig, "watch": fig, "env": fig, "eval_episodes": fig}``, those
    the run has data for; ``records``
    (metrics.jsonl) and ``record`` (molting_run.json) are read from ``run_dir`` unless the caller has them."""
    import matplotlib

    matplotlib.use("Agg")
    records = read_metrics(run_dir) if records is None else records
    record = read_record(run_dir) if record is None else record
    alarms = (record.get("watch") or {}).get("alarms", [])
    figures = {
        "training": training_figure(records, f"{run_dir.name}: training"),
        "eval_curves": eval_figure(records, f"{run_dir.name}: held-out evaluation during training", alarms),
        "eval": before_after_figure(record["eval"], f"{run_dir.name}: held-out demo evaluation")
        if record.get("eval") else None,
        "watch": watch_figure(record["watch"], f"{run_dir.name}: training reward against the held-out judges")
        if (record.get("watch") or {}).get("evaluations") else None,
        "env": env_figure(records, f"{run_dir.name}: episodes"),
        "eval_episodes": before_after_figure(record["eval_episodes"], f"{run_dir.name}: held-out episodes of "
                                                                      f"{record['eval_episodes']['environment']}")
        if record.get("eval_episodes") else None,
    }
    return {name: fig for name, fig in figures.items() if fig is not None}


def plot_run(run_dir: Path, out: Path | None = None) -> list[Path]:
    """Write ``training.png``, ``eval_curves.png`` (evaluation during training), ``watch.png`` (training reward
    against the held-out judges), ``eval.png`` (before/after), ``env.png`` (an environment's episodes) and
    ``eval_episodes.png`` (held-out episodes before/after), those the run has data for; returns their paths."""
    import matplotlib.pyplot as plt

    out = out or run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in run_figures(run_dir).items():
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
