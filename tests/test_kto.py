"""KTO and the unpaired stage: the loss against trl's, the whole batch against trl's KTOTrainer, data, a run."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

from molting import demo
from molting.components import Loss, UnpairedInputs
from molting.config import RunConfig
from molting.errors import ConfigError, DataError
from molting.plugins.kto import KTOParams, kto_loss
from molting.plugins.unpaired import (
    UnpairedCollator,
    build_trainer,
    format_unpaired,
    imbalance_warning,
    tokenize_unpaired,
)
from conftest import run_molting
from trl_oracle import kto_stand_in, make_kto_trainer, spread, trl_kto

KTO = Loss(name="kto", compute=kto_loss, params=KTOParams, stage="unpaired", description="KTO")


@pytest.fixture(scope="module")
def model_and_tokenizer(demo_model):
    from molting.models import load_causal_lm

    return load_causal_lm(demo_model)


# --------------------------------------------------------------------------- the loss, on identical tensors


def random_batch(seed: int, batch: int = 12, kl_shift: float = 0.0, labels=None):
    """Summed log-probs in [-60, -1], 3-30 tokens, and labels (random unless given)."""
    g = torch.Generator().manual_seed(seed)
    logps = -1 - 59 * torch.rand(4, batch, generator=g)
    lengths = torch.randint(3, 31, (2, batch), generator=g)
    if labels is None:
        labels = torch.rand(batch, generator=g) < 0.6
    # the policy's KL-pair log-probs sit near the reference's, shifted so the KL estimate is either sign
    kl_logps = logps[3] + kl_shift + torch.randn(batch, generator=g)
    return logps[0], logps[1], kl_logps, logps[3], torch.as_tensor(labels), lengths[0], lengths[1]


@pytest.mark.parametrize("beta, desirable_weight, undesirable_weight", [(0.1, 1.0, 1.0), (0.5, 1.33, 1.0), (0.05, 1.0, 2.5)])
@pytest.mark.parametrize("kl_shift", [2.0, -2.0])  # a positive KL estimate, and a negative one that trl clamps to 0
def test_kto_loss_matches_trl_on_identical_tensors(beta, desirable_weight, undesirable_weight, kl_shift):
    """trl 1.16 computes KTO inline in ``KTOTrainer._compute_loss``; it runs, unchanged, on a stand-in ``self``
    and a stand-in model whose per-token log-probs sum to the tensors molting's loss receives."""
    fake = kto_stand_in(beta, desirable_weight, undesirable_weight)
    params = KTOParams(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    worst = 0.0
    for seed in range(20):
        logps, ref_logps, kl_logps, ref_kl_logps, labels, lengths, kl_lengths = random_batch(seed, kl_shift=kl_shift)
        trl_loss, trl_metrics = trl_kto(fake, logps, ref_logps, kl_logps, ref_kl_logps, labels, lengths, kl_lengths)

        # the sums trl computes from the spread per-token log-probs, and the stage's KL arithmetic
        width = int(max(lengths.max(), kl_lengths.max()))
        sums = spread(logps, lengths, width)[0].sum(dim=1)
        kl_sums = spread(kl_logps, kl_lengths, width)[0].sum(dim=1)
        kl = (kl_sums - ref_kl_logps).mean().detach().reshape(1).mean().clamp(min=0)  # gather on one process
        out = kto_loss(UnpairedInputs(logps=sums, labels=labels, ref_logps=ref_logps, kl=kl, lengths=lengths), params)

        assert kl.item() == trl_metrics["kl"]
        worst = max(worst, abs(out.losses.mean().item() - trl_loss.item()))
        assert out.chosen_rewards.mean().item() == pytest.approx(trl_metrics["rewards/chosen"], abs=1e-6)
        assert out.rejected_rewards.mean().item() == pytest.approx(trl_metrics["rewards/rejected"], abs=1e-6)
    assert worst < 1e-6, worst
    assert (kl.item() > 0) == (kl_shift > 0)


@pytest.mark.parametrize("labels", [[True] * 5, [False] * 5])
def test_kto_loss_matches_trl_with_one_class_only(labels):
    fake = kto_stand_in(0.1, 1.2, 0.8)
    logps, ref_logps, kl_logps, ref_kl_logps, labels, lengths, kl_lengths = random_batch(3, batch=5, kl_shift=1.0, labels=labels)
    trl_loss, _ = trl_kto(fake, logps, ref_logps, kl_logps, ref_kl_logps, labels, lengths, kl_lengths)
    width = int(max(lengths.max(), kl_lengths.max()))
    sums = spread(logps, lengths, width)[0].sum(dim=1)
    kl = (spread(kl_logps, kl_lengths, width)[0].sum(dim=1) - ref_kl_logps).mean().clamp(min=0)
    out = kto_loss(UnpairedInputs(logps=sums, labels=labels, ref_logps=ref_logps, kl=kl), KTOParams(0.1, 1.2, 0.8))
    assert abs(out.losses.mean().item() - trl_loss.item()) < 1e-6


def test_kto_gradient_raises_desirable_and_lowers_undesirable():
    logps = torch.full((4,), -10.0, requires_grad=True)
    inputs = UnpairedInputs(logps=logps, labels=torch.tensor([True, False, True, False]),
                            ref_logps=torch.full((4,), -10.0), kl=torch.tensor(0.0))
    kto_loss(inputs, KTOParams()).losses.sum().backward()
    assert (logps.grad[[0, 2]] < 0).all() and (logps.grad[[1, 3]] > 0).all()


def test_kto_params_are_validated():
    for bad in ({"beta": 0}, {"desirable_weight": -1.0}, {"undesirable_weight": float("nan")}):
        with pytest.raises(ValueError):
            KTOParams(**bad)


# --------------------------------------------------------------------------- the whole batch, against trl's KTOTrainer


def test_collator_pairs_each_prompt_with_the_previous_completion():
    batch = UnpairedCollator(pad_token_id=0)([
        {"prompt_ids": [5, 6], "completion_ids": [7, 8], "label": True},
        {"prompt_ids": [9], "completion_ids": [10], "label": False},
        {"prompt_ids": [11], "completion_ids": [12, 13, 14], "label": True},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0], [11, 12, 13, 14]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 0, 0], [0, 1, 1, 1]]
    assert batch["KL_input_ids"].tolist() == [[5, 6, 12, 13, 14], [9, 7, 8, 0, 0], [11, 10, 0, 0, 0]]
    assert batch["KL_completion_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 1, 0, 0, 0]]
    assert batch["label"].tolist() == [True, False, True] and batch["label"].dtype == torch.bool


def test_whole_batch_loss_and_kl_match_trl_ktotrainer(model_and_tokenizer, demo_model, tmp_path):
    """Same weights, same batch: molting's unpaired stage and trl's KTOTrainer give the same loss, KL and metrics.

    The batch is molting's: the demo rows tokenized by the unpaired stage and
    padded by ``UnpairedCollator``, whose output has exactly the keys and
    layout of trl's ``DataCollatorForUnpairedPreference`` (it calls it, after
    rotating the completions within the batch as trl does to build its KL
    sequences), so trl's ``_compute_loss`` takes it as it is. trl tokenizes
    raw text its own way (prompt and prompt+completion together, EOS appended
    as text); handing both the same token ids leaves only the model forward,
    the log-prob sums, the KL estimate and the loss to compare.
    """
    model, tokenizer = model_and_tokenizer
    torch.manual_seed(0)
    policy = copy.deepcopy(model)
    with torch.no_grad():  # make the policy differ from the reference
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    rows = demo.unpaired_rows("test", 4)[:7]  # 4 desirable, 3 undesirable
    examples = tokenize_unpaired(format_unpaired(rows, tokenizer, "demo"), tokenizer, 512, "drop")
    batch = UnpairedCollator(tokenizer.pad_token_id, 512)(examples)
    params = KTOParams(beta=0.1, desirable_weight=1.0, undesirable_weight=1.33)
    config = RunConfig(plugins=["kto"], output_dir=str(tmp_path), batch_size=7, precision="fp32")
    ours = build_trainer(policy, tokenizer, examples, config, KTO, params, tmp_path, ref_model=copy.deepcopy(model))
    ours.model.train()
    our_loss = ours.compute_loss(ours.model, batch).item()
    our_metrics = {k: v[-1] for k, v in ours._metrics["train"].items()}

    trl = make_kto_trainer(demo_model, tmp_path, beta=0.1, desirable_weight=1.0, undesirable_weight=1.33)
    trl.model.load_state_dict(policy.state_dict())
    trl.ref_model.load_state_dict(model.state_dict())
    trl.model.train()
    trl_loss = trl._compute_loss(trl.model, batch, return_outputs=False).item()
    trl_metrics = {k: v[-1] for k, v in trl._metrics["train"].items()}

    assert our_metrics["kl"] > 0  # the clamp does not hide the estimate
    assert abs(our_metrics["rewards/chosen"]) > 0.01  # the policy really differs from the reference
    assert abs(our_loss - trl_loss) < 1e-5
    assert abs(our_metrics["kl"] - trl_metrics["kl"]) < 1e-5
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert our_metrics[name] == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-5), name
    assert (our_metrics["count/chosen"], our_metrics["count/rejected"]) == (4, 3)


