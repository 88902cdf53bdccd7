"""Precomputed reference log-probs, cached on disk.

One pass of the reference model over the tokenized data before training;
the result is stored under ``$MOLTING_CACHE`` (default
``~/.cache/molting``)/``reference-logps/<key>.safetensors``, where the key
hashes the reference model's files and the tokenized data, so a second run
on the same model and data reuses it and a change to either misses. The
reference model is then not held during training.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from molting.data import Rows

if TYPE_CHECKING:  # pragma: no cover - typing only
    from molting.context import StageContext


def cache_dir() -> Path:
    return Path(os.environ.get("MOLTING_CACHE", Path.home() / ".cache" / "molting")) / "reference-logps"


def model_fingerprint(model_dir: Path) -> str:
    """SHA-256 over the model directory's config and weight files (names and contents)."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).iterdir()):
        if path.suffix in (".json", ".safetensors") and path.is_file():
            digest.update(path.name.encode())
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def data_fingerprint(examples: Rows, keys: tuple[str, ...]) -> str:
    """SHA-256 over the ``keys`` of every example, in order."""
    from molting.data import iter_rows

    digest = hashlib.sha256()
    for example in iter_rows(examples, keys):
        digest.update(json.dumps([example[k] for k in keys]).encode())
    return digest.hexdigest()


def precomputed_reference(ref_model: Any, adapter_disabled: bool, examples: Rows, tokenizer: Any,
                          context: StageContext, collator: Any, batch_size: int = 32) -> Rows:
    """``examples`` with ``ref_chosen_logps`` / ``ref_rejected_logps`` added, from the cache or one pass."""
    from safetensors.torch import load_file, save_file

    from molting.data import is_dataset

    import torch as _torch

    how = f"4bit={context.config.load_in_4bit} dtype={next(ref_model.parameters()).dtype} torch={_torch.__version__}"
    key = hashlib.sha256(
        (model_fingerprint(context.model_path) + how
         + data_fingerprint(examples, ("prompt_ids", "chosen_ids", "rejected_ids"))).encode()
    ).hexdigest()[:32]
    path = cache_dir() / f"{key}.safetensors"
    if path.exists():
        cached = load_file(path)
        chosen, rejected = cached["chosen"], cached["rejected"]
        print(f"molting: reference log-probs: reusing {path}", file=sys.stderr)
    else:
        chosen, rejected = _compute(ref_model, adapter_disabled, examples, collator, batch_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        os.close(fd)
        save_file({"chosen": chosen, "rejected": rejected}, tmp)
        os.replace(tmp, path)
        print(f"molting: reference log-probs: computed for {len(examples)} pairs, cached in {path}", file=sys.stderr)
    if is_dataset(examples):
        return examples.add_column("ref_chosen_logps", chosen.tolist()).add_column("ref_rejected_logps",
                                                                                   rejected.tolist())
    return [
        {**ex, "ref_chosen_logps": float(c), "ref_rejected_logps": float(r)}
        for ex, c, r in zip(examples, chosen.tolist(), rejected.tolist())
    ]


def _compute(model: Any, adapter_disabled: bool, examples: Rows, collator: Any, batch_size: int):
    import contextlib

    from molting.pairs import pair_logps

    with model.disable_adapter() if adapter_disabled else contextlib.nullcontext():
        return pair_logps(model, examples, collator, batch_size)
