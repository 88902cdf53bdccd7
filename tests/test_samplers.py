"""Samplers as a seam: hf and hf-paged registered, equal under greedy decoding, chosen with --sampler in the
online stages; a sampler that cannot run here, or a broken one, is a clear error or a failed check. (Both built-in
samplers pass their conformance checks in test_conformance.py's TestEveryBuiltinPlugin.)"""

from __future__ import annotations

import json

import pytest
import torch

import molting
from molting import Sampler
from molting.discovery import load_plugins
from molting.sampling import SamplingRequest, sample, sampler_for
from molting.testing import check_plugin

from test_grpo import run_stage

HOST = load_plugins()


@pytest.fixture(scope="module")
def demo():
    from molting.demo import demo_model_dir, prompt_rows
    from molting.models import load_causal_lm

    model, tokenizer = load_causal_lm(demo_model_dir())
    return model, tokenizer, [r["prompt"] for r in prompt_rows("train", 5)]


def test_paged_greedy_completions_equal_hf_with_truncated_prompts_and_several_per_prompt(demo):
    model, tokenizer, prompts = demo
    paged = sampler_for(HOST, "hf-paged")
    settings = dict(n=2, max_new_tokens=16, temperature=0, max_prompt_length=6)
    ours, theirs = paged(model, tokenizer, prompts, **settings), sample(model, tokenizer, prompts, **settings)
    assert ours.texts == theirs.texts and ours.rows == theirs.rows
    torch.testing.assert_close(ours.truncated, theirs.truncated)
    for a, b in zip(ours.completion_ids, theirs.completion_ids):  # the same kept tokens (padding widths may differ)
        assert a[a != tokenizer.pad_token_id].tolist() == b[b != tokenizer.pad_token_id].tolist()
    assert ours.prompt_ids.size(1) == 6


def test_the_hf_sampler_is_molting_sampling_sample(demo):
    model, tokenizer, prompts = demo
    seeds = [11, 12, 13, 14, 15]
    ours = HOST.get("sampler", "hf").sample(SamplingRequest(model, tokenizer, prompts, max_new_tokens=8, seeds=seeds))
    assert ours.texts == sample(model, tokenizer, prompts, max_new_tokens=8, seeds=seeds).texts


def test_per_completion_seeds_make_a_completion_independent_of_its_batch(demo):
    model, tokenizer, prompts = demo
    together = sample(model, tokenizer, prompts, max_new_tokens=12, seeds=[1, 2, 3, 4, 5])
    alone = [sample(model, tokenizer, [p], max_new_tokens=12, seeds=[s]).texts[0] for p, s in zip(prompts, [1, 2, 3, 4, 5])]
    assert together.texts == alone


def test_grpo_draws_through_the_chosen_sampler(tmp_path, capsys):
    records = run_stage(tmp_path, sampler="hf-paged")
    record = json.loads((tmp_path / "run" / "molting_run.json").read_text())
    assert record["status"] == "completed" and record["config"]["sampler"] == "hf-paged"
    assert len([r for r in records if "reward" in r]) == 2


def test_sample_pairs_draws_through_the_chosen_sampler(tmp_path, capsys):
    from molting.demo import demo_model_dir
    from molting.pipeline import run
    from molting.resolve import resolve_config

    from test_grpo import write_prompts

    flags = {"model": str(demo_model_dir()), "data": str(write_prompts(tmp_path, n=6)),
             "output_dir": str(tmp_path / "run"), "eval": "off", "sampler": "hf-paged", "num_samples": 4,
             "max_new_tokens": 12, "judges": {"rule": 1.0}}
    config, steps = resolve_config(HOST, ["sample-pairs"], flags=flags)
    run(config, steps, HOST)
    assert "(sampler hf-paged)" in capsys.readouterr().err
    assert (tmp_path / "run" / "data.jsonl").read_text().strip()


def test_an_unknown_sampler_lists_the_available_ones(tmp_path):
    with pytest.raises(molting.PluginError, match=r"no sampler named 'vllm'.*Available samplers: hf"):
        run_stage(tmp_path, sampler="vllm")


def test_a_sampler_that_cannot_run_here_says_why(tmp_path):
    host = load_plugins()

    class Plugin:
        @molting.hookimpl
        def molting_register_samplers(self, register):
            register(Sampler(name="remote", sample=lambda request: None, description="Needs a server.",
                             available=lambda: "no server at http://127.0.0.1:1"))

    host.register(Plugin(), "remote")
    with pytest.raises(molting.ConfigError, match="sampler 'remote' cannot run here: no server"):
        run_stage(tmp_path, host=host, sampler="remote")


def _reversed_greedy(request):
    out = sample(request.model, request.tokenizer, list(reversed(request.prompts)), n=request.n,
                 max_new_tokens=request.max_new_tokens, temperature=request.temperature)
    return out


def test_a_sampler_that_mixes_up_the_prompts_fails_its_check():
    broken = Sampler(name="shuffled", sample=_reversed_greedy, description="Answers the prompts in reverse order.")
    results = {r.check: r for r in check_plugin(broken)}
    assert results["sampler-greedy-matches-hf"].status == "failed"
    assert "differs from hf's" in results["sampler-greedy-matches-hf"].message


def test_paged_sampler_decodes_each_call_with_its_own_settings(demo):
    """The paged manager kept on the model between calls is rebuilt when the settings change."""
    model, tokenizer, prompts = demo
    paged = sampler_for(HOST, "hf-paged")
    short = paged(model, tokenizer, prompts, max_new_tokens=3, temperature=0)
    long = paged(model, tokenizer, prompts, max_new_tokens=12, temperature=0)
    assert short.lengths.max() <= 3 and long.lengths.max() > 3
    assert long.texts == sample(model, tokenizer, prompts, max_new_tokens=12, temperature=0).texts


def test_the_paged_cache_is_sized_to_the_request_not_to_the_machine(tmp_path):
    """By default transformers sizes the paged cache to most of the free memory (on CPU: of the RAM; 14.5 GB here),
    and a kept manager would hold it through training: molting sizes it to the request (a 3.5M model: ~0.6 GB)."""
    import subprocess
    import sys

    # VmHWM: this process's own peak (getrusage's ru_maxrss starts at the RSS of the process that spawned it)
    script = (
        "from molting.demo import demo_model_dir, prompt_rows\n"
        "from molting.discovery import load_plugins\n"
        "from molting.models import load_causal_lm\n"
        "from molting.sampling import sampler_for\n"
        "model, tok = load_causal_lm(demo_model_dir())\n"
        "draw = sampler_for(load_plugins(), 'hf-paged')\n"
        "draw(model, tok, [r['prompt'] for r in prompt_rows('train', 8)], n=2, max_new_tokens=20, temperature=0)\n"
        "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "print('PEAK', int(hwm.split()[1]) * 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    peak = int(result.stdout.split("PEAK")[-1])
    assert peak < 2e9, f"peak RSS {peak / 1e9:.1f} GB"
