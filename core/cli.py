"""The ``molting`` command line (click).

Heavy libraries (torch, transformers, datasets) are imported inside the
commands that need them, so ``molting --help`` and ``molting plugins``
answer at once.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from molting.card import HEADLINE_METRICS
from molting.config import ATTENTION, LR_SCHEDULERS, OPTIMIZERS
from molting.errors import MoltingError
from molting.discovery import PluginHost, load_plugins


class MoltingGroup(click.Group):
    """Turns a :class:`MoltingError` into a one-line ``Error: ...`` instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MoltingError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=MoltingGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="molting")
def cli() -> None:
    """Align language models with human preferences.

    Every method (DPO, SFT, ...) is a plugin; `molting plugins` lists what is
    installed. Start with the built-in tiny model and demo data:

    \b
        molting run --plugin dpo
        molting run --plugin dpo --model ./my-sft-model --data pairs.jsonl --beta 0.1
        molting run --config recipe.yaml --learning-rate 1e-6
    """


def _host() -> PluginHost:
    ctx = click.get_current_context()
    root = ctx.find_root()
    if not isinstance(root.obj, PluginHost):
        root.obj = load_plugins()
    return root.obj


# --------------------------------------------------------------------------- run

RUN_EPILOG = """\b
Examples:
  molting run --plugin dpo                      # built-in tiny model + demo pairs, ~30 s on 2 CPU cores
  molting run --plugin dpo --model ./sft --data pairs.jsonl --output-dir ./dpo-out
  molting run --plugin dpo --set label_smoothing=0.1 --beta 0.3
  molting run --loss dpo=0.8 --loss bco_pair=0.2 --loss sft=1.0   # a weighted sum (the MPO recipe)
  molting run --config recipe.yaml --max-steps 10   # flags override the recipe
  molting run --plugin sft --plugin reward-model --plugin ppo   # RLHF: each step feeds the next
  molting run --plugin sft --plugin sample-pairs --plugin dpo   # DPO on pairs sampled and judged on-policy
  molting run --plugin grpo --judge rule --set num_generations=8  # GRPO, reward: the data's `answer` column

\b
Pipelines: each step writes OUTPUT/N-NAME; a rerun skips steps already complete
with the same settings (--force reruns them). Per-step settings go in the
recipe: `stages: [{plugin: sft, epochs: 1}, {plugin: dpo, beta: 0.2}]`.
Judges: --judge NAME[=WEIGHT] (repeat to sum); their settings in the recipe,
`judge_args: {rule: {mode: numeric, column: answer}}`.

\b
Data (--data): a .jsonl, .json, .csv or .parquet file, a directory saved with
datasets' save_to_disk, a registered dataset name (see `molting plugins`), or a
hub dataset id (--data trl-lib/ultrafeedback_binarized --data-split train;
HF_HUB_OFFLINE=1 reads the cache). Preference rows have prompt/chosen/rejected
strings, or message lists (conversational; the chat template is applied);
without a prompt column the prompt is the common prefix of chosen and rejected
(cut after the last "Assistant:" turn in hh-rlhf's text). Other column names:
--columns chosen=response_a,rejected=response_b.

\b
The output directory holds the model and tokenizer (safetensors, loadable with
AutoModelForCausalLM.from_pretrained), molting_run.json (the resolved config
and every plugin's version), recipe.yaml (rerun with --config) and metrics.jsonl.
"""


def _parse_set(values: tuple[str, ...], option: str = "--set") -> dict[str, Any]:
    import yaml

    parsed = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            reason = str(getattr(exc, "problem", None) or exc).splitlines()[0]
            raise click.BadParameter(f"{item!r}: the value is read as YAML, and this is not ({reason}); quote it, "
                                     f"e.g. {key}='\"...\"'", param_hint=option) from None
        parsed[key if option in ("--loss", "--judge-arg") else key.replace("-", "_")] = value
    return parsed


def _parse_judges(values: tuple[str, ...], option: str) -> dict[str, float]:
    """``NAME[=WEIGHT]`` options as {name: weight} (weight 1 when not given)."""
    judges = {}
    for name, _, weight in (j.partition("=") for j in values):
        try:
            judges[name] = float(weight) if weight else 1.0
        except ValueError:
            raise click.BadParameter(f"expected NAME or NAME=WEIGHT with a numeric weight, got {name}={weight}",
                                     param_hint=option) from None
    return judges


