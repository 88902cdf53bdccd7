"""The model-family matrix: every stage trains two steps on a tiny model of each of eleven families.

Each family's model and tokenizer come from :mod:`families` (random weights,
the family's special tokens and chat template). Chat families train on
conversational rows with a system turn (where the template accepts one) and
a multi-turn history; GPT-2 and Pythia, which have no template, on text.
Each output must reload with plain transformers and give finite logits.

A step takes about a second: the whole matrix runs by default.
"""

from __future__ import annotations

import json
import math

import pytest

from families import FAMILIES, family_model

STAGES = {
    "sft": {"batch_size": 2},
    "reward-model": {"batch_size": 2},
    "dpo": {"batch_size": 2},
    "kto": {"batch_size": 4},
    "grpo": {"batch_size": 4, "num_generations": 2, "max_new_tokens": 6, "judges": {"rule": 1.0}},
    "ppo": {"batch_size": 2, "max_new_tokens": 6, "judges": {"rule": 1.0}, "eval_prompts": 0},
    "sample-pairs": {"num_samples": 4, "max_new_tokens": 6, "judges": {"python": 1.0},
                     "judge_args": {"python": {"function": "families:text_length"}}},
}


def matrix():
    return [pytest.param(family, stage, id=f"{family}-{stage}") for family in FAMILIES for stage in STAGES]


@pytest.fixture(scope="session")
def families_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("families"))


def history(family: str) -> list[dict[str, str]]:
    """A system turn (Gemma 2's template refuses one) and a finished exchange before the question."""
    turns = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "four"},
             {"role": "user", "content": "And three plus three?"}]
    return turns if family == "gemma2" else [{"role": "system", "content": "Answer briefly."}, *turns]


def rows_for(family: str, stage: str) -> list[dict]:
    chat = FAMILIES[family].chat
    prompt = history(family) if chat else "Q: what is three plus three?\nA:"

    def answer(text):
        return [{"role": "assistant", "content": text}] if chat else f" {text}"

    rows = []
    for i in range(8):
        good, bad = f"six, {i} is here", f"seven {i}"
        if stage in ("dpo", "reward-model"):
            rows.append({"prompt": prompt, "chosen": answer(good), "rejected": answer(bad)})
        elif stage == "kto":
            rows.append({"prompt": prompt, "completion": answer(good if i % 2 else bad), "label": bool(i % 2)})
        elif stage == "sft":
            rows.append({"messages": prompt + answer(good)} if chat else {"prompt": prompt, "completion": answer(good)})
        else:
            rows.append({"prompt": prompt, "answer": "6"})
    return rows


def train(tmp_path, families_root, family: str, stage: str, **extra):
    from molting.discovery import load_plugins
    from molting.pipeline import run
    from molting.resolve import resolve_config

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows_for(family, stage)))
    out = tmp_path / "out"
    host = load_plugins()
    flags = {"model": str(family_model(family, families_root)), "data": str(data), "output_dir": str(out),
             "max_steps": 2, "logging_steps": 1, "eval": "off", "precision": "fp32", "max_length": 256,
             "learning_rate": 1e-4, **STAGES[stage], **extra}
    config, steps = resolve_config(host, [stage], flags=flags)
    run(config, steps, host)
    return out


def reloads(out, stage: str) -> None:
    """The output directory loads with plain transformers and computes finite logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    kind = AutoModelForSequenceClassification if stage == "reward-model" else AutoModelForCausalLM
    model = kind.from_pretrained(out)
    with torch.no_grad():
        logits = model(**tokenizer(["the sum is six"], return_tensors="pt")).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family, stage", matrix())
def test_every_stage_trains_on_every_family(tmp_path, families_root, family, stage):
    out = train(tmp_path, families_root, family, stage)
    record = json.loads((out / "molting_run.json").read_text())
    assert record["status"] == "completed"
    if stage == "sample-pairs":
        pairs = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
        assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
        return
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m.get("loss", m.get("loss/policy_avg")) for m in metrics if "loss" in m or "loss/policy_avg" in m]
    assert len(losses) >= 2 and all(math.isfinite(v) for v in losses)
    reloads(out, stage)


# --------------------------------------------------------------------------- LoRA, 4-bit, padding-free


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
@pytest.mark.parametrize("family", ["llama3", "phi3", "gemma3", "gpt2"])
def test_lora_on_all_linear_layers_and_a_4bit_base(tmp_path, families_root, family, quantized):
    """Phi-3 fuses q/k/v into one projection and GPT-2's are Conv1D: all-linear must find them all."""
    from peft import AutoPeftModelForCausalLM

    out = train(tmp_path, families_root, family, "dpo", lora_r=4, load_in_4bit=quantized)
    adapter = json.loads((out / "adapter_config.json").read_text())
    expected = {"phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
                "gpt2": {"c_attn", "c_proj", "c_fc"}}.get(family, {"q_proj", "k_proj", "v_proj", "o_proj"})
    assert expected <= {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}
    import torch

    model = AutoPeftModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


