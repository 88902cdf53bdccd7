"""Max |molting - trl| for every loss of the DPO family, over random batches.

For each loss, runs molting's loss (looked up through the installed entry
points) and trl's ``DPOTrainer._compute_loss`` (through ``tests/trl_oracle.py``)
on identical log-prob tensors, and prints a Markdown table of the largest
absolute difference in the batch loss and in ``rewards/chosen`` /
``rewards/rejected``. Usage::

    python benchmarks/loss_parity.py [--batches 20] [--batch-size 16]

It builds the tiny demo model on first use (trl's trainer needs a model even
though the oracle never runs it); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

# molting loss name -> (trl loss_type, non-default hyperparameters to measure besides β)
LOSSES = {
    "dpo": ("sigmoid", {}),  # trl 1.16's sigmoid loss ignores label_smoothing: compare plain DPO only
    "ipo": ("ipo", {}),
    "hinge": ("hinge", {}),
    "robust": ("robust", {"label_smoothing": 0.1}),
    "exo_pair": ("exo_pair", {}),
    "nca_pair": ("nca_pair", {}),
    "bco_pair": ("bco_pair", {}),
    "sppo_hard": ("sppo_hard", {}),
    "aot": ("aot", {"label_smoothing": 0.1}),
    "aot_unpaired": ("aot_unpaired", {"label_smoothing": 0.1}),
    "apo_zero": ("apo_zero", {}),
    "apo_down": ("apo_down", {}),
    "discopop": ("discopop", {}),
    "sft": ("sft", {}),
    "sigmoid_norm": ("sigmoid_norm", {}),
}
BETAS = (0.1, 0.5)


def random_batch(seed: int, n: int, scale: float = 30.0):
    import torch

    g = torch.Generator().manual_seed(seed)
    logps = -scale * torch.rand(4, n, generator=g, dtype=torch.float32)
    lengths = torch.randint(1, 40, (2, n), generator=g).float()
    return (*logps, *lengths)


def measure(batches: int, batch_size: int) -> dict[str, tuple[float, float, float, float]]:
    """loss name -> (max |Δ loss|, max |Δ loss| / max(1, |loss|), max |Δ rewards/chosen|, max |Δ rewards/rejected|)."""
    import attrs

    from molting.demo import demo_model_dir
    from molting.discovery import load_plugins
    from trl_oracle import make_dpo_trainer, molting_inputs, trl_dpo

    host = load_plugins(disabled=[])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_dpo_trainer(demo_model_dir(), Path(tmp))
        table = {}
        for name, (trl_name, extra) in LOSSES.items():
            loss = host.get("loss", name)
            worst = [0.0, 0.0, 0.0, 0.0]
            for seed in range(batches):
                batch = random_batch(seed, batch_size)
                for beta in BETAS:
                    params = loss.params(beta=beta, **extra)
                    out = loss.compute(molting_inputs(*batch), params)
                    trl_loss, metrics = trl_dpo(trainer, trl_name, *batch, **attrs.asdict(params))
                    diff = abs(out.losses.mean().item() - trl_loss.item())
                    worst[0] = max(worst[0], diff)
                    worst[1] = max(worst[1], diff / max(1.0, abs(trl_loss.item())))
                    worst[2] = max(worst[2], abs(out.chosen_rewards.mean().item() - metrics["rewards/chosen"]))
                    worst[3] = max(worst[3], abs(out.rejected_rewards.mean().item() - metrics["rewards/rejected"]))
            table[name] = tuple(worst)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    table = measure(args.batches, args.batch_size)
    print(f"{args.batches} random batches of {args.batch_size} pairs x beta in {BETAS}, float32, CPU\n")
    print("| loss | trl loss_type | max abs diff, loss | max rel diff, loss | max abs diff, rewards/chosen | max abs diff, rewards/rejected |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (loss, rel, chosen, rejected) in table.items():
        print(f"| `{name}` | `{LOSSES[name][0]}` | {loss:.1e} | {rel:.1e} | {chosen:.1e} | {rejected:.1e} |")


if __name__ == "__main__":
    main()