@cli.command(epilog=RUN_EPILOG)
@click.option("--plugin", "plugins", multiple=True, metavar="NAME",
              help="Loss or stage to run (e.g. dpo). Repeat for a pipeline: each output is the next one's model.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML recipe; flags override it.")
@click.option("--model", help="Model to start from: a local directory, a Hugging Face hub id (ORG/NAME, fetched into "
                              "the hub cache; HF_HUB_OFFLINE=1 reads the cache only) or a built-in model: demo (the "
                              "default tiny model) or demo-tools (the calculator demo's).")
@click.option("--model-revision", metavar="REV", help="Hub branch, tag or commit of --model (or ORG/NAME@REV).")
@click.option("--data", help="Data file, saved dataset directory, registered dataset name, or Hugging Face hub dataset "
                             "id (ORG/NAME[@REV]). Default: the stage's demo data.")
@click.option("--data-subset", metavar="NAME", help="Subset (configuration) of a hub dataset that has several.")
@click.option("--data-split", metavar="NAME", help="Split of a hub or saved dataset to train on.  [default: train]")
@click.option("--persona-role", metavar="ROLE|NAME",
              help="Read --data as conversation logs (ShareGPT, OpenAI messages, a ChatGPT export) and train on this "
                   "speaker's turns, each with the conversation before it as the prompt.")
@click.option("--columns", metavar="FIELD=COLUMN,...",
              help="Read fields from other columns, e.g. chosen=response_a,rejected=response_b.")
@click.option("--output-dir", help="Where to write the trained model and logs.  [default: molting-output]")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps (overrides --epochs).")
@click.option("--epochs", type=float,
              help="Passes over the data.  [default: 1; 3 on the demo model (1 for sft, reward-model and ppo)]")
@click.option("--learning-rate", type=float, help="Peak learning rate.  [default: 5e-6; 5e-5 on the demo model]")
@click.option("--lr-scheduler-type", type=click.Choice(list(LR_SCHEDULERS)),
              help="How the learning rate moves from its peak, as transformers' TrainingArguments.  [default: linear]")
@click.option("--warmup-steps", type=float, metavar="N",
              help="Steps the learning rate climbs to its peak; a fraction of all steps when below 1 (0.1: the "
                   "first tenth).  [default: 0]")
@click.option("--beta", type=float,
              help="The loss's β (KL strength to the reference).  [default: the loss's own (0.1 for dpo); 0.3 for "
                   "molting's own losses on the demo model]")
@click.option("--batch-size", type=int,
              help="Examples (pairs; completions in grpo, prompts in ppo) per device per step.  [default: 8]")
@click.option("--gradient-accumulation-steps", type=int, help="Batches per optimizer step.  [default: 1]")
@click.option("--max-length", type=int, help="Max tokens of prompt + completion.  [default: 512]")
@click.option("--overlong", type=click.Choice(["truncate", "drop"]),
              help="What to do with rows longer than --max-length.  [default: truncate]")
@click.option("--num-proc", type=int, metavar="N",
              help="Processes that format and tokenize the data (datasets' map; its cache makes a rerun on the same "
                   "data, tokenizer and settings skip this).  [default: 1]")
@click.option("--seed", type=int, help="Random seed for initialisation and data order.  [default: 42]")
@click.option("--logging-steps", type=int, help="Log metrics every N steps.  [default: 5]")
@click.option("--report-to", help="Trainer integration to report to (none, tensorboard, wandb, ...).  [default: none]")
@click.option("--eval", type=click.Choice(["auto", "on", "off"]),
              help="Evaluate the start and trained models on the held-out demo split (auto: when trained on demo data).")
@click.option("--eval-data", metavar="DATA", help="Held-out data to evaluate on during training (as --data; pairs "
                                                 "for offline stages, prompts for online ones).")
@click.option("--eval-data-split", metavar="NAME", help="Split of a hub, saved or registered --eval-data.  "
                                                       "[default: --data-split]")
@click.option("--eval-split", type=float, metavar="FRACTION",
              help="Hold this fraction of --data out for evaluation during training (shuffled with --seed; recorded).")
@click.option("--eval-steps", type=int, metavar="N",
              help="With held-out data, evaluate every N steps (and at the end).  [default: 0, at the end only]")
