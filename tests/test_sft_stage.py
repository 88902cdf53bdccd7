"""The sft stage: data as trl's SFTTrainer prepares it, its whole-model loss against trl's, training, pipelines, errors."""

from __future__ import annotations

import json

import pytest
import torch

from molting import demo
from molting.config import RunConfig
from molting.discovery import load_plugins
from molting.errors import DataError
from molting.models import load_causal_lm
from molting.plugins.supervised import SFTCollator, build_trainer, check_sft_rows, format_sft, tokenize_sft
from molting.pipeline import run
from molting.resolve import resolve_config
from conftest import run_molting

CONVERSATIONAL = [
    {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
     "completion": [{"role": "assistant", "content": "Arr! 4, matey."}]},
    {"prompt": [{"role": "system", "content": "Answer plainly."}, {"role": "user", "content": "What is 3 + 2?"}],
     "completion": [{"role": "assistant", "content": "The answer is 5."}]},
]


@pytest.fixture(scope="module")
def model_and_tokenizer(demo_model):
    return load_causal_lm(demo_model)


@pytest.fixture(scope="module")
def trl_sft(demo_model, tmp_path_factory):
    """A real trl SFTTrainer on the demo model (prompt/completion data, so completion_only_loss is on)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    # float32 as molting loads it (transformers 5 would take the dtype config.json records)
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    args = SFTConfig(output_dir=str(tmp_path_factory.mktemp("trl-sft")), report_to=[], per_device_train_batch_size=6,
                     bf16=False, use_cpu=True, gradient_checkpointing=False)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(demo.sft_rows("test", 6)),
                      processing_class=tokenizer)


def trl_prepared(trainer, rows):
    """trl's own dataset preparation (chat template, EOS, tokenization, completion-only labels) of ``rows``."""
    from datasets import Dataset

    prepared = trainer._prepare_dataset(Dataset.from_list(rows), trainer.processing_class, trainer.args, False, None, "t")
    return [(r["input_ids"], r["labels"]) for r in prepared]


def ours_prepared(rows, tokenizer):
    formatted, conversational = format_sft(rows, tokenizer, "rows")
    examples = tokenize_sft(formatted, tokenizer, 512, "drop", "rows", conversational)
    return [(ex["prompt_ids"] + ex["completion_ids"], [-100] * len(ex["prompt_ids"]) + ex["completion_ids"])
            for ex in examples]


@pytest.mark.parametrize("kind", ["standard", "standard, EOS given", "conversational", "messages"])
def test_rows_are_tokenized_and_labelled_as_trl_sfttrainer_does(kind, model_and_tokenizer, trl_sft):
    _, tokenizer = model_and_tokenizer
    rows = {
        "standard": demo.sft_rows("test", 6),
        "standard, EOS given": [{**r, "completion": r["completion"] + tokenizer.eos_token} for r in demo.sft_rows("test", 3)],
        "conversational": CONVERSATIONAL,
        "messages": CONVERSATIONAL,
    }[kind]
    ours_rows = [{"messages": r["prompt"] + r["completion"]} for r in rows] if kind == "messages" else rows
    # a `messages` row is its earlier messages as the prompt and its last (assistant) message as the completion
    assert ours_prepared(ours_rows, tokenizer) == trl_prepared(trl_sft, rows)


