"""One short demo run per preference loss: held-out effect of each on the built-in task.

    python benchmarks/loss_demo.py [--epochs 1]

Each built-in loss of the preference stage trains the demo model on the demo
pairs (demo defaults: learning rate 5e-5, β 0.3 where the loss has a β) and
is evaluated on the 256 held-out prompts and pairs. Prints a table:
preference accuracy of the implicit reward on held-out pairs, persona rate,
greedy correctness, and the last logged training rewards/accuracies.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path

from molting.discovery import load_plugins
from molting.pipeline import run
from molting.resolve import resolve_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=1.0)
    args = parser.parse_args()
    host = load_plugins()
    losses = [n for n, r in sorted(host.components["loss"].items())
              if r.component.stage == "preference" and r.plugin.distribution == "molting"]
    print("| loss | held-out preference accuracy | persona (before 0.516) | correct (before 0.535) | train rewards/accuracies |")
    print("| --- | --- | --- | --- | --- |")
    for name in losses:
        with tempfile.TemporaryDirectory() as out:
            config, steps = resolve_config(host, [name], flags={"epochs": args.epochs, "eval": "on", "output_dir": out})
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                [metrics] = run(config, steps, host)
            after = json.loads((Path(out) / "molting_run.json").read_text())["eval"]["after"]
        accuracy = metrics.get("rewards/accuracies")
        print(f"| {name} | {after['preference_accuracy']:.3f} | {after['persona']:.3f} | {after['correct']:.3f} | "
              f"{'-' if accuracy is None else f'{accuracy:.3f}'} |", flush=True)


if __name__ == "__main__":
    main()