@click.option("--eval-judge", "eval_judge_weights", multiple=True, metavar="NAME[=WEIGHT]",
              help="Held-out judge of online stages' answers during training (may differ from --judge); repeat to sum.")
@click.option("--keep-best", metavar="METRIC[:min|max]",
              help="Keep the best evaluation's model in OUTPUT/best (e.g. eval_loss, eval_reward) and record its step.")
@click.option("--stop-on-hacking", is_flag=True, default=None,
              help="Stop when the reward-hacking watch fires (online stages: training reward up while the held-out "
                   "judges' score falls, answers growing, KL running away).")
@click.option("--trust-remote-code", is_flag=True, default=None,
              help="Allow model directories to run their own Python code. Off by default.")
@click.option("--lora-r", type=int, help="Train LoRA adapters of this rank instead of every weight (peft).")
@click.option("--lora-alpha", type=float, help="LoRA scaling α.  [default: 16]")
@click.option("--lora-dropout", type=float, help="LoRA dropout.  [default: 0]")
@click.option("--lora-target-modules", help="Comma-separated module names, or all-linear.  [default: all-linear]")
@click.option("--load-in-4bit", is_flag=True, default=None, help="QLoRA: 4-bit NF4 base (bitsandbytes) + LoRA.")
@click.option("--merge", is_flag=True, default=None, help="With LoRA: write the merged model, adapter in OUTPUT/adapter.")
@click.option("--dtype", "--torch-dtype", "dtype", type=click.Choice(["float32", "bfloat16", "float16", "auto"]),
              help="The dtype the weights load in (bfloat16: half the memory; auto: the one config.json names); LoRA "
                   "adapters stay float32.  [default: float32]")
@click.option("--attn-implementation", type=click.Choice(list(ATTENTION)),
              help="Attention kernels (flash_attention_2 needs the flash-attn package and a GPU).  "
                   "[default: transformers' choice, sdpa where supported]")
@click.option("--disable-dropout/--keep-dropout", default=None,
              help="Dropout off in the model trained, or kept.  [default: as trl: off, but kept in sft and grpo]")
@click.option("--gradient-checkpointing", is_flag=True, default=None,
              help="Recompute each layer's activations in backward instead of keeping them (less memory, ~30% more "
                   "compute).")
@click.option("--optim", type=click.Choice(list(OPTIMIZERS)),
              help="PyTorch's AdamW, fused (no parameter-sized temporaries) or foreach; or bitsandbytes' 8-bit AdamW "
                   "(a quarter of its state; paged on CUDA).  [default: adamw_torch_fused]")
@click.option("--precompute-ref", is_flag=True, default=None,
              help="Compute reference log-probs once (cached on disk); hold no reference model while training.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]),
              help="bf16 autocast or fp32 (auto: bf16 where it is faster: GPUs with bf16, CPUs whose avx512_bf16 or AMX beat fp32 in a 0.1 s timing; fp32 elsewhere).  [default: auto]")
@click.option("--padding-free", is_flag=True, default=None,
              help="Pack each batch into one row without pad tokens (varlen attention); attention never crosses examples.")
@click.option("--logits-chunk-size", type=int, metavar="N",
              help="Turn N positions at a time into log-probs (memory: never all tokens x vocabulary); 0: full logits.  "
                   "[default: by vocabulary, ~128 MiB of logits]")
@click.option("--group-by-length", is_flag=True, default=None,
              help="Batch rows of similar length together: less padding on mixed-length data.")
@click.option("--save-steps", type=int, help="Write a checkpoint every N steps (atomically).  [default: 0, none]")
@click.option("--save-total-limit", type=int, help="Keep at most this many checkpoints.")
@click.option("--resume", metavar="auto|PATH", help="Resume from the latest checkpoint in --output-dir, or from PATH.")
@click.option("--judge", "judge_weights", multiple=True, metavar="NAME[=WEIGHT]",
              help="Judge that scores samples in online stages (ppo, grpo, sample-pairs); repeat to sum several.")
@click.option("--judge-arg", "judge_settings", multiple=True, metavar="JUDGE.KEY=VALUE",
              help="A judge's setting, e.g. --judge-arg openai.base_url=http://127.0.0.1:8000/v1 (as judge_args in "
                   "a recipe).")
