"""molting: align language models with human preferences, one plugin at a time.

The public surface a plugin author needs::

    import molting

    @molting.hookimpl
    def molting_register_losses(register):
        register(molting.Loss(name="my-loss", compute=my_loss, description="..."))

A stage is written with the stage toolkit: the modules in :data:`TOOLKIT`
(``molting.training``, ``molting.pairs``, ``molting.sampling``, ...), each
documented in ``docs/stages.md``, reachable as attributes of ``molting``
(``molting.training.train_and_save``) and loaded on first use. Built-in
stages use nothing else, so an outside package can ship a stage the way it
ships a loss.

Importing molting is cheap: torch and transformers load only when a command
or a component needs them.
"""

import logging as _logging

# bitsandbytes logs a warning at import when it cannot fetch an optional CPU kernel from the hub (it falls
# back to its own); molting never fetches from the hub, so the warning is noise on every run.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

from molting.components import (  # noqa: E402
    Advantage,
    AdvantageInputs,
    AdvantageOutput,
    Dataset,
    Environment,
    GroupInputs,
    Judge,
    Loss,
    LossOutput,
    NoParams,
    PreferenceInputs,
    RewardInputs,
    Sampler,
    Stage,
    ToolParser,
    UnpairedInputs,
)
from molting.config import RunConfig  # noqa: E402
from molting.context import DataSource, StageContext, Step  # noqa: E402
from molting.errors import ConfigError, DataError, JudgeError, ModelError, MoltingError, PluginError  # noqa: E402
from molting.hookspecs import hookimpl, hookspec  # noqa: E402

TOOLKIT = (
    "components",  # the component classes and what losses exchange (also exported here)
    "errors",  # the errors a user can act on (also exported here)
    "config",  # RunConfig: a run's settings (also exported here)
    "context",  # StageContext, Step, DataSource: what a stage receives
    "data",  # reading rows, checking them against a schema, BOS handling
    "files",  # atomic writes
    "tokenization",  # prompt/completion token ids, truncation of overlong rows
    "pairs",  # preference pairs: formatting, collators, inputs, trl's metrics
    "logps",  # completion log-probs of every batch shape
    "packing",  # padding-free batches and varlen attention
    "hub",  # Hugging Face hub ids: snapshots in huggingface_hub's cache, the id and commit of one
    "models",  # loading causal LMs (local or by hub id) and tokenizers safely, LoRA, merging
    "training",  # MoltingTrainer, the policy and its reference, callbacks, train_and_save
    "refcache",  # precomputed reference log-probs, cached on disk
    "sampling",  # sampling completions from a policy
    "judging",  # judges: resolution, weights, caching, errors
    "openai_api",  # a client of OpenAI-compatible servers: concurrency, timeouts, retries, the key from the env
    "serve",  # molting serve: a model behind an OpenAI-compatible API, in a process or a thread
    "conversations",  # conversation logs (ShareGPT, OpenAI messages, ChatGPT exports) as one person's SFT rows
    "tools",  # tool schemas from Python functions, parsed tool calls, running them with a timeout
    "environments",  # multi-turn episodes: the contract, rollouts with environment tokens masked, their metrics
    "ranking",  # sampled completions into chosen/rejected pairs (pointwise best vs worst, pairwise wins)
    "losses",  # helpers of the preference losses, weighted sums
    "group_losses",  # what the grpo stage's losses share: importance weights, KL, entropy mask, normalisers
    "advantages",  # what advantage estimators share: masked whitening, group statistics, discounted sums
    "evaluation",  # the demo task's held-out evaluation, generation with a fixed seed
    "compare",  # a model against a baseline on any prompts: intervals, win rates, length control, KL
    "watch",  # evaluation during training: the best model kept, the reward-hacking watch
    "demo",  # the demo task's data, grading and model
)
"""The stage toolkit: the core modules a plugin may import. ``tests/test_imports.py`` holds plugins to it."""

__version__ = "0.1.0"


def __getattr__(name: str):  # PEP 562: molting.training etc. load on first use, so `import molting` stays cheap
    if name in TOOLKIT:
        import importlib

        return importlib.import_module(f"molting.{name}")
    raise AttributeError(f"module 'molting' has no attribute {name!r}")


__all__ = [
    "Advantage",
    "AdvantageInputs",
    "AdvantageOutput",
    "ConfigError",
    "DataError",
    "DataSource",
    "Dataset",
    "Environment",
    "GroupInputs",
    "Judge",
    "JudgeError",
    "Loss",
    "LossOutput",
    "ModelError",
    "MoltingError",
    "NoParams",
    "PluginError",
    "PreferenceInputs",
    "RewardInputs",
    "RunConfig",
    "Sampler",
    "Stage",
    "StageContext",
    "Step",
    "TOOLKIT",
    "ToolParser",
    "UnpairedInputs",
    "hookimpl",
    "hookspec",
    "__version__",
]