def test_completion_tokens_only_are_labelled(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    [example] = tokenize_sft([{"prompt": "Q: What is 1 + 1?\nA:", "completion": " The answer is 2."}], tokenizer, 512, "drop")
    batch = SFTCollator(tokenizer.pad_token_id)([example, {**example, "completion_ids": example["completion_ids"][:2]}])
    labelled = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert labelled == example["completion_ids"] and labelled[-1] == tokenizer.eos_token_id
    assert (batch["labels"][1] != -100).sum() == 2 and batch["attention_mask"][1].sum() == len(example["prompt_ids"]) + 2


def test_whole_model_loss_and_metrics_match_trl_sfttrainer(model_and_tokenizer, trl_sft, tmp_path):
    """Same weights, same batch: the stage's loss, token accuracy, entropy and token count are trl's."""
    model, tokenizer = model_and_tokenizer
    formatted, _ = format_sft(demo.sft_rows("test", 6), tokenizer, "demo")
    examples = tokenize_sft(formatted, tokenizer, 512, "drop")
    batch = SFTCollator(tokenizer.pad_token_id)(examples)
    trl_batch = {k: v for k, v in batch.items() if k != "index"}
    ours = build_trainer(model, tokenizer, examples, RunConfig(plugins=["sft"], output_dir=str(tmp_path)), tmp_path)
    trl_sft.model.load_state_dict(model.state_dict())
    ours.model.train()
    trl_sft.model.train()

    losses = {}
    for num_items in (None, 50):  # 50: as if the optimizer step's micro-batches held 50 completion tokens in all
        our_loss = ours.compute_loss(ours.model, dict(batch), num_items_in_batch=num_items).item()
        trl_loss = trl_sft.compute_loss(trl_sft.model, dict(trl_batch), num_items_in_batch=num_items).item()
        assert abs(our_loss - trl_loss) < 1e-5, num_items
        losses[num_items] = our_loss
    completion_tokens = int((batch["labels"] != -100).sum())
    assert losses[None] == pytest.approx(0.4167, abs=1e-3)  # the mean NLL of the completion tokens
    assert losses[50] == pytest.approx(losses[None] * completion_tokens / 50, rel=1e-6)
    for name in ("mean_token_accuracy", "entropy"):
        assert ours._metrics["train"][name] == pytest.approx(trl_sft._metrics["train"][name], abs=1e-5), name
    assert ours._metrics["train"]["num_tokens"] == [float(trl_sft._metrics["train"]["num_tokens"][0])]


def _run(plugins, tmp_path, **flags):
    host = load_plugins()
    config, steps = resolve_config(host, plugins, {}, {"output_dir": str(tmp_path / "out"), "eval": "off", **flags})
    return run(config, steps, host)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_training_lowers_the_loss_and_saves_a_causal_lm(tmp_path):
    from transformers import AutoModelForCausalLM

    data = _jsonl(tmp_path / "sft.jsonl", demo.sft_rows("train", 8))
    [metrics] = _run(["sft"], tmp_path, data=str(data), max_steps=6, batch_size=8, logging_steps=1,
                     learning_rate=1e-4, lr_scheduler_type="constant")
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert {"mean_token_accuracy", "entropy", "num_tokens"} <= set(records[0])
    assert [r["num_tokens"] for r in records if "loss" in r] == sorted({r["num_tokens"] for r in records if "loss" in r})
    assert metrics["train_loss"] > 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert not (tmp_path / "out" / "training_args.bin").exists()


def test_lora_sft_saves_an_adapter(tmp_path):
    data = _jsonl(tmp_path / "sft.jsonl", demo.sft_rows("train", 4))
    _run(["sft"], tmp_path, data=str(data), max_steps=2, batch_size=4, lora_r=4)
    assert (tmp_path / "out" / "adapter_config.json").exists()


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "Q: What is 1 + 1?\nA:"}, r"sft\.jsonl, row 1: missing column\(s\) completion"),
        ({"prompt": "Q: What is 1 + 1?\nA:", "completion": 2}, r"sft\.jsonl, row 1, field 'completion': expected a non-empty string"),
        ({"prompt": ["Q: 1 + 1?"], "completion": " 2"}, r"sft\.jsonl, row 1, field 'prompt': expected a non-empty string"),
    ],
)
def test_a_bad_row_names_file_row_and_field(row, message, tmp_path):
    data = _jsonl(tmp_path / "sft.jsonl", [demo.sft_rows("train", 1)[0], row])
    with pytest.raises(DataError, match=message):
        _run(["sft"], tmp_path, data=str(data), max_steps=1)


def test_conversations_must_end_with_the_assistant():
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr!"}]}
    assert check_sft_rows([good], "chat.jsonl") == (("messages",), True)
    with pytest.raises(DataError, match=r"chat\.jsonl, row 1, field 'messages': expected at least one message followed by the assistant's"):
        check_sft_rows([good, {"messages": good["messages"][:1]}], "chat.jsonl")
    with pytest.raises(DataError, match=r"chat\.jsonl, row 1, field 'messages': expected a list of \{role, content\} messages"):
        check_sft_rows([good, {"messages": "Hi"}], "chat.jsonl")


@pytest.mark.slow
def test_sft_then_dpo_pipeline_through_the_cli(tmp_path):
    """`--plugin sft --plugin dpo`: the SFT output is the DPO step's model (and so its reference)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pipeline"
    result = run_molting("run", "--plugin", "sft", "--plugin", "dpo", "--max-steps", "2", "--eval", "off",
                         "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    sft_record = json.loads((out / "1-sft" / "molting_run.json").read_text())
    dpo_record = json.loads((out / "2-dpo" / "molting_run.json").read_text())
    assert sft_record["stage"] == "sft" and sft_record["loss"] is None and sft_record["status"] == "completed"
    assert "dataset 'demo-sft'" in sft_record["data"]
    assert dpo_record["stage"] == "preference" and dpo_record["status"] == "completed"
    assert dpo_record["model"] == str(out / "1-sft")
    AutoModelForCausalLM.from_pretrained(out / "1-sft")
    AutoModelForCausalLM.from_pretrained(out / "2-dpo")


def test_a_conversational_row_exactly_max_length_long_is_kept(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    rows = [{"messages": [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "The answer is 42."}]}]
    formatted, conversational = format_sft(rows, tokenizer, "rows")
    [full] = tokenize_sft(formatted, tokenizer, 512, "drop", "rows", conversational)
    length = len(full["prompt_ids"]) + len(full["completion_ids"])
    [exact] = tokenize_sft(formatted, tokenizer, length, "drop", "rows", conversational)
    assert exact["completion_ids"] == full["completion_ids"]