@click.option("--judge-on-error", type=click.Choice(["fail", "skip", "zero"]),
              help="What a judgement the judge could not make does (a judge server that kept failing): stop the "
                   "run, leave the sample out, or score it 0.  [default: fail]")
@click.option("--sampler", metavar="NAME",
              help="How online stages draw completions: hf (batched generate), hf-paged (continuous batching, "
                   "paged KV cache), openai (a served model; sample-pairs only); `molting plugins` lists them.  "
                   "[default: hf]")
@click.option("--sampler-arg", "sampler_settings", multiple=True, metavar="KEY=VALUE",
              help="A setting of the sampler, e.g. --sampler-arg base_url=http://127.0.0.1:8000/v1 (as sampler_args "
                   "in a recipe).")
@click.option("--env", metavar="NAME",
              help="Roll out multi-turn episodes of this environment in the online stages (grpo, ppo, sample-pairs): "
                   "tool calls run, environment tokens masked out of the loss; `molting plugins` lists them "
                   "(calculator: the demo's).")
@click.option("--env-arg", "env_settings", multiple=True, metavar="KEY=VALUE",
              help="A setting of the environment, e.g. --env-arg tool_timeout=5 (as env_args in a recipe).")
@click.option("--max-turns", type=int, metavar="N", help="The most model turns of an episode.  [default: the "
                                                          "environment's]")
@click.option("--max-episode-tokens", type=int, metavar="N",
              help="The most tokens of an episode after its prompt, the model's and the environment's.  [default: "
                   "max_new_tokens x max_turns]")
@click.option("--tool-parser", metavar="NAME",
              help="How the model writes tool calls: hermes (Qwen, Hermes), llama3-json, mistral, ...  [default: auto, "
                   "from the chat template]")
@click.option("--advantage", metavar="NAME",
              help="Advantage estimator of an online stage (grpo: grpo, rloo, reinforce++, remax; ppo: gae); "
                   "`molting plugins` lists them.  [default: the stage's]")
@click.option("--overwrite", is_flag=True, default=None,
              help="Replace another run left in --output-dir (its record, checkpoints and model); refused otherwise.")
@click.option("--force", is_flag=True, default=None,
              help="In a pipeline, rerun steps already complete in the output dir (they are skipped otherwise).")
@click.option("--loss", "loss_weights", multiple=True, metavar="NAME=WEIGHT",
              help="Train on a weighted sum of losses of one stage; repeat, e.g. --loss dpo=0.8 --loss sft=1.0.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Any other config key or loss hyperparameter, e.g. --set label_smoothing=0.1.")
@click.option("--dry-run", is_flag=True,
              help="Print each step's expected peak memory per process (weights, gradients, optimizer, reference, "
                   "activations, logits) from the model's config.json and the data, without loading weights or "
                   "training (as `molting estimate`).")
@click.option("--memory-budget", metavar="SIZE", callback=lambda ctx, param, value: _size(value),
              help="Memory per process (e.g. 24GB): with --dry-run, say whether each step fits and which settings "
                   "would make it; for a run, refuse one that would not fit before loading anything.")
@click.option("--estimate-device", type=click.Choice(["cpu", "cuda"]), hidden=True)
def run(plugins: tuple[str, ...], config_path: str | None, loss_weights: tuple[str, ...], judge_weights: tuple[str, ...],
        eval_judge_weights: tuple[str, ...], judge_settings: tuple[str, ...], sampler_settings: tuple[str, ...],
        env_settings: tuple[str, ...], settings: tuple[str, ...], dry_run: bool, memory_budget: int | None, estimate_device: str | None,
        **flags: Any) -> None:
    """Train a model with one plugin, or several in a row."""
    from molting.config import read_recipe
    from molting.resolve import resolve_config
    from molting.pipeline import run as run_steps

    host = _host()
    recipe = read_recipe(config_path) if config_path else {}
    judges = _parse_judges(judge_weights, "--judge")
    flags = {**flags, "losses": _parse_set(loss_weights, "--loss"), "judges": judges,
             "eval_judges": _parse_judges(eval_judge_weights, "--eval-judge"), **_parse_set(settings)}
    if judge_settings:
        flags["judge_args"] = _merged(recipe.get("judge_args"), _parse_judge_args(judge_settings))
    if sampler_settings:
        flags["sampler_args"] = {**(recipe.get("sampler_args") or {}), **_parse_set(sampler_settings, "--sampler-arg")}
    if env_settings:
        flags["env_args"] = {**(recipe.get("env_args") or {}), **_parse_set(env_settings, "--env-arg")}
    config, steps = resolve_config(host, list(plugins), recipe, flags, recipe_source=config_path or "the recipe")
    if dry_run or memory_budget is not None:
        _check_memory(config, steps, host, memory_budget, dry_run, estimate_device)
        if dry_run:
            return
    if not _has_gpu():
        from molting.cpu import keep_freed_memory

        keep_freed_memory()
    results = run_steps(config, steps, host)
    final = results[-1]
    shown = {k: final[k] for k in HEADLINE_METRICS if isinstance(final.get(k), (int, float))}
    click.echo(f"molting: done. Output in {config.output_dir}. " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))


