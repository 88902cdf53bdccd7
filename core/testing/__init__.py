"""The plugin conformance suite.

Two ways in, as scikit-learn's ``check_estimator`` and zarr's ``zarr.testing``:

* the function API::

      from molting.testing import check_plugin
      results = check_plugin("simpo", expected_failures={"batch-independence": "sorts the batch"})
      assert all(r.ok for r in results), [r for r in results if not r.ok]

* base test classes, one small test file::

      from molting.testing import LossTests

      class TestSimPO(LossTests):
          name = "simpo"            # found through the entry points, as users find it

  (``StageTests``, ``JudgeTests``, ``DatasetTests``, ``AdvantageTests``,
  ``SamplerTests``, ``EnvironmentTests``, ``ToolParserTests``; ``PluginTests``
  checks every component of a plugin or a distribution.)

and on the command line: ``molting check NAME``.

The numeric loss checks build example inputs of the class the loss's stage
hands it (``Stage.inputs``) with the generator registered for that class
(:mod:`molting.testing.inputs`; ``inputs_generator`` registers one for a
third-party inputs class, ``example_inputs_for(cls)`` builds a batch).
"""

from molting.testing.checks import (
    CHECKS,
    Check,
    CheckFailed,
    CheckResult,
    CheckSkipped,
    Subject,
    check,
    check_plugin,
    checks_for,
)
from molting.testing import environment_checks  # noqa: F401,E402 (registers the environment and parser checks)
from molting.testing.inputs import (
    GENERATORS,
    Expectation,
    InputsGenerator,
    ZeroMargin,
    example_inputs,
    example_inputs_for,
    generator_for,
    inputs_generator,
    with_logps,
)

_CLASSES = ("AdvantageTests", "ComponentTests", "DatasetTests", "EnvironmentTests", "JudgeTests", "LossTests",
            "PluginTests", "SamplerTests", "StageTests", "ToolParserTests")


def __getattr__(name: str):
    # The base classes import pytest; the function API does not need it.
    if name in _CLASSES:
        from molting.testing import classes

        return getattr(classes, name)
    raise AttributeError(f"module 'molting.testing' has no attribute {name!r}")


__all__ = [
    "CHECKS",
    "Check",
    "CheckFailed",
    "CheckResult",
    "CheckSkipped",
    "Expectation",
    "GENERATORS",
    "InputsGenerator",
    "Subject",
    "ZeroMargin",
    "check",
    "check_plugin",
    "checks_for",
    "example_inputs",
    "example_inputs_for",
    "generator_for",
    "inputs_generator",
    "with_logps",
    *_CLASSES,
]
