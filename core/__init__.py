"""molting: align language models with human preferences, one plugin at a time.

The public surface a plugin author needs::

    import molting

    @molting.hookimpl
    def molting_register_losses(register):
        register(molting.Loss(name="my-loss", compute=my_loss, description="..."))

Importing molting is cheap: torch and transformers load only when a command
or a component needs them.
"""

from molting.components import (
    Dataset,
    Judge,
    Loss,
    LossOutput,
    NoParams,
    PreferenceInputs,
    Stage,
)
from molting.errors import ConfigError, DataError, ModelError, MoltingError, PluginError
from molting.hookspecs import hookimpl, hookspec

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "Dataset",
    "Judge",
    "Loss",
    "LossOutput",
    "ModelError",
    "MoltingError",
    "NoParams",
    "PluginError",
    "PreferenceInputs",
    "Stage",
    "hookimpl",
    "hookspec",
    "__version__",
]