def _size(value: str | None) -> int | None:
    from molting.estimate import parse_size

    try:
        return None if value is None else parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--memory-budget") from None


def _check_memory(config: Any, steps: list[Any], host: PluginHost, budget: int | None, dry_run: bool,
                  device: str | None) -> None:
    from molting.estimate import dry_run as estimate_steps

    report, fits = estimate_steps(config, steps, host, budget, device)
    if dry_run:
        click.echo("molting: dry run: expected peak memory per process (no weights loaded, nothing trained)\n")
        click.echo(report)
    elif not fits:
        raise click.ClickException("the run would not fit --memory-budget (estimated before loading anything; "
                                   "--dry-run prints this):\n" + report)


estimate_command = click.Command(
    "estimate",
    params=[p for p in run.params if p.name not in ("dry_run", "estimate_device")] + [
        click.Option(["--device", "estimate_device"], type=click.Choice(["cpu", "cuda"]),
                     help="Estimate for a CPU process or a CUDA GPU.  [default: this machine's]")],
    callback=lambda **kwargs: click.get_current_context().invoke(run, dry_run=True, **kwargs),
    help="Print the expected peak memory of `molting run` with the same options (weights, gradients, optimizer, "
         "reference, activations, logits) without loading weights, and with --memory-budget the settings that "
         "would fit it.",
    epilog="""\b
Examples:
  molting estimate --plugin dpo --model ./qwen2.5-0.5b --data pairs.jsonl --max-length 1024
  molting estimate --plugin sft --model ./llama --memory-budget 24GB --device cuda   # what fits a 24 GB GPU
""")
cli.add_command(estimate_command)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------- plugins


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def plugins_command(as_json: bool) -> None:
    """List installed plugins: distribution, status, hooks and the components they provide."""
    host = _host()
    entries = []
    for info in sorted(host.plugins.values(), key=lambda p: p.name):
        components = []
        for kind_name in info.components:
            kind, name = kind_name.split(":", 1)
            registered = host.components[kind].get(name)
            description = registered.component.description if registered else ""
            components.append({"kind": kind, "name": name, "description": description})
        entries.append({**info.to_dict(), "components": components})
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    for entry in entries:
        source = f"{entry['distribution']} {entry['version']}" if entry["distribution"] else entry["module"]
        status = entry["status"] if entry["status"] == "ok" else f"{entry['status']}: {entry['error']}"
        click.echo(f"{entry['name']}  ({source})  {status}")
        for comp in entry["components"]:
            click.echo(f"    {comp['kind']:<11} {comp['name']:<20} {comp['description']}")
        if entry["hooks"]:
            click.echo(f"    hooks: {', '.join(entry['hooks'])}")


# --------------------------------------------------------------------------- eval


EVAL_EPILOG = """\b
Examples:
  molting eval --model ./dpo-out                 # the demo task: against the model the run started from
  molting eval --model ./dpo-out --baseline ./sft --data heldout.jsonl --judge llm-pairwise \\
      --judge-arg llm-pairwise.model=Qwen/Qwen2.5-7B-Instruct
  molting eval --model ./grpo-out --data test.jsonl --judge rule --judge-arg rule.column=answer --json

\b
Figures: each judge's mean score with a 95% bootstrap interval; with a
baseline, the win rate (a pairwise judge, asked in both orders, else the
pointwise scores; ties count one half) and its length-controlled version,
mean lengths, and KL(model || baseline) on the model's own answers; with
chosen/rejected columns, the preference accuracy of log pi/pi_ref. Then a few
prompts with both answers.
"""


