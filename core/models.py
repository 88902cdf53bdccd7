"""Loading models and tokenizers safely.

Weights load as safetensors only (no pickle from user files) and remote code
runs only when the user passes ``--trust-remote-code``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from molting.errors import ModelError


def resolve_model_path(model: str | None) -> Path:
    """``None`` is the built-in demo model (built on first use); otherwise a local directory."""
    if model is None:
        from molting.demo import demo_model_dir

        return demo_model_dir()
    path = Path(model)
    if not path.is_dir():
        raise ModelError(
            f"model {model!r} is not a local directory; molting loads models from disk only "
            "(a directory with config.json, model.safetensors and the tokenizer files)"
        )
    return path


def load_causal_lm(path: str | Path, trust_remote_code: bool = False, dtype: Any = None):
    """A causal LM and its tokenizer from ``path``, with clear errors for anything else."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(path)
    if not (path / "config.json").exists():
        raise ModelError(f"{path} has no config.json: not a transformers model directory")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(f"cannot read the model config in {path}: {_first_line(exc)}") from exc
    architectures = list(getattr(config, "architectures", None) or [])
    is_causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        not architectures or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    )
    if not is_causal and not (trust_remote_code and getattr(config, "auto_map", None)):
        raise ModelError(
            f"{path} is not a causal language model (model_type {config.model_type!r}, "
            f"architectures {architectures or 'unknown'}); this stage needs one loadable with "
            "AutoModelForCausalLM"
        )
    if not any(path.glob("*.safetensors")):
        raise ModelError(
            f"{path} has no .safetensors weights; molting loads weights as safetensors only "
            "(convert with model.save_pretrained(dir, safe_serialization=True))"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            dtype=dtype or torch.float32,
        )
    except Exception as exc:
        raise ModelError(f"cannot load {path} as a causal LM: {_first_line(exc)}") from exc
    tokenizer = load_tokenizer(path, trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(f"cannot load a tokenizer from {path}: {_first_line(exc)}") from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"the tokenizer in {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
