"""Errors a user can act on.

A :class:`MoltingError` carries a message that names the file, row, field or
plugin at fault and what was expected. The CLI prints it without a traceback;
any other exception is a bug in molting or in a plugin.
"""

from __future__ import annotations


class MoltingError(Exception):
    """An error caused by input, configuration or a plugin, with an actionable message."""


class DataError(MoltingError):
    """A data file or row does not match what the stage needs."""


class ConfigError(MoltingError):
    """A configuration key or value is not valid."""


class PluginError(MoltingError):
    """A plugin is missing, broken, or conflicts with another."""


class ModelError(MoltingError):
    """A model directory cannot be loaded as the model a stage needs."""


class JudgeError(MoltingError):
    """A judge raised, or returned the wrong number of scores or a non-finite one, naming the judge and the prompt."""


class DiskFullError(MoltingError):
    """The disk filled up (``ENOSPC``) while a checkpoint or the model was written; what was written before is whole."""