@cli.command("eval", epilog=EVAL_EPILOG)
@click.option("--model", "model_dir", required=True, help="Model to evaluate: a directory (a run's output works) or "
                                                         "a hub id.")
@click.option("--baseline", help="Model to compare with (win rate, KL).  [default: --ref-model]")
@click.option("--ref-model", help="pi_ref of the preference accuracy.  [default: the baseline, else the model the "
                                  "run started from]")
@click.option("--data", help="Held-out prompts: a file, saved dataset, registered dataset or hub dataset id, with a "
                             "prompt column (and chosen/rejected for preference accuracy).  [default: the demo task's "
                             "held-out split]")
@click.option("--data-split", default="train", show_default=True, help="Split of a hub or saved dataset.")
@click.option("--judge", "judge_weights", multiple=True, metavar="NAME[=WEIGHT]",
              help="Judge of the answers; repeat for several (one may be pairwise).  [default: demo-rule on the demo]")
@click.option("--judge-arg", "judge_settings", multiple=True, metavar="JUDGE.KEY=VALUE",
              help="A judge's setting, e.g. --judge-arg rule.column=answer (as judge_args in a recipe).")
@click.option("--n", "limit", type=click.IntRange(1), default=256, show_default=True,
              help="Evaluate on the first N prompts.")
@click.option("--max-new-tokens", type=click.IntRange(1), help="Longest answer.  [default: 20 on the demo, else 256]")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (both models use it).")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Sampling temperature (0: greedy).")
@click.option("--show", type=click.IntRange(0), default=3, show_default=True, help="Prompts printed with both answers.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model directories to run their own code.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON (every figure and the samples).")
def eval_command(model_dir, baseline, ref_model, data, data_split, judge_weights, judge_settings, limit, max_new_tokens,
                 seed, temperature, show, trust_remote_code, as_json) -> None:
    """Evaluate a model on held-out prompts: judges, win rate, length, KL.

    Without --data, the demo task's held-out split, with today's task figures
    (correctness, persona rate) as well.
    """
    from molting import demo
    from molting.compare import compare, format_comparison
    from molting.models import resolve_model_path

    path = resolve_model_path(model_dir)
    record = path / "molting_run.json"
    ref_model = ref_model or baseline or (json.loads(record.read_text()).get("model") if record.exists() else None)
    baseline = baseline or ref_model
    loaded = _eval_models({"model": model_dir, "baseline": baseline, "reference": ref_model}, trust_remote_code)
    rows, source = _eval_rows(data, data_split, limit)
    scorer = _eval_scorer(_parse_judges(judge_weights, "--judge") or ({"demo-rule": 1.0} if data is None else {}),
                          judge_settings)
    pairs = demo.preference_rows("test", limit) if data is None else None
    report = compare(loaded["model"], loaded.get("baseline"), rows, scorer, reference=loaded.get("reference"),
                     pair_rows=pairs,
                     max_new_tokens=max_new_tokens or (20 if data is None else 256), temperature=temperature,
                     seed=seed, shown=show, source=source)
    if data is None:
        report["demo"] = _demo_figures(loaded, limit, seed, temperature)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    click.echo(format_comparison(report))
    if data is None:
        from molting.evaluation import format_table

        click.echo("\nThe demo task (correct: greedy answers; persona, judge: sampled answers):")
        click.echo(format_table(report["demo"]))


def _eval_models(names: dict[str, str | None], trust_remote_code: bool) -> dict[str, Any]:
    """Each named model loaded once (the baseline and the reference are often the same)."""
    from molting.compare import Contender
    from molting.evaluation import load_for_eval
    from molting.models import resolve_model_path

    cache: dict[str, Any] = {}
    loaded = {}
    for role, name in names.items():
        if name:
            if name not in cache:
                click.echo(f"molting: loading {name}", err=True)
                cache[name] = load_for_eval(resolve_model_path(name), trust_remote_code)
            loaded[role] = Contender(str(name), *cache[name])
    return loaded


