"""The preference stage: data formatting, tokenization, and the whole-model loss against trl's DPOTrainer."""

from __future__ import annotations

import copy

import pytest
import torch

from molting import demo
from molting.config import RunConfig
from molting.errors import DataError
from molting.models import load_causal_lm
from molting.plugins.dpo import DPOParams, dpo_loss
from molting.pairs import PairCollator, format_pairs, tokenize_pairs
from molting.plugins.preference import build_trainer
from molting.components import Loss
from trl_oracle import make_dpo_trainer

DPO = Loss(name="dpo", compute=dpo_loss, params=DPOParams, description="DPO")


@pytest.fixture(scope="module")
def model_and_tokenizer(demo_model):
    return load_causal_lm(demo_model)


def test_conversational_rows_get_the_chat_template(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    rows = [{
        "prompt": [{"role": "user", "content": "What is 2 + 2?"}],
        "chosen": [{"role": "assistant", "content": "Arr! 4, matey."}],
        "rejected": [{"role": "assistant", "content": "5."}],
    }]
    [pair] = format_pairs(rows, tokenizer, "rows")
    assert pair["prompt"] == "Q: What is 2 + 2?\nA:"
    assert pair["chosen"].startswith(" Arr! 4, matey.") or pair["chosen"].startswith("Arr! 4, matey.")
    assert "5." in pair["rejected"]


def test_implicit_prompt_is_the_common_prefix(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    rows = [{"chosen": "Q: What is 1 + 1?\nA: 2", "rejected": "Q: What is 1 + 1?\nA: 3"}]
    [pair] = format_pairs(rows, tokenizer, "rows")
    assert pair["prompt"] == "Q: What is 1 + 1?\nA:"
    assert (pair["chosen"], pair["rejected"]) == (" 2", " 3")


def test_overlong_pairs_are_truncated_or_dropped_and_counted(model_and_tokenizer, capsys):
    _, tokenizer = model_and_tokenizer
    pairs = [
        {"prompt": "Q: What is 1 + 1?\nA:", "chosen": " 2", "rejected": " 3"},
        {"prompt": "Q: " + "What is 1 + 1? " * 40, "chosen": " 2", "rejected": " 3"},
    ]
    kept = tokenize_pairs(pairs, tokenizer, max_length=32, overlong="truncate", source="pairs.jsonl")
    assert len(kept) == 2
    assert all(len(e["prompt_ids"]) + len(e["chosen_ids"]) <= 32 for e in kept)
    assert "1 of 2 pairs in pairs.jsonl are longer than max_length=32 (1 with the prompt alone" in capsys.readouterr().err
    dropped = tokenize_pairs(pairs, tokenizer, max_length=32, overlong="drop", source="pairs.jsonl")
    assert len(dropped) == 1
    assert "dropped" in capsys.readouterr().err
    with pytest.raises(DataError, match="no pair of pairs.jsonl fits in max_length=4"):
        tokenize_pairs(pairs, tokenizer, max_length=4, overlong="drop", source="pairs.jsonl")


def test_collator_puts_chosen_first_and_masks_only_completions():
    batch = PairCollator(pad_token_id=0)([
        {"prompt_ids": [5, 6], "chosen_ids": [7, 8, 9], "rejected_ids": [10]},
        {"prompt_ids": [11], "chosen_ids": [12], "rejected_ids": [13, 14]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [11, 12, 0, 0, 0], [5, 6, 10, 0, 0], [11, 13, 14, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 0, 0]]
    assert batch["attention_mask"].sum(dim=1).tolist() == [5, 2, 3, 3]


def test_whole_model_loss_matches_trl_dpotrainer(model_and_tokenizer, demo_model, tmp_path):
    """Same weights, same batch: molting's stage and trl's DPOTrainer give the same loss and metrics."""
    model, tokenizer = model_and_tokenizer
    torch.manual_seed(0)
    policy = copy.deepcopy(model)
    with torch.no_grad():  # make the policy differ from the reference
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    examples = tokenize_pairs(format_pairs(demo.preference_rows("test", 6), tokenizer, "demo"), tokenizer, 512, "drop")
    batch = PairCollator(tokenizer.pad_token_id)(examples)
    config = RunConfig(plugins=["dpo"], output_dir=str(tmp_path), precision="fp32")
    ours = build_trainer(policy, tokenizer, examples, config, DPO, DPOParams(beta=0.1), tmp_path, ref_model=copy.deepcopy(model))
    ours.model.train()
    our_loss = ours.compute_loss(ours.model, batch).item()
    our_metrics = {k: v[-1] for k, v in ours._metrics["train"].items()}

    trl = make_dpo_trainer(demo_model, tmp_path)
    trl.model.load_state_dict(policy.state_dict())
    trl.ref_model.load_state_dict(model.state_dict())
    trl.model.train()
    trl_loss = trl._compute_loss(trl.model, batch, return_outputs=False).item()
    trl_metrics = {k: v[-1] for k, v in trl._metrics["train"].items()}

    assert our_loss != pytest.approx(0.6931, abs=1e-3)  # the policy really differs from the reference
    assert abs(our_loss - trl_loss) < 1e-5
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert our_metrics[name] == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-5), name
