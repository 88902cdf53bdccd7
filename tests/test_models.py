"""Model directories: safetensors only, no remote code unless asked, clear errors for non-causal LMs."""

from __future__ import annotations

import json

import pytest

from molting.errors import ModelError
from molting.models import load_causal_lm, resolve_model_path


def test_demo_model_loads_with_plain_transformers(demo_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo_model)
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    assert model.config.model_type == "llama" and 3e6 < model.num_parameters() < 5e6
    assert tokenizer.decode(tokenizer("Q: What is 12 + 34?")["input_ids"]) == "Q: What is 12 + 34?"


def test_not_a_directory():
    with pytest.raises(ModelError, match="'no/such/dir' is not a local directory"):
        resolve_model_path("no/such/dir")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        load_causal_lm(tmp_path)


def test_a_sequence_classifier_is_not_a_causal_lm(tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
               architectures=["BertForSequenceClassification"]).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=r"is not a causal language model \(model_type 'bert'"):
        load_causal_lm(tmp_path)


def test_pickle_weights_are_refused(demo_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_model)
    import torch

    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError, match="has no .safetensors weights; molting loads weights as safetensors only"):
        load_causal_lm(tmp_path)


def test_remote_code_does_not_run_without_the_flag(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    )
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "evil",
        "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"},
    }))
    with pytest.raises(ModelError, match="cannot read the model config"):
        load_causal_lm(tmp_path, trust_remote_code=False)
    assert not marker.exists()