def _eval_rows(data: str | None, split: str, limit: int) -> tuple[list[dict[str, Any]], str]:
    """The first ``limit`` rows with a prompt, and where they came from (the demo's held-out prompts without ``data``)."""
    from molting import demo
    from molting.config import RunConfig
    from molting.data import check_prompts, iter_rows, is_dataset
    from molting.pipeline import load_rows

    if data is None:
        return demo.prompt_rows("test", limit), "the demo task's held-out split"
    rows, source = load_rows(_host(), None, data, config=RunConfig(plugins=(), data_split=split))
    if is_dataset(rows):
        rows = rows.select(range(min(limit, len(rows))))
    rows = list(iter_rows(rows))[:limit]
    check_prompts(rows, str(source), "eval")
    return rows, str(source)


def _eval_scorer(judges: dict[str, float], settings: tuple[str, ...]) -> Any:
    from molting.config import RunConfig
    from molting.judging import Scorer, resolve_judges

    if not judges:
        return None
    config = RunConfig(plugins=(), judges=judges, judge_args=_parse_judge_args(settings))
    specs = resolve_judges(_host(), config, {}, stage="molting eval")
    if sum(spec.judge.kind == "pairwise" for spec in specs) > 1:
        raise click.BadParameter("at most one pairwise judge decides the win rate", param_hint="--judge")
    return Scorer(specs, pairwise=True)


def _parse_judge_args(settings: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``--judge-arg JUDGE.KEY=VALUE`` options as ``judge_args``."""
    judge_args: dict[str, dict[str, Any]] = {}
    for key, value in _parse_set(settings, "--judge-arg").items():
        judge, dot, setting = key.partition(".")
        if not dot or not setting:
            raise click.BadParameter(f"expected JUDGE.KEY=VALUE, got {key!r}", param_hint="--judge-arg")
        judge_args.setdefault(judge, {})[setting] = value
    return judge_args


def _merged(recipe_args: Any, flags: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A recipe's ``judge_args`` with the command line's settings over them, judge by judge."""
    merged = {name: dict(args or {}) for name, args in (recipe_args or {}).items()}
    for name, args in flags.items():
        merged.setdefault(name, {}).update(args)
    return merged


def _demo_figures(loaded: dict[str, Any], limit: int, seed: int, temperature: float) -> dict[str, dict[str, float]]:
    """Today's demo-task table: the model (and the baseline), with preference accuracy against the reference."""
    from molting.evaluation import evaluate

    model, baseline, reference = loaded["model"], loaded.get("baseline"), loaded.get("reference")
    columns, baseline_texts = {}, None
    if baseline is not None:
        columns["baseline"], baseline_texts = evaluate(baseline.model, baseline.tokenizer, n=limit, seed=seed,
                                                          temperature=temperature)
    columns["model"], _ = evaluate(model.model, model.tokenizer, ref_model=reference.model if reference else None,
                                      baseline_completions=baseline_texts, n=limit, seed=seed, temperature=temperature)
    return columns


# --------------------------------------------------------------------------- plot


@cli.command("plot")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Where to write the PNGs. Default: RUN_DIR/plots.")
def plot_command(run_dir: str, out: str | None) -> None:
    """Draw a run's training curves, its held-out evaluation curves and its before/after evaluation as PNG files."""
    from pathlib import Path

    from molting.plots import plot_run

    for path in plot_run(Path(run_dir), Path(out) if out else None):
        click.echo(str(path))


@cli.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="Where to write the HTML.  [default: RUN_DIR/report.html]")
def report_command(run_dir: str, out: str | None) -> None:
    """Write one self-contained HTML page about a run (or each step of a pipeline).

    Training and held-out evaluation curves, the before/after table, the
    held-out answers before and after side by side, the reward-hacking
    watch's alarms and the settings; images are embedded, so the file opens
    anywhere, offline.
    """
    from pathlib import Path

    from molting.report import write_report

    click.echo(str(write_report(Path(run_dir), Path(out) if out else None)))


# --------------------------------------------------------------------------- serve

SERVE_EPILOG = """\b
Examples:
  molting serve ./dpo-out                        # http://127.0.0.1:8000/v1, model name ./dpo-out
  molting serve Qwen/Qwen2.5-0.5B-Instruct --port 8001 --model-name judge
  OPENAI_API_KEY=sk-local molting serve ./sft --api-key-env OPENAI_API_KEY

\b
Then, with any OpenAI client:
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "./dpo-out", "messages": [{"role": "user", "content": "2+3="}], "max_tokens": 8}'

\b
Concurrent requests share one generate call (up to --max-batch-size
completions). Sampling follows each request's temperature, top_p, top_k,
n, seed, max_tokens and stop; chat messages go through the model's chat
template. A served model can judge another run: --judge openai with
judge_args: {openai: {base_url: http://127.0.0.1:8000/v1, model: NAME}}.
"""


