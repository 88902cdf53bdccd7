"""PNG plots of a run: training curves from metrics.jsonl, the before/after evaluation from molting_run.json."""

from __future__ import annotations

import json
from pathlib import Path

from molting.errors import DataError

CURVES = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "learning_rate")


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


def plot_run(run_dir: Path, out: Path | None = None) -> list[Path]:
    """Write ``training.png`` (and ``eval.png`` when the run was evaluated); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(run_dir) if "loss" in r]
    out = out or run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in CURVES if any(n in r for r in records)]
    names += sorted({k for r in records for k in r} - set(names) - {"step", "epoch", "grad_norm", "loss"})[: max(0, 6 - len(names))]
    written = []
    if records and names:
        cols = 3
        rows = (len(names) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            points = [(r["step"], r[name]) for r in records if name in r]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 40 else None)
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.suptitle(f"{run_dir.name}: training", fontsize=11)
        fig.tight_layout()
        path = out / "training.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    record_path = run_dir / "molting_run.json"
    evaluation = json.loads(record_path.read_text()).get("eval") if record_path.exists() else None
    if evaluation:
        before, after = evaluation["before"], evaluation["after"]
        metrics = [m for m in after if m in before]
        fig, ax = plt.subplots(figsize=(6.5, 3.4))
        xs = range(len(metrics))
        ax.bar([x - 0.2 for x in xs], [before[m] for m in metrics], width=0.4, label="before")
        ax.bar([x + 0.2 for x in xs], [after[m] for m in metrics], width=0.4, label="after")
        for x, m in zip(xs, metrics):
            ax.text(x + 0.2, after[m] + 0.02, f"{after[m]:.2f}", ha="center", fontsize=8)
            ax.text(x - 0.2, before[m] + 0.02, f"{before[m]:.2f}", ha="center", fontsize=8)
        ax.set_xticks(list(xs), metrics)
        ax.set_ylim(0, 1.1)
        ax.set_title(f"{run_dir.name}: held-out demo evaluation")
        ax.legend()
        fig.tight_layout()
        path = out / "eval.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
