"""Max |molting - trl| for every loss of the grpo stage, with and without the entropy mask, over random batches.

Runs each molting loss (found through the installed entry points) and trl's
``GRPOTrainer._compute_loss`` (through the stand-in of
``tests/test_grpo_losses.py``) on identical per-token tensors — ratios far
enough from 1 to clip, ragged masks, one completion fully masked — and prints
a Markdown table of the largest absolute difference in the loss and in its
gradient with respect to the log-probs. Usage::

    python benchmarks/grpo_loss_parity.py [--batches 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_grpo_losses import make_batch, trl_loss  # noqa: E402
from test_policy_losses import molting_loss, trl_settings  # noqa: E402

LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo", "sapo")
CASES = {"β=0": {}, "β=0.04": {"beta": 0.04}, "β=0.04, top 20% entropy": {"beta": 0.04, "quantile": 0.2}}


def worst(name: str, case: dict, batches: int) -> tuple[float, float]:
    settings = {k: v for k, v in case.items() if k != "quantile"}
    quantile = case.get("quantile", 1.0)
    loss_gap = grad_gap = 0.0
    for seed in range(batches):
        logps, old, ref, advantages, mask = make_batch(seed)
        entropies = torch.rand(logps.shape, generator=torch.Generator().manual_seed(seed + 100)) * 3
        num_items = mask.sum()
        ours, our_grad, _ = molting_loss(name, logps, old, ref, advantages, mask, num_items, settings,
                                         entropies=entropies, quantile=quantile)
        loss_type, theirs_settings = trl_settings(name, settings)
        theirs, their_grad, _ = trl_loss(loss_type, logps, old, ref, advantages, mask, num_items,
                                         entropies=entropies, quantile=quantile, **theirs_settings)
        loss_gap = max(loss_gap, (ours - theirs).abs().item())
        grad_gap = max(grad_gap, (our_grad - their_grad).abs().max().item())
    return loss_gap, grad_gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    print("| loss | " + " | ".join(CASES) + " |")
    print("| --- |" + " --- |" * len(CASES))
    for name in LOSSES:
        cells = [worst(name, case, args.batches) for case in CASES.values()]
        print(f"| `{name}` | " + " | ".join(f"{a:.1e} / {b:.1e}" for a, b in cells) + " |")


if __name__ == "__main__":
    main()
