"""Loading models and tokenizers safely.

Weights load as safetensors only (no pickle from user files) and remote code
runs only when the user passes ``--trust-remote-code``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from molting.config import TORCH_OPTIMIZERS
from molting.errors import ModelError
from molting.hub import hub_origin, is_hub_id, snapshot

#: What a hub model's snapshot needs: config, safetensors weights, tokenizer files and chat templates (never
#: pickled ``*.bin``/``*.pt`` weights); ``*.py`` only with ``--trust-remote-code``.
HUB_MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*")


def split_revision(model: str, revision: str | None = None) -> tuple[str, str | None]:
    """``("ORG/NAME", REV)`` from ``ORG/NAME@REV`` or ``ORG/NAME`` and ``--model-revision``; both at once must agree."""
    name, at, pinned = model.partition("@")
    if not at:
        return model, revision
    if revision is not None and revision != pinned:
        raise ModelError(f"model {model!r} pins revision {pinned!r} but --model-revision is {revision!r}: give one")
    return name, pinned


def resolve_model_path(model: str | None, revision: str | None = None, *, trust_remote_code: bool = False,
                       weights: bool = True, what: str = "model") -> Path:
    """The local directory of ``model``: the built-in demo model for ``None``, a local directory, a built-in model's
    name (``demo``, ``demo-tools``: :data:`molting.demo.BUILT_IN_MODELS`; a local directory of that name wins), or a
    Hugging Face hub id (``ORG/NAME``, ``ORG/NAME@REV`` or ``revision``) fetched into, or found in, huggingface_hub's
    cache.

    Hub snapshots hold safetensors weights and tokenizer files only (code
    files with ``trust_remote_code``; no weights with ``weights=False``,
    enough for ``molting estimate``). ``HF_HUB_OFFLINE=1`` resolves from the
    cache alone. Errors name the id and the fix; ``what`` names the setting
    (``"model"``, ``"judge 'reward-model': model"``).
    """
    from molting.demo import BUILT_IN_MODELS, demo_model_dir

    if model is None:
        return demo_model_dir()
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()  # recorded in molting_run.json and adapter configs: must work from anywhere
    if model in BUILT_IN_MODELS:
        return demo_model_dir(model)
    repo_id, revision = split_revision(model, revision)
    if path.exists() or not is_hub_id(repo_id):
        raise ModelError(f"{what} {model!r} is not a local directory (one with config.json, *.safetensors and the "
                         f"tokenizer files), nor a built-in model ({', '.join(BUILT_IN_MODELS)}), nor a Hugging Face "
                         "hub id (ORG/NAME)")
    patterns = [*HUB_MODEL_FILES, *(["*.py"] if trust_remote_code else [])]
    if not weights:
        patterns.remove("*.safetensors")
    return _hub_snapshot(repo_id, revision, tuple(patterns), what)


@functools.lru_cache(maxsize=None)
def _hub_snapshot(repo_id: str, revision: str | None, patterns: tuple[str, ...], what: str) -> Path:
    """A hub model's snapshot, asked of the hub once per process: judges resolve their model on every call."""
    return Path(snapshot(repo_id, revision, list(patterns), what, "model", ModelError))


def describe_model(path: str | Path) -> str:
    """How a model directory is named to users: its hub id and commit when it is a hub snapshot, else its path."""
    origin = hub_origin(path)
    return str(path) if origin is None else str(origin)