# --------------------------------------------------------------------------- data


def test_paired_rows_are_unpaired(model_and_tokenizer, capsys):
    _, tokenizer = model_and_tokenizer
    rows = [
        {"prompt": "Q: What is 1 + 1?\nA:", "chosen": " Arr! 1 plus 1 be 2, matey.", "rejected": " The answer is 2."},
        {"prompt": "Q: What is 2 + 2?\nA:", "chosen": " Arr! 2 plus 2 be 4, matey.", "rejected": " The answer is 5."},
    ]
    examples = format_unpaired(rows, tokenizer, "pairs.jsonl").to_list()
    assert examples == [  # trl's _unpair_row: every chosen, then every rejected
        {"prompt": rows[0]["prompt"], "completion": rows[0]["chosen"], "label": True, "templated": False},
        {"prompt": rows[1]["prompt"], "completion": rows[1]["chosen"], "label": True, "templated": False},
        {"prompt": rows[0]["prompt"], "completion": rows[0]["rejected"], "label": False, "templated": False},
        {"prompt": rows[1]["prompt"], "completion": rows[1]["rejected"], "label": False, "templated": False},
    ]
    assert "pairs.jsonl is paired (prompt/chosen/rejected): unpaired into 2 desirable and 2 undesirable" in capsys.readouterr().err
    implicit = [{"chosen": "Q: What is 1 + 1?\nA: 2", "rejected": "Q: What is 1 + 1?\nA: 3"}]
    assert format_unpaired(implicit, tokenizer, "pairs").to_list() == [
        {"prompt": "Q: What is 1 + 1?\nA:", "completion": " 2", "label": True, "templated": False},
        {"prompt": "Q: What is 1 + 1?\nA:", "completion": " 3", "label": False, "templated": False},
    ]


