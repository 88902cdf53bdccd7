"""molting: align language models with human preferences, one plugin at a time.

The public surface a plugin author needs::

    import molting

    @molting.hookimpl
    def molting_register_losses(register):
        register(molting.Loss(name="my-loss", compute=my_loss, description="..."))

Importing molting is cheap: torch and transformers load only when a command
or a component needs them.
"""

import logging as _logging

# bitsandbytes logs a warning at import when it cannot fetch an optional CPU kernel from the hub (it falls
# back to its own); molting never fetches from the hub, so the warning is noise on every run.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

from molting.components import (  # noqa: E402
    Dataset,
    GroupInputs,
    Judge,
    Loss,
    LossOutput,
    NoParams,
    PreferenceInputs,
    RewardInputs,
    Stage,
    UnpairedInputs,
)
from molting.errors import ConfigError, DataError, JudgeError, ModelError, MoltingError, PluginError  # noqa: E402
from molting.hookspecs import hookimpl, hookspec  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "Dataset",
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
    "Stage",
    "UnpairedInputs",
    "hookimpl",
    "hookspec",
    "__version__",
]