@pytest.mark.parametrize("family", [name for name, f in FAMILIES.items() if f.sdpa])
def test_padding_free_gives_the_padded_loss_on_every_family(tmp_path, families_root, family):
    stage, first = "dpo", {}
    for packed in (False, True):
        (tmp_path / str(packed)).mkdir()
        out = train(tmp_path / str(packed), families_root, family, stage, padding_free=packed, max_steps=1)
        first[packed] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert math.isclose(first[True], first[False], rel_tol=1e-4, abs_tol=1e-5), first


def test_padding_free_is_refused_where_packed_attention_would_differ(tmp_path, families_root):
    """Gemma 2 soft-caps attention scores; SDPA's varlen path cannot, so packing would train another model."""
    from molting.errors import ConfigError

    with pytest.raises(ConfigError, match="--padding-free: the gemma2 model soft-caps its attention scores"):
        train(tmp_path, families_root, "gemma2", "dpo", padding_free=True, max_steps=1)


def test_a_model_whose_layers_drop_the_packing_boundaries_is_refused(families_root):
    """A model (say, one with remote code) whose forward never hands cu_seq_lens to its attention."""
    from transformers import AutoModelForCausalLM

    from molting.errors import ConfigError
    from molting.packing import use_varlen_attention

    model = AutoModelForCausalLM.from_pretrained(family_model("llama3", families_root))
    forward = model.forward

    def dropping(*args, cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
        return forward(*args, **kwargs)

    model.forward = dropping
    with pytest.raises(ConfigError, match="the llama model gives a packed row other logits than its sequences alone"):
        use_varlen_attention(model)


# --------------------------------------------------------------------------- sampling stops at the end of a turn


@pytest.mark.parametrize("family", ["phi3", "gemma3"])
def test_sampling_stops_at_the_end_of_turn_token_as_generate_does(families_root, family):
    """Phi-3 ends a turn with <|end|> and Gemma with <end_of_turn>, not with the tokenizer's EOS: an answer that
    ends there is finished (not truncated, its mask ends there), as the generation config says."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from molting.sampling import sample, stop_token_ids

    path = family_model(family, families_root)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    end = tokenizer.convert_tokens_to_ids(FAMILIES[family].end_of_turn)
    assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id, end]
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.zero_()
        head.bias[end] = 20.0  # the answer is the end-of-turn token at once
    model.set_output_embeddings(head)
    samples = sample(model, tokenizer, [[{"role": "user", "content": "What is two plus two?"}]], n=2, max_new_tokens=5)
    assert samples.completion_ids[:, 0].tolist() == [end, end]
    assert samples.completion_mask.tolist() == [[1], [1]] or samples.completion_mask[:, 1:].sum() == 0
    assert not samples.truncated.any()


# --------------------------------------------------------------------------- tokenization parity with trl

CHAT_FAMILIES = [name for name, f in FAMILIES.items() if f.chat]


def conversational_pair(family: str) -> dict:
    return {"prompt": history(family), "chosen": [{"role": "assistant", "content": "six"}],
            "rejected": [{"role": "assistant", "content": "seven, I think"}]}


def assert_pair_tokens_equal_trls(tmp_path, path, rows):
    """molting's prompt, chosen and rejected ids of ``rows`` equal trl's DPOTrainer's (so do the loss masks)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from molting.pairs import format_pairs, tokenize_pairs

    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(path), train_dataset=Dataset.from_list(rows),
                         args=DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                         processing_class=AutoTokenizer.from_pretrained(path))
    tokenizer = AutoTokenizer.from_pretrained(path)
    ours = tokenize_pairs(format_pairs(rows, tokenizer, "pairs"), tokenizer, 1024, "truncate")
    for mine, theirs in zip(ours, trainer.train_dataset, strict=True):
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert mine[key] == theirs[key], (key, tokenizer.decode(mine[key]), tokenizer.decode(theirs[key]))


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_preference_tokens_equal_trls_dpo_trainer(tmp_path, families_root, family):
    """A conversation with a system turn and history."""
    assert_pair_tokens_equal_trls(tmp_path, family_model(family, families_root), [conversational_pair(family)])


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_sft_tokens_and_completion_mask_equal_trls_sft_trainer(tmp_path, families_root, family):
    """molting's ``messages`` rows against trl's prompt/completion rows (``completion_only_loss``) of the same talk."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from molting.plugins.supervised import format_sft, tokenize_sft

    path = family_model(family, families_root)
    answer = [{"role": "assistant", "content": "six"}]
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(path),
                         train_dataset=Dataset.from_list([{"prompt": history(family), "completion": answer}]),
                         args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], completion_only_loss=True),
                         processing_class=AutoTokenizer.from_pretrained(path))
    theirs = trainer.train_dataset[0]
    tokenizer = AutoTokenizer.from_pretrained(path)
    formatted, conversational = format_sft([{"messages": history(family) + answer}], tokenizer, "chat")
    ours = tokenize_sft(formatted, tokenizer, 1024, "truncate", conversational=conversational)[0]
    assert ours["prompt_ids"] + ours["completion_ids"] == theirs["input_ids"], tokenizer.decode(theirs["input_ids"])
    mask = theirs["completion_mask"] if "completion_mask" in theirs else [int(x != -100) for x in theirs["labels"]]
    assert [0] * len(ours["prompt_ids"]) + [1] * len(ours["completion_ids"]) == mask


@pytest.mark.parametrize("family", list(FAMILIES))
def test_text_pair_tokens_equal_trls_dpo_trainer(tmp_path, families_root, family):
    """Standard (text) rows: the BOS where the tokenizer adds one, EOS after each completion, as trl."""
    rows = [{"prompt": "Q: what is three plus three?\nA:", "chosen": " six", "rejected": " seven, I think"}]
    assert_pair_tokens_equal_trls(tmp_path, family_model(family, families_root), rows)


# --------------------------------------------------------------------------- loading options


def test_dtype_auto_loads_the_dtype_config_json_names_and_the_record_says_which(tmp_path, families_root):
    import torch
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(family_model("qwen3", families_root), dtype=torch.bfloat16)
    model_dir = tmp_path / "bf16-model"
    source.save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (family_model("qwen3", families_root) / name).exists():
            (model_dir / name).write_bytes((family_model("qwen3", families_root) / name).read_bytes())
    from molting.models import config_dtype

    assert config_dtype(model_dir) == "bfloat16"
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows_for("qwen3", "sft")))
    from molting.discovery import load_plugins
    from molting.pipeline import run
    from molting.resolve import resolve_config

    host = load_plugins()
    out = tmp_path / "out"
    config, steps = resolve_config(host, ["sft"], flags={
        "model": str(model_dir), "data": str(data), "output_dir": str(out), "max_steps": 1, "eval": "off",
        "dtype": "auto", "lora_r": 4, "attn_implementation": "eager", "batch_size": 2})
    run(config, steps, host)
    record = json.loads((out / "molting_run.json").read_text())
    assert record["config"]["dtype"] == "bfloat16" and record["config"]["attn_implementation"] == "eager"


def test_attn_implementation_reaches_the_model_and_a_missing_kernel_is_a_clear_error(families_root):
    from molting.errors import ModelError
    from molting.models import load_causal_lm

    model, _ = load_causal_lm(family_model("llama3", families_root), attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ModelError, match="cannot load .* as a causal LM: .*(flash|Flash)"):
        load_causal_lm(family_model("llama3", families_root), attn_implementation="flash_attention_2")