def test_conversational_rows_get_the_chat_template(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    rows = [{"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
             "completion": [{"role": "assistant", "content": "Arr! 4, matey."}], "label": True}]
    [example] = format_unpaired(rows, tokenizer, "rows")
    assert example["prompt"] == "Q: What is 2 + 2?\nA:"
    assert "Arr! 4, matey." in example["completion"] and example["label"] is True


def test_a_label_that_is_not_a_bool_is_a_data_error(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    rows = [{"prompt": "Q: 1 + 1?\nA:", "completion": " 2", "label": True, "templated": False},
            {"prompt": "Q: 1 + 1?\nA:", "completion": " 3", "label": "false"}]
    with pytest.raises(DataError, match=r"data.jsonl, row 1, field 'label': expected a boolean .*got 'false'"):
        format_unpaired(rows, tokenizer, "data.jsonl")
    with pytest.raises(DataError, match=r"row 0, field 'label'.*got 1"):
        format_unpaired([{**rows[0], "label": 1}], tokenizer, "data.jsonl")
    with pytest.raises(DataError, match="the unpaired stage needs"):
        format_unpaired([{"prompt": "x", "answer": "y"}], tokenizer, "data.jsonl")


def test_imbalance_warning_matches_trl(caplog):
    """The rule and the recommended ranges are trl's: its ``_prepare_dataset`` runs on the same labels."""
    from accelerate import PartialState
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import KTOConfig, KTOTrainer
    from types import SimpleNamespace

    PartialState()  # trl's logger needs accelerate's state
    tokenizer = AutoTokenizer.from_pretrained(demo.demo_model_dir())
    cases = [([True] * 6 + [False] * 2, 1.0, 1.0), ([True] * 6 + [False] * 2, 1.0, 3.0), ([True] * 2 + [False] * 7, 1.0, 1.0),
             ([True] * 3 + [False] * 4, 1.0, 1.0), ([True] * 4 + [False] * 4, 5.0, 1.0)]
    for labels, w_d, w_u in cases:
        ours = imbalance_warning(labels, w_d, w_u, source="data.jsonl")
        rows = [{"prompt": "Q: What is 1 + 1?\nA:", "completion": " 2", "label": label} for label in labels]
        fake = SimpleNamespace(calculate_KL=False, desirable_weight=w_d, undesirable_weight=w_u, _tokenizer=tokenizer)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="trl.trainer.kto_trainer"):
            KTOTrainer._prepare_dataset(fake, Dataset.from_list(rows), tokenizer, KTOConfig(output_dir="unused", report_to=[], bf16=False, use_cpu=True), "train")
        trl_message = " ".join(r.getMessage() for r in caplog.records if "ideal range" in r.getMessage())
        assert (ours is None) == (trl_message == ""), (labels, w_d, w_u, ours, trl_message)
        if ours is not None:
            recommended = trl_message[trl_message.index("desirable_weight in"): trl_message.index("(but NOT BOTH)")]
            assert recommended in ours
    text = imbalance_warning([True] * 6 + [False] * 2, 1.0, 1.0, source="data.jsonl")
    assert text == (
        "molting: warning: data.jsonl has 6 desirable and 2 undesirable examples, but the weights on the desirable and "
        "undesirable losses (desirable_weight=1, undesirable_weight=1) don't seem to be in an ideal range. Based on "
        "your data, we recommend EITHER desirable_weight in [0.33, 0.44] or undesirable_weight in [2.26, 3.0] "
        "(but NOT BOTH), e.g. --set desirable_weight=0.33. The KTO paper (arXiv:2402.01306, Eq. 8) keeps "
        "desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3]."
    )


# --------------------------------------------------------------------------- a run


def test_molting_run_kto(tmp_path):
    out = tmp_path / "kto"
    result = run_molting("run", "--plugin", "kto", "--max-steps", "3", "--logging-steps", "1", "--eval", "off",
                         "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage unpaired, loss kto" in result.stderr
    assert "dataset 'demo-unpaired' (train split)" in result.stderr
    assert "reference model: frozen copy" in result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*records)
    for name in ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                 "logps/rejected", "count/chosen", "count/rejected"):
        assert name in logged, name
    assert records[0]["loss"] == pytest.approx(0.5, abs=1e-3)  # policy = reference, KL = 0: 1 - σ(0)
    record = json.loads((out / "molting_run.json").read_text())
    assert set(record["loss_params"]) == {"beta", "desirable_weight", "undesirable_weight"}  # beta: the demo default
    assert (record["loss_params"]["desirable_weight"], record["loss_params"]["undesirable_weight"]) == (1.0, 1.0)
    assert (record["stage"], record["status"]) == ("unpaired", "completed")


