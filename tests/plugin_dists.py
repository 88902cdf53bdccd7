"""Real installed distributions for tests: a dist-info folder with entry points, on sys.path.

``importlib.metadata`` finds them exactly as it finds a pip-installed package,
so discovery runs its real code path.
"""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path


def make_distribution(site: Path, name: str, version: str, plugins: dict[str, str]) -> Path:
    """Write a module per plugin and a dist-info declaring them in group ``molting``."""
    site.mkdir(parents=True, exist_ok=True)
    lines = ["[molting]"]
    for ep_name, source in plugins.items():
        module = f"{ep_name.replace('-', '_')}_{uuid.uuid4().hex[:8]}"  # unique: sys.modules caches by name
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        lines.append(f"{ep_name} = {module}")
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return site


HINGE_LOSS = """
    import attrs
    import molting

    @attrs.frozen
    class Params:
        beta: float = 0.1

    def hinge(inputs, params):
        import torch
        logits = (inputs.chosen_logps - inputs.ref_chosen_logps) - (inputs.rejected_logps - inputs.ref_rejected_logps)
        return molting.LossOutput(losses=torch.relu(1 - params.beta * logits))

    @molting.hookimpl
    def molting_register_losses(register):
        register(molting.Loss(name="{name}", compute=hinge, params=Params, description="Hinge loss on the margin."))
"""