@cli.command("serve", epilog=SERVE_EPILOG)
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port; 0 takes a free one.")
@click.option("--model-name", help="The name clients ask for (`model` in a request).  [default: MODEL as given]")
@click.option("--max-batch-size", type=click.IntRange(1), default=16, show_default=True,
              help="Completions per generate call.")
@click.option("--batch-wait-ms", type=click.FloatRange(0), default=5.0, show_default=True,
              help="How long an idle model waits for more requests to batch with the first.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=256, show_default=True,
              help="max_tokens of a request that gives none.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Weights' dtype (auto: bfloat16 on a GPU that has it, else float32).")
@click.option("--api-key-env", metavar="VAR", help="Require `Authorization: Bearer $VAR` on every request.")
@click.option("--trust-remote-code", is_flag=True, help="Run the model repository's own Python code.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="warning",
              show_default=True, help="uvicorn's log level (info: one line per request).")
def serve_command(model: str, host: str, port: int, model_name: str | None, max_batch_size: int,
                  batch_wait_ms: float, max_new_tokens: int, dtype: str, api_key_env: str | None,
                  trust_remote_code: bool, log_level: str) -> None:
    """Serve MODEL (a directory, a run's output, or a hub id) over an OpenAI-compatible HTTP API.

    /v1/chat/completions, /v1/completions and /v1/models, until Ctrl-C or
    SIGTERM (requests in flight finish first).
    """
    from molting.serve import Settings, serve

    settings = Settings(max_batch_size=max_batch_size, batch_wait=batch_wait_ms / 1000, max_new_tokens=max_new_tokens)
    serve(model, host, port, model_name, settings, dtype, trust_remote_code, api_key_env, log_level)


# --------------------------------------------------------------------------- check

_MARKS = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP", "xfailed": "XFAIL", "xpassed": "XPASS"}


@cli.command("check")
@click.argument("name")
@click.option("--skip-slow", is_flag=True, help="Leave out the slow checks (a loss's eight training steps on the tiny model).")
@click.option("--expect-fail", "expect", multiple=True, metavar="CHECK=REASON",
              help="Declare a check as an expected failure, e.g. --expect-fail batch-independence='sorts the batch'.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def check_command(name: str, skip_slow: bool, expect: tuple[str, ...], as_json: bool) -> None:
    """Run the conformance suite on an installed plugin or component.

    NAME is a plugin (every component it registers is checked) or a
    component name. Exits with status 1 if any check fails.
    """
    import attrs

    from molting.components import KINDS
    from molting.testing import check_plugin, checks_for

    expected = {}
    for item in expect:
        check_name, _, reason = item.partition("=")
        expected[check_name] = reason or "declared with --expect-fail"
    results = check_plugin(name, expected_failures=expected, skip_slow=skip_slow, host=_host())
    if as_json:
        click.echo(json.dumps([attrs.asdict(r) for r in results], indent=2))
    else:
        docs = {c.name: c.doc for c in checks_for("any") + [c for k in KINDS for c in checks_for(k)]}
        current = None
        for r in results:
            if r.component != current:
                current = r.component
                click.echo(current)
            line = f"  {_MARKS[r.status]:<5} {r.check:<28} {docs.get(r.check, '')}"
            click.echo(click.style(line, fg="red") if not r.ok else line)
            if r.message and r.status != "passed":
                click.echo(f"        {r.message}")
        counts = {s: sum(r.status == s for r in results) for s in _MARKS}
        click.echo(f"{len(results)} checks: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    if not all(r.ok for r in results):
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: load plugins, let them add commands, run the CLI."""
    host = load_plugins()
    for impl in host.pm.hook.molting_register_commands.get_hookimpls():
        try:
            impl.function(cli=cli)
        except Exception as exc:  # a broken plugin never takes the CLI down
            print(f"molting: warning: plugin {impl.plugin_name!r} failed to add commands: {exc}", file=sys.stderr)
    cli.main(args=argv, obj=host, prog_name="molting")