def load_causal_lm(path: str | Path, trust_remote_code: bool = False, dtype: Any = None, load_in_4bit: bool = False,
                   attn_implementation: str | None = None):
    """A causal LM and its tokenizer from ``path``, with clear errors for anything else.

    A directory holding a LoRA adapter (``adapter_config.json``, no
    ``config.json``) loads as its base model with the adapter applied.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(path)
    if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        return _load_adapter(path, trust_remote_code)
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
    quantization = _four_bit_config() if load_in_4bit else None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            dtype=dtype or torch.float32,
            quantization_config=quantization,
            **({"attn_implementation": attn_implementation} if attn_implementation else {}),
        )
    except Exception as exc:
        raise ModelError(f"cannot load {path} as a causal LM: {_first_line(exc)}") from exc
    tokenizer = load_tokenizer(path, trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def torch_dtype(name: str) -> Any:
    """``"bfloat16"`` → ``torch.bfloat16`` (``--dtype``)."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def config_dtype(path: str | Path) -> str:
    """The dtype ``path``'s config.json names (``dtype``, or ``torch_dtype`` in older files) for ``--dtype auto``:
    ``float32``, ``bfloat16`` or ``float16``, and ``float32`` when it names none of them."""
    import json

    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    named = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    return named if named in ("float32", "bfloat16", "float16") else "float32"


def check_optimizer(name: str) -> None:
    """A clear error, before any model loads, where ``--optim`` cannot run: bitsandbytes' 8-bit AdamW is tried
    on a test parameter on this device."""
    if name in TORCH_OPTIMIZERS:
        return
    import torch

    try:
        import bitsandbytes as bnb

        device = "cuda" if torch.cuda.is_available() else "cpu"
        weight = torch.nn.Parameter(torch.zeros(4096, device=device))  # 8-bit states start at 4096 elements
        weight.grad = torch.ones_like(weight)
        bnb.optim.AdamW8bit([weight], lr=1e-3).step()
    except Exception as exc:
        raise ModelError(
            f"--optim {name} needs bitsandbytes' 8-bit optimizers working on this device, and a test step failed: "
            f"{_first_line(exc)}. Use --optim adamw_torch_fused"
        ) from exc


def _four_bit_config():
    """NF4 quantisation (QLoRA); a clear error, before any training, where bitsandbytes cannot run."""
    import torch
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(8, 8, bias=False, quant_type="nf4", compute_dtype=torch.float32)
        layer = layer.to("cuda" if torch.cuda.is_available() else "cpu")
        layer(torch.zeros(1, 8, device=layer.weight.device))
    except Exception as exc:
        raise ModelError(
            f"--load-in-4bit needs bitsandbytes working on this device, and a 4-bit test layer failed: {_first_line(exc)}"
        ) from exc
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=False
    )


def disable_dropout(model: Any) -> Any:
    """``model`` with every ``torch.nn.Dropout`` at probability 0 (trl's ``disable_dropout_in_model``): its
    log-probs are then a function of the weights alone, as a preference loss against a reference assumes."""
    from trl.trainer.utils import disable_dropout_in_model

    disable_dropout_in_model(model)
    return model


def apply_lora(model: Any, r: int, alpha: float, dropout: float, target_modules: str, task_type: str = "CAUSAL_LM",
               modules_to_save: list[str] | None = None):
    """Wrap ``model`` with fresh LoRA adapters (peft); a 4-bit model is prepared for k-bit training first.

    ``task_type`` and ``modules_to_save`` are peft's (a reward model: ``SEQ_CLS``, its new head trained in full).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = "all-linear" if target_modules == "all-linear" else [m.strip() for m in target_modules.split(",") if m.strip()]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type=task_type,
                        modules_to_save=modules_to_save)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ModelError(f"cannot apply LoRA with target modules {target_modules!r}: {_first_line(exc)}") from exc


def _load_adapter(path: Path, trust_remote_code: bool):
    import json

    from peft import PeftModel

    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelError(f"the LoRA adapter in {path} names no base model (base_model_name_or_path)")
    base = resolve_model_path(base, trust_remote_code=trust_remote_code,
                              what=f"the LoRA adapter in {path}: base model")
    model, tokenizer = load_causal_lm(base, trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(model, path), tokenizer


def merge_adapter(adapter_dir: Path, output_dir: Path, trust_remote_code: bool = False) -> None:
    """Write the base model (reloaded in float32) with the adapter in ``adapter_dir`` merged in."""
    model, tokenizer = _load_adapter(adapter_dir, trust_remote_code)
    merged = model.merge_and_unload()
    merged.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)


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
