"""``molting estimate`` / ``molting run --dry-run``: the peak memory of a run, said before any weight loads.

The estimate is held within ±25% of the peak RSS a real run measures, on a
model of real vocabulary (a random Qwen2 of 151,936 tokens, so the output
layer matters as it does for Qwen2.5), for full training, LoRA, a precomputed
reference and long answers. Each measured run is its own process.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from molting.cli import cli


@pytest.fixture(scope="module")
def real_shaped(tmp_path_factory) -> Path:
    """A random Qwen2 of Qwen2.5's vocabulary (hidden 256, 2 layers: 40M parameters) with the demo tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from molting.demo import demo_model_dir

    directory = tmp_path_factory.mktemp("qwen2-shaped")
    config = Qwen2Config(vocab_size=151936, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def pairs(directory: Path, model: Path, answer_tokens: int, rows: int = 16) -> Path:
    """Preference rows of ~10-token prompts and answers of about ``answer_tokens`` tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    rng = random.Random(0)

    def text(count: int) -> str:
        words = " ".join(f"{rng.randint(10, 99)} plus {rng.randint(10, 99)} is" for _ in range(count))
        return tokenizer.decode(tokenizer(words, add_special_tokens=False)["input_ids"][:count])

    path = directory / f"pairs-{answer_tokens}.jsonl"
    path.write_text("".join(json.dumps({"prompt": text(10), "chosen": text(answer_tokens),
                                        "rejected": text(answer_tokens)}) + "\n" for _ in range(rows)))
    return path


def peak_of(stdout: str) -> float:
    """The estimated peak in bytes that ``molting estimate`` printed (its first step's)."""
    return float(stdout.split("\npeak", 1)[1].split()[0]) * 1e9


CONFIGURATIONS = {
    "full": (["--batch-size", "4"], 100),
    "lora": (["--batch-size", "4", "--lora-r", "16"], 100),
    "precomputed-reference": (["--batch-size", "4", "--precompute-ref"], 100),
    "long-answers": (["--batch-size", "1", "--max-length", "1024"], 450),
}


def measure(args: list[str], env: dict[str, str]) -> int:
    """Peak RSS of the run: the child's own VmHWM.

    Not ``getrusage``: a child's ``ru_maxrss`` starts at the RSS of the process that spawned it, so a pytest
    process grown large by earlier tests would raise every measurement after it.
    """
    code = ("import sys\nfrom molting.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
            "hwm = next(line for line in open('/proc/self/status') if line.startswith('VmHWM'))\n"
            "print('PEAK', int(hwm.split()[1]) * 1024)\n")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.strip().splitlines()[-1].split()[1])


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_the_estimate_is_within_a_quarter_of_the_measured_peak(real_shaped, tmp_path, name):
    extra, answer_tokens = CONFIGURATIONS[name]
    data = pairs(tmp_path, real_shaped, answer_tokens)
    args = ["run", "--plugin", "dpo", "--model", str(real_shaped), "--data", str(data), "--max-steps", "2",
            "--eval", "off", "--precision", "fp32", "--logging-steps", "1", *extra]
    env = {**os.environ, "MOLTING_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "2"}
    printed = molting("estimate", *args[1:])
    assert printed.exit_code == 0, printed.output
    estimated = peak_of(printed.stdout)
    measured = measure([*args, "--output-dir", str(tmp_path / "out")], env)
    print(f"{name}: estimated {estimated / 1e9:.2f} GB, measured {measured / 1e9:.2f} GB")
    assert 0.75 <= estimated / measured <= 1.25, f"{name}: estimated {estimated / 1e9:.2f} GB, measured " \
                                                 f"{measured / 1e9:.2f} GB\n{printed.stdout}"


def weightless_copy(model: Path, directory: Path) -> Path:
    """The model's config and tokenizer without its weights: what the estimate reads."""
    import shutil

    shutil.copytree(model, directory, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return directory


def molting(*args: str):
    """``molting ARGS`` in this process (an estimate loads no weights): click's runner, output captured."""
    return CliRunner().invoke(cli, list(args))


def test_the_estimate_reads_no_weights_and_names_every_part(real_shaped, tmp_path):
    model = weightless_copy(real_shaped, tmp_path / "config-only")
    data = pairs(tmp_path, real_shaped, 120)
    printed = molting("estimate", "--plugin", "dpo", "--model", str(model), "--data", str(data), "--batch-size", "4")
    assert printed.exit_code == 0, printed.output
    for part in ("runtime", "weights", "gradients", "optimizer", "reference", "activations", "logits", "peak"):
        assert f"\n{part} " in printed.stdout, printed.stdout
    assert "40M parameters, vocabulary 151,936; micro-batch 4 x 2 x" in printed.stdout


def test_a_budget_it_does_not_fit_names_settings_that_do(real_shaped, tmp_path):
    data = pairs(tmp_path, real_shaped, 120)
    base = ["estimate", "--plugin", "dpo", "--model", str(real_shaped), "--data", str(data), "--batch-size", "4"]
    full = molting(*base)
    budget = peak_of(full.stdout) * 0.8
    printed = molting(*base, "--memory-budget", f"{budget / 1e9:.2f}GB")
    assert printed.exit_code == 0, printed.output
    verdict = printed.stdout.strip().splitlines()[-1]
    assert verdict.startswith(f"does not fit in {budget / 1e9:.2f} GB; with --"), verdict
    suggested = verdict.split("; with ", 1)[1].rsplit(":", 1)[0].split()
    again = molting(*base, *suggested, "--memory-budget", f"{budget / 1e9:.2f}GB")
    assert again.exit_code == 0, again.output
    assert again.stdout.strip().splitlines()[-1].startswith(f"fits in {budget / 1e9:.2f} GB"), again.stdout


def test_a_run_over_its_budget_is_refused_before_anything_loads(tmp_path):
    out = tmp_path / "out"
    refused = molting("run", "--plugin", "dpo", "--memory-budget", "300MB", "--output-dir", str(out))
    assert refused.exit_code == 1
    assert "Error: the run would not fit --memory-budget" in refused.output
    assert "does not fit in 0.30 GB" in refused.output
    assert not out.exists()
    bad = molting("run", "--plugin", "dpo", "--memory-budget", "lots")
    assert bad.exit_code == 2 and "expected a size such as 24GB or 512MB, got 'lots'" in bad.output


def test_a_pipeline_is_estimated_step_by_step():
    printed = molting("run", "--plugin", "sft", "--plugin", "sample-pairs", "--plugin", "dpo", "--dry-run")
    assert printed.exit_code == 0, printed.output
    steps = printed.stdout.split("\nstep ")[1:]
    assert [s.split(":")[0] for s in steps] == ["1", "2", "3"]
    assert "gradients" not in steps[1] and "generation" in steps[1]  # sampling trains nothing, holds a KV cache
    assert "made by an earlier step" in steps[2]


def test_each_lever_lowers_the_part_it_should():
    from molting.config import RunConfig
    from molting.estimate import Lengths, Shape, estimate

    shape = Shape(parameters=494_000_000, linear=358_000_000, lora_per_rank=4_400_000, vocabulary=151_936,
                  hidden=896, intermediate=4864, layers=24, kv_width=128, tied=True)
    lengths = Lengths(sequence=712, completion=512, rows_per_sequence=2)
    base = RunConfig(plugins=("dpo",))

    def parts(device="cuda", **changes):
        import attrs

        return estimate(shape, attrs.evolve(base, **changes), lengths, "preference", needs_reference=True,
                        device=device).parts

    full = parts()
    assert full["reference"] == full["weights"] and full["optimizer"] == 2 * full["gradients"]
    assert parts(precompute_ref=True)["reference"] == 0
    lora = parts(lora_r=16)
    assert lora["reference"] == 0 and lora["gradients"] == 16 * 4_400_000 * 4
    assert parts(optim="adamw_8bit")["optimizer"] == full["optimizer"] // 4
    # on CPU, bitsandbytes updates the largest parameter (the embedding) through float32 copies of its moments
    assert parts("cpu", optim="adamw_8bit")["optimizer"] == full["optimizer"] // 4 + 151_936 * 896 * 8
    assert parts(dtype="bfloat16")["weights"] == full["weights"] // 2
    assert parts(gradient_checkpointing=True)["activations"] < full["activations"] / 4
    assert parts(logits_chunk_size=0)["logits"] > 5 * full["logits"]
    assert parts(lora_r=16, load_in_4bit=True)["weights"] < lora["weights"] / 2


def test_precision_auto_is_counted_as_the_run_would_pick_it():
    from molting.config import RunConfig
    from molting.estimate import Lengths, Shape, estimate
    from molting.training import uses_bf16

    shape = Shape(parameters=42_000_000, linear=3_000_000, lora_per_rank=40_000, vocabulary=151_936,
                  hidden=256, intermediate=704, layers=4, kv_width=128, tied=True)
    lengths = Lengths(sequence=200, completion=190, rows_per_sequence=2)

    def activations(precision, device):
        return estimate(shape, RunConfig(plugins=("dpo",), precision=precision), lengths, "preference",
                        needs_reference=True, device=device).parts["activations"]

    fp32, bf16 = activations("fp32", "cpu"), activations("bf16", "cpu")
    assert bf16 == fp32 // 2
    assert activations("auto", "cpu") == (bf16 if uses_bf16("auto") else fp32)  # this machine: the run's choice
    assert activations("auto", "cuda") == bf16


@pytest.mark.parametrize("text, expected", [("24GB", 24 * 10**9), ("512MB", 512 * 10**6), ("1.5GiB", 1.5 * 2**30),
                                            ("80 GB", 80 * 10**9)])
def test_sizes_read_as_people_write_them(text, expected):
    from molting.estimate import parse_size

    assert parse_size(text) == int(expected)