def test_a_batch_of_one_is_a_config_error(tmp_path):
    from molting.discovery import load_plugins
    from molting.pipeline import run
    from molting.resolve import resolve_config

    host = load_plugins()
    config, steps = resolve_config(host, ["kto"], flags={"batch_size": 1, "output_dir": str(tmp_path), "eval": "off"})
    with pytest.raises(ConfigError, match="needs batch_size >= 2"):
        run(config, steps, host)


def test_kto_loss_is_finite_per_example_and_dtype_safe():
    """What the suite's numeric checks assert of preference losses (they skip losses of other stages)."""
    big = torch.tensor([-1e4, 1e4, -1e4, 0.0], requires_grad=True)
    labels = torch.tensor([True, False, False, True])
    out = kto_loss(UnpairedInputs(logps=big, labels=labels, ref_logps=-big.detach(), kl=torch.tensor(1e4)), KTOParams())
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(big.grad).all()
    logps, ref_logps, _, _, labels, _, _ = random_batch(5, batch=6)
    inputs = UnpairedInputs(logps=logps, labels=labels, ref_logps=ref_logps, kl=torch.tensor(0.7))
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = UnpairedInputs(logps=logps[order], labels=labels[order], ref_logps=ref_logps[order], kl=inputs.kl)
    assert torch.allclose(kto_loss(inputs, KTOParams()).losses[order], kto_loss(shuffled, KTOParams()).losses)
    half = UnpairedInputs(logps=logps.bfloat16(), labels=labels, ref_logps=ref_logps.bfloat16(), kl=inputs.kl.bfloat16())
    assert torch.isfinite(kto_loss(half, KTOParams()).losses.float()).all()


def test_padding_free_is_refused_by_the_unpaired_stage(tmp_path):
    result = run_molting("run", "--plugin", "kto", "--max-steps", "1", "--eval", "off", "--padding-free",
                         "--output-dir", str(tmp_path))
    assert result.returncode != 0 and "--padding-free is not supported by the unpaired stage" in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
